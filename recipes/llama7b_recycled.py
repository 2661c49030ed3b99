"""Reflection-Tuning recipe: train a student on data recycled by an oracle during epoch 1.

    accelerate launch recipes/llama7b_recycled.py --config recipes/llama7b_recycled.yaml     # paper setup, ZeRO-3
    accelerate launch recipes/llama7b_recycled.py --config recipes/llama7b_qlora.yaml        # one 24 GB GPU
    accelerate launch --cpu recipes/llama7b_recycled.py --config recipes/cpu_smollm2.yaml    # embedded default, CPU

Any field of RecipeArguments, SFTConfig, ReflectionConfig or ModelConfig can be given in the YAML or on the command
line (the command line wins).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig
from trl import ModelConfig, SFTConfig, TrlParser, get_peft_config, get_quantization_config

from reflect_trainer import ReflectionConfig, load_data, save_recycled
from reflect_trainer.trainer import ReflectionSFTTrainer

logger = logging.getLogger("recipe")
EMBEDDED = "embedded:smollm2"


@dataclass
class RecipeArguments:
    """Data and hardware guards of the recipe."""

    dataset_path: str = field(
        default="alpaca-eval",
        metadata={"help": "JSON/JSONL/Parquet file or datasets folder; 'alpaca-eval' is the embedded real data."},
    )
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N rows."})
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


def check_hardware(recipe: RecipeArguments, model_path: str) -> None:
    """Fail in seconds, not hours in, when the config cannot run on this machine."""
    if torch.cuda.is_available():
        return
    if recipe.requires_gpu:
        sys.exit(GPU_MESSAGE)
    try:
        params = estimated_parameters(AutoConfig.from_pretrained(model_path))
    except OSError as err:
        sys.exit(f"error: cannot read the student's config at {model_path!r} ({err}); pass a local model folder")
    if params > 1.5e9:
        sys.exit(
            f"error: the student at {model_path!r} has about {params / 1e9:.1f}B parameters; training it on CPU "
            "would take days. Use a GPU, or a student under 1.5B parameters."
        )


def main() -> None:
    require_gpu_early(sys.argv[1:])
    parser = TrlParser((RecipeArguments, SFTConfig, ReflectionConfig, ModelConfig))
    recipe, sft_config, reflection_config, model_config = parser.parse_args_and_config()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    model_path = resolve_model_path(model_config.model_name_or_path or EMBEDDED)
    check_hardware(recipe, model_path)

    data = load_data(recipe.dataset_path, recipe.dataset_limit, recipe.dataset_max_answer_words)

    # As TRL's own sft script does, the trainer loads the student. The distributed state must exist first: ZeRO-3
    # partitions the student under zero.Init, which reads the world size from it.
    sft_config.distributed_state.wait_for_everyone()
    if sft_config.deepspeed:
        import deepspeed

        deepspeed.init_distributed()  # wraps the process group above, so zero.Init sees every rank
    sft_config.model_init_kwargs = {
        "dtype": model_config.dtype,
        "attn_implementation": model_config.attn_implementation,
        **(sft_config.model_init_kwargs or {}),
    }
    trainer = ReflectionSFTTrainer(
        model=model_path,
        args=sft_config,
        train_dataset=data,
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
