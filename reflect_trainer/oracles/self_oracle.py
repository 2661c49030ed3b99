"""``oracle_engine="self"``: the student's own frozen base weights, adapters disabled, are the oracle.

No second model sits in memory, which suits single-GPU QLoRA: the 4-bit base that LoRA trains on top of is the
very model that recycles the data. The trade-off against a separate oracle: the oracle is only as strong as the
student's base (Reflection-Tuning's gains come from a stronger oracle rewriting the data; self-recycling a 7B base
is closer to self-distillation), and recycling borrows the student's device, so it cannot overlap with training.

Only a PEFT student qualifies: with full fine-tuning the weights change every step, so "the oracle" would drift
during epoch 1 and its outputs could not be cached by identity.
"""

from __future__ import annotations

import copy

import torch

from . import Conversation, Generation, GenerationSettings
from .transformers_engine import TransformersOracle


def identity_for(model_path: str | None = None, **_: object) -> str:
    raise ValueError("oracle_engine='self' is built by ReflectionSFTTrainer from the student, not from a path")


class SelfOracle(TransformersOracle):
    """Generates with ``model`` under ``disable_adapter()``, in eval mode, with the KV cache on.

    Args:
        model: The student, a PEFT model (``disable_adapter`` gives back its frozen base).
        tokenizer: The student's tokenizer (copied: generation pads on the left, training does not).
        batch_size: Most conversations per ``generate`` call.
    """

    def __init__(self, model, tokenizer, batch_size: int = 16):
        if not hasattr(model, "disable_adapter"):
            raise ValueError(
                "oracle_engine='self' needs a PEFT student (LoRA/QLoRA: pass peft_config, or a PeftModel): its frozen "
                "base weights are the oracle. With full fine-tuning the weights change every step; use a separate "
                "oracle (oracle_engine='transformers') instead."
            )
        from ..selection import student_identity

        self.model = model
        self.batch_size = batch_size
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.identity = f"self:{student_identity(model)}"
        self.tokens_generated = 0
        # The padded path, no prefix cache: the student may be sharded (ZeRO-3) or checkpointed, and is called whole
        # through its PEFT wrapper; length batching's per-row prefill is left to the standalone engine.
        self.batch_tokens, self.prefix_cache, self._prefixes = 0, False, {}
        self.prefill_tokens = self.prefix_tokens_reused = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device  # wherever the Trainer put the student by now

    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.disable_adapter():
                return super().generate(conversations, settings)
        finally:
            self.model.train(was_training)

    def _generate_kwargs(self) -> dict:
        # Training configs often turn the KV cache off (gradient checkpointing); generation needs it.
        return {"use_cache": True}

    def close(self) -> None:
        pass  # the model is the student: nothing to free
