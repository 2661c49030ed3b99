"""Oracle engines: a small protocol, one module per engine, one registry line each.

An oracle takes a batch of chat conversations and returns one :class:`Generation` per conversation: the text and
why generation stopped. A conversation that ends with an ``assistant`` message is a *pre-fill*: the oracle continues
that message instead of starting a new one, and returns only what it added.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

from ..structured import SectionFormat

logger = logging.getLogger(__name__)

Conversation = list[dict[str, str]]

#: Why generation stopped, as OpenAI-compatible servers and vLLM say it. ``stop``: end-of-sequence, a stop string or
#: the closing marker; ``length``: the token budget ran out (the text may be cut mid-sentence); ``error``: the engine
#: produced nothing usable for this prompt (``Generation.error`` says what); ``unknown``: an engine (or a cache
#: record written before finish reasons existed) that does not say.
FINISH_STOP, FINISH_LENGTH, FINISH_ERROR, FINISH_UNKNOWN = "stop", "length", "error", "unknown"


@dataclass(frozen=True)
class Generation:
    """One prompt's output.

    Args:
        text: What the oracle added after the prompt (and pre-fill), stop string excluded.
        finish_reason: ``"stop"``, ``"length"``, ``"error"`` or ``"unknown"`` (see :data:`FINISH_STOP`).
        error: With ``finish_reason="error"``: a short reason such as ``"oracle_error:400"``. Such a row falls back
            (counted under that reason) and is not cached, so a later run asks again.
    """

    text: str
    finish_reason: str = FINISH_UNKNOWN
    error: str | None = None


def as_generation(output) -> Generation:
    """Accept a plain string from an engine written before :class:`Generation` (its finish reason is unknown)."""
    return output if isinstance(output, Generation) else Generation(str(output), FINISH_UNKNOWN)


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings; all of them are part of the cache key.

    Args:
        max_new_tokens: Most tokens generated per call.
        temperature: 0 means greedy decoding (the paper ran its oracle at temperature 0).
        top_p: Nucleus sampling mass, used when ``temperature > 0``.
        seed: Sampling seed, used when ``temperature > 0``.
        stop: Stop strings; generation ends at the first, which is not returned.
        section_format: Structured output: constrain generation so the marked sections come out (see
            :mod:`reflect_trainer.structured`). ``None``: unconstrained.
        repetition_penalty: Divides the logit of every token the oracle already wrote (CTRL's penalty; 1.0: off).
            Local engines count the oracle's output only, not the prompt, so copying the original stays free (see
            :mod:`reflect_trainer.oracles.decoding`).
        no_repeat_ngram_size: No run of this many tokens appears twice in the oracle's output (0: off).
        chat_template_kwargs: Extra variables for the oracle's chat template, e.g. ``{"enable_thinking": False}``
            (Qwen3): passed to ``apply_chat_template`` by the engines that render prompts, sent as
            ``chat_template_kwargs`` by the ``openai`` engine. ``None``: the template's defaults.
    """

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    section_format: SectionFormat | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    chat_template_kwargs: dict | None = None

    def to_dict(self) -> dict:
        out = {**asdict(self), "stop": list(self.stop)}
        # Left out when unset, so cache keys written before this setting existed stay valid.
        if not self.chat_template_kwargs:
            del out["chat_template_kwargs"]
        # Left out when off, so cache keys written before these controls existed stay valid.
        for name, off in (("repetition_penalty", 1.0), ("no_repeat_ngram_size", 0)):
            if out[name] == off:
                del out[name]
        # Left out when unconstrained, so cache keys written before structured output existed stay valid.
        if self.section_format is None:
            del out["section_format"]
        else:
            out["section_format"] = self.section_format.to_dict()
        return out


@runtime_checkable
class Oracle(Protocol):
    """What every engine implements."""

    #: Identifies the model, its weights and quantization: part of the cache key.
    identity: str
    #: Tokens generated so far, over all calls.
    tokens_generated: int

    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]: ...

    def close(self) -> None:
        """Release the model and its memory."""


# name -> "module:Class". Adding an engine: one new module, one line here.
ENGINES = {
    "transformers": "reflect_trainer.oracles.transformers_engine:TransformersOracle",
    "openai": "reflect_trainer.oracles.openai_http:OpenAIHTTPOracle",
    "self": "reflect_trainer.oracles.self_oracle:SelfOracle",
    "llama_cpp": "reflect_trainer.oracles.llama_cpp_engine:LlamaCppOracle",
    "vllm": "reflect_trainer.oracles.vllm_engine:VLLMOracle",
}


def _engine_module(engine: str):
    if engine not in ENGINES:
        raise ValueError(f"unknown oracle engine {engine!r}; known: {sorted(ENGINES)}")
    module_name, class_name = ENGINES[engine].split(":")
    return importlib.import_module(module_name), class_name


def known_engine(engine: str, base_url: str | None) -> str:
    """The engine as far as it is known without looking at the machine: an explicit one, ``openai`` for ``"auto"``
    with a server URL, else ``"auto"`` (the first step of :func:`resolve_engine`; what config checks can use)."""
    if engine == "auto" and base_url:
        return "openai"
    return engine


def resolve_engine(engine: str, model_path: str | None, device: str | None, base_url: str | None = None
                   ) -> tuple[str, str]:
    """``(engine, why)``: what ``oracle_engine="auto"`` means here; an explicit engine always wins.

    The fastest engine that is installed and fits the oracle and the device: a server URL means the ``openai`` engine;
    a ``.gguf`` file llama.cpp; a CUDA device with vLLM importable vLLM; anything else transformers. The embedded
    default (no ``oracle_model_path``) is a CPU demo model: transformers.
    """
    import importlib.util

    if engine != "auto":
        return engine, "set explicitly"
    if known_engine(engine, base_url) == "openai":
        return "openai", "oracle_base_url names a server"
    if model_path is None:
        return "transformers", "the embedded default oracle"
    if str(model_path).endswith(".gguf"):
        if importlib.util.find_spec("llama_cpp") is None:
            raise ImportError(f"{model_path} is a GGUF file: the llama_cpp engine runs it, and llama-cpp-python is not "
                              "installed (bash scripts/build_llama_cpp.sh), or convert it to a transformers folder")
        return "llama_cpp", "a .gguf file, and llama-cpp-python is installed"
    import torch

    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda and importlib.util.find_spec("vllm") is not None:
        _warn_vllm_untested()
        return "vllm", "a CUDA device, and vLLM is installed"
    return "transformers", "no GPU engine applies" if not on_cuda else "vLLM is not installed"


_vllm_warned = False


def _warn_vllm_untested() -> None:
    """Once per process: auto picked vLLM, whose engine no GPU run has checked in this release yet."""
    global _vllm_warned
    if _vllm_warned or importlib.import_module("reflect_trainer.oracles.vllm_engine").GPU_CHECKED_RELEASE:
        return
    _vllm_warned = True
    logger.warning("oracle_engine='auto' picked vllm, whose engine is untested on GPUs in this release (its API is "
                   "checked against vLLM's source, benchmarks/gpu_vllm_check.py has not passed yet). To use another "
                   "engine set oracle_engine='transformers' (in the config, the recipe YAML or on the command line).")


def resolve_quantization(engine: str, quantization: str, device: str | None) -> tuple[str, str]:
    """``(quantization, why)``: what ``"auto"`` means for this engine and device; explicit settings win.

    4-bit saves scarce GPU memory, so a CUDA oracle is NF4. On a CPU bitsandbytes dequantizes every weight at every
    decoding step: measured on the embedded oracle (2 cores), NF4 decodes at half the fp32 rate (5.6 vs 13.5 tok/s
    single, 28 vs 61 batched), so a CPU oracle stays unquantized.
    """
    if quantization != "auto":
        return quantization, "set explicitly"
    if engine == "vllm":
        from .vllm_engine import installed_quantization_methods

        methods = installed_quantization_methods()
        if methods is not None and "bitsandbytes" not in methods:  # removed in vLLM 0.28
            return "none", "the installed vLLM has no bitsandbytes 4-bit (removed in 0.28): the checkpoint as it is"
        return "nf4", "vLLM runs on a GPU, where 4-bit leaves memory to the student"
    if engine != "transformers":
        return "none", f"the {engine} engine takes the model as it is"
    import torch

    on_cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    if on_cuda:
        return "nf4", "on CUDA 4-bit leaves GPU memory to the student"
    return "none", "on CPU bitsandbytes 4-bit decodes at half the fp32 speed"


def load_oracle(engine: str, model_path: str | None, **kwargs) -> Oracle:
    module, class_name = _engine_module(engine)
    return getattr(module, class_name)(model_path, **kwargs)


def oracle_identity(engine: str, model_path: str | None, **kwargs) -> str:
    """Cache identity of an engine's oracle without loading it; each engine module defines ``identity_for``."""
    module, _ = _engine_module(engine)
    return module.identity_for(model_path, **kwargs)


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    """Cut ``text`` at the first stop string (engines that stop on tokens may overshoot by a few characters)."""
    return _stop_cut(text, stop)[0]


def _stop_cut(text: str, stop: tuple[str, ...]) -> tuple[str, bool]:
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text, False) if cut < 0 else (text[:cut], True)


def finished(text: str, stop: tuple[str, ...], hit_budget: bool) -> Generation:
    """The :class:`Generation` of a local engine's raw decoded text: cut at the first stop string; ``length`` only
    when the budget ended it and no stop string did (a stop string in the last tokens means it ended on its own)."""
    cut, stopped = _stop_cut(text, stop)
    return Generation(cut, FINISH_LENGTH if hit_budget and not stopped else FINISH_STOP)
