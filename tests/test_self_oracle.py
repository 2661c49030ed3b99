"""``oracle_engine="self"``: the student's frozen base (adapters disabled) recycles the data it trains on, in one
process, with no second model in memory — shown by the process's measured peak memory against a run with a
separate oracle of the same size.

Each run is its own process (this file, run as a script), so peak memory belongs to one configuration only.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROWS = 4  # two buffers of 2 (batch 1 x 2 micro-batches): the second is recycled after two steps moved the adapter


def rss_bytes(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(engine: str, out_dir: str) -> dict:
    """Train a LoRA student for one epoch with the given oracle engine; measure memory around it."""
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from reflect_trainer import ReflectionConfig
    from reflect_trainer.embedded import default_oracle_path, load_alpaca_eval
    from reflect_trainer.trainer import ReflectionSFTTrainer
    from test_trainer import sft_config

    torch.manual_seed(0)
    path = str(default_oracle_path())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    baseline = rss_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: loading is not measured
    # The separate oracle is the same model, unquantized: a second copy of exactly the student's size.
    config = ReflectionConfig(cache_dir=f"{out_dir}/cache", oracle_engine=engine, oracle_model_path=path,
                              oracle_quantization="none", mode="response", template_set="compact", max_new_tokens=16,
                              buffer_batches=2, progress_bar=False, release_oracle=False)
    trainer = ReflectionSFTTrainer(
        model=model, args=sft_config(Path(out_dir), num_train_epochs=1, learning_rate=1e-3, disable_tqdm=True,
                                     per_device_train_batch_size=1),
        train_dataset=load_alpaca_eval(limit=ROWS), processing_class=AutoTokenizer.from_pretrained(path),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
        reflection_config=config,
    )
    trainer.train()
    stats = trainer.recycling_stats()
    exported = trainer.recycled_dataset()
    return {"model_bytes": model_bytes, "baseline": baseline, "peak": rss_bytes("VmHWM"),
            "oracle_prompts": stats["oracle_prompts"], "oracle_tokens": stats["oracle_tokens"],
            "steps": trainer.state.global_step, "identity": trainer.recycler.oracle_identity,
            "oracle_is_student": getattr(trainer.recycler.oracle, "model", None) is trainer.model,
            "raw": list(exported["response_reflection_raw"]), "generated": generated_texts(Path(out_dir) / "cache")}


def generated_texts(cache_dir: Path) -> list[str]:
    """What the oracle generated, as the cache stored it (without the pre-fill the recycler puts before it)."""
    records = [json.loads(line.split(" ", 1)[1]) for path in (cache_dir / "segments").glob("*.jsonl")
               for line in path.read_text().splitlines() if line]
    return sorted(r["raw"] for r in records)  # keys include the oracle's identity: compared as a sorted list


def run_probe(engine: str, tmp_path) -> dict:
    result = subprocess.run([sys.executable, __file__, engine, str(tmp_path / engine)], capture_output=True,
                            text=True, timeout=900, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


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
    from test_trainer import sft_config

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
    from test_trainer import sft_config

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


if __name__ == "__main__":  # a probe run: python test_self_oracle.py ENGINE OUT_DIR
    import logging
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    print(json.dumps(probe(sys.argv[1], sys.argv[2])))
