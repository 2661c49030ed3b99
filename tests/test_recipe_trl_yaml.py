"""The recipe speaks TRL's sft.py: a YAML written for `trl/scripts/sft.py` (dataset_name, dataset_train_split,
dataset_test_split, eval_strategy, `datasets:` mixtures) plus one oracle line runs through
recipes/llama7b_recycled.py, on the embedded default, on real AlpacaEval pairs saved as local data."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trl import DatasetMixtureConfig, ScriptArguments

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "llama7b_recycled.py"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


def alpaca_messages(limit: int, offset: int = 0):
    """Real AlpacaEval pairs in TRL's conversational `messages` form."""
    from reflect_trainer.embedded import load_alpaca_eval

    rows = load_alpaca_eval(limit=limit + offset, max_answer_words=30).select(range(offset, offset + limit))
    return [{"messages": [{"role": "user", "content": r["instruction"]},
                          {"role": "assistant", "content": r["output"]}]} for r in rows]


def trl_yaml(tmp_path: Path, data_lines: str, extra: str = "") -> Path:
    """An sft.py-style YAML (TRL's keys only) plus the one oracle line; tiny sizes so it runs in about a minute."""
    config = tmp_path / "sft.yaml"
    config.write_text(f"""\
model_name_or_path: embedded:smollm2
{data_lines}
dtype: float32
learning_rate: 2.0e-5
max_steps: 2
per_device_train_batch_size: 2
per_device_eval_batch_size: 2
max_length: 128
eval_strategy: steps
eval_steps: 1
logging_steps: 1
save_strategy: "no"
report_to: none
use_cpu: true
output_dir: {tmp_path / "out"}
# the one line that is ours (plus small generation settings for a 2-core CPU)
oracle_model_path: embedded:smollm2
max_new_tokens: 32
cache_dir: {tmp_path / "cache"}
{extra}""")
    return config


def run_recipe(config: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), "--config", str(config)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def eval_losses(output_dir: Path) -> list[float]:
    """The eval losses the Trainer logged, from the log history of a checkpoint's trainer_state.json."""
    state = output_dir / "trainer_state.json"
    if state.exists():
        return [e["eval_loss"] for e in json.loads(state.read_text())["log_history"] if "eval_loss" in e]
    return []


@pytest.mark.slow
def test_trl_sft_yaml_with_a_local_saved_dataset_trains_and_evaluates_its_test_split(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "alpaca_eval_messages"
    DatasetDict({"train": Dataset.from_list(alpaca_messages(4)),
                 "test": Dataset.from_list(alpaca_messages(2, offset=4))}).save_to_disk(str(folder))
    config = trl_yaml(tmp_path, f"dataset_name: {folder}\ndataset_train_split: train\ndataset_test_split: test",
                      extra="save_strategy: steps\nsave_steps: 2\n")
    result = run_recipe(config)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoint = tmp_path / "out" / "checkpoint-2"
    losses = eval_losses(checkpoint)
    assert len(losses) == 2 and all(loss > 0 for loss in losses), result.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_packing_true_in_a_trl_yaml_is_refused_with_its_reason_before_the_student_loads(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "data"
    DatasetDict({"train": Dataset.from_list(alpaca_messages(2))}).save_to_disk(str(folder))
    config = trl_yaml(tmp_path, f"dataset_name: {folder}", extra="packing: true\neval_strategy: 'no'\n")
    config.write_text(config.read_text().replace("eval_strategy: steps\n", ""))
    start = time.monotonic()
    result = run_recipe(config, timeout=120)
    assert result.returncode != 0
    assert "packing=True cannot work with lazy recycling" in result.stderr
    assert "Loading weights" not in result.stderr and not (tmp_path / "out").exists()
    assert time.monotonic() - start < 60


@pytest.mark.slow
def test_trl_datasets_mixture_of_two_local_jsonl_files_trains(tmp_path):
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    first.write_text("".join(json.dumps(r) + "\n" for r in alpaca_messages(2)))
    second.write_text("".join(json.dumps(r) + "\n" for r in alpaca_messages(2, offset=2)))
    mixture = f"""\
datasets:
  - path: json
    data_files: {first}
  - path: json
    data_files: {second}
eval_strategy: 'no'"""
    config = trl_yaml(tmp_path, mixture)
    config.write_text(config.read_text().replace("eval_strategy: steps\n", ""))
    result = run_recipe(config)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "model.safetensors").exists()


def load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("llama7b_recycled_recipe_trl", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_datasets_mixture_of_two_local_files_yields_the_rows_of_both(tmp_path):
    from trl.scripts.utils import DatasetConfig

    recipe = load_recipe()
    first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows_a, rows_b = alpaca_messages(2), alpaca_messages(3, offset=2)
    first.write_text("".join(json.dumps(r) + "\n" for r in rows_a))
    second.write_text("".join(json.dumps(r) + "\n" for r in rows_b))
    mixture = DatasetMixtureConfig(datasets=[DatasetConfig(path="json", data_files=str(first)),
                                             DatasetConfig(path="json", data_files=str(second))])
    splits = recipe.load_splits(recipe.RecipeArguments(), ScriptArguments(), mixture)
    assert list(splits["train"]["messages"]) == [r["messages"] for r in rows_a + rows_b]


def test_dataset_name_may_be_a_local_jsonl_file_loaded_as_its_train_split(tmp_path):
    recipe = load_recipe()
    path = tmp_path / "pairs.jsonl"
    rows = alpaca_messages(3)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = recipe.load_splits(recipe.RecipeArguments(), ScriptArguments(dataset_name=str(path)),
                                DatasetMixtureConfig())
    assert list(splits["train"]["messages"]) == [r["messages"] for r in rows]


def test_without_dataset_name_the_recipe_keeps_its_dataset_path_default_alpaca_eval():
    recipe = load_recipe()
    splits = recipe.load_splits(recipe.RecipeArguments(dataset_max_answer_words=30), ScriptArguments(),
                                DatasetMixtureConfig())
    from reflect_trainer.embedded import load_alpaca_eval

    assert splits["train"]["instruction"] == load_alpaca_eval(max_answer_words=30)["instruction"]
