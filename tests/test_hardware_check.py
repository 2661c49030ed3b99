"""The engine and device must fit the machine: a GPU-only engine or a ``cuda`` device on a machine where torch sees no
GPU fails when the trainer is built (before the student is touched) and in the CLI (exit 2, one line), not at the
first oracle call inside ``train()``. These run where CI runs: a CPU-only machine, as torch itself reports it."""

import json
import logging
import time

import pytest
import torch
from datasets import Dataset

from reflect_trainer import InputError, ReflectionConfig
from reflect_trainer.cli import main
from test_support.students import UntouchableStudent

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the claim is about a machine without a GPU")
PAIRS = [{"instruction": "Name a colour.", "input": "", "output": "Red."},
         {"instruction": "Name a fruit.", "input": "", "output": "An apple."}]


def model_folder(tmp_path):
    folder = tmp_path / "oracle"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # a model folder by its shape: the path check passes, no load needed
    return str(folder)


CASES = {
    "vllm without a GPU": ({"oracle_engine": "vllm"}, r"oracle_engine vllm needs a CUDA GPU, and torch sees none"),
    "cuda device without a GPU": ({"oracle_engine": "transformers", "oracle_device": "cuda"},
                                  r"oracle_device 'cuda' names a CUDA GPU, and torch sees none.*oracle_device cpu"),
    "auto on cuda:1 without a GPU": ({"oracle_device": "cuda:1"}, r"oracle_device 'cuda:1' names a CUDA GPU"),
}


@pytest.mark.parametrize("case", CASES)
def test_trainer_refuses_an_engine_or_device_this_machine_lacks_before_the_student(case, tmp_path):
    from reflect_trainer import ReflectionSFTTrainer

    settings, message = CASES[case]
    config = ReflectionConfig(cache_dir=str(tmp_path / "cache"), oracle_model_path=model_folder(tmp_path), **settings)
    started = time.perf_counter()
    with pytest.raises(InputError, match=message):
        ReflectionSFTTrainer(UntouchableStudent(), train_dataset=Dataset.from_list(PAIRS), reflection_config=config)
    assert time.perf_counter() - started < 10


def test_cli_recycle_with_vllm_on_a_machine_without_a_gpu_exits_2_in_one_line(tmp_path, caplog, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the recycler was built before the hardware check")

    monkeypatch.setattr("reflect_trainer.recycler.Recycler", refuse)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    out = tmp_path / "out.jsonl"
    with caplog.at_level(logging.INFO):
        code = main(["recycle", str(data), "--out", str(out), "--oracle", model_folder(tmp_path), "--engine", "vllm"])
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0] and "\n" not in errors[0]
    assert not out.exists()


def test_a_cpu_device_and_the_transformers_engine_pass_the_check(tmp_path):
    from reflect_trainer.preflight import check_hardware

    check_hardware(ReflectionConfig(oracle_model_path=model_folder(tmp_path), oracle_device="cpu"))
    check_hardware(ReflectionConfig(oracle_engine="transformers"))
