"""Oracle engine on 🤗 transformers: any local causal LM, NF4 4-bit through bitsandbytes by default."""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager
from pathlib import Path

import torch

from ..fingerprint import weights_fingerprint
from . import Conversation, Generation, GenerationSettings, finished, resolve_quantization
from .decoding import transformers_processors

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8", "none")


@contextmanager
def outside_zero3_init():
    """Load a model whole even while a ZeRO-3 run is active.

    transformers partitions every ``from_pretrained`` under ``deepspeed.zero.Init`` while an ``HfDeepSpeedConfig``
    with stage 3 is alive. The oracle must not be partitioned: each rank generates on its own, out of lockstep.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def identity_for(model_path: str, quantization: str = "auto", device: str | None = None, **_: object) -> str:
    """The cache identity of an oracle, computed without loading it (so cache hits never load a model)."""
    quantization, _ = resolve_quantization("transformers", quantization, device)
    return f"transformers:{weights_fingerprint(Path(model_path))}:{quantization}"


class TransformersOracle:
    """Generates whole batches with ``model.generate`` (left padding, greedy by default).

    Args:
        model_path: Local folder of a causal LM with a chat template. Nothing is fetched from a hub.
        quantization: ``"nf4"`` (bitsandbytes 4-bit; works on CPU and CUDA), ``"int8"``, ``"none"`` or ``"auto"``
            (default: NF4 on CUDA, none on CPU; see :func:`~reflect_trainer.oracles.resolve_quantization`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: CUDA when available.
        batch_size: Most conversations per ``generate`` call; a larger request is split.
    """

    def __init__(self, model_path: str, quantization: str = "auto", device: str | None = None, batch_size: int = 16,
                 **_: object):
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        quantization, _ = resolve_quantization("transformers", quantization, device)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        path = Path(model_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"oracle model folder {path} has no config.json; pass a local model folder "
                "(run `reflect-trainer fetch` for the embedded default)"
            )
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        on_cuda = self.device.startswith("cuda")
        kwargs: dict = {}
        if quantization == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.bfloat16 if on_cuda else torch.float32,
            )
        elif quantization == "int8":
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            kwargs["dtype"] = torch.bfloat16 if on_cuda else torch.float32
        with outside_zero3_init():
            self.model = AutoModelForCausalLM.from_pretrained(path, device_map={"": self.device}, **kwargs)
        self.model.eval()
        self.identity = identity_for(model_path, quantization, self.device)
        self.tokens_generated = 0

    def _prompt_text(self, conversation: Conversation) -> str:
        if conversation and conversation[-1]["role"] == "assistant":
            head = self.tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
            return head + conversation[-1]["content"]
        return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    @torch.inference_mode()
    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]:
        prompts = [self._prompt_text(c) for c in conversations]
        # Sort by length so each sub-batch pads little; restore the order at the end.
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out: list[Generation] = [Generation("")] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            for i, text in zip(idx, self._generate_batch([prompts[i] for i in idx], settings)):
                out[i] = text
        return out

    def _generate_batch(self, prompts: list[str], settings: GenerationSettings) -> list[Generation]:
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        # synced_gpus=False: generate() would otherwise turn it on whenever ZeRO-3 is active and keep every rank
        # stepping until all finish. The oracle is whole on each rank, and ranks call it out of step (different
        # cache hits, different numbers of accepted rows): synced, they would hang in each other's collectives.
        kwargs = dict(max_new_tokens=settings.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
                      synced_gpus=False, **self._generate_kwargs())
        if settings.temperature > 0:
            torch.manual_seed(settings.seed)
            kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if settings.stop:
            kwargs.update(stop_strings=list(settings.stop), tokenizer=self.tokenizer)
        configured = self.model.generation_config.eos_token_id
        # The id generate() stops on comes first: a structured-output processor forces it to end a sequence.
        eos_list = [*(configured if isinstance(configured, list) else [configured]), self.tokenizer.eos_token_id,
                    self.tokenizer.pad_token_id]
        eos_list = [t for t in eos_list if t is not None]
        processor = None
        # Before the section processor, so a marker it forces is never banned after it.
        processors = transformers_processors(enc["input_ids"].shape[1], settings.repetition_penalty,
                                             settings.no_repeat_ngram_size)
        if settings.section_format is not None:
            from .section_processor import SectionFormatProcessor

            processor = SectionFormatProcessor(
                settings.section_format, self.tokenizer, enc["input_ids"].shape[1], settings.max_new_tokens, eos_list)
            processors.append(processor)
        if processors:
            from transformers import LogitsProcessorList

            kwargs["logits_processor"] = LogitsProcessorList(processors)
        generated = self.model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
        eos_ids = set(eos_list)
        outputs = []
        for k, row in enumerate(generated.tolist()):
            # A sequence that stopped (end-of-sequence or a stop string) is padded with pad/eos ids afterwards; one
            # that ran to max_new_tokens has none. A section the structured-output processor closed because its
            # budget ran out was cut too, though the sequence then ends on eos.
            n = next((j for j, t in enumerate(row) if t in eos_ids), len(row))
            self.tokens_generated += n
            hit_budget = n >= settings.max_new_tokens or (processor is not None and k in processor.cut_rows)
            outputs.append(finished(self.tokenizer.decode(row[:n], skip_special_tokens=True), settings.stop,
                                    hit_budget))
        return outputs

    def _generate_kwargs(self) -> dict:
        return {}

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
