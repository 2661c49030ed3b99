"""Reflection-Tuning recipe: train a student on data recycled by an oracle during epoch 1.

    accelerate launch recipes/llama7b_recycled.py --config recipes/llama7b_recycled.yaml     # paper setup, ZeRO-3
    accelerate launch recipes/llama7b_recycled.py --config recipes/llama7b_qlora.yaml        # one 24 GB GPU
    accelerate launch --cpu recipes/llama7b_recycled.py --config recipes/cpu_smollm2.yaml    # embedded default, CPU

Any field of RecipeArguments, TRL's ScriptArguments, SFTConfig, ReflectionConfig, ModelConfig or DatasetMixtureConfig
can be given in the YAML or on the command line (the command line wins). The data and the model are loaded as TRL's
own `trl/scripts/sft.py` loads them, so a TRL sft.py YAML plus one `oracle_model_path:` line runs unchanged
(`packing: true` excepted: lazy recycling cannot pack, and the recipe says why in its first seconds).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig
from trl import (DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser, get_dataset,
                 get_peft_config, get_quantization_config)

from reflect_trainer import InputError, ReflectionConfig, load_data, save_recycled
from reflect_trainer.preflight import check_oracle, check_packing
from reflect_trainer.trainer import ReflectionSFTTrainer

logger = logging.getLogger("recipe")
EMBEDDED = "embedded:smollm2"


@dataclass
class RecipeArguments:
    """Data and hardware guards of the recipe."""

    dataset_path: str = field(
        default="alpaca-eval",
        metadata={"help": "JSON/JSONL/Parquet file or datasets folder; 'alpaca-eval' is the embedded real data. "
                          "Used only when neither TRL's dataset_name nor datasets is given."},
    )
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N rows (of each split)."})
    dataset_max_answer_words: int | None = field(
        default=None, metadata={"help": "alpaca-eval only: keep pairs whose answer has at most N words."})
    recycled_out: str | None = field(
        default=None, metadata={"help": "Save the recycled data set that was trained on (.jsonl or .parquet)."}
    )
    requires_gpu: bool = field(default=False, metadata={"help": "Fail at once when no CUDA GPU is present."})
    stats_file: str | None = field(
        default=None, metadata={"help": "Write each rank's recycling counters here (JSON); '{rank}' is replaced."}
    )


def estimated_parameters(config) -> float:
    """Decoder-only estimate: 12·L·h² for the blocks plus the embeddings (enough to tell 135M from 7B)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    return 12 * layers * h * h + 2 * vocab * h


def parser() -> TrlParser:
    """TRL's sft.py parser (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig) plus ours."""
    return TrlParser((RecipeArguments, ScriptArguments, SFTConfig, ReflectionConfig, ModelConfig,
                      DatasetMixtureConfig))


def load_splits(recipe: RecipeArguments, script: ScriptArguments, mixture: DatasetMixtureConfig):
    """The data as TRL's sft.py loads it: a `datasets:` mixture through trl.get_dataset, else `dataset_name` through
    datasets.load_dataset (a hub id, or a local json/jsonl/parquet/csv file or data folder); else our
    `dataset_path`. Returns a dict of splits. A folder written by `save_to_disk` is read with load_from_disk, since
    load_dataset cannot read one."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if mixture.datasets:
        if script.dataset_name:
            logger.warning("Both `datasets` and `dataset_name` are given; `datasets` is used, as TRL's sft.py does.")
        return get_dataset(mixture)
    name = script.dataset_name
    if name:
        local = Path(name)
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "dataset_info.json").exists()):
            data = load_from_disk(str(local))
            data = data if isinstance(data, DatasetDict) else DatasetDict({script.dataset_train_split: data})
            if script.dataset_streaming:
                return {split: rows.to_iterable_dataset() for split, rows in data.items()}
            return data
        if local.is_file():
            suffix = local.suffix.lstrip(".")
            builder = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}.get(suffix)
            if builder is None:
                sys.exit(f"error: dataset_name {name!r} is a file of unknown type; use .json, .jsonl, .parquet or .csv")
            return load_dataset(builder, data_files=str(local), streaming=script.dataset_streaming)
        return load_dataset(name, name=script.dataset_config, streaming=script.dataset_streaming)
    return {script.dataset_train_split: load_data(recipe.dataset_path, None, recipe.dataset_max_answer_words)}


def first_rows(data, limit: int | None):
    if limit is None:
        return data
    return data.take(limit) if not hasattr(data, "select") else data.select(range(min(limit, len(data))))


def resolve_model_path(name: str) -> str:
    if name == EMBEDDED:
        from reflect_trainer.embedded import default_oracle_path

        return str(default_oracle_path())
    return name


GPU_MESSAGE = (
    "error: this config needs a CUDA GPU (a 7B-class student in bf16 with DeepSpeed ZeRO or QLoRA), and none is "
    "visible. On a CPU machine run the same recipe on the embedded default: "
    "accelerate launch --cpu recipes/llama7b_recycled.py --config recipes/cpu_smollm2.yaml"
)


def require_gpu_early(argv: list[str]) -> None:
    """Before SFTConfig is even built (its bf16/DeepSpeed checks would fail less clearly on CPU)."""
    if torch.cuda.is_available():
        return
    wants_gpu = "--requires_gpu" in argv and argv[argv.index("--requires_gpu") + 1 :][:1] != ["false"]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        config = yaml.safe_load(Path(argv[argv.index("--config") + 1]).read_text()) or {}
        wants_gpu = wants_gpu or bool(config.get("requires_gpu"))
    if wants_gpu:
        sys.exit(GPU_MESSAGE)


def check_hardware(recipe: RecipeArguments, model_path: str, revision: str | None = None) -> None:
    """Fail in seconds, not hours in, when the config cannot run on this machine."""
    if torch.cuda.is_available():
        return
    if recipe.requires_gpu:
        sys.exit(GPU_MESSAGE)
    try:
        params = estimated_parameters(AutoConfig.from_pretrained(model_path, revision=revision))
    except OSError as err:
        sys.exit(f"error: cannot read the student's config at {model_path!r} ({err}); pass a local model folder, "
                 "or a hub id (with model_revision) that is in the local cache or reachable")
    if params > 1.5e9:
        sys.exit(
            f"error: the student at {model_path!r} has about {params / 1e9:.1f}B parameters; training it on CPU "
            "would take days. Use a GPU, or a student under 1.5B parameters."
        )


def main() -> None:
    require_gpu_early(sys.argv[1:])
    recipe, script, sft_config, reflection_config, model_config, mixture = parser().parse_args_and_config()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_path = resolve_model_path(model_config.model_name_or_path or EMBEDDED)
    check_hardware(recipe, model_path, model_config.model_revision)
    try:  # in the first seconds, before the data, the student or DeepSpeed is loaded (the trainer checks again)
        check_packing(sft_config)
        check_oracle(reflection_config)
    except InputError as err:
        sys.exit(f"error: {err}")

    splits = load_splits(recipe, script, mixture)
    train_split = script.dataset_train_split
    if train_split not in splits:
        sys.exit(f"error: the data set has no split {train_split!r} (dataset_train_split); it has {list(splits)}")
    data = first_rows(splits[train_split], recipe.dataset_limit)
    eval_data = None
    if sft_config.eval_strategy != "no":  # as sft.py: the test split is evaluated only when an eval strategy is set
        if script.dataset_test_split not in splits:
            sys.exit(f"error: eval_strategy is {sft_config.eval_strategy!r} but the data set has no split "
                     f"{script.dataset_test_split!r} (dataset_test_split); it has {list(splits)}")
        eval_data = first_rows(splits[script.dataset_test_split], recipe.dataset_limit)

    # As TRL's own sft script does, the trainer loads the student. The distributed state must exist first: ZeRO-3
    # partitions the student under zero.Init, which reads the world size from it.
    sft_config.distributed_state.wait_for_everyone()
    if sft_config.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # wraps the process group above, so zero.Init sees every rank
    sft_config.model_init_kwargs = {  # as sft.py
        "revision": model_config.model_revision,
        "trust_remote_code": sft_config.trust_remote_code,
        "dtype": model_config.dtype,
        "attn_implementation": model_config.attn_implementation,
        **(sft_config.model_init_kwargs or {}),
    }
    trainer = ReflectionSFTTrainer(
        model=model_path,
        args=sft_config,
        train_dataset=data,
        eval_dataset=eval_data,
        quantization_config=get_quantization_config(model_config),
        peft_config=get_peft_config(model_config),
        reflection_config=reflection_config,
    )
    resume = sft_config.resume_from_checkpoint
    if isinstance(resume, str) and resume.lower() in ("true", "last", "latest"):
        resume = True  # the newest checkpoint in output_dir
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(sft_config.output_dir)
    if recipe.recycled_out:
        recycled = trainer.recycled_dataset()  # every rank takes part (rows of other ranks come from the cache)
        if trainer.accelerator.is_main_process:
            save_recycled(recycled, recipe.recycled_out)
    if recipe.stats_file:
        rank = trainer.accelerator.process_index
        stats = {**trainer.recycling_stats(), "rank": rank, "global_step": trainer.state.global_step,
                 "oracle_loaded_at_end": trainer.recycler.oracle_loaded,
                 "deepspeed_zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
                 if trainer.is_deepspeed_enabled else None}
        path = Path(recipe.stats_file.replace("{rank}", str(rank)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(stats, indent=2))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo ranks can abort at exit without it


if __name__ == "__main__":
    main()
