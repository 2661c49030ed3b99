"""Data TRL users have: ShareGPT ``conversations`` (``from``/``value``) and pre-tokenized rows (``input_ids``) train as
with ``SFTTrainer``, token for token; ShareGPT rows are recycled like ``messages`` and stay ShareGPT in the export.

Parity is compared as in ``test_parity.py`` (whose helpers these tests import): both trainers on the same data,
options and seed; what each fed the model, step by step.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTTrainer

from reflect_trainer import ReflectionConfig
from reflect_trainer.trainer import ReflectionSFTTrainer
from test_support.oracles import ScriptedOracle
import test_parity
from test_parity import STEPS, assert_same_training, cheap_copy, config, fresh_tokenizer, qa, train

student = test_parity.student  # the fixture: one real SmolLM2 student per module

pytestmark = pytest.mark.slow
SPEAKERS = [("human", "gpt"), ("user", "assistant"), ("human", "chatgpt"), ("user", "model"), ("human", "bard")]


def sharegpt_rows(n=10):
    """ShareGPT as found in the wild: mixed speaker names, a system turn, multi-turn rows, an extra column, and one
    row whose final turn is a tool's (nothing to reflect: passed through)."""
    rows = []
    for i in range(n):
        q, a = qa(i)
        user, assistant = SPEAKERS[i % len(SPEAKERS)]
        turns = [{"from": "system", "value": "Answer briefly."}] if i % 3 == 0 else []
        if i % 4 == 1:
            turns += [{"from": user, "value": "Hi!"}, {"from": assistant, "value": "Hello."}]
        turns += [{"from": user, "value": q}, {"from": assistant, "value": a}]
        if i == 7:
            turns += [{"from": "observation", "value": f"{2 * i}"}]
        rows.append({"id": f"row-{i}", "conversations": turns})
    return Dataset.from_list(rows)


def recording(script):
    """A scripted oracle that also keeps every conversation it was sent."""
    oracle = ScriptedOracle(lambda conversation: oracle.prompts.append(conversation) or script(conversation))
    oracle.prompts = []
    return oracle


def reflection(tmp_path, **overrides):
    return ReflectionConfig(**{**dict(cache_dir=str(tmp_path / "cache"), buffer_batches=2, progress_bar=False,
                                      template_set="compact"), **overrides})


def sent_text(oracle) -> str:
    return "\n".join(m["content"] for c in oracle.prompts for m in c)


def test_sharegpt_conversations_are_recycled_and_train_exactly_as_sfttrainer(tmp_path, student, oracle_path):
    data = sharegpt_rows()
    oracle = recording(lambda conversation: "ok")  # never parses: every row falls back to its original exchange
    args = config(tmp_path)
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), args, data, oracle=oracle,
                 reflection_config=reflection(tmp_path))
    theirs = train(SFTTrainer, student, fresh_tokenizer(oracle_path), args, data)
    assert ours["steps"] == STEPS
    assert_same_training(ours, theirs, "sharegpt")
    stats = ours["trainer"].recycling_stats()
    assert (stats["rows_recycled"], stats["rows_passed_through"]) == (9, 1)  # row 7 ends with an observation
    # The oracle was sent each reflected row's final exchange (human/user turn and gpt/assistant/... turn).
    text = sent_text(oracle)
    for i in range(10):
        q, a = qa(i)
        assert (q in text) == (i != 7) and (a in text) == (i != 7), i


PRE_TOKENIZED = {
    "input_ids": lambda prompt, full: {},
    "input_ids-labels": lambda prompt, full: {"labels": [-100] * len(prompt) + full[len(prompt):]},
    "input_ids-completion_mask": lambda prompt, full: {"completion_mask": [0] * len(prompt) +
                                                       [1] * (len(full) - len(prompt))},
    "input_ids-assistant_masks": lambda prompt, full: {"assistant_masks": [0] * len(prompt) +
                                                       [1] * (len(full) - len(prompt))},
}


def pre_tokenized_rows(tokenizer, case, n=10):
    rows = []
    for i in range(n):
        q, a = qa(i)
        prompt = tokenizer(f"Question: {q}\nAnswer:")["input_ids"]
        full = prompt + tokenizer(f" {a}")["input_ids"] + [tokenizer.eos_token_id]
        row = {"input_ids": full, **PRE_TOKENIZED[case](prompt, full)}
        if case != "input_ids":  # text columns a pre-tokenized set often keeps: SFTTrainer ignores them then
            row["messages"] = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        rows.append(row)
    return Dataset.from_list(rows)


@pytest.mark.parametrize("case", list(PRE_TOKENIZED), ids=list(PRE_TOKENIZED))
def test_pre_tokenized_rows_pass_through_counted_and_train_exactly_as_sfttrainer(
        case, tmp_path, student, oracle_path):
    data = pre_tokenized_rows(fresh_tokenizer(oracle_path), case)
    oracle = recording(lambda conversation: "ok")
    args = config(tmp_path, max_length=16)  # some rows are cut: truncation is SFTTrainer's too
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), args, data, oracle=oracle,
                 reflection_config=reflection(tmp_path))
    theirs = train(SFTTrainer, student, fresh_tokenizer(oracle_path), args, data)
    assert ours["steps"] == STEPS
    assert_same_training(ours, theirs, case)
    stats = ours["trainer"].recycling_stats()
    assert (stats["rows_recycled"], stats["rows_passed_through"]) == (0, 10)
    assert oracle.prompts == []
    exported = ours["trainer"].recycled_dataset()
    assert exported["input_ids"] == data["input_ids"] and set(exported["trained_version"]) == {"original"}


def test_sharegpt_rows_really_recycled_stay_sharegpt_and_plain_sfttrainer_trains_the_export_identically(
        tmp_path, student, oracle_path):
    data = sharegpt_rows(4)
    oracle = recording(lambda conversation: "A longer and better answer than before. [End]")
    options = dict(max_length=128)
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), config(tmp_path, **options), data,
                 oracle=oracle, reflection_config=reflection(tmp_path, mode="response"))
    exported = ours["trainer"].recycled_dataset()
    assert exported["id"] == data["id"]  # the original columns are kept
    assert exported["original_conversations"] == data["conversations"]
    for original, row in zip(data, exported):
        assert row["trained_version"] == "recycled" and row["response_reflection_fallback"] is None
        *before, last = row["conversations"]
        assert before == original["conversations"][:-1]  # every other turn, speakers and all, as it was
        assert last["from"] == original["conversations"][-1]["from"]
        assert last["value"] == row["recycled_output"] != original["conversations"][-1]["value"]
        assert "better answer" in last["value"]  # what the oracle wrote, parsed
    # Plain SFTTrainer on the export, same options and seed: its loader's batches are what our run trained on.
    plain = SFTTrainer(model=cheap_copy(student), args=config(tmp_path / "plain", **options), train_dataset=exported,
                       processing_class=fresh_tokenizer(oracle_path))
    batches = list(plain.get_train_dataloader())
    assert len(batches) == len(ours["fed"])
    for k, (mine, base) in enumerate(zip(ours["fed"], batches)):
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(mine[name], base[name]), f"batch {k} {name} differs"
    tokenizer = fresh_tokenizer(oracle_path)
    trained = "".join(tokenizer.decode(batch["input_ids"][0]) for batch in ours["fed"])
    assert "better answer" in trained


def tokenized_on_the_fly(batch):
    return {"input_ids": [[1, 2, 3]] * len(batch["conversations"])}


REFUSED_BY_TRL = {  # data SFTTrainer itself refuses: it says why, and we must say the same
    "with_transform": lambda: sharegpt_rows(4).with_transform(tokenized_on_the_fly),
    "conversations_in_role_content_form": lambda: Dataset.from_list(
        [{"conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
         for q, a in map(qa, range(4))]),
    "empty_first_conversation": lambda: Dataset.from_list(
        [{"conversations": []}, *sharegpt_rows(3).to_list()]).remove_columns("id"),
}


@pytest.mark.parametrize("case", list(REFUSED_BY_TRL), ids=list(REFUSED_BY_TRL))
def test_data_sfttrainer_refuses_is_refused_with_sfttrainers_own_error(case, tmp_path, student, oracle_path):
    def error(trainer_cls, **kwargs):
        with pytest.raises(Exception) as caught:
            trainer_cls(model=cheap_copy(student), args=config(tmp_path), train_dataset=REFUSED_BY_TRL[case](),
                        processing_class=fresh_tokenizer(oracle_path), **kwargs)
        return type(caught.value), str(caught.value)

    theirs = error(SFTTrainer)
    oracle = recording(lambda conversation: "ok")
    assert error(ReflectionSFTTrainer, oracle=oracle, reflection_config=reflection(tmp_path)) == theirs
    assert oracle.prompts == []


def test_a_sharegpt_stream_is_recycled_and_exported_in_sharegpt_form(tmp_path, student, oracle_path):
    data = sharegpt_rows(4)
    oracle = recording(lambda conversation: "A longer and better answer than before. [End]")
    trainer = ReflectionSFTTrainer(model=cheap_copy(student), args=config(tmp_path, max_steps=2),
                                   train_dataset=data.to_iterable_dataset(),
                                   processing_class=fresh_tokenizer(oracle_path), oracle=oracle,
                                   reflection_config=reflection(tmp_path, mode="response"))
    trainer.train()
    exported = {row["id"]: row for row in trainer.recycled_dataset()}
    assert sorted(exported) == sorted(data["id"])
    for original in data:
        row = exported[original["id"]]
        assert row["trained_version"] == "recycled" and row["original_conversations"] == original["conversations"]
        assert row["conversations"][-1] == {"from": original["conversations"][-1]["from"],
                                            "value": "A longer and better answer than before."}
