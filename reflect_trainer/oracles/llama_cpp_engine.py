"""Oracle engine on llama.cpp (through llama-cpp-python): GGUF models on CPU or GPU, batched, optionally
grammar-constrained.

llama-cpp-python's high-level ``Llama`` API generates one sequence at a time, so this engine drives the low-level
API itself: up to ``batch_size`` sequences share one context, each with its own sequence id and sampler chain, and
every ``llama_decode`` call advances all of them by one token (continuous batching: a finished sequence frees its
slot for the next prompt at once).

Chat-template variables (``chat_template_kwargs``, e.g. Qwen3's ``enable_thinking``) are refused: llama-cpp-python's
``Jinja2ChatFormatter`` (0.3.x) accepts extra keyword arguments and drops them without passing them to the template,
so they would be silently ignored. Run the GGUF with llama.cpp's server (``llama-server --jinja``) and the ``openai``
engine instead; a thinking oracle's output is still cut at its thinking when read, whatever the engine.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..structured import SectionFormat
from . import Conversation, Generation, GenerationSettings, finished
from .decoding import banned_tokens
from .section_budget import (FORCE, HOLD, MIN_SECTION_TOKENS, PREAMBLE_SHARE,  # noqa: F401
                             SectionBudget, SequenceBudget)
from ..fingerprint import weights_fingerprint

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'reflect-trainer[llama-cpp]' (builds from source) or bash scripts/build_llama_cpp.sh"
MIN_PREFIX_TOKENS = 8  # a shared prefix shorter than this is decoded with each prompt


def _llama_cpp():
    # Imported here, not at module level: identity_for (the cache key) must work without the package, so a fully
    # cached run never needs it.
    try:
        import llama_cpp
    except ImportError as err:
        raise ImportError(f"the llama_cpp oracle engine needs llama-cpp-python: {INSTALL_HINT}") from err
    return llama_cpp


def identity_for(model_path: str, **_: object) -> str:
    """The cache identity of a GGUF oracle, computed without loading it."""
    return f"llama_cpp:{weights_fingerprint(Path(model_path))}"


_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}  # ggml's WARN and ERROR; DEBUG, INFO and CONT go to DEBUG
_log_callback = None  # kept alive here: llama.cpp holds a pointer to it


def _route_llama_logs(llama_cpp) -> None:
    """llama.cpp prints every load step to stderr; send its messages through ``logging`` instead."""
    global _log_callback
    if _log_callback is None:
        @llama_cpp.llama_log_callback
        def callback(level, text, _user_data):
            logger.log(_LOG_LEVELS.get(level, logging.DEBUG), "llama.cpp: %s", text.decode("utf-8", "replace").rstrip())

        _log_callback = callback
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


@dataclass
class _Sequence:
    index: int  # position in the request
    seq_id: int  # llama.cpp sequence id (a slot of the context)
    sampler: object  # sampler chain: top-p, temperature, greedy or random pick
    grammar: object | None  # structured output: the GBNF sampler, kept out of the chain (see _sample)
    pos: int  # position of the next token fed to the model
    tokens: list[int] = field(default_factory=list)
    text: bytes = b""
    feed: list[int] = field(default_factory=list)  # generated, not yet fed to the model
    budget: SequenceBudget = field(default_factory=SequenceBudget)  # structured output: the section budget's state
    hold: bool = False  # structured output: the open section is empty, so it must not be closed or ended yet


class _SectionBudget:
    """The llama.cpp adapter of the section budget (:mod:`reflect_trainer.oracles.section_budget`).

    The grammar keeps the markers in order, so counting them tells where an output is. The budget forces the next
    marker (the grammar accepts it); while the open section is empty the sequence is held (``seq.hold``): the sampler
    bans end-of-generation and every token with ``[``, so the model can neither close the section empty nor stop.
    """

    def __init__(self, fmt: SectionFormat, tokenize, max_new_tokens: int):
        opens = [tokenize("\n" + fmt.marker(name)) for name in fmt.sections]
        self.machine = SectionBudget(fmt, opens, tokenize(fmt.marker(fmt.end_marker)), max_new_tokens)
        texts = {"\n" + fmt.marker(n) for i, n in enumerate(fmt.sections) if not (i == 0 and fmt.open_first)}
        texts.add(fmt.marker(fmt.end_marker))
        self.regex = re.compile("|".join(re.escape(m.strip()) for m in texts))
        #: Request positions of sequences whose section text a budget cut (their finish reason is ``length``).
        self.cut: set[int] = set()

    def due(self, seq: _Sequence) -> list[int]:
        """Tokens to force into ``seq`` now; empty while the model may (or, held, must) write on."""
        text = seq.text.decode("utf-8", "ignore")
        markers = list(self.regex.finditer(text))
        k = len(markers)
        section_text = text[markers[-1].end():] if markers else text
        action, tokens = self.machine.step(seq.budget, k, len(seq.tokens), section_text)
        seq.hold = action == HOLD
        if action != FORCE:
            return []
        if self.machine.in_section(k):
            self.cut.add(seq.index)  # closing a section the model was still writing
        return tokens

    def holds(self, seq: _Sequence) -> bool:
        """After a forced marker: whether the section it opened must be written into before it may close."""
        text = seq.text.decode("utf-8", "ignore")
        markers = list(self.regex.finditer(text))
        return self.machine.must_not_close(len(markers), text[markers[-1].end():] if markers else text)


class LlamaCppOracle:
    """Generates with llama.cpp from a GGUF file, using the chat template embedded in it.

    Args:
        model_path: A local ``.gguf`` file with a chat template.
        batch_size: Most sequences decoded together.
        context_length: Context cells (KV cache) shared by the sequences decoded together: each gets room for the
            call's longest prompt plus ``max_new_tokens``, so fewer run at once when prompts are long.
        threads: CPU threads; ``None`` takes ``OMP_NUM_THREADS`` when set, else every core this process may run on,
            divided among the local processes of a distributed run (``LOCAL_WORLD_SIZE``).
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"`` (every layer offloaded; needs a CUDA build of llama.cpp).
            Default: CUDA when the build supports it.
        prefix_cache: Decode the token prefix all prompts of a call share once, in a sequence of its own, and copy
            its KV cells to each sequence as it starts (``llama_memory_seq_cp``) instead of decoding it per prompt.
    """

    def __init__(self, model_path: str, batch_size: int = 16, context_length: int = 4096, threads: int | None = None,
                 device: str | None = None, prefix_cache: bool = True, **_: object):
        lib = self._lib = _llama_cpp()
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"oracle model {path} is not a file; the llama_cpp engine takes a .gguf file")
        _route_llama_logs(lib)
        lib.llama_backend_init()
        device = device or ("cuda" if lib.llama_supports_gpu_offload() else "cpu")
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = 0
        if device.startswith("cuda"):
            if not lib.llama_supports_gpu_offload():
                raise RuntimeError(f"device {device!r}: this llama-cpp-python build has no GPU support; rebuild it "
                                   "with LLAMA_CPP_CMAKE_ARGS='-DGGML_CUDA=ON' bash scripts/build_llama_cpp.sh")
            model_params.n_gpu_layers = -1
            if ":" in device:  # the one given GPU holds the whole model
                model_params.split_mode = lib.LLAMA_SPLIT_MODE_NONE
                model_params.main_gpu = int(device.split(":")[1])
        self.model = lib.llama_model_load_from_file(str(path).encode(), model_params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {path} (not a GGUF file, or an architecture it does not know)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self._held: set[int] | None = None  # tokens a held sequence may not write (see _hold_banned)

        self.params = params = lib.llama_context_default_params()
        if threads is None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
            threads = int(os.environ["OMP_NUM_THREADS"])  # the thread budget this process was given, as torch takes it
        if threads is None:
            # Every core this process may run on, shared among the processes of a distributed run on this machine:
            # llama.cpp's threads spin at every barrier and slow to a crawl when there are more of them than cores.
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
            threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        params.n_threads = params.n_threads_batch = threads
        params.n_batch = 2048  # most tokens per llama_decode call; longer inputs are chunked
        # Each sequence gets its own KV stream (not one pool for all): on CPU, attention then computes exactly the
        # same numbers for a sequence whatever else is in the batch, so batched greedy output equals one-at-a-time
        # output (with one pool, logits move by up to ~1 with the batch's make-up and greedy texts diverge).
        params.kv_unified = False
        # Flash attention on CPU also depends on the batch's shape: off. The two cost ~5% tok/s (SmolLM2, 2 cores).
        params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_AUTO if device.startswith("cuda") else \
            lib.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.no_perf = True
        self.context_length = context_length
        self.batch_size = batch_size
        self.prefix_cache = prefix_cache
        #: Prompt tokens decoded, and those a shared prefix saved: what the benchmarks report.
        self.prefill_tokens = 0
        self.prefix_tokens_reused = 0
        self.ctx, self._ctx_shape = None, None  # created per call, sized for its prompts (see _context)
        self.batch = lib.llama_batch_init(params.n_batch, 0, 1)

        template = lib.llama_model_chat_template(self.model, None)
        if not template:
            raise ValueError(f"{path} has no chat template in its metadata (tokenizer.chat_template)")
        self.chat_template = Jinja2ChatFormatter(
            template.decode(), eos_token=self._token_text(lib.llama_vocab_eos(self.vocab)),
            bos_token=self._token_text(lib.llama_vocab_bos(self.vocab)), add_generation_prompt=True)
        self.identity = identity_for(model_path)
        self.tokens_generated = 0

    # ---- text <-> tokens --------------------------------------------------------------------------------------------
    def _token_text(self, token: int) -> str:
        return self._lib.llama_vocab_get_text(self.vocab, token).decode() if token >= 0 else ""

    def prompt_text(self, conversation: Conversation) -> str:
        """The prompt as the model sees it. A final assistant message is a pre-fill that the model continues; it is
        rendered exactly as the transformers engine renders it, so both engines see the same text."""
        if conversation and conversation[-1]["role"] == "assistant":
            return self.chat_template(messages=conversation[:-1]).prompt + conversation[-1]["content"]
        return self.chat_template(messages=conversation).prompt

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        # No BOS added: the chat template writes the special tokens it wants (transformers: add_special_tokens=False).
        buf = (self._lib.llama_token * (len(data) + 8))()
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, True)
        if n < 0:
            raise RuntimeError(f"llama.cpp could not tokenize a prompt of {len(data)} bytes")
        return list(buf[:n])

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)  # special tokens: no text
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # ---- sampling ---------------------------------------------------------------------------------------------------
    def _sampler_chain(self, settings: GenerationSettings):
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if settings.repetition_penalty != 1.0:
            # Over the whole output (last_n = the budget; the library takes -1 as 0, off). The chain sees only the
            # sampled tokens, never the prompt: the rule of oracles/decoding.py.
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_penalties(
                self.n_vocab, settings.max_new_tokens, settings.repetition_penalty, 0.0, 0.0))
        if settings.temperature > 0:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_top_p(settings.top_p, 1))
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_temp(settings.temperature))
            # The same seed for every sequence: a prompt's output does not depend on what it was batched with.
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_dist(settings.seed))
        else:
            lib.llama_sampler_chain_add(chain, lib.llama_sampler_init_greedy())
        return chain

    def _grammar(self, settings: GenerationSettings):
        if settings.section_format is None:
            return None
        grammar = self._lib.llama_sampler_init_grammar(self.vocab, settings.section_format.gbnf().encode(), b"root")
        if not grammar:
            raise ValueError(f"llama.cpp rejected the GBNF grammar of {settings.section_format}")
        return grammar

    def _allowed(self, grammar, token: int) -> bool:
        """Whether the grammar lets ``token`` come next (checking one token is cheap; the whole vocabulary is not)."""
        lib = self._lib
        data = lib.llama_token_data(token, 0.0, 0.0)
        candidates = lib.llama_token_data_array(ctypes.pointer(data), 1, -1, False)
        lib.llama_sampler_apply(grammar, ctypes.byref(candidates))
        return candidates.data[0].logit != float("-inf")

    def _sample(self, seq: _Sequence, k: int) -> int:
        """The next token of ``seq`` from the ``k``-th logits of the last decode.

        With a grammar this is llama.cpp's own shortcut: pick without it and only when the grammar forbids the pick
        (rare) mask the whole vocabulary with it and pick again. Masking every step costs as much as the forward pass
        of a small model.
        """
        lib = self._lib
        # No-repeat n-gram (oracles/decoding.py): only when the last n-1 tokens were written before is anything
        # banned; then pick from the masked logits, as for the grammar below, and tell the chain what was picked.
        banned = banned_tokens(seq.tokens, self._no_repeat) if self._no_repeat else set()
        if seq.hold:  # structured output: an empty section may be neither closed nor ended (see _SectionBudget)
            banned = banned | self._hold_banned()
        if banned:
            token = self._pick(seq, k, banned)
            lib.llama_sampler_accept(seq.sampler, token)
        else:
            token = lib.llama_sampler_sample(seq.sampler, self.ctx, k)
        if seq.grammar is None:
            return token
        if not self._allowed(seq.grammar, token):
            token = self._pick(seq, k, banned)
        if not lib.llama_vocab_is_eog(self.vocab, token):  # end-of-generation is only allowed once it is complete
            lib.llama_sampler_accept(seq.grammar, token)
        return token

    def _hold_banned(self) -> set[int]:
        """End-of-generation tokens and every token with ``[``: what a held sequence may not write (computed once)."""
        if self._held is None:
            lib = self._lib
            self._held = {t for t in range(self.n_vocab)
                          if b"[" in self._piece(t) or lib.llama_vocab_is_eog(self.vocab, t)}
        return self._held

    def _pick(self, seq: _Sequence, k: int, banned: set[int]) -> int:
        """The sampler chain's pick over the whole vocabulary, ``banned`` tokens masked, the grammar applied."""
        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,))
        data = np.zeros(self.n_vocab, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)])
        data["id"], data["logit"] = np.arange(self.n_vocab), logits
        data["logit"][list(banned)] = -np.inf
        candidates = lib.llama_token_data_array(data.ctypes.data_as(lib.llama_token_data_p), self.n_vocab, -1,
                                                False)
        if seq.grammar is not None:
            lib.llama_sampler_apply(seq.grammar, ctypes.byref(candidates))
        lib.llama_sampler_apply(seq.sampler, ctypes.byref(candidates))
        return candidates.data[candidates.selected].id

    def _append(self, seq: _Sequence, token: int) -> None:
        seq.tokens.append(token)
        seq.text += self._piece(token)
        seq.feed.append(token)

    def _force(self, seq: _Sequence, tokens: list[int]) -> None:
        for token in tokens:
            # Never accept a token the grammar forbids (llama.cpp aborts): when the model is halfway through a marker
            # of its own, stop here and let it finish.
            if not self._allowed(seq.grammar, token):
                return
            self._lib.llama_sampler_accept(seq.grammar, token)
            self._append(seq, token)

    # ---- generation -------------------------------------------------------------------------------------------------
    def _context(self, prompts: list[list[int]], max_new_tokens: int, prefix_seq: bool = False) -> int:
        """A context for this call: as many parallel sequences as ``context_length`` holds when each gets room for
        the longest prompt plus ``max_new_tokens``, plus one for the shared prefix when ``prefix_seq``. Reused while
        the shape stays the same. Returns that room."""
        lib = self._lib
        longest = max(len(p) for p in prompts)
        if longest >= self.context_length:
            i = next(i for i, p in enumerate(prompts) if len(p) == longest)
            raise ValueError(f"prompt {i} has {longest} tokens, no room left in the oracle's context of "
                             f"{self.context_length}; raise oracle_context_length")
        room = min(-(-(longest + max_new_tokens) // 256) * 256, self.context_length)  # llama.cpp pads to 256
        # Not fewer for a small call: the same shape for every call of a step keeps the context (creating one costs
        # 50-150 ms); cells of idle sequences cost memory within context_length, no compute.
        n_seq = max(1, min(self.batch_size, self.context_length // room)) + int(prefix_seq)
        if self._ctx_shape != (n_seq, room):
            if self.ctx:
                lib.llama_free(self.ctx)
            self.params.n_seq_max, self.params.n_ctx = n_seq, n_seq * room
            self.ctx = lib.llama_init_from_model(self.model, self.params)
            if not self.ctx:
                raise RuntimeError(f"llama.cpp could not create a context of {n_seq} x {room} tokens")
            self._ctx_shape = (n_seq, room)
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        return lib.llama_n_ctx_seq(self.ctx)

    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]:
        if settings.chat_template_kwargs:
            raise ValueError(
                f"the llama_cpp engine cannot pass oracle_chat_template_kwargs={settings.chat_template_kwargs} to the "
                "chat template (llama-cpp-python's formatter drops them): serve the GGUF with `llama-server --jinja` "
                "and use oracle_engine='openai', or leave oracle_chat_template_kwargs unset")
        if not conversations:
            return []
        prompts = [self.tokenize(self.prompt_text(c)) for c in conversations]
        from .transformers_engine import shared_prefix_length

        shared = shared_prefix_length(prompts) if self.prefix_cache and len(prompts) > 1 else 0
        shared = shared if shared >= MIN_PREFIX_TOKENS else 0
        room = self._context(prompts, settings.max_new_tokens, prefix_seq=shared > 0)
        self._no_repeat = settings.no_repeat_ngram_size
        budget = (_SectionBudget(settings.section_format, self.tokenize, settings.max_new_tokens)
                  if settings.section_format is not None else None)
        lib = self._lib
        memory = lib.llama_get_memory(self.ctx)
        waiting = deque(range(len(prompts)))
        free_ids = list(range(lib.llama_n_seq_max(self.ctx)))[::-1]
        if shared:
            # The last sequence holds the prefix; each prompt's sequence starts as a copy of it. Sequences have KV
            # streams of their own (kv_unified=False), so the copy moves the cells (done inside the next decode).
            prefix_id = free_ids.pop(0)
            for _ in self._decode([(t, j, prefix_id, False) for j, t in enumerate(prompts[0][:shared])]):
                pass
            self.prefill_tokens += shared
        active: dict[int, _Sequence] = {}
        out: list[Generation] = [Generation("")] * len(prompts)
        stop_window = max((len(s.encode()) for s in settings.stop), default=0) + 64  # bytes: enough to see a stop
        while waiting or active:
            # Continuous batching: a free sequence slot takes the next prompt at once.
            while waiting and free_ids:
                i = waiting.popleft()
                seq = _Sequence(i, free_ids.pop(), self._sampler_chain(settings), self._grammar(settings), pos=shared,
                                feed=list(prompts[i][shared:]))
                if shared:
                    lib.llama_memory_seq_cp(memory, prefix_id, seq.seq_id, -1, -1)
                    self.prefix_tokens_reused += shared
                self.prefill_tokens += len(seq.feed)
                active[seq.seq_id] = seq
            feed: list[tuple[int, int, int, bool]] = []  # (token, position, seq_id, wants logits)
            for seq in active.values():
                feed += [(t, seq.pos + j, seq.seq_id, j == len(seq.feed) - 1) for j, t in enumerate(seq.feed)]
                seq.pos += len(seq.feed)
                seq.feed = []
            for seq_id, k in self._decode(feed):
                seq = active[seq_id]
                token = self._sample(seq, k)
                done = lib.llama_vocab_is_eog(self.vocab, token)
                hit_budget = False
                if not done:
                    self._append(seq, token)
                    if budget is not None:
                        forced = budget.due(seq)
                        if forced:
                            self._force(seq, forced)
                            seq.hold = budget.holds(seq)  # a section just opened is empty: held until written in
                    hit_budget = len(seq.tokens) >= settings.max_new_tokens or seq.pos + len(seq.feed) >= room
                    done = hit_budget or any(s in seq.text[-stop_window:].decode("utf-8", "ignore")
                                             for s in settings.stop)
                if done:
                    hit_budget = hit_budget or (budget is not None and seq.index in budget.cut)
                    out[seq.index] = finished(seq.text.decode("utf-8", "replace"), settings.stop, hit_budget)
                    self.tokens_generated += len(seq.tokens)
                    lib.llama_memory_seq_rm(memory, seq_id, -1, -1)
                    lib.llama_sampler_free(seq.sampler)
                    if seq.grammar is not None:
                        lib.llama_sampler_free(seq.grammar)
                    free_ids.append(seq_id)
                    del active[seq_id]
        return out

    def _decode(self, feed: list[tuple[int, int, int, bool]]):
        """Run ``feed`` through the model in chunks of ``n_batch``; yield (seq_id, logits index) for each entry that
        wants logits, right after its chunk (logits only live until the next decode)."""
        lib, batch = self._lib, self.batch
        n_batch = lib.llama_n_batch(self.ctx)
        for start in range(0, len(feed), n_batch):
            chunk = feed[start:start + n_batch]
            for k, (token, pos, seq_id, logits) in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, logits
                batch.seq_id[k][0] = seq_id
            batch.n_tokens = len(chunk)
            status = lib.llama_decode(self.ctx, batch)
            if status != 0:
                raise RuntimeError(f"llama_decode failed with status {status}")
            for k, (_, _, seq_id, logits) in enumerate(chunk):
                if logits:
                    yield seq_id, k

    def close(self) -> None:
        lib = self._lib
        if getattr(self, "batch", None) is not None:
            lib.llama_batch_free(self.batch)
            self.batch = None
        if getattr(self, "ctx", None):
            lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            lib.llama_model_free(self.model)
            self.model = None
