"""Oracle engine on vLLM, colocated with training on the rank's own GPU (optional extra, GPU only).

The student and the oracle share one GPU, as in TRL's colocate mode (``trl/generation/vllm_generation.py``):

* vLLM takes ``gpu_memory_utilization`` of the GPU's memory, the student trains in the rest;
* with ``sleep_level`` 1 or 2, the engine is woken right before each ``generate`` call and put back to sleep right
  after, so the student has the memory back while it trains (vLLM's sleep mode: level 1 offloads the weights to CPU
  memory and drops the KV cache, level 2 drops both and reloads the weights from disk on waking);
* inside a torchrun/accelerate job (``torch.distributed`` initialised) the engine runs with
  ``distributed_executor_backend="external_launcher"``, as TRL does, so it joins the job's processes instead of
  starting its own. vLLM then builds its process groups collectively: every rank must create its oracle at the same
  time (the trainer's first buffer does).

vLLM as a separate server is the ``openai`` engine (``vllm serve`` + :mod:`reflect_trainer.oracles.openai_http`).

Structured output goes through vLLM's guided decoding: ``SamplingParams(structured_outputs=StructuredOutputsParams(
regex=...))`` (vLLM >= 0.10.2) or ``SamplingParams(guided_decoding=GuidedDecodingParams(regex=...))`` (older),
whichever the installed vLLM offers.

Supported vLLM: the ``vllm`` extra's range, TRL 1.16's (0.22.0 to 0.31.0). ``tests/test_vllm_contract.py`` reads this
module's vLLM calls with ``ast`` and checks each against the real vLLM source of both ends of that range (wheels read,
not installed), so an API change is caught without a GPU. Within the range vLLM dropped bitsandbytes (0.28): there
``nf4`` is refused with the fix. Whether it really runs on a GPU is ``benchmarks/gpu_vllm_check.py``'s job.
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import os
import threading
from pathlib import Path

import torch

from . import Conversation, Generation, GenerationSettings, finished
from .decoding import NO_REPEAT_UNSUPPORTED
from ..fingerprint import weights_fingerprint

logger = logging.getLogger(__name__)

#: Our quantization names -> vLLM's ``quantization`` argument. ``nf4``: vLLM's in-flight bitsandbytes quantization
#: (4-bit NF4, what TRL maps a bitsandbytes 4-bit model to). ``none``: whatever the checkpoint says (its dtype, or its
#: own AWQ/GPTQ/FP8 ``quantization_config``). ``int8`` has no vLLM counterpart: vLLM does not quantize to 8-bit
#: in flight (TRL raises for it too), so it is rejected.
QUANTIZATIONS = {"nf4": "bitsandbytes", "none": None}
#: The release of this package whose ``benchmarks/gpu_vllm_check.py`` run passed on a GPU; ``None`` until one has.
#: While ``None``, ``oracle_engine="auto"`` warns whenever it picks this engine (see ``oracles.resolve_engine``).
GPU_CHECKED_RELEASE: str | None = None
INSTALL_HINT = (
    "the vllm oracle engine needs vLLM and a CUDA GPU: pip install 'reflect-trainer[vllm]'. "
    "On a machine without a GPU use oracle_engine='transformers' (default), 'llama_cpp', or 'openai' "
    "(against a vLLM server running elsewhere)."
)


def _check_quantization(quantization: str) -> None:
    if quantization == "int8":
        raise ValueError("the vllm engine has no int8: vLLM does not quantize to 8-bit in flight; use "
                         "oracle_quantization='nf4' (bitsandbytes 4-bit), 'none', or a pre-quantized checkpoint")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {sorted(QUANTIZATIONS)} for the vllm engine, "
                         f"got {quantization!r}")


def installed_quantization_methods() -> "list[str] | None":
    """The quantization methods the installed vLLM offers, or None if it cannot tell (or vLLM is not installed)."""
    try:
        return list(importlib.import_module("vllm.model_executor.layers.quantization").QUANTIZATION_METHODS)
    except (ImportError, AttributeError):
        return None


def _check_vllm_quantization(quantization: str) -> None:
    """Refuse a quantization the installed vLLM no longer has, before it fails deep inside ``vllm.LLM``: vLLM 0.28
    removed bitsandbytes (``nf4``) from its quantization methods."""
    method = QUANTIZATIONS[quantization]
    methods = installed_quantization_methods()
    if methods is None:  # a vLLM that does not list them: let vLLM itself decide
        return
    if method is not None and method not in methods:
        version = getattr(importlib.import_module("vllm"), "__version__", "installed")
        raise ValueError(f"oracle_quantization={quantization!r} needs vLLM's {method!r} quantization, which vLLM "
                         f"{version} no longer has (removed in 0.28). Set oracle_quantization='none' (the checkpoint "
                         "as it is, including its own AWQ/GPTQ/FP8 quantization_config), pass a pre-quantized "
                         "checkpoint, or install vllm<0.28 (pip install 'vllm>=0.22,<0.28').")


def identity_for(model_path: str | None, quantization: str = "nf4", revision: str | None = None, **_: object) -> str:
    """The cache identity, computed without vLLM or a GPU. vLLM's kernels differ from transformers', so the same
    weights give a different identity than the transformers engine's. A hub id's is ``repo@commit`` (no hashing)."""
    from ..hub import hub_model

    _check_quantization(quantization)
    if not model_path:
        raise ValueError("the vllm engine needs oracle_model_path (a local model folder or a hub id)")
    model = hub_model(model_path, revision)
    return f"vllm:{model.identity if model is not None else weights_fingerprint(Path(model_path))}:{quantization}"


def _import_vllm():
    try:
        return importlib.import_module("vllm")
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err


class VLLMOracle:
    """Generates with an in-process ``vllm.LLM`` sharing the training GPU.

    Args:
        model_path: Local folder of a causal LM with a chat template, or a Hugging Face hub id (``org/name``; a path
            that exists locally is always a folder), resolved to a pinned commit (see :mod:`reflect_trainer.hub`).
        revision: With a hub id: branch, tag or commit (default: the default branch).
        quantization: ``"nf4"`` (vLLM's in-flight bitsandbytes 4-bit, default) or ``"none"``; ``"int8"`` is refused.
        gpu_memory_utilization: Share of the GPU's memory vLLM may take, in (0, 1).
        sleep_level: ``1`` (weights offloaded to CPU memory between calls), ``2`` (weights dropped and reloaded from
            disk) or ``0`` (never sleeps; the memory stays taken).
        context_length: Longest prompt plus output (``max_model_len``), capped at the model's own maximum.
        device: Must be unset or ``"cuda"``: vLLM runs on the rank's own GPU. For another GPU, serve the model with
            ``vllm serve`` there and use the ``openai`` engine.
        prefix_cache: vLLM's automatic prefix caching (``enable_prefix_caching``): KV blocks of a prompt prefix
            already computed (the chat header and a template's fixed text, shared by every prompt of a step) are
            reused instead of prefilled again. On by default in vLLM v1; set here so ``oracle_prefix_cache=False``
            turns it off for every engine alike.
    """

    def __init__(self, model_path: str, quantization: str = "nf4", gpu_memory_utilization: float = 0.3,
                 sleep_level: int = 1, context_length: int | None = 4096, device: str | None = None,
                 prefix_cache: bool = True, revision: str | None = None, **_: object):
        # Every check comes before anything heavy: settings, then vLLM, then the GPU, then what this vLLM offers,
        # then the folder.
        _check_quantization(quantization)
        if not 0 < gpu_memory_utilization < 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1), got {gpu_memory_utilization}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level}")
        if device not in (None, "cuda"):
            raise ValueError(f"the vllm engine runs on the rank's own GPU; oracle_device must be unset or 'cuda', got "
                             f"{device!r} (for another GPU: `vllm serve` there and oracle_engine='openai')")
        vllm = _import_vllm()
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device: the vllm oracle engine is GPU-only here. Use oracle_engine="
                               "'transformers' (default, CPU or GPU), 'llama_cpp' (CPU), or 'openai' (a server).")
        _check_vllm_quantization(quantization)
        from ..hub import local_folder

        path = local_folder(model_path, revision)  # a hub id: its pinned commit's snapshot folder
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"oracle model folder {path} has no config.json; pass a local model folder")
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self._sampling_params = vllm.SamplingParams
        self._constraint = _constraint_builder(importlib.import_module("vllm.sampling_params"))
        self.sleep_level = sleep_level
        # Inside a training job vLLM must join the job's processes, not start a group of its own (TRL's colocate mode).
        self._external_launcher = torch.distributed.is_available() and torch.distributed.is_initialized()
        max_len = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
        max_model_len = min(context_length, max_len) if context_length and max_len else (context_length or max_len)
        kwargs = dict(
            model=str(path),
            quantization=QUANTIZATIONS[quantization],
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=sleep_level > 0,
            max_model_len=max_model_len,
            dtype="auto",
            seed=0,
            # TRL: vLLM v1's memory profiler, misled by the large default (32768), finds too little memory at low
            # utilisation.
            max_num_batched_tokens=max(4096, max_model_len or 0),
            enable_prefix_caching=prefix_cache,
        )
        if self._external_launcher:
            kwargs["distributed_executor_backend"] = "external_launcher"
            # vLLM reads the rank from the environment; torchrun and accelerate set it, TRL sets it explicitly.
            for name, value in (("RANK", torch.distributed.get_rank), ("WORLD_SIZE", torch.distributed.get_world_size),
                                ("LOCAL_RANK", torch.cuda.current_device)):
                if name not in os.environ:
                    os.environ[name] = str(value())
        logger.info("starting vLLM oracle %s (%s, %.0f%% of GPU memory, sleep level %d%s)", path, quantization,
                    100 * gpu_memory_utilization, sleep_level, ", external launcher" if self._external_launcher else "")
        self.llm = vllm.LLM(**kwargs)
        self._asleep = False
        self._lock = threading.Lock()  # wake, generate, sleep is one unit, even with a background recycling thread
        self.identity = identity_for(model_path, quantization, revision)  # (a hub id's commit is remembered)
        self.tokens_generated = 0

    def _params(self, settings: GenerationSettings):
        kwargs: dict = dict(max_tokens=settings.max_new_tokens, temperature=settings.temperature)
        if settings.temperature > 0:
            kwargs.update(top_p=settings.top_p, seed=settings.seed)
        if settings.stop:
            kwargs["stop"] = list(settings.stop)
        if settings.section_format is not None:
            kwargs.update(self._constraint(settings.section_format.regex()))
        if settings.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = settings.repetition_penalty  # vLLM counts the prompt's tokens too
        if settings.no_repeat_ngram_size:
            raise ValueError(NO_REPEAT_UNSUPPORTED.format(engine="vllm", n=settings.no_repeat_ngram_size))
        return self._sampling_params(**kwargs)

    def _wake(self) -> None:
        if not self._asleep:
            return
        torch.cuda.empty_cache()  # TRL: frees the student's cached blocks so vLLM can map its memory back
        if self.sleep_level == 2:
            # vLLM's sleep-mode docs: level 2 dropped the weights; reallocate them, reload them in place from the
            # checkpoint, then reallocate the KV cache.
            self.llm.wake_up(tags=["weights"])
            self.llm.collective_rpc("reload_weights")
            self.llm.wake_up(tags=["kv_cache"])
        else:
            self.llm.wake_up()
        self._asleep = False

    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True

    def generate(self, conversations: list[Conversation], settings: GenerationSettings) -> list[Generation]:
        if not conversations:
            return []
        # Token ids, not text: vLLM would tokenize a text prompt with special tokens added (a second BOS for
        # templates that already start with one); these are exactly the transformers engine's input ids.
        from .transformers_engine import prompt_text  # the same rendering (and chat_template_kwargs) as transformers

        prompts = [{"prompt_token_ids": self.tokenizer(prompt_text(self.tokenizer, c, settings.chat_template_kwargs),
                                                       add_special_tokens=False)["input_ids"]} for c in conversations]
        params = self._params(settings)
        with self._lock:
            self._wake()
            try:
                outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
            finally:
                self._sleep()
        texts = []
        for output in outputs:  # vLLM returns them in prompt order
            completion = output.outputs[0]
            self.tokens_generated += len(completion.token_ids)
            # vLLM's own finish_reason: "stop" (eos or a stop string) or "length" (max_tokens).
            texts.append(finished(completion.text, settings.stop, completion.finish_reason == "length"))
        return texts

    def close(self) -> None:
        if self.llm is None:
            return
        self.llm = None
        gc.collect()
        # vLLM maintainers' recipe (vllm-project/vllm#6544, #18806): drop the LLM, then cleanup_dist_env_and_memory.
        # That also destroys the default torch.distributed group, which under external_launcher is the trainer's:
        # there, only vLLM's own model-parallel groups go.
        distributed = importlib.import_module("vllm.distributed")
        if self._external_launcher:
            distributed.destroy_model_parallel()
        else:
            distributed.cleanup_dist_env_and_memory()
        gc.collect()
        torch.cuda.empty_cache()


def _constraint_builder(sampling_params_module):
    """``regex -> SamplingParams kwargs`` for the installed vLLM (the structured-output API was renamed in 0.10.2,
    vllm-project/vllm#22772; the old name was removed later)."""
    new = getattr(sampling_params_module, "StructuredOutputsParams", None)
    if new is not None:
        return lambda regex: {"structured_outputs": new(regex=regex)}
    old = getattr(sampling_params_module, "GuidedDecodingParams", None)
    if old is not None:
        return lambda regex: {"guided_decoding": old(regex=regex)}

    def unsupported(regex: str) -> dict:
        raise RuntimeError("this vLLM offers neither StructuredOutputsParams nor GuidedDecodingParams; "
                           "upgrade vLLM or set structured_output=False")

    return unsupported
