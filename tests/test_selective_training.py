"""Selective Reflection-Tuning inside the trainer: the student (a LoRA model on SmolLM2-135M) scores every version of
every pair with IFD / reverse-IFD and trains on the one the paper's rule picks; the real 4-bit SmolLM2 oracle
recycles."""

import math

import pytest
import torch
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from reflect_trainer import Recycler, ReflectionConfig
from reflect_trainer.selection import VERSIONS, PairScores, StudentScorer, score_pairs, select_version
from reflect_trainer.trainer import ReflectionSFTTrainer
from test_support.students import sft_config

pytestmark = pytest.mark.slow
ROWS = 8


class ScoringPerEpoch(TrainerCallback):
    """Test instrument: scores computed and oracle calls made by the end of each epoch."""

    def __init__(self):
        self.trainer = None
        self.at_epoch_end: list[tuple[int, int]] = []

    def on_epoch_end(self, args, state, control, **kwargs):
        stats = self.trainer.recycling_stats()
        self.at_epoch_end.append((int(stats["scores_computed"]), int(stats["oracle_calls"])))


def lora_student(oracle_path):
    model = AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32)
    return model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")


def selective_config(tmp_path, oracle_path, **overrides):
    base = dict(cache_dir=str(tmp_path / "cache"), mode="selective", max_new_tokens=24, buffer_batches=2,
                oracle_model_path=oracle_path, template_set="compact", progress_bar=False)
    return ReflectionConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def selective_run(tmp_path_factory, oracle_path, alpaca_pairs):
    tmp_path = tmp_path_factory.mktemp("selective")
    model, peft_config = lora_student(oracle_path)
    tokenizer = AutoTokenizer.from_pretrained(oracle_path)
    probe = ScoringPerEpoch()
    trainer = ReflectionSFTTrainer(
        model=model, args=sft_config(tmp_path, learning_rate=1e-3), train_dataset=alpaca_pairs.select(range(ROWS)),
        processing_class=tokenizer, peft_config=peft_config, callbacks=[probe],
        reflection_config=selective_config(tmp_path, oracle_path),
    )
    probe.trainer = trainer
    trained_on = []
    original_compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *args, **kwargs):  # test instrument: the sequences trained on
        trained_on.extend(tuple(ids[labels != -100].tolist())
                          for ids, labels in zip(inputs["input_ids"], inputs["labels"]))
        return original_compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {"trainer": trainer, "probe": probe, "tmp_path": tmp_path, "tokenizer": tokenizer,
            "trained_on": trained_on, "exported": trainer.recycled_dataset()}


def test_training_with_selection_exports_choices_and_scores_for_every_row(selective_run):
    exported = selective_run["exported"]
    assert len(exported) == ROWS
    for row in exported:
        assert row["selected_version"] in VERSIONS
        for version in VERSIONS:
            for kind in ("ifd", "rifd"):
                value = row[f"{kind}_{version}"]
                assert math.isfinite(value) and value > 0, (kind, version, value)
        # The recycled (trained-on) pair is the chosen version, and the choice follows the rule from the scores.
        scores = {v: PairScores(row[f"ifd_{v}"], row[f"rifd_{v}"]) for v in VERSIONS}
        assert select_version(scores) == row["selected_version"]
        chosen = {"original": (row["original_instruction"], row["original_output"]), "q": (row["reflected_instruction"],
                  row["reflected_output"]), "a": (row["original_instruction"], row["a_output"]),
                  "qa": (row["reflected_instruction"], row["qa_output"])}[row["selected_version"]]
        assert (row["recycled_instruction"], row["recycled_output"]) == chosen
        assert row["completion"] == [{"role": "assistant", "content": row["recycled_output"]}]
    stats = selective_run["trainer"].recycling_stats()
    assert sum(stats.get(f"selected/{v}", 0) for v in VERSIONS) == ROWS


def test_each_trained_response_is_the_selected_version(selective_run):
    tokenizer = selective_run["tokenizer"]
    outputs = [row["recycled_output"].strip() for row in selective_run["exported"]]
    matched = set()
    for label_ids in selective_run["trained_on"]:  # the loss positions of each trained sequence
        text = tokenizer.decode(label_ids, skip_special_tokens=True).strip()
        hits = [i for i, out in enumerate(outputs) if out.startswith(text[:60])]
        assert hits, f"trained on a response that is no row's selected version: {text[:80]!r}"
        matched.update(hits)
    assert matched == set(range(ROWS))


def test_scores_come_from_the_frozen_base_and_are_computed_once(selective_run, oracle_path):
    (after_epoch_1, calls_1), (after_epoch_2, calls_2) = selective_run["probe"].at_epoch_end
    assert after_epoch_1 > 0 and after_epoch_2 == after_epoch_1  # epoch 2 reads choices, never rescoring
    assert calls_1 > 0 and calls_2 == calls_1
    # LoRA student: scores are the pre-trained base's (adapters disabled), as in the paper: recompute by hand.
    tokenizer = selective_run["tokenizer"]
    base = AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32).eval()
    row = selective_run["exported"][0]
    q, a = row["reflected_instruction"], row["reflected_output"]
    by_hand = score_pairs(base, tokenizer, [(q, a)], max_length=selective_run["trainer"].args.max_length)[0]
    assert row["ifd_q"] == pytest.approx(by_hand.ifd, rel=1e-4)
    assert row["rifd_q"] == pytest.approx(by_hand.reverse_ifd, rel=1e-4)


def test_scores_are_cached_and_a_new_threshold_needs_no_rescoring(selective_run, oracle_path, alpaca_pairs):
    trainer = selective_run["trainer"]
    scorer = StudentScorer(trainer.model, selective_run["tokenizer"], max_length=trainer.args.max_length)
    config = selective_config(selective_run["tmp_path"], oracle_path, selection_threshold=0.0, selection_drop=True)
    recycler = Recycler(config, scorer=scorer)
    out = recycler.recycle_dataset(alpaca_pairs.select(range(ROWS)))
    stats = recycler.stats()
    assert stats["oracle_calls"] == 0 and stats["scores_computed"] == 0  # texts and scores from the cache
    assert out["selected_version"] == [None] * ROWS  # no score is below 0: every row dropped
    assert out["skip_reason"] == ["dropped_by_selection"] * ROWS
    for v in VERSIONS:
        assert out[f"ifd_{v}"] == selective_run["exported"][f"ifd_{v}"]


def test_rows_dropped_by_selection_train_on_nothing(selective_run, oracle_path, alpaca_pairs, tmp_path):
    model, peft_config = lora_student(oracle_path)
    config = selective_config(selective_run["tmp_path"], oracle_path, selection_threshold=0.0, selection_drop=True)
    trainer = ReflectionSFTTrainer(model=model, args=sft_config(tmp_path, num_train_epochs=1),
                                   train_dataset=alpaca_pairs.select(range(ROWS)),
                                   processing_class=selective_run["tokenizer"], peft_config=peft_config,
                                   reflection_config=config)
    trainer.train()
    assert trainer.state.global_step == ROWS // 2
    assert all(h["loss"] == 0 for h in trainer.state.log_history if "loss" in h)  # nothing left to learn from
    assert len(trainer.recycled_dataset()) == 0
    kept = trainer.recycled_dataset(include_dropped=True)
    assert len(kept) == ROWS and kept["selected_version"] == [None] * ROWS


def test_selective_mode_without_a_student_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="needs the student"):
        Recycler(ReflectionConfig(cache_dir=str(tmp_path), mode="selective"))
