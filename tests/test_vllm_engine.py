"""The vLLM oracle engine, on a machine with NO GPU and without vLLM (vLLM is GPU-only here and cannot be installed
usefully on this CPU machine).

What these tests prove: the engine's configuration and errors (missing vLLM, no CUDA, bad settings), its cache
identity from the real embedded SmolLM2 folder without loading anything, and — against a fake ``vllm`` module injected
into ``sys.modules`` with ``torch.cuda.is_available`` patched to True — what it asks of vLLM and in which order: the
``LLM`` arguments (memory share, sleep mode, quantization, external launcher inside a distributed job), wake before
and sleep after every ``generate``, prompts rendered with the real SmolLM2 tokenizer exactly as the transformers
engine renders them (pre-fills included), the section regex in the sampling parameters (both vLLM API generations),
stop strings cut, tokens counted, memory released on close. Also the HTTP engine's structured-output fields, against
a scripted loopback server.

What they do not prove: that real vLLM accepts these arguments, that sleep mode really returns the memory to the
student, that bitsandbytes in-flight quantization combines with sleep level 2, or that guided decoding with this regex
yields parseable text. ``benchmarks/gpu_vllm_check.py`` checks those on a machine with a GPU and vLLM.
"""

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.oracles import ENGINES, GenerationSettings, _engine_module, oracle_identity
from reflect_trainer.oracles.openai_http import OpenAIHTTPOracle
from reflect_trainer.oracles.transformers_engine import TransformersOracle, weights_fingerprint
from reflect_trainer.oracles.vllm_engine import VLLMOracle, identity_for
from reflect_trainer.structured import SectionFormat
from test_support.http_server import PROMPT, FaultyServer

PREFILLED = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "[Better Answer] "}]
PLAIN = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
BETTER_ANSWER = SectionFormat(sections=("Better Answer",), open_first=True, preamble=False)


def install_fake_vllm(monkeypatch, api: str = "structured_outputs") -> list:
    """A stand-in ``vllm`` that records every call; ``api`` picks the structured-output generation it offers."""
    log: list = []

    class LLM:
        def __init__(self, **kwargs):
            log.append(("init", kwargs))

        def sleep(self, level):
            log.append(("sleep", level))

        def wake_up(self, tags=None):
            log.append(("wake_up", tags))

        def collective_rpc(self, method):
            log.append(("collective_rpc", method))

        def generate(self, prompts, sampling_params=None, use_tqdm=True):
            log.append(("generate", prompts, sampling_params))
            # Real vLLM stops before a stop string; this one overshoots, so the engine's own cut is tested.
            # The second output ran out of tokens: vLLM says so in finish_reason, which the engine passes on.
            return [SimpleNamespace(outputs=[SimpleNamespace(text=f"Answer {i}. [End] spill", token_ids=[5] * (3 + i),
                                                             finish_reason="length" if i else "stop")])
                    for i in range(len(prompts))]

    class Recorded:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, Recorded
    sampling = types.ModuleType("vllm.sampling_params")
    setattr(sampling, "StructuredOutputsParams" if api == "structured_outputs" else "GuidedDecodingParams",
            type("Constraint", (Recorded,), {}))
    distributed = types.ModuleType("vllm.distributed")
    distributed.destroy_model_parallel = lambda: log.append(("destroy_model_parallel",))
    distributed.cleanup_dist_env_and_memory = lambda: log.append(("cleanup_dist_env_and_memory",))
    vllm.sampling_params, vllm.distributed = sampling, distributed
    for name, module in (("vllm", vllm), ("vllm.sampling_params", sampling), ("vllm.distributed", distributed)):
        monkeypatch.setitem(sys.modules, name, module)
    return log


@pytest.fixture
def fake_gpu(monkeypatch):
    """No GPU exists here: pretend CUDA is there (configuration and call order only)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)


def calls(log) -> list:
    return [entry[0] if entry[0] in ("init", "generate") else entry for entry in log]


def test_registry_resolves_vllm_without_importing_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # any `import vllm` would fail
    module, class_name = _engine_module("vllm")
    assert ENGINES["vllm"] == "reflect_trainer.oracles.vllm_engine:VLLMOracle"
    assert getattr(module, class_name) is VLLMOracle


def test_missing_vllm_raises_import_error_with_install_hint_and_cpu_engines(monkeypatch, oracle_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ImportError, match=r"pip install 'reflect-trainer\[vllm\]'") as err:
        VLLMOracle(oracle_path)
    for engine in ("transformers", "llama_cpp", "openai"):
        assert engine in str(err.value)


def test_no_cuda_raises_runtime_error_before_building_the_engine(monkeypatch, oracle_path):
    log = install_fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the real situation on this machine
    with pytest.raises(RuntimeError, match="GPU-only") as err:
        VLLMOracle(oracle_path)
    assert "transformers" in str(err.value) and log == []


@pytest.mark.parametrize("kwargs", [
    {"gpu_memory_utilization": 0.0}, {"gpu_memory_utilization": 1.0}, {"gpu_memory_utilization": 1.5},
    {"quantization": "int8"}, {"quantization": "fp4"}, {"sleep_level": 3}, {"device": "cpu"}, {"device": "cuda:1"},
])
def test_bad_settings_raise_value_error_before_importing_vllm(monkeypatch, oracle_path, kwargs):
    monkeypatch.setitem(sys.modules, "vllm", None)  # a ValueError, not the ImportError: settings are checked first
    with pytest.raises(ValueError):
        VLLMOracle(oracle_path, **kwargs)


def test_identity_from_real_folder_without_vllm_or_loading_a_model(monkeypatch, oracle_path):
    monkeypatch.setitem(sys.modules, "vllm", None)
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("loaded"))
    identity = oracle_identity("vllm", oracle_path, quantization="nf4", gpu_memory_utilization=0.3)
    from pathlib import Path

    assert identity == f"vllm:{weights_fingerprint(Path(oracle_path))}:nf4" == identity_for(oracle_path)
    assert identity != oracle_identity("transformers", oracle_path, quantization="nf4")  # other kernels, other key
    assert identity != identity_for(oracle_path, quantization="none")
    with pytest.raises(ValueError, match="int8"):
        identity_for(oracle_path, quantization="int8")


@pytest.mark.parametrize("quantization, expected", [("nf4", "bitsandbytes"), ("none", None)])
def test_colocated_llm_gets_memory_share_sleep_mode_and_mapped_quantization(monkeypatch, fake_gpu, oracle_path,
                                                                            quantization, expected):
    log = install_fake_vllm(monkeypatch)
    VLLMOracle(oracle_path, quantization=quantization, gpu_memory_utilization=0.25, sleep_level=1)
    (_, kwargs), = log
    assert kwargs["model"] == oracle_path and kwargs["quantization"] == expected
    assert kwargs["gpu_memory_utilization"] == 0.25 and kwargs["enable_sleep_mode"] is True
    assert kwargs["max_model_len"] == 4096  # context_length, under SmolLM2's 8192
    assert "distributed_executor_backend" not in kwargs  # a single process: vLLM's own executor


def test_prefix_caching_is_on_by_default_and_off_with_oracle_prefix_cache_false(
        monkeypatch, fake_gpu, oracle_path, tmp_path):
    log = install_fake_vllm(monkeypatch)
    VLLMOracle(oracle_path)
    config = ReflectionConfig(oracle_engine="vllm", oracle_model_path=oracle_path, oracle_prefix_cache=False,
                              cache_dir=str(tmp_path), progress_bar=False)
    Recycler(config).oracle
    assert [kwargs["enable_prefix_caching"] for name, kwargs in log if name == "init"] == [True, False]


def test_wake_before_and_sleep_after_each_generate(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path, sleep_level=1)
    for _ in range(2):
        oracle.generate([PLAIN], GenerationSettings(max_new_tokens=8))
    # Awake after loading; asleep (weights offloaded) while the student trains between calls.
    assert calls(log) == ["init", "generate", ("sleep", 1), ("wake_up", None), "generate", ("sleep", 1)]


def test_sleep_level_2_reloads_weights_before_kv_cache_on_waking(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path, sleep_level=2)
    for _ in range(2):
        oracle.generate([PLAIN], GenerationSettings(max_new_tokens=8))
    assert calls(log)[2:] == [("sleep", 2), ("wake_up", ["weights"]), ("collective_rpc", "reload_weights"),
                              ("wake_up", ["kv_cache"]), "generate", ("sleep", 2)]


def test_sleep_level_0_never_sleeps_nor_enables_sleep_mode(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path, sleep_level=0)
    oracle.generate([PLAIN], GenerationSettings(max_new_tokens=8))
    oracle.generate([PLAIN], GenerationSettings(max_new_tokens=8))
    assert log[0][1]["enable_sleep_mode"] is False
    assert calls(log) == ["init", "generate", "generate"]


def test_prompts_and_prefills_rendered_with_real_tokenizer_as_transformers_engine(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path)
    oracle.generate([PREFILLED, PLAIN], GenerationSettings(max_new_tokens=8))
    _, prompts, _ = next(entry for entry in log if entry[0] == "generate")
    tok = oracle.tokenizer
    reference = SimpleNamespace(tokenizer=tok)  # the transformers engine's own rendering, without its model
    for prompt, conversation in zip(prompts, [PREFILLED, PLAIN]):
        text = TransformersOracle._prompt_text(reference, conversation)
        assert prompt == {"prompt_token_ids": tok(text, add_special_tokens=False)["input_ids"]}
    assert tok.decode(prompts[0]["prompt_token_ids"]).endswith("<|im_start|>assistant\n[Better Answer] ")


@pytest.mark.parametrize("api, field", [("structured_outputs", "structured_outputs"),
                                        ("guided_decoding", "guided_decoding")])
def test_section_regex_reaches_sampling_params_in_both_vllm_api_generations(monkeypatch, fake_gpu, oracle_path,
                                                                            api, field):
    log = install_fake_vllm(monkeypatch, api=api)
    oracle = VLLMOracle(oracle_path)
    settings = GenerationSettings(max_new_tokens=32, stop=("[End]",), section_format=BETTER_ANSWER)
    oracle.generate([PREFILLED], settings)
    _, _, params = next(entry for entry in log if entry[0] == "generate")
    assert params.kwargs[field].kwargs == {"regex": BETTER_ANSWER.regex()}
    assert params.kwargs["max_tokens"] == 32 and params.kwargs["temperature"] == 0.0  # greedy
    assert params.kwargs["stop"] == ["[End]"] and "seed" not in params.kwargs


def test_sampling_passes_top_p_and_seed_and_unconstrained_sends_no_regex(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    VLLMOracle(oracle_path).generate([PLAIN], GenerationSettings(temperature=0.7, top_p=0.9, seed=3))
    _, _, params = next(entry for entry in log if entry[0] == "generate")
    assert params.kwargs == {"max_tokens": 512, "temperature": 0.7, "top_p": 0.9, "seed": 3}


def test_stop_strings_are_cut_and_generated_tokens_counted(monkeypatch, fake_gpu, oracle_path):
    install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path)
    texts = oracle.generate([PREFILLED, PLAIN], GenerationSettings(max_new_tokens=8, stop=("[End]",)))
    assert [g.text for g in texts] == ["Answer 0. ", "Answer 1. "]
    # A stop string in the text means the output ended on its own, whatever vLLM's token count said.
    assert [g.finish_reason for g in texts] == ["stop", "stop"]
    assert oracle.tokens_generated == 3 + 4
    assert oracle.generate([], GenerationSettings()) == []


def test_finish_reason_length_passes_through_when_no_stop_string_ended_it(monkeypatch, fake_gpu, oracle_path):
    install_fake_vllm(monkeypatch)
    outputs = VLLMOracle(oracle_path).generate([PLAIN, PLAIN], GenerationSettings(max_new_tokens=8))
    assert [g.finish_reason for g in outputs] == ["stop", "length"]


def test_close_releases_engine_and_gpu_memory_once(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path)
    oracle.close()
    oracle.close()
    assert oracle.llm is None
    assert calls(log) == ["init", ("cleanup_dist_env_and_memory",)]


def test_inside_distributed_job_uses_external_launcher_and_keeps_trainer_process_group(monkeypatch, fake_gpu,
                                                                                       oracle_path):
    log = install_fake_vllm(monkeypatch)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1")):  # as torchrun sets them
        monkeypatch.setenv(name, value)
    oracle = VLLMOracle(oracle_path)
    assert log[0][1]["distributed_executor_backend"] == "external_launcher"
    oracle.close()
    # vLLM's full clean-up would destroy the default process group, which is the trainer's here.
    assert calls(log)[1:] == [("destroy_model_parallel",)]
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")


def test_recycler_passes_config_to_vllm_engine(monkeypatch, fake_gpu, oracle_path, alpaca_pairs, tmp_path):
    log = install_fake_vllm(monkeypatch)
    config = ReflectionConfig(oracle_engine="vllm", oracle_model_path=oracle_path, oracle_quantization="none",
                              oracle_gpu_memory_utilization=0.2, oracle_sleep_level=2, structured_output=True,
                              mode="response", template_set="compact", cache_dir=str(tmp_path), progress_bar=False)
    recycler = Recycler(config)
    assert recycler.oracle_identity.startswith("vllm:")
    recycler.recycle_dataset(alpaca_pairs.select(range(2)))
    kwargs = log[0][1]
    assert (kwargs["gpu_memory_utilization"], kwargs["enable_sleep_mode"], kwargs["quantization"]) == (0.2, True, None)
    generate = [entry for entry in log if entry[0] == "generate"]
    assert len(generate) == 1 and len(generate[0][1]) == 2  # one batched call for both pairs
    assert "structured_outputs" in generate[0][2].kwargs
    assert calls(log)[-1] == ("sleep", 2) and recycler.stats()["oracle_tokens"] == 3 + 4


# ---- the HTTP engine (vLLM as a separate server): the structured-output field ---------------------------------------
@pytest.mark.parametrize("api, expected", [
    ("vllm", {"structured_outputs": {"regex": BETTER_ANSWER.regex()}}),
    ("vllm_guided", {"guided_regex": BETTER_ANSWER.regex()}),
    ("llama.cpp", {"grammar": BETTER_ANSWER.gbnf()}),
    ("none", {}),
])
def test_http_engine_sends_structured_output_field_the_server_takes(api, expected):
    server = FaultyServer([])
    try:
        oracle = OpenAIHTTPOracle(None, base_url=server.url, served_model="m", structured_output_api=api)
        oracle.generate([PROMPT], GenerationSettings(max_new_tokens=8, section_format=BETTER_ANSWER))
        oracle.generate([PROMPT], GenerationSettings(max_new_tokens=8))  # unconstrained: no field at all
    finally:
        server.close()
    fields = ("structured_outputs", "guided_regex", "grammar")
    constrained, unconstrained = (r["body"] for r in server.posts)
    assert {k: constrained[k] for k in fields if k in constrained} == expected
    assert not any(k in unconstrained for k in fields)


def test_unknown_structured_output_api_is_refused_by_engine_and_config():
    with pytest.raises(ValueError, match="structured_output_api"):
        OpenAIHTTPOracle(None, served_model="m", structured_output_api="tgi")
    with pytest.raises(ValueError, match="oracle_structured_output_api"):
        ReflectionConfig(oracle_structured_output_api="tgi")


# ---- decoding controls (tests/test_decoding_controls.py has the rest) ---------------------------------------------
def test_vllm_engine_gets_the_penalty_in_sampling_params_and_refuses_no_repeat(monkeypatch, fake_gpu, oracle_path):
    log = install_fake_vllm(monkeypatch)
    oracle = VLLMOracle(oracle_path)
    oracle.generate([PLAIN], GenerationSettings(max_new_tokens=8, repetition_penalty=1.3))
    _, _, params = next(entry for entry in log if entry[0] == "generate")
    assert params.kwargs["repetition_penalty"] == 1.3
    with pytest.raises(ValueError, match="no_repeat_ngram_size=4: the vllm engine"):
        oracle.generate([PLAIN], GenerationSettings(max_new_tokens=8, no_repeat_ngram_size=4))
