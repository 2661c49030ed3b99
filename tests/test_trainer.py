"""ReflectionSFTTrainer in one process, with the real 4-bit SmolLM2 oracle and SmolLM2-135M as the student."""

import json
import statistics

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
from trl import SFTTrainer

from reflect_trainer import BadRowError, ReflectionConfig
from reflect_trainer.trainer import ReflectionSFTTrainer
from test_support.oracles import ScriptedOracle
from test_support.students import sft_config, tiny_student

pytestmark = pytest.mark.slow


class OracleCallsPerEpoch(TrainerCallback):
    """Test instrument: oracle calls made by the end of each epoch."""

    def __init__(self):
        self.at_epoch_end: list[int] = []
        self.trainer = None

    def on_epoch_end(self, args, state, control, **kwargs):
        self.at_epoch_end.append(int(self.trainer.recycling_stats()["oracle_calls"]))


def epoch_losses(trainer):
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [statistics.mean(h["loss"] for h in logs if e < h["epoch"] <= e + 1) for e in (0, 1)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, oracle_path, alpaca_pairs):
    """The plain TRL SFT script, with SFTTrainer replaced by ReflectionSFTTrainer (and the reflection settings)."""
    tmp_path = tmp_path_factory.mktemp("trainer")
    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    model = AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32)
    counter = OracleCallsPerEpoch()
    trainer = ReflectionSFTTrainer(
        model=model,
        args=sft_config(tmp_path),
        train_dataset=alpaca_pairs.select(range(16)),
        eval_dataset=alpaca_pairs.select(range(40, 44)),
        processing_class=tokenizer,
        callbacks=[counter],
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), max_new_tokens=32, buffer_batches=4,
                                           oracle_model_path=oracle_path, template_set="compact"),
    )
    counter.trainer = trainer
    after_init = {"oracle_calls": trainer.recycling_stats()["oracle_calls"],
                  "oracle_loaded": trainer.recycler.oracle_loaded}
    trained_batches = []
    original_compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):  # test instrument: what each step trained on
        if model.training:  # evaluate() goes through compute_loss too
            trained_batches.append((int(trainer.state.epoch or 0), inputs["input_ids"].clone(),
                                    inputs["labels"].clone()))
        return original_compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {"trainer": trainer, "counter": counter, "batches": trained_batches, "tokenizer": tokenizer,
            "tmp_path": tmp_path, "after_init": after_init}


def test_init_makes_zero_oracle_calls_and_loads_no_oracle(trained):
    assert trained["after_init"] == {"oracle_calls": 0, "oracle_loaded": False}


def test_trainer_log_carries_the_recycle_counters_each_step(trained):
    logs = [h for h in trained["trainer"].state.log_history if "loss" in h]
    assert len(logs) == 16  # logging_steps 1
    calls = [h["recycle/oracle_calls"] for h in logs]
    prompts = [h["recycle/oracle_prompts"] for h in logs]
    assert calls[0] > 0 and calls == sorted(calls)  # buffer 1 was recycled before step 1 was logged
    stats = trained["trainer"].recycling_stats()
    # By epoch 2 every pair was recycled: the last log holds the final counts.
    assert (calls[-1], prompts[-1]) == (stats["oracle_calls"], stats["oracle_prompts"])
    assert logs[-1]["recycle/response_reflection/total"] == stats["response_reflection/total"] == 16
    assert logs[-1]["recycle/rows_recycled"] == stats["rows_recycled"]


def test_class_swap_trains_two_epochs_and_loss_decreases(trained):
    first, second = epoch_losses(trained["trainer"])
    assert second < first, (first, second)
    assert trained["trainer"].state.global_step == 16  # 16 pairs / batch 2, two epochs


def test_eval_data_are_scored_as_given_without_oracle_work(trained):
    calls = trained["trainer"].recycling_stats()["oracle_calls"]
    metrics = trained["trainer"].evaluate()
    assert metrics["eval_loss"] > 0 and trained["trainer"].recycling_stats()["oracle_calls"] == calls


def test_epoch_two_makes_zero_oracle_calls_and_oracle_is_released(trained):
    calls = trained["counter"].at_epoch_end
    assert calls[0] > 0 and calls[1] == calls[0]
    # 16 pairs in buffers of 8 (batch 2 x 4 micro-batches): 2 buffers, at most 3 template steps each.
    assert calls[0] <= 6
    assert not trained["trainer"].recycler.oracle_loaded


def test_exported_recycled_data_is_exactly_what_was_trained_on(trained):
    exported = trained["trainer"].recycled_dataset()
    assert len(exported) == 16 and exported.column_names[:3] == ["instruction", "input", "output"]
    # Tokenize the export the way plain SFTTrainer does and compare with the sequences seen in each epoch.
    plain = SFTTrainer(model=trained["trainer"].model, args=sft_config(trained["tmp_path"] / "plain"),
                       train_dataset=exported, processing_class=trained["tokenizer"])
    expected = sorted(tuple(ids) for ids in plain.train_dataset["input_ids"])
    for epoch in (0, 1):
        seen = []
        for e, ids, labels in trained["batches"]:
            if e == epoch or (epoch == 1 and e == 2):
                for row_ids, row_labels in zip(ids, labels):
                    loss_positions = (row_labels != -100).nonzero().flatten()
                    start, n = int(loss_positions.min()), int(loss_positions.max()) + 1  # right padding after n
                    assert start > 0 and bool((row_labels[start:n] == row_ids[start:n]).all())  # response only
                    seen.append(tuple(row_ids[:n].tolist()))
        assert sorted(seen) == expected


def test_qlora_student_in_4bit_with_lora_trains_on_cpu(tmp_path, oracle_path, alpaca_pairs):
    from peft import LoraConfig

    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    model = AutoModelForCausalLM.from_pretrained(
        oracle_path,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32),
    )
    counter = OracleCallsPerEpoch()
    trainer = ReflectionSFTTrainer(
        model=model,
        args=sft_config(tmp_path, learning_rate=1e-3),
        train_dataset=alpaca_pairs.select(range(16, 24)),
        processing_class=tokenizer,
        callbacks=[counter],
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), mode="response", max_new_tokens=24,
                                           buffer_batches=2, oracle_model_path=oracle_path, template_set="compact"),
    )
    counter.trainer = trainer
    trainer.train()
    first, second = epoch_losses(trainer)
    assert second < first
    assert counter.at_epoch_end[0] > 0 and counter.at_epoch_end[1] == counter.at_epoch_end[0]
    assert any("lora" in n for n, p in trainer.model.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora" not in n)


class KilledAfterTrainerState(Exception):
    pass


def checkpointed_run(tmp_path, oracle_path, alpaca_pairs, rows, save_steps):
    """The two checkpoint tests' setup: a tiny student, ``rows`` real pairs, response mode with one-row buffers,
    a checkpoint every ``save_steps`` steps, and a scripted oracle (the claim is the bookkeeping, not the text)."""
    student = str(tiny_student(tmp_path / "student"))
    data = alpaca_pairs.select(range(rows))
    config = ReflectionConfig(cache_dir=str(tmp_path / "cache"), mode="response", template_set="compact",
                              buffer_batches=1, progress_bar=False)
    args = sft_config(tmp_path, num_train_epochs=1, per_device_train_batch_size=1, save_strategy="steps",
                      save_steps=save_steps, logging_steps=100)
    oracle = ScriptedOracle(lambda c: "A longer and better answer than before. [End]")
    return student, data, config, args, oracle


def test_checkpoint_whose_trainer_state_is_written_already_holds_the_trained_rows(
        tmp_path, oracle_path, alpaca_pairs, monkeypatch):
    """The Trainer writes trainer_state.json last; a checkpoint that has it counts as complete and is resumed from.
    The rows trained so far (for the export) were written after it, and not atomically: a kill -9 right after the
    trainer state left a checkpoint whose resumed run exported none of the rows trained before it.
    The kill point is the moment trainer_state.json appears under its final name (it is written under a temporary
    name and renamed once every rank wrote its files)."""
    import os

    student, data, config, args, oracle = checkpointed_run(tmp_path, oracle_path, alpaca_pairs, rows=4, save_steps=2)
    rename = os.replace

    def killed_after_the_state_is_in_place(source, destination):
        rename(source, destination)
        if os.path.basename(destination) == "trainer_state.json":  # the process dies right after it is on disk
            raise KilledAfterTrainerState

    monkeypatch.setattr(os, "replace", killed_after_the_state_is_in_place)
    trainer = ReflectionSFTTrainer(model=student, args=args, train_dataset=data, reflection_config=config,
                                   oracle=oracle)
    with pytest.raises(KilledAfterTrainerState):
        trainer.train()
    checkpoint = tmp_path / "out" / "checkpoint-2"
    assert (checkpoint / "trainer_state.json").exists()
    assert sorted(json.loads((checkpoint / "reflect_trained-0.json").read_text())) == [0, 1]
    assert not list(checkpoint.glob("*.tmp"))

    monkeypatch.setattr(os, "replace", rename)
    resumed = ReflectionSFTTrainer(model=student, args=args, train_dataset=data, reflection_config=config,
                                   oracle=oracle)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    exported = resumed.recycled_dataset()
    assert exported["original_instruction"] == data["instruction"]  # all 4 rows, 2 of them trained before the kill


def test_resumed_from_the_last_checkpoint_the_export_still_holds_every_trained_row(tmp_path, oracle_path,
                                                                                   alpaca_pairs):
    """A run killed after its last checkpoint (while saving the model or exporting) resumes from it with no step
    left: the Trainer then runs no epoch, and the trained rows, read in a hook of its epoch loop, were never loaded:
    the export was empty."""
    student, data, config, args, oracle = checkpointed_run(tmp_path, oracle_path, alpaca_pairs, rows=2, save_steps=1)
    first = ReflectionSFTTrainer(model=student, args=args, train_dataset=data, reflection_config=config, oracle=oracle)
    first.train()
    resumed = ReflectionSFTTrainer(model=student, args=args, train_dataset=data, reflection_config=config,
                                   oracle=oracle)
    resumed.train(resume_from_checkpoint=True)  # the newest: checkpoint-2, the end of training
    assert resumed.state.global_step == 2
    assert resumed.recycled_dataset().to_list() == first.recycled_dataset().to_list()


def test_bad_data_is_caught_at_init_before_any_work(tmp_path, alpaca_pairs):
    def never(conversation):
        raise AssertionError("no oracle work may happen")

    bad = alpaca_pairs.select(range(5)).map(lambda r, i: {"output": "" if i == 3 else r["output"]}, with_indices=True)
    with pytest.raises(BadRowError, match="row 3, field 'output' is empty"):
        # A model *name* would be loaded by SFTTrainer: the error must come first.
        ReflectionSFTTrainer(model="/nonexistent/model/never/loaded", args=sft_config(tmp_path), train_dataset=bad,
                             oracle=ScriptedOracle(never))


def test_streamed_data_is_recycled_in_the_first_pass_only(tmp_path, oracle_path, alpaca_pairs):
    from datasets import IterableDataset

    rows = alpaca_pairs.select(range(24, 32)).to_list()
    stream = IterableDataset.from_generator(lambda: iter(rows))
    counter = OracleCallsPerEpoch()
    trainer = ReflectionSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32),
        args=sft_config(tmp_path, max_steps=8),  # 8 rows / batch 2 = 4 steps a pass: two passes
        train_dataset=stream,
        processing_class=AutoTokenizer.from_pretrained(oracle_path),
        callbacks=[counter],
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), mode="response", max_new_tokens=16,
                                           buffer_batches=2, oracle_model_path=oracle_path, template_set="compact"),
    )
    counter.trainer = trainer
    trainer.train()
    assert trainer.state.global_step == 8
    stats = trainer.recycling_stats()
    assert stats["oracle_prompts"] == 8 and stats["oracle_calls"] == 2  # buffers of 4 pairs, first pass only
    assert not trainer.recycler.oracle_loaded  # released when the second pass began
    exported = trainer.recycled_dataset()
    assert exported["original_instruction"] == [r["instruction"] for r in rows]  # in the order first trained
