"""``oracle_engine="self"``: the student's frozen base (adapters disabled) recycles the data it trains on, in one
process, with no second model in memory — shown by the process's measured peak memory against a run with a
separate oracle of the same size.

Each run is its own process (``test_support.self_oracle_probe``), so peak memory belongs to one configuration only.
"""

import pytest

from test_support.self_oracle_probe import ROWS
from test_support.self_oracle_probe import run_probe as run_probe_process

pytestmark = pytest.mark.slow


def run_probe(engine: str, tmp_path) -> dict:
    return run_probe_process(engine, tmp_path / engine)


def test_self_oracle_recycles_and_trains_in_one_process_without_a_second_model(tmp_path):
    own = run_probe("self", tmp_path)
    separate = run_probe("transformers", tmp_path)
    assert own["steps"] == separate["steps"] == ROWS
    assert own["oracle_prompts"] == ROWS and own["oracle_tokens"] > 0
    assert own["oracle_is_student"] and own["identity"].startswith("self:")
    assert len(own["generated"]) == ROWS and all(text.strip() for text in own["generated"])  # the student wrote
    # The frozen base with adapters disabled *is* the pre-trained model the separate oracle loads: same greedy text.
    assert own["generated"] == separate["generated"] and own["raw"] == separate["raw"]
    grown_own = own["peak"] - own["baseline"]
    grown_separate = separate["peak"] - separate["baseline"]
    model = own["model_bytes"]
    # Training alone grows the process by far more than the model (allocator arenas, activations, the Trainer), so
    # the yardstick is the same run with a separate oracle of exactly the student's size: it costs one more model
    # (0.98x in benchmarks/self_oracle_memory.py, 0.72x at worst across its runs; one run varies by up to 0.3x).
    assert grown_separate - grown_own > 0.5 * model, (grown_own / 2**20, grown_separate / 2**20, model / 2**20)


def test_self_oracle_needs_a_peft_student(tmp_path, oracle_path, alpaca_pairs):
    import torch
    from transformers import AutoModelForCausalLM

    from reflect_trainer import ReflectionConfig
    from reflect_trainer.trainer import ReflectionSFTTrainer
    from test_support.students import sft_config

    with pytest.raises(ValueError, match="needs a PEFT student"):
        ReflectionSFTTrainer(model=AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32),
                             args=sft_config(tmp_path), train_dataset=alpaca_pairs.select(range(2)),
                             reflection_config=ReflectionConfig(cache_dir=str(tmp_path), oracle_engine="self"))


def lora_trainer(tmp_path, oracle_path, alpaca_pairs, **reflection):
    """A real ReflectionSFTTrainer around a LoRA student (what ``oracle_engine="self"`` needs), built in __init__."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from reflect_trainer import ReflectionConfig
    from reflect_trainer.trainer import ReflectionSFTTrainer
    from test_support.students import sft_config

    return ReflectionSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(oracle_path, dtype=torch.float32), args=sft_config(tmp_path),
        train_dataset=alpaca_pairs.select(range(2)),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        reflection_config=ReflectionConfig(cache_dir=str(tmp_path / "cache"), oracle_engine="self", **reflection))


def test_self_oracle_with_overlap_on_is_refused_by_the_trainer(tmp_path, oracle_path, alpaca_pairs):
    with pytest.raises(ValueError, match="overlap='on' cannot work with oracle_engine='self'"):
        lora_trainer(tmp_path, oracle_path, alpaca_pairs, overlap="on")


def test_self_oracle_with_a_sharded_student_is_refused_by_the_trainer(tmp_path, oracle_path, alpaca_pairs,
                                                                      monkeypatch):
    """ZeRO-3/FSDP cannot run on this machine; the trainer is told its student is sharded, as it is there."""
    from reflect_trainer.trainer import ReflectionSFTTrainer

    monkeypatch.setattr(ReflectionSFTTrainer, "_model_is_sharded", lambda self: True)
    with pytest.raises(ValueError, match="cannot generate with a sharded student"):
        lora_trainer(tmp_path, oracle_path, alpaca_pairs)
