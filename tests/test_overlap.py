"""Overlap: with ``overlap="on"`` the oracle phases of the next buffer run in a background thread while the current
buffer trains, and training sees exactly what it sees without overlap. (Whether it is *faster* is a benchmark
question: benchmarks/b6_overlap.py.)"""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reflect_trainer import InputError, ReflectionConfig
from reflect_trainer.placement import overlap_wanted
from reflect_trainer.trainer import ReflectionSFTTrainer
from test_support.oracles import CountingOracle
from test_support.students import sft_config

pytestmark = pytest.mark.slow
ROWS = 6  # 3 buffers of 2 (batch 2, one micro-batch per buffer)


class ThreadRecordingOracle(CountingOracle):
    """Test instrument: which thread asked for each generation."""

    def __init__(self, inner):
        super().__init__(inner)
        self.threads: list[str] = []

    def generate(self, conversations, settings):
        self.threads.append(threading.current_thread().name)
        return super().generate(conversations, settings)


def train(tmp_path, real_oracle, oracle_path, pairs, overlap):
    oracle = ThreadRecordingOracle(real_oracle)
    trainer = ReflectionSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32),
        args=sft_config(tmp_path, num_train_epochs=1),
        train_dataset=pairs,
        processing_class=AutoTokenizer.from_pretrained(oracle_path),
        oracle=oracle,
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), mode="response", max_new_tokens=16,
                                           buffer_batches=1, template_set="compact", overlap=overlap,
                                           progress_bar=False),
    )
    sequences = []
    original_compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):  # test instrument: what each step trained on
        sequences.append(inputs["input_ids"].tolist())
        return original_compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return trainer, oracle, sequences


def test_next_buffer_is_recycled_in_the_background_and_training_is_unchanged(tmp_path, real_oracle, oracle_path,
                                                                             alpaca_pairs):
    pairs = alpaca_pairs.select(range(60, 60 + ROWS))
    overlapped, oracle_on, seen_on = train(tmp_path / "on", real_oracle, oracle_path, pairs, "on")
    serial, oracle_off, seen_off = train(tmp_path / "off", real_oracle, oracle_path, pairs, "off")
    # Buffer 1 is recycled when first drawn; buffers 2 and 3 while the one before them trains.
    assert oracle_on.threads[0] == "MainThread"
    assert len(oracle_on.threads) == 3 and all(name.startswith("recycle") for name in oracle_on.threads[1:])
    assert set(oracle_off.threads) == {"MainThread"}
    assert seen_on == seen_off  # the same sequences, in the same order
    assert overlapped.recycled_dataset().to_list() == serial.recycled_dataset().to_list()
    assert overlapped.recycling_stats()["oracle_prompts"] == ROWS
    assert overlapped.rows._prefetcher is None  # once the rank's share is recycled, the thread is gone


def test_auto_overlaps_only_when_the_oracle_has_its_own_compute(tmp_path, oracle_path, alpaca_pairs):
    def wanted(**config):
        trainer = ReflectionSFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32),
            args=sft_config(tmp_path), train_dataset=alpaca_pairs.select(range(2)),
            processing_class=AutoTokenizer.from_pretrained(oracle_path),
            reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), oracle_model_path=oracle_path,
                                               **config),
        )
        return trainer._overlap

    from test_support.http_server import FaultyServer

    server = FaultyServer()  # the trainer asks a server for its models before it starts
    try:
        assert not wanted()  # CPU student, CPU oracle: the same two cores
        assert wanted(oracle_engine="openai", oracle_base_url=server.url)  # a server does its own work
        if torch.cuda.device_count() > 1:
            assert wanted(oracle_device="cuda:1")  # another device
        else:  # no second GPU here: refused when the trainer is built (the decision itself: the test below)
            with pytest.raises(InputError, match="cuda:1"):
                wanted(oracle_device="cuda:1")
        assert not wanted(overlap="off", oracle_engine="openai", oracle_base_url=server.url)
    finally:
        server.close()


@pytest.mark.parametrize("student, oracle, overlap", [
    ("cuda", "cuda:0", False),  # accelerate's single-process device is "cuda": the current GPU, GPU 0
    ("cuda:0", "cuda", False),  # rank 0 of a multi-GPU run, oracle_device given as "cuda"
    ("cuda:0", "cuda:1", True),
    ("cpu", "cuda", True),
])
def test_auto_overlap_compares_devices_not_their_spelling(student, oracle, overlap):
    """Without a GPU here, "cuda" means GPU 0 (the current device of a process that never changed it)."""
    # The trainer resolves oracle_engine="auto" before it decides on overlap: here it resolves to transformers.
    assert overlap_wanted("auto", "transformers", oracle, torch.device(student), streaming=False) is overlap
