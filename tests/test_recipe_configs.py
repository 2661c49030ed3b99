"""Configs and guards checked without a model run: the GPU recipes' YAMLs through the parser the recipe uses, the
DeepSpeed config through DeepSpeed's own validation, the CPU size guard, ReflectionConfig's checks, the CLI."""

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from reflect_trainer import ReflectionConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("llama7b_recycled_recipe", ROOT / "recipes" / "llama7b_recycled.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, zero_config, oracle_quantization", [
    ("llama7b_recycled.yaml", "ds_configs/zero3.json", None),
    ("llama7b_qlora.yaml", None, "nf4"),
])
def test_gpu_recipe_yaml_parses_through_trl_parser_into_every_dataclass(recipe, name, zero_config, oracle_quantization):
    """Every key of the YAML must be a field of RecipeArguments, SFTConfig, ReflectionConfig or ModelConfig (TrlParser
    rejects unknown keys). --use_cpu only lets SFTConfig's bf16 check pass on this GPU-less machine."""
    from trl import ModelConfig, SFTConfig, TrlParser

    parser = TrlParser((recipe.RecipeArguments, SFTConfig, ReflectionConfig, ModelConfig))
    args, sft, reflection, model = parser.parse_args_and_config(
        ["--config", str(ROOT / "recipes" / name), "--use_cpu", "true"])
    assert args.requires_gpu and sft.bf16 and sft.deepspeed == zero_config
    assert reflection.oracle_model_path and reflection.template_set == "paper"
    if oracle_quantization:
        assert model.load_in_4bit and model.use_peft and reflection.oracle_quantization == oracle_quantization


def test_yaml_with_a_misspelt_key_is_refused_by_the_same_parser(recipe, tmp_path):
    from trl import ModelConfig, SFTConfig, TrlParser

    config = tmp_path / "typo.yaml"
    config.write_text((ROOT / "recipes" / "cpu_smollm2.yaml").read_text() + "bufer_batches: 4\n")
    with pytest.raises(ValueError, match="bufer_batches"):
        TrlParser((recipe.RecipeArguments, SFTConfig, ReflectionConfig, ModelConfig)).parse_args_and_config(
            ["--config", str(config)])


def test_zero3_offload_json_is_accepted_by_deepspeed_once_transformers_fills_auto(tmp_path):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(ROOT / "ds_configs" / "zero3_offload.json"),
                             use_cpu=True)
    hf_config = args.hf_deepspeed_config
    hf_config.trainer_config_finalize(args, types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=4096)),
                                      1000)
    validated = DeepSpeedConfig(hf_config.config)  # DeepSpeed's own (pydantic) validation
    assert validated.zero_config.stage == 3
    assert validated.zero_config.offload_optimizer.device == "cpu"
    assert validated.zero_config.offload_param.device == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the guard only applies without a GPU")
def test_student_over_1_5b_parameters_is_refused_on_cpu_before_loading(recipe, tmp_path, oracle_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=4096, num_hidden_layers=32, vocab_size=32000).save_pretrained(tmp_path)  # config only
    with pytest.raises(SystemExit, match=r"about 6\.7B parameters"):
        recipe.check_hardware(recipe.RecipeArguments(), str(tmp_path))
    recipe.check_hardware(recipe.RecipeArguments(), oracle_path)  # 135M: allowed


@pytest.mark.parametrize("field, value, message", [
    ("mode", "all", "mode must be one of"),
    ("template_set", "tiny", "template_set must be"),
    ("buffer_batches", 0, "buffer_batches must be >= 1"),
    ("overlap", "yes", "overlap must be one of"),
    ("oracle_gpu_memory_utilization", 1.0, r"oracle_gpu_memory_utilization must be in \(0, 1\)"),
    ("oracle_sleep_level", 3, "oracle_sleep_level must be 0, 1 or 2"),
    ("claim_lease_seconds", 0, "claim_lease_seconds must be > 0"),
    ("length_budget_ratio", -1.0, "length_budget_ratio, min_length_ratio and loop_ngram must be >= 0"),
    ("on_bad_row", "ignore", "on_bad_row must be 'error' or 'skip'"),
])
def test_reflection_config_refuses_an_invalid_value_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        ReflectionConfig(**{field: value})


def test_cli_recycle_exits_2_on_a_bad_row_naming_it_before_any_oracle_work(tmp_path, caplog):
    from reflect_trainer.cli import main

    data = tmp_path / "bad.jsonl"
    rows = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
            {"instruction": "Name a fruit.", "input": "", "output": ""}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    # An oracle path that does not exist: loading it would fail differently, so exit 2 means validation came first.
    code = main(["recycle", str(data), "--out", str(out), "--oracle", str(tmp_path / "no-oracle")])
    assert code == 2
    assert "row 1" in caplog.text and "output" in caplog.text and "empty" in caplog.text
    assert not out.exists()


def test_cli_fetch_prints_the_local_oracle_and_data_it_resolved(capsys, oracle_path):
    from reflect_trainer.cli import main

    assert main(["fetch"]) == 0
    lines = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    assert lines["oracle"].strip() == oracle_path and (Path(oracle_path) / "config.json").exists()
    assert Path(lines["data"].strip()).exists()
