"""Students for tests and harnesses of the trainer: a tiny one whose steps take milliseconds, and the ``SFTConfig``
the trainer tests train with."""

from __future__ import annotations

from pathlib import Path


def tiny_student(path: str | Path) -> Path:
    """Save a 1.6M-parameter Llama with the embedded oracle's tokenizer and chat template (random weights, seed 0) to
    ``path``: a student for tests and fault harnesses of the trainer's bookkeeping, whose steps and checkpoints take
    milliseconds (what they check is the oracle's work and what is trained on, not what the student learns)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from reflect_trainer.embedded import default_oracle_path

    source = default_oracle_path()
    config = LlamaConfig.from_pretrained(source)
    config.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=16))
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(source).save_pretrained(path)
    return Path(path)


def sft_config(tmp_path: Path, **overrides):
    """The trainer tests' ``SFTConfig``: CPU, fp32, 2 epochs of batch 2, a log line per step, no checkpoints."""
    from trl import SFTConfig

    base = dict(output_dir=str(tmp_path / "out"), num_train_epochs=2, per_device_train_batch_size=2, max_length=128,
                learning_rate=1e-4, logging_steps=1, save_strategy="no", report_to="none", bf16=False,
                gradient_checkpointing=False, use_cpu=True, seed=0)
    return SFTConfig(**{**base, **overrides})


class UntouchableStudent:
    """A student whose every use fails: an error raised with it in hand (a bad input, a machine that cannot run the
    oracle) came before the student was prepared."""

    def __getattr__(self, name):
        raise AssertionError(f"the student was used ({name}) before the checks that must come first")
