"""The trainer's ledger off the heap: per-row records on disk, a few bytes a row in memory, the export unchanged."""

import gc
import os
import tracemalloc

import numpy as np
import pytest

from reflect_trainer.ledger import RowLedger, TrainOrder
from test_support.data import LONGER

FEATURES = {"input_ids": [1, 2, 3, 70000], "labels": [-100, -100, 3, 70000]}
EXPORT_ROW = {"instruction": "Übersetze: 猫はかわいい 🐈", "input": "", "output": "Die Katze ist süß.",
              "original_output": "x", "recycled_output": None, "ifd_score": 0.25, "trained_version": "recycled",
              "messages": [{"role": "user", "content": "é"}]}


# ---- the ledger alone ----------------------------------------------------------------------------------------------
def test_features_and_export_rows_come_back_exactly_including_non_ascii_and_empty_lists(tmp_path):
    ledger = RowLedger(10, tmp_path)
    empty = {"input_ids": [], "labels": []}
    ledger[3], ledger[7], ledger[0] = FEATURES, EXPORT_ROW, empty
    assert ledger[3] == FEATURES and ledger[7] == EXPORT_ROW and ledger[0] == empty
    assert all(type(v) is int for v in ledger[3]["input_ids"])  # Python ints, as TRL's rows hold
    assert ledger[7]["recycled_output"] is None


def test_none_is_a_record_distinct_from_absent(tmp_path):
    ledger = RowLedger(4, tmp_path)
    ledger[1] = None  # "the original, as SFTTrainer prepared it" / "a bad row, left out"
    assert 1 in ledger and ledger[1] is None and ledger.get(1, "absent") is None
    assert 2 not in ledger and ledger.get(2, "absent") == "absent"
    with pytest.raises(KeyError):
        ledger[2]
    assert ledger.file_bytes == 0  # None costs no write


def test_membership_missing_and_order_follow_the_records(tmp_path):
    ledger = RowLedger(6, tmp_path)
    for r in (4, 1, 5):
        ledger[r] = {"r": r}
    assert [r in ledger for r in range(6)] == [False, True, False, False, True, True]
    assert 6 not in ledger and -1 not in ledger and "1" not in ledger  # not rows of this data set
    assert ledger.missing() == [0, 2, 3] and ledger.missing([5, 3, 0]) == [3, 0]
    assert list(ledger) == [1, 4, 5] and len(ledger) == 3
    assert ledger.present().tolist() == [False, True, False, False, True, True]


def test_a_row_written_again_keeps_its_last_record(tmp_path):
    ledger = RowLedger(2, tmp_path)
    ledger[0] = {"v": 1}
    ledger[0] = {"v": 2}
    ledger[1] = {"v": 3}
    assert ledger[0] == {"v": 2} and ledger[1] == {"v": 3} and len(ledger) == 2


def test_streamed_rows_are_keyed_by_their_hash_in_the_order_first_written(tmp_path):
    ledger = RowLedger(None, tmp_path)
    keys = [f"{k:020x}" for k in range(3000)]  # more than the first capacity: the arrays grow
    for k in reversed(keys):
        ledger[k] = {"key": k}
    ledger[keys[5]] = None
    assert all(ledger[k] == {"key": k} for k in keys if k != keys[5]) and ledger[keys[5]] is None
    assert list(ledger) == list(reversed(keys)) and "nope" not in ledger and ledger.get("nope") is None


def test_the_file_has_no_name_and_close_frees_it(tmp_path):
    ledger = RowLedger(3, tmp_path)
    ledger[0] = FEATURES
    assert os.listdir(tmp_path) == []  # anonymous: nothing to clean up after a crash, nobody else can open it
    ledger.close()
    assert 0 not in ledger and ledger.file_bytes == 0


def test_memory_holds_no_token_lists_only_a_few_bytes_a_row(tmp_path):
    """10k rows of 512 tokens each (about 40 MB as Python lists): what stays in memory is the two arrays."""
    n = 10_000
    ledger = RowLedger(n, tmp_path)
    tokens = list(range(1000, 1512))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for r in range(n):
        ledger[r] = {"input_ids": tokens, "labels": tokens}
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, grown  # the arrays were allocated up front; writing rows adds nothing per row
    assert ledger.nbytes() <= 16 * n  # an offset and a length per row
    assert ledger.file_bytes > 2 * 512 * n  # the tokens went to the file
    assert ledger[n - 1]["input_ids"] == tokens


def test_train_order_keeps_first_training_order_in_one_int_a_row():
    order = TrainOrder(100)
    for r in (7, 3, 7, 99, 0, 3):
        order.add(r)
    assert list(order) == [7, 3, 99, 0] and len(order) == 4 and 3 in order and 4 not in order
    assert order._first.dtype == np.int64 and order._first.nbytes == 8 * 100
    streamed = TrainOrder(None)
    for k in ("b", "a", "b"):
        streamed.add(k)
    assert list(streamed) == ["b", "a"]


# ---- the trainer on it -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_trainer_keeps_its_ledger_on_disk_and_exports_what_it_trained_on(tmp_path):
    """A short run (max_steps stops it inside the data set) with a scripted oracle: the export matches an independent
    recycling of the same rows and, tokenized by plain SFTTrainer, the tokens each step trained on; meanwhile the
    trainer's per-row memory is its arrays."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from reflect_trainer import Recycler, ReflectionConfig
    from reflect_trainer.oracles import Generation
    from reflect_trainer.trainer import ReflectionSFTTrainer
    from test_support.oracles import ScriptedOracle
    from test_support.students import tiny_student

    student = str(tiny_student(tmp_path / "student"))
    data = Dataset.from_list([{"instruction": f"How do I keep basil fresh, friend number {i}?", "input": "",
                               "output": f"Put the stems in water ({i})."} for i in range(12)])
    script = ScriptedOracle(lambda c: Generation(LONGER, "stop"))  # accepted: complete and longer
    config = dict(mode="response", template_set="compact", buffer_batches=2, progress_bar=False)

    def sft_config(out):
        return SFTConfig(output_dir=str(out), max_steps=4, per_device_train_batch_size=2, max_length=256,
                         learning_rate=1e-4, logging_steps=100, save_strategy="no", report_to="none", bf16=False,
                         use_cpu=True, seed=0)

    args = sft_config(tmp_path / "out")
    trainer = ReflectionSFTTrainer(model=student, args=args, train_dataset=data, oracle=script,
                                   reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), **config))
    seen = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *a, **kw):  # test instrument: the tokens each step trained on
        for ids, labels in zip(inputs["input_ids"], inputs["labels"]):
            n = int((labels != -100).nonzero().max()) + 1
            seen.append(tuple(ids[:n].tolist()))
        return compute_loss(model, inputs, *a, **kw)

    trainer.compute_loss = recording
    trainer.train()
    assert len(seen) == 8 and len(trainer._trained) == 8  # 4 steps x 2 rows of 12

    # The per-row state is arrays; the records are in the (anonymous) file.
    assert trainer.rows.prepared.nbytes() <= 16 * len(data) and trainer.rows.exported.nbytes() <= 16 * len(data)
    assert trainer.rows.prepared.file_bytes > 0 and trainer.rows.exported.file_bytes > 0
    assert not hasattr(trainer, "_exchanges") and trainer.rows.reflectable.tolist() == [True] * 12

    exported = trainer.recycled_dataset()
    trained = sorted(trainer._trained)
    independent = Recycler(ReflectionConfig(cache_dir=str(tmp_path / "cache2"), **config),
                           oracle=ScriptedOracle(script.script)).recycle_dataset(data.select(trained))
    assert exported["original_output"] == data.select(trained)["output"]
    for column in ("recycled_instruction", "recycled_input", "recycled_output", "response_reflection_fallback"):
        assert exported[column] == independent[column], column
    assert exported["output"] == independent["recycled_output"]  # the row as trained on
    assert set(exported["trained_version"]) == {"recycled"} and set(exported["output"]) == {LONGER}
    plain = SFTTrainer(model=trainer.model, args=sft_config(tmp_path / "plain"), train_dataset=exported,
                       processing_class=trainer.processing_class)
    assert sorted(tuple(ids) for ids in plain.train_dataset["input_ids"]) == sorted(seen)

    everything = trainer.recycle_remaining()
    assert everything["original_output"] == data["output"]
    assert [i for i, t in enumerate(everything["trained"]) if t] == trained
