"""Drop-in means identical: ``ReflectionSFTTrainer`` and ``trl.SFTTrainer`` on the same data, options and seed train
on the same tokens, with the same masks, steps, learning rates and losses.

Differential: each case trains both trainers (real SmolLM2-135M student, real TRL) and compares what each Trainer
actually fed the model (``inputs`` recorded in ``compute_loss``). Recycling is made a no-op with a scripted oracle
whose outputs fall back to the original pairs: the claim under test is data preparation, not recycling, and the
recycled rows still go through the whole recycling path (counted below). With real recycling, the export of a run is
trained by plain SFTTrainer and must give the batches the run trained on.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from reflect_trainer import ReflectionConfig
from reflect_trainer.trainer import ReflectionSFTTrainer
from test_support.oracles import CountingOracle, ScriptedOracle

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent
TOOLS_TEMPLATE = str(HERE / "chat_template_tools.jinja")
STEPS = 5  # 10 rows, batch 2, one epoch


class LearningRates(TrainerCallback):
    """Test instrument: the scheduler's learning rate after every optimizer step."""

    def __init__(self):
        self.trainer, self.rates = None, []

    def on_step_end(self, args, state, control, **kwargs):
        self.rates.append(self.trainer.lr_scheduler.get_last_lr()[0])


def noop_oracle():
    # Too short to be accepted by any template step: every phase falls back to the original pair.
    return ScriptedOracle(lambda conversation: "ok")


@pytest.fixture(scope="module")
def student(oracle_path):
    return AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32)


def fresh_tokenizer(oracle_path):
    return AutoTokenizer.from_pretrained(oracle_path)  # per trainer: options such as chat_template_path change it


def config(tmp_path, cls=SFTConfig, **overrides):
    base = dict(output_dir=str(tmp_path / "out"), num_train_epochs=1, per_device_train_batch_size=2,
                learning_rate=1e-2, lr_scheduler_type="cosine", warmup_steps=1, logging_steps=1, save_strategy="no",
                report_to="none", use_cpu=True, seed=0)
    if cls is SFTConfig:  # TrainingArguments has no max_length: SFTTrainer's conversion gives the default, 1024
        base.update(bf16=False, gradient_checkpointing=False, max_length=64)
    return cls(**{**base, **overrides})


def cheap_copy(student):
    """The student with only its final norm trainable: the forward pass (what the loss is computed from) is the full
    real model, the backward pass and optimizer step are cheap. Both trainers of a case get the same treatment."""
    model = copy.deepcopy(student)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = name.startswith("model.norm")
    return model


def train(trainer_cls, student, tokenizer, args, data, **kwargs):
    """Train one epoch; return the trainer and what it fed the model, step by step."""
    lrs = LearningRates()
    trainer = trainer_cls(model=cheap_copy(student), args=args, train_dataset=data, processing_class=tokenizer,
                          callbacks=[lrs], **kwargs)
    lrs.trainer = trainer
    fed, losses = [], []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **k):  # test instrument
        loss = compute_loss(model, inputs, *a, **k)
        if model.training:
            fed.append({name: value.clone() for name, value in inputs.items() if torch.is_tensor(value)})
            losses.append(float(loss.detach()))
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {"trainer": trainer, "fed": fed, "losses": losses, "lrs": lrs.rates, "steps": trainer.state.global_step}


def assert_same_training(ours, theirs, case):
    assert ours["steps"] == theirs["steps"], f"{case}: steps per epoch differ"
    assert len(ours["fed"]) == len(theirs["fed"]), f"{case}: micro-batches differ"
    for k, (a, b) in enumerate(zip(ours["fed"], theirs["fed"])):
        assert a.keys() == b.keys(), f"{case}: batch {k} keys {sorted(a)} vs {sorted(b)}"
        for name in a:
            assert torch.equal(a[name], b[name]), f"{case}: batch {k} {name} differs"
    assert ours["lrs"] == theirs["lrs"], f"{case}: learning rates differ"
    assert ours["losses"][:5] == theirs["losses"][:5], f"{case}: losses differ"


# ---- data: short real-looking rows ---------------------------------------------------------------------------
def qa(i):
    return f"What is {i} plus {i}?", f"{i} plus {i} is {2 * i}."


def messages_single(n=10):
    return Dataset.from_list([{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
                              for q, a in map(qa, range(n))])


def real_qa(i):
    """Real AlpacaEval pairs with short answers: the real oracle can rewrite them within a small budget (on the toy
    arithmetic of :func:`qa` SmolLM2 loops, and the acceptance gates rightly reject every rewrite)."""
    from reflect_trainer.embedded import load_alpaca_eval

    row = load_alpaca_eval(limit=i + 1, max_answer_words=30)[i]
    return row["instruction"], row["output"]


def messages_multiturn_tools(n=10, source=None):
    add = {"name": "add", "description": "Add two numbers", "parameters": {"type": "object", "properties": {}}}
    tools = json.dumps([{"type": "function", "function": add}])
    rows = []
    for i in range(n):
        q, a = (source or qa)(i)
        final = {"role": "assistant", "content": a if source else f"Let me add {i} and {i}."}
        if i % 2:  # a final reply that also calls a tool
            final["tool_calls"] = [{"type": "function", "function": {"name": "add", "arguments": f"{i},{i}"}}]
        rows.append({
            "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi!"},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": q}, final],
            "tools": tools,
            "chat_template_kwargs": {"persona": f"Persona {i % 3}"},
        })
    return Dataset.from_list(rows)


def prompt_completion_strings(n=10, long_prompts=0):
    rows = [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"} for q, a in map(qa, range(n))]
    rows += [{"prompt": "Question: " + "why " * 60 + "?\nAnswer:", "completion": " Because."}] * long_prompts
    return Dataset.from_list(rows)


def prompt_completion_conversations(n=10):
    return Dataset.from_list([
        {"prompt": [{"role": "system", "content": "Be precise. " * 4}, {"role": "user", "content": q}],
         "completion": [{"role": "assistant", "content": a}]} for q, a in map(qa, range(n))])


def text_rows(n=10):
    return Dataset.from_list([{"content": f"{q} {a}"} for q, a in map(qa, range(n))])


def alpaca_rows(n=10):
    return Dataset.from_list([{"instruction": q, "input": "Show your work." if i % 2 else "", "output": a}
                              for i, (q, a) in enumerate(map(qa, range(n)))])


def alpaca_text(row):
    return f"### Instruction: {row['instruction']} {row['input']}\n### Response: {row['output']}"


def alpaca_as_prompt_completion(data):
    return data.map(lambda r: {
        "prompt": [{"role": "user", "content": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")}],
        "completion": [{"role": "assistant", "content": r["output"]}]})


# id -> (data, SFTTrainer's data, SFTConfig options, trainer kwargs, rows reflected)
CASES = {
    "messages-single_turn-defaults": (messages_single, None, {}, {}, 10),
    "messages-multi_turn_system_tools_tool_calls_chat_template_kwargs-assistant_only_loss": (
        messages_multiturn_tools, None, dict(assistant_only_loss=True, chat_template_path=TOOLS_TEMPLATE,
                                             max_length=128), {}, 10),
    "prompt_completion_strings-completion_only_loss_default-max_length_drops_fully_masked": (
        lambda: prompt_completion_strings(10, long_prompts=2), None, dict(max_length=32), {}, 12),
    "prompt_completion_strings-completion_only_loss_false": (
        prompt_completion_strings, None, dict(completion_only_loss=False), {}, 10),
    "prompt_completion_conversations-truncation_keep_end": (
        prompt_completion_conversations, None, dict(max_length=24, truncation_mode="keep_end"), {}, 10),
    "text-dataset_text_field-passed_through": (text_rows, None, dict(dataset_text_field="content"), {}, 0),
    "formatting_func-alpaca_columns-gradient_accumulation": (
        alpaca_rows, None, dict(per_device_train_batch_size=1, gradient_accumulation_steps=2),
        dict(formatting_func=alpaca_text), 10),
    "alpaca-as_prompt_completion_conversations": (alpaca_rows, alpaca_as_prompt_completion, {}, {}, 10),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_noop_recycling_trains_exactly_as_sfttrainer(case, tmp_path, student, oracle_path):
    make, for_trl, options, kwargs, reflected = CASES[case]
    data = make()
    args = config(tmp_path, **options)
    before = args.to_dict()
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), args, data, oracle=noop_oracle(),
                 reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), buffer_batches=2,
                                                    progress_bar=False, template_set="compact"), **kwargs)
    assert args.to_dict() == before, f"{case}: the user's config was modified"
    # The same config object, reused for the baseline, as a user comparing the two would.
    theirs = train(SFTTrainer, student, fresh_tokenizer(oracle_path), args, for_trl(data) if for_trl else data,
                   **kwargs)
    assert ours["steps"] == STEPS
    assert_same_training(ours, theirs, case)
    stats = ours["trainer"].recycling_stats()
    # Every trained row went through recycling (or was passed through, counted): nothing bypassed it.
    trained = len(ours["trainer"].recycled_dataset(include_dropped=True))
    assert stats["rows_recycled"] + stats["rows_passed_through"] == trained
    assert stats["rows_recycled"] == min(reflected, trained)
    assert stats["rows_dropped_by_trl"] == len(data) - trained  # as SFTTrainer drops them, but counted


def test_training_arguments_eval_dict_group_by_length_and_drop_last_behave_as_in_sfttrainer(
        tmp_path, student, oracle_path):
    case = "messages-TrainingArguments-eval_dict-evaluate_raw-group_by_length-dataloader_drop_last"
    data = messages_single(11)  # 11 rows, batch 2, drop_last: 5 steps
    args = config(tmp_path, cls=TrainingArguments, train_sampling_strategy="group_by_length",
                  dataloader_drop_last=True)
    evals = {"first": messages_single(4), "second": messages_single(6).select(range(3, 6))}
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), args, data, eval_dataset=evals,
                 oracle=noop_oracle(), reflection_config=ReflectionConfig(
                     cache_dir=str(tmp_path / "cache"), buffer_batches=2, progress_bar=False, template_set="compact"))
    theirs = train(SFTTrainer, student, fresh_tokenizer(oracle_path), args, data, eval_dataset=evals)
    assert ours["steps"] == STEPS
    assert_same_training(ours, theirs, case)

    def measured(metrics):  # timings differ between any two runs
        return {k: v for k, v in metrics.items() if "runtime" not in k and "per_second" not in k}

    assert measured(ours["trainer"].evaluate()) == measured(theirs["trainer"].evaluate())
    raw = messages_single(3)
    ours_raw, theirs_raw = ours["trainer"].evaluate(eval_dataset=raw), theirs["trainer"].evaluate(eval_dataset=raw)
    assert measured(ours_raw) == measured(theirs_raw)


def test_packing_is_refused_with_the_reason(tmp_path, oracle_path):
    with pytest.raises(ValueError, match="packing=True cannot work with lazy recycling"):
        ReflectionSFTTrainer(model=oracle_path, args=config(tmp_path, packing=True), train_dataset=messages_single(),
                             oracle=noop_oracle())


def record_trained_rows(trainer) -> list:
    """Test instrument: the token rows (padding removed) of every batch the trainer's loss is computed on."""
    seen = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **k):
        rows = zip(inputs["input_ids"], inputs["attention_mask"])
        seen.extend(tuple(ids[mask.bool()].tolist()) for ids, mask in rows)
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = recording_compute_loss
    return seen


def test_max_steps_export_holds_only_rows_trained_and_the_rest_is_recycled_on_request(
        tmp_path, student, oracle_path):
    data = messages_single(10)
    trainer = ReflectionSFTTrainer(
        model=cheap_copy(student), args=config(tmp_path, max_steps=2), train_dataset=data,
        processing_class=fresh_tokenizer(oracle_path), oracle=noop_oracle(),
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), buffer_batches=1, progress_bar=False,
                                           template_set="compact"))
    seen = record_trained_rows(trainer)
    trainer.train()
    exported = trainer.recycled_dataset()
    assert len(exported) == 4 == len(seen)  # 2 steps of 2 rows: only those
    # Buffer = one micro-batch; the loader collates (so recycles) one micro-batch ahead of the step that takes it:
    # that batch was recycled but never trained on, and is not in the export.
    assert trainer.recycling_stats()["rows_recycled"] == 6
    plain = SFTTrainer(model=trainer.model, args=config(tmp_path / "plain"), train_dataset=exported,
                       processing_class=fresh_tokenizer(oracle_path))
    assert sorted(tuple(x) for x in plain.train_dataset["input_ids"]) == sorted(seen)
    everything = trainer.recycle_remaining()
    assert len(everything) == 10 and sum(everything["trained"]) == 4
    assert trainer.recycling_stats()["rows_recycled"] == 10


# ---- real recycling: the export, trained by plain SFTTrainer, is what was trained on ---------------------------
REAL = {
    "messages-single_turn": (messages_single, {}),
    "messages-multi_turn_tools-assistant_only_loss": (
        lambda n: messages_multiturn_tools(n, source=real_qa),
        dict(assistant_only_loss=True, chat_template_path=TOOLS_TEMPLATE, max_length=256)),
    "prompt_completion_strings": (prompt_completion_strings, {}),
}


@pytest.mark.parametrize("case", list(REAL), ids=list(REAL))
def test_export_of_a_real_recycling_run_trains_plain_sfttrainer_on_the_same_tokens(
        case, tmp_path, student, oracle_path, real_oracle):
    make, options = REAL[case]
    data = make(4)
    # The claim is about tokens, not quality, and it needs rows the oracle changed: on 4 pairs the 135M oracle's only
    # complete rewrite in one case is a comment on itself, which the meta-commentary gate would reject.
    reflection = ReflectionConfig(cache_dir=str(tmp_path / "cache"), mode="response", max_new_tokens=64,
                                  buffer_batches=2, progress_bar=False, template_set="compact",
                                  reject_meta_commentary=False)
    oracle = CountingOracle(real_oracle)  # shared by the tests: a run's release must not close it
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), config(tmp_path, **options), data,
                 oracle=oracle, reflection_config=reflection)
    assert oracle.calls > 0
    exported = ours["trainer"].recycled_dataset()
    assert len(exported) == 4
    changed = [r for r in exported if r["trained_version"] == "recycled" and r["response_reflection_fallback"] is None]
    assert changed, (f"{case}: the oracle changed no row, so this run cannot show anything: "
                     f"{[(r['response_reflection_fallback'], r['response_reflection_raw']) for r in exported]}")
    # Plain SFTTrainer on the export, same options and seed: its loader's batches are what our run trained on.
    plain = SFTTrainer(model=cheap_copy(student), args=config(tmp_path / "plain", **options),
                       train_dataset=exported, processing_class=fresh_tokenizer(oracle_path))
    batches = list(plain.get_train_dataloader())
    assert len(batches) == len(ours["fed"])
    for k, (mine, base) in enumerate(zip(ours["fed"], batches)):
        for name in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(mine[name], base[name]), f"{case}: batch {k} {name} differs"


# ---- streams on two ranks --------------------------------------------------------------------------------------
def test_two_ranks_on_a_five_row_stream_finish_in_step_and_reshuffle_each_pass(tmp_path):
    script = HERE / "parity_stream_worker.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(script), str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE.parent)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # max_steps=3 honoured on both ranks, with as many micro-batches on each: a pass is 3 per rank (accelerate pads
    # rank 1's share), one optimizer step of 2 and the pass's last micro-batch (the Trainer ends the epoch when the
    # stream runs out), so 3 + 3 + 2, past two passes.
    assert [r["global_step"] for r in ranks] == [3, 3]
    assert len(ranks[0]["trained"]) == len(ranks[1]["trained"]) == 8
    # Each pass of the stream is reshuffled: the rows of pass 1 and of pass 2 (rank 0 takes positions 0, 2, 4 of
    # a pass, rank 1 positions 1, 3 and pads with 0) come in different orders, and pass 1 covers every row.
    passes = [[ranks[i % 2]["trained"][p * 3 + i // 2] for i in range(5)] for p in (0, 1)]
    assert passes[0] != passes[1]
    assert sorted(passes[0]) == sorted(passes[1]) == sorted(ranks[0]["all"])
    assert all(r["exported"] == 5 for r in ranks)  # rows trained by either rank


def test_export_after_resuming_from_a_checkpoint_holds_the_rows_trained_before_and_after(
        tmp_path, student, oracle_path):
    def run(max_steps, **train_kwargs):
        trainer = ReflectionSFTTrainer(
            model=cheap_copy(student), args=config(tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2),
            train_dataset=messages_single(10), processing_class=fresh_tokenizer(oracle_path), oracle=noop_oracle(),
            reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), buffer_batches=2,
                                               progress_bar=False, template_set="compact"))
        seen = record_trained_rows(trainer)
        trainer.train(**train_kwargs)
        return trainer, seen

    _, before = run(2)  # stops after checkpoint-2, as a crash right after it would
    resumed, after = run(3, resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert len(before) == 4 and len(after) == 2
    exported = resumed.recycled_dataset()
    plain = SFTTrainer(model=resumed.model, args=config(tmp_path / "plain"), train_dataset=exported,
                       processing_class=fresh_tokenizer(oracle_path))
    assert sorted(tuple(x) for x in plain.train_dataset["input_ids"]) == sorted(before + after)


def long_demands(conversation):
    """Scripted instruction reflection whose new instruction is far longer than max_length (accepted by the parser:
    varied words, no loop)."""
    if conversation[-2]["content"].startswith("Make this request more demanding"):
        words = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november".split()
        return " explain every step and mention " + ", ".join(f"{a} {b}" for a, b in zip(words, words[::-1])) + "."
    return "Add the two numbers: the sum is written out step by step, with the carry shown at the end."


def test_recycled_row_left_without_trainable_tokens_trains_as_its_original(tmp_path, student, oracle_path):
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}],
                               "completion": [{"role": "assistant", "content": a}]} for q, a in map(qa, range(4))])
    args = config(tmp_path, max_length=40)  # the originals fit; the recycled prompts alone exceed 40 tokens
    ours = train(ReflectionSFTTrainer, student, fresh_tokenizer(oracle_path), args, data,
                 oracle=ScriptedOracle(long_demands), reflection_config=ReflectionConfig(
                     cache_dir=str(tmp_path / "cache"), mode="instruction", buffer_batches=2, progress_bar=False,
                     template_set="compact"))
    stats = ours["trainer"].recycling_stats()
    assert stats["instruction_reflection/accepted"] == 4  # the oracle's rewrites were accepted...
    assert stats["rows_fully_masked_fallback"] == 4  # ...but TRL's truncation left them nothing to learn
    exported = ours["trainer"].recycled_dataset()
    assert exported["trained_version"] == ["original"] * 4 and exported["prompt"] == data["prompt"]
    theirs = train(SFTTrainer, student, fresh_tokenizer(oracle_path), args, data)
    assert_same_training(ours, theirs, "prompt_completion_conversations-recycled_row_fully_masked")
