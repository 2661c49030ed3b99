"""``oracle_engine="auto"`` and ``oracle_quantization="auto"``: the choice follows the oracle, the device and what is
installed; explicit settings win; the choice reaches the engine that is built and its cache identity."""

import logging

import pytest

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.oracles import resolve_engine, resolve_quantization


def test_auto_engine_follows_the_oracle_and_what_is_installed(oracle_path, monkeypatch):
    import importlib.util

    from reflect_trainer.embedded import smollm2_gguf_path

    assert resolve_engine("auto", None, "cpu")[0] == "transformers"  # the embedded default
    assert resolve_engine("auto", oracle_path, "cpu")[0] == "transformers"
    assert resolve_engine("auto", oracle_path, "cpu", "http://127.0.0.1:9/v1")[0] == "openai"
    assert resolve_engine("auto", str(smollm2_gguf_path()), "cpu")[0] == "llama_cpp"  # built by `make test`
    assert resolve_engine("transformers", str(smollm2_gguf_path()), "cuda")[0] == "transformers"  # explicit wins
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm"
                        else real_find_spec(name, *a))
    assert resolve_engine("auto", oracle_path, "cuda:0")[0] == "vllm"
    assert resolve_engine("auto", oracle_path, "cpu")[0] == "transformers"


def test_auto_engine_without_llama_cpp_says_how_to_get_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(ImportError, match="build_llama_cpp.sh"):
        resolve_engine("auto", "/models/oracle.gguf", "cpu")


def test_auto_quantization_is_4bit_on_cuda_and_unquantized_on_cpu():
    assert resolve_quantization("transformers", "auto", "cuda:0")[0] == "nf4"
    assert resolve_quantization("transformers", "auto", "cpu")[0] == "none"
    assert resolve_quantization("transformers", "int8", "cpu")[0] == "int8"
    assert resolve_quantization("vllm", "auto", None)[0] == "nf4"


def test_recycler_builds_and_names_the_engine_it_chose_and_logs_why_once(tmp_path, caplog):
    from reflect_trainer.embedded import smollm2_gguf_path

    with caplog.at_level(logging.INFO, logger="reflect_trainer.recycler"):
        recycler = Recycler(ReflectionConfig(cache_dir=str(tmp_path), oracle_model_path=str(smollm2_gguf_path())))
    assert recycler.config.oracle_engine == "llama_cpp"
    assert recycler.oracle_identity.startswith("llama_cpp:")  # cache keys name the engine really used
    assert [r.getMessage() for r in caplog.records if "oracle engine" in r.getMessage()] == [
        "oracle engine: llama_cpp (a .gguf file, and llama-cpp-python is installed)"]
    default = Recycler(ReflectionConfig(cache_dir=str(tmp_path)))
    assert default.config.oracle_engine == "transformers" and default.oracle_quantization == "none"
    assert default.oracle_identity.endswith(":none")
