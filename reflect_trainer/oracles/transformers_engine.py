"""Oracle engine on 🤗 transformers: any local causal LM, NF4 4-bit through bitsandbytes by default."""

from __future__ import annotations

import gc
import inspect
import logging
from pathlib import Path

import torch

from ..fingerprint import weights_fingerprint
from . import Conversation, Generation, GenerationSettings, finished, resolve_quantization
from .decoding import transformers_processors

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("nf4", "int8", "none")
# Padded prompt tokens + new tokens per sub-batch: the KV memory it may take (SmolLM2-135M fp32 ~46 kB/token: 0.75 GB).
# As much as the padded path used for 16 prompts of ~1000 tokens, so no call needs more memory than before; prefill
# no longer pays for padding, so larger sub-batches only cost attention over pad cells and save decoding steps.
DEFAULT_BATCH_TOKENS = 16384
MIN_PREFIX_TOKENS = 8  # a shared prefix shorter than this is not worth a cache entry
PREFIX_CACHE_ENTRIES = 4  # prefixes kept per engine (one per template step in use)


def shared_prefix_length(rows: list[list[int]]) -> int:
    """Token ids every row starts with, leaving each row at least one of its own (its first logits come from it).

    Taken on the token ids of the whole prompts, so the prefix ends on a token boundary of every row's own
    tokenization: no re-tokenization of a split text, no boundary merge to repair."""
    shortest = min(len(r) for r in rows) - 1
    n = 0
    while n < shortest and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def length_batches(lengths: list[int], max_new_tokens: int, batch_tokens: int, batch_size: int) -> list[list[int]]:
    """Row indices sorted by length, cut into sub-batches of at most ``batch_size`` rows whose rows times (longest
    row + ``max_new_tokens``) fits ``batch_tokens``; a row over the budget goes alone. ``batch_tokens <= 0``: cut by
    ``batch_size`` only."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if batch_tokens <= 0:
        return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    batches: list[list[int]] = [[]]
    for i in order:  # ascending: the row added is the longest so far
        cost = (len(batches[-1]) + 1) * (lengths[i] + max_new_tokens)
        if batches[-1] and (cost > batch_tokens or len(batches[-1]) >= batch_size):
            batches.append([])
        batches[-1].append(i)
    return batches


def identity_for(model_path: str, quantization: str = "auto", device: str | None = None, revision: str | None = None,
                 **_: object) -> str:
    """The cache identity of an oracle, computed without loading it (so cache hits never load a model): a local
    folder's weights hash, a hub id's ``repo@commit`` (see :mod:`reflect_trainer.hub`)."""
    from ..hub import hub_model

    quantization, _ = resolve_quantization("transformers", quantization, device)
    model = hub_model(model_path, revision)
    weights = model.identity if model is not None else weights_fingerprint(Path(model_path))
    return f"transformers:{weights}:{quantization}"


def prompt_text(tokenizer, conversation: Conversation, template_kwargs: dict | None = None) -> str:
    """The chat-template rendering every local engine uses (transformers, vLLM): a final assistant message is a
    pre-fill, appended after the generation prompt and continued. ``template_kwargs``: the settings'
    ``chat_template_kwargs``, e.g. ``enable_thinking=False`` for a reasoning oracle."""
    extra = template_kwargs or {}
    if conversation and conversation[-1]["role"] == "assistant":
        head = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True, **extra)
        return head + conversation[-1]["content"]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True, **extra)


class TransformersOracle:
    """Generates whole batches with ``model.generate`` (left padding, greedy by default).

    Args:
        model_path: Local folder of a causal LM with a chat template, or a Hugging Face hub id (``org/name``; a path
            that exists locally is always a folder), resolved to a pinned commit (see :mod:`reflect_trainer.hub`).
        revision: With a hub id: branch, tag or commit (default: the default branch).
        quantization: ``"nf4"`` (bitsandbytes 4-bit; works on CPU and CUDA), ``"int8"``, ``"none"`` or ``"auto"``
            (default: NF4 on CUDA, none on CPU; see :func:`~reflect_trainer.oracles.resolve_quantization`).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; default: CUDA when available.
        batch_size: Most conversations per ``generate`` call; a larger request is split.
        batch_tokens: Length batching: the prompts of one call are sorted by length and split into sub-batches whose
            padded prompt tokens plus new tokens stay under this budget; each prompt is prefilled on its own (no
            padding computed) and a sub-batch then decodes together. ``0``: the old way, one batch of up to
            ``batch_size`` prompts padded to the longest (prefill pays for every pad token).
        prefix_cache: Compute the KV cache of the token prefix all prompts of a call share (chat header, system turn,
            a template's fixed opening) once per engine and prefill only what follows it. Greedy output is the same.
    """

    def __init__(self, model_path: str, quantization: str = "auto", device: str | None = None, batch_size: int = 16,
                 batch_tokens: int = DEFAULT_BATCH_TOKENS, prefix_cache: bool = True, revision: str | None = None,
                 **_: object):
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        from ..hub import local_folder

        quantization, _ = resolve_quantization("transformers", quantization, device)
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
        path = local_folder(model_path, revision)  # a hub id: its pinned commit's snapshot folder
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
        from ..trl_bridge import outside_zero3_init

        with outside_zero3_init():
            self.model = AutoModelForCausalLM.from_pretrained(path, device_map={"": self.device}, **kwargs)
        self.model.eval()
        self.identity = identity_for(model_path, quantization, self.device, revision)  # (the commit is remembered)
        self.tokens_generated = 0
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        # Per-row prefill assembles a batch cache by hand: only for plain full-attention caches (no sliding window,
        # no recurrent state), which is what most causal LMs use; other models keep the padded path.
        packable = all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers)
        self.batch_tokens = batch_tokens if packable else 0
        self.prefix_cache = prefix_cache and packable
        self._prefixes: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        #: Prompt tokens computed (prefill, pads included), and those a cached prefix saved: what the benchmarks report.
        self.prefill_tokens = 0
        self.prefix_tokens_reused = 0

    def _prompt_text(self, conversation: Conversation, template_kwargs: dict | None = None) -> str:
        return prompt_text(self.tokenizer, conversation, template_kwargs)

    @torch.inference_mode()
    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]:
        texts = [self._prompt_text(c, settings.chat_template_kwargs) for c in conversations]
        rows = [self.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
        out: list[Generation] = [Generation("")] * len(rows)
        if not rows:
            return out
        # The prefix rides on per-row prefill: the padded path (batch_tokens=0) computes every prompt whole.
        prefix = self._prefix(rows) if self.prefix_cache and self.batch_tokens > 0 else ()
        for idx in length_batches([len(r) for r in rows], settings.max_new_tokens, self.batch_tokens,
                                  self.batch_size):
            for i, text in zip(idx, self._generate_batch([rows[i] for i in idx], prefix, settings)):
                out[i] = text
        return out

    def _prefix(self, rows: list[list[int]]) -> tuple[int, ...]:
        """The longest cached prefix all rows start with; with several rows and none cached, their shared prefix
        (computed and cached now). One row alone never starts a cache entry: its "shared" prefix is itself."""
        known = [p for p in self._prefixes if all(len(r) > len(p) and tuple(r[:len(p)]) == p for r in rows)]
        if known:
            return max(known, key=len)
        if len(rows) < 2:
            return ()
        prefix = tuple(rows[0][:shared_prefix_length(rows)])
        if len(prefix) < MIN_PREFIX_TOKENS:
            return ()
        if len(self._prefixes) >= PREFIX_CACHE_ENTRIES:
            self._prefixes.pop(next(iter(self._prefixes)))  # the oldest
        out = self.model(input_ids=torch.tensor([prefix], device=self.device), use_cache=True, logits_to_keep=1)
        cache = getattr(out, self._cache_name)
        self.prefill_tokens += len(prefix)
        self._prefixes[prefix] = [(layer.keys, layer.values) for layer in cache.layers]
        return prefix

    @property
    def _cache_name(self) -> str:
        """The KV cache's argument and output name: transformers 5.25 renamed ``past_key_values`` to ``cache`` (the
        old name warns, and goes in 5.40); 5.23 knows only the old one. Both are in the declared range."""
        params = inspect.signature(self.model.forward).parameters
        return "cache" if "cache" in params else "past_key_values"

    def _packed_cache(self, rows: list[list[int]], prefix: tuple[int, ...]):
        """The batch's KV cache for every row but its last token, right-aligned (left padding), each row prefilled
        on its own after the shared prefix: no pad token is computed. generate() then feeds the last column."""
        from transformers import DynamicCache

        width = max(len(r) for r in rows) - 1
        if width == 0:
            return None
        kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        for b, row in sorted(enumerate(rows), key=lambda x: -len(x[1])):  # longest first: it sizes the tensors
            known = self._prefixes[prefix] if prefix else []
            cache = DynamicCache(ddp_cache_data=known or None)
            rest = row[len(prefix):-1]
            if rest:
                self.model(input_ids=torch.tensor([rest], device=self.device), use_cache=True, logits_to_keep=1,
                           **{self._cache_name: cache})
                self.prefill_tokens += len(rest)
            self.prefix_tokens_reused += len(prefix)
            n = len(row) - 1
            if n == 0:
                continue
            if kv is None:
                kv = [(k.new_zeros((len(rows), *k.shape[1:2], width, k.shape[3])),
                       v.new_zeros((len(rows), *v.shape[1:2], width, v.shape[3])))
                      for k, v in ((layer.keys, layer.values) for layer in cache.layers)]
            for (k_all, v_all), layer in zip(kv, cache.layers):
                k_all[b, :, width - n:] = layer.keys[0]
                v_all[b, :, width - n:] = layer.values[0]
        return DynamicCache(ddp_cache_data=kv)

    def _generate_batch(self, rows: list[list[int]], prefix: tuple[int, ...], settings: GenerationSettings
                        ) -> list[Generation]:
        enc = self.tokenizer.pad({"input_ids": rows}, return_tensors="pt").to(self.device)  # left padding
        if self.batch_tokens > 0:
            enc[self._cache_name] = self._packed_cache(rows, prefix)
        else:
            self.prefill_tokens += enc["input_ids"].numel()
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
