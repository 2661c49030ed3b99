"""Checks that need no generation, run before any model is loaded: a wrong name, path, server or data set fails in
the first second with what to do, not an hour later inside ``train()``.

Three callers, one owner: ``ReflectionConfig.__post_init__`` (names), ``ReflectionSFTTrainer.__init__`` before the
student is prepared and ``reflect-trainer recycle`` before the oracle is loaded (data, oracle path, packages, server).
A path is checked where it is used, not where a config is parsed: a recipe may name a folder of another machine.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

from .oracles import ENGINES

logger = logging.getLogger(__name__)

ORACLE_ENGINES = ("auto", *ENGINES)
ORACLE_QUANTIZATIONS = ("auto", "nf4", "int8", "none")
#: Names of the embedded demo oracle (SmolLM2-135M-Instruct, see ``embedded.py``); the same as ``oracle_model_path:
#: None``. ``embedded:smollm2`` is also the name the CPU recipe gives its student.
EMBEDDED_ORACLE_NAMES = ("embedded", "embedded:smollm2")
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"  # the openai engine's default (oracles/openai_http.py)
#: Seconds the models call may take at start-up: a server that is up answers it in milliseconds.
SERVER_CHECK_TIMEOUT = 5.0


class InputError(ValueError):
    """A setting, oracle or data set that cannot work; the message names it and says what to do."""


def _choice(field: str, value: Any, valid: tuple[str, ...], fix: str = "") -> None:
    if value not in valid:
        raise InputError(f"{field}={value!r} is not known; use one of {', '.join(valid)}{fix}")


def check_names(engine: str, quantization: str) -> None:
    """Engine and quantization names, as ``ReflectionConfig`` is built."""
    _choice("oracle_engine", engine, ORACLE_ENGINES,
            " (auto picks the fastest installed engine that fits the oracle and the device)")
    _choice("oracle_quantization", quantization, ORACLE_QUANTIZATIONS, " (auto: nf4 on CUDA, none on CPU)")


def check_oracle_path(path: str | None, engine: str, base_url: str | list | None = None,
                      revision: str | None = None) -> None:
    """A local oracle path exists and holds what its engine loads; a hub id (``org/name`` that is no local path)
    resolves to a commit, from the hub or, offline, the hub cache (see :mod:`reflect_trainer.hub`). The HTTP engine
    only reads a tokenizer there (and the served model name from it), and the ``self`` engine none: neither is
    checked."""
    if path is None or engine in ("openai", "self") or (engine == "auto" and base_url):
        return
    path = str(path)
    from .hub import hub_model, is_hub_id

    if is_hub_id(path):
        if engine == "llama_cpp":
            raise InputError(f"oracle_model_path {path!r} is a hub id; the llama_cpp engine takes a local .gguf file")
        hub_model(path, revision)  # raises InputError naming the repo, the revision and what to do
        return
    local = Path(path)
    if not local.exists():
        raise InputError(
            f"oracle_model_path {path!r} does not exist; pass a local model folder (with config.json) or a .gguf "
            f"file, leave it unset (or 'embedded') for the embedded demo oracle, or run `reflect-trainer fetch` to "
            f"see where that one lives")
    if path.endswith(".gguf") or engine == "llama_cpp":
        if not local.is_file():
            raise InputError(f"oracle_model_path {path!r} is not a file; the llama_cpp engine takes a .gguf file")
    elif not (local / "config.json").exists():
        raise InputError(f"oracle_model_path {path!r} has no config.json: it is not a model folder; pass the folder "
                         f"that holds config.json and the weights, or a .gguf file (llama_cpp engine)")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a stand-in module without a spec (tests) counts as installed
        return True


def check_packages(config) -> None:
    """The optional packages the oracle's engine and quantization need are installed (extras of the package)."""
    from .oracles import resolve_engine, resolve_quantization

    engine = config.oracle_engine
    if engine == "auto":
        try:
            engine, _ = resolve_engine("auto", config.oracle_model_path, config.oracle_device, config.oracle_base_url)
        except ImportError as err:  # a .gguf file without llama-cpp-python: the message says what to install
            raise InputError(str(err)) from None
    if engine == "llama_cpp" and not _installed("llama_cpp"):
        raise InputError("oracle_engine llama_cpp needs llama-cpp-python: `pip install 'reflect-trainer[llama-cpp]'` "
                         "(bash scripts/build_llama_cpp.sh builds its wheel), or use a transformers model folder")
    if engine == "transformers":
        quantization, _ = resolve_quantization(engine, config.oracle_quantization, config.oracle_device)
        if quantization in ("nf4", "int8") and not _installed("bitsandbytes"):
            raise InputError(f"oracle_quantization {quantization} needs bitsandbytes: `pip install "
                             f"'reflect-trainer[quantization]'`, or set oracle_quantization=none")


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_hardware(config) -> None:
    """The engine and device fit this machine: vLLM and a ``cuda`` device need a CUDA GPU that torch sees (else the
    first oracle call fails inside ``train()``, after the student is set up); vLLM must be installed."""
    from .oracles import resolve_engine

    device = config.oracle_device
    engine = config.oracle_engine
    if engine == "auto":  # an unknown .gguf case is check_packages' to report
        try:
            engine, _ = resolve_engine("auto", config.oracle_model_path, device, config.oracle_base_url)
        except ImportError:
            return
    if engine in ("openai", "self"):
        return  # the server's or the student's hardware, not ours to check here
    gpus = None
    if engine == "vllm":
        gpus = _cuda_devices()
        if not gpus:
            raise InputError("oracle_engine vllm needs a CUDA GPU, and torch sees none on this machine "
                             "(torch.cuda.is_available() is False); use oracle_engine transformers (or llama_cpp for a "
                             ".gguf file), or run where a GPU is visible")
        if not _installed("vllm"):
            raise InputError("oracle_engine vllm needs vLLM: `pip install 'reflect-trainer[vllm]'` (0.22-0.31, the "
                             "range TRL 1.16 supports), or use oracle_engine transformers")
    if device and str(device).startswith("cuda"):
        gpus = _cuda_devices() if gpus is None else gpus
        index = str(device).partition(":")[2]
        if not gpus:
            raise InputError(f"oracle_device {device!r} names a CUDA GPU, and torch sees none on this machine; set "
                             f"oracle_device cpu, or leave it unset (auto)")
        if index.isdigit() and int(index) >= gpus:
            raise InputError(f"oracle_device {device!r}: torch sees {gpus} CUDA GPU(s) here (cuda:0..cuda:{gpus - 1}); "
                             f"check CUDA_VISIBLE_DEVICES or the index")


PACKING_REFUSED = (
    "packing=True cannot work with lazy recycling: a packed sequence is cut from many rows before training starts, "
    "but a row's recycled length is only known when its buffer is recycled. Train with packing=False "
    "(padding_free=True also saves the padding), or recycle first (`reflect-trainer recycle`) and pack the export "
    "with plain SFTTrainer."
)


def check_packing(args) -> None:
    """SFTConfig's ``packing`` is the one SFTTrainer option we refuse (README: "What differs from SFTTrainer")."""
    if getattr(args, "packing", False):
        raise InputError(PACKING_REFUSED)


def check_server(config) -> None:
    """Every server of an HTTP oracle answers a models call within :data:`SERVER_CHECK_TIMEOUT` seconds."""
    import httpx2 as httpx

    from .oracles.openai_http import _client, redact, split_base_urls

    for url in split_base_urls(config.oracle_base_url or DEFAULT_BASE_URL):
        timeout = min(SERVER_CHECK_TIMEOUT, config.oracle_timeout)
        with _client(url, config.oracle_api_key_env, timeout) as client:
            try:
                response = client.get("models")
            except httpx.TransportError as err:
                raise InputError(
                    f"the oracle server at {redact(url)} does not answer GET /models ({type(err).__name__}; timeout "
                    f"{timeout:g} s); start it (e.g. `vllm serve MODEL`), or fix oracle_base_url (the URL including "
                    f"/v1)") from None
        if response.status_code in (401, 403):
            raise InputError(f"the oracle server at {redact(url)} refused the API key (HTTP {response.status_code}); "
                             f"put the key in the environment variable {config.oracle_api_key_env}")
        logger.debug("oracle server at %s answered /models: HTTP %d", redact(url), response.status_code)


def no_rows(where: str) -> InputError:
    """The error for a data set without rows (``datasets`` itself says ``StopIteration``, or nothing until later)."""
    return InputError(f"{where} has no rows: nothing to recycle or train on; check the path, split or filter that "
                      f"produced it")


def _first_row(dataset, where: str) -> dict:
    from datasets import IterableDataset

    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        first = None
    else:
        first = next(iter(dataset), None)
    if first is None:
        raise no_rows(where)
    return first


def check_data(dataset, where: str = "train_dataset", dataset_text_field: str = "text", formatting_func=None) -> str:
    """The data set has rows and a format the trainer knows; returns the format (see ``exchange.training_format``)."""
    from .exchange import training_format

    first = _first_row(dataset, where)
    return training_format(first.keys(), dataset_text_field, formatting_func)


def check_oracle(config) -> None:
    """The oracle a config names can be built: its path, its engine's packages and hardware, an HTTP oracle's
    server."""
    if config.oracle_engine == "self":
        return
    check_oracle_path(config.oracle_model_path, config.oracle_engine, config.oracle_base_url,
                      getattr(config, "oracle_revision", None))
    check_packages(config)
    check_hardware(config)
    if config.oracle_engine == "openai" or (config.oracle_engine == "auto" and config.oracle_base_url):
        check_server(config)


def check_trainer_inputs(config, train_dataset, args=None, oracle=None, formatting_func=None) -> None:
    """What ``ReflectionSFTTrainer`` checks before it prepares the student: the data, then the oracle (unless an
    oracle object is given)."""
    if train_dataset is None or not hasattr(train_dataset, "__iter__"):
        return  # the trainer's own check says what it needs
    check_data(train_dataset, "train_dataset", getattr(args, "dataset_text_field", "text"), formatting_func)
    if oracle is None:
        check_oracle(config)
