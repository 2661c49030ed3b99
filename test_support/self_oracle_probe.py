"""The self-oracle memory probe: one LoRA training run in a fresh process, its peak memory measured, so that peak
memory belongs to one configuration only. Run by ``tests/test_self_oracle.py`` and
``benchmarks/self_oracle_memory.py`` through :func:`run_probe`; ``python -m test_support.self_oracle_probe ENGINE
OUT_DIR`` prints the figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_support.cache_files import stored_records

ROOT = Path(__file__).resolve().parents[1]
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
    from test_support.students import sft_config

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
    return sorted(r["raw"] for r in stored_records(cache_dir))  # keys include the oracle's identity: sorted


def run_probe(engine: str, out_dir: str | Path) -> dict:
    """:func:`probe` in a fresh process (the repository root on its ``PYTHONPATH``); its figures."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    result = subprocess.run([sys.executable, "-m", "test_support.self_oracle_probe", engine, str(out_dir)],
                            capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"the {engine} probe failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    import logging

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.disable(logging.WARNING)
    print(json.dumps(probe(sys.argv[1], sys.argv[2])))
