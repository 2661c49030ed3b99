"""The recipe fails in its first seconds, before the data, the student or DeepSpeed is loaded: a TRL sft.py YAML with
`packing: true` (the one SFTTrainer option lazy recycling refuses) or an oracle that cannot load. The data set named
here does not exist, so an error about it would mean the check came after the data was loaded."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
       "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize("line, message", [
    ("packing: true", "packing=True cannot work with lazy recycling"),
    ("oracle_model_path: /no/such/oracle", "oracle_model_path '/no/such/oracle' does not exist"),
], ids=["packing", "missing oracle"])
def test_recipe_refuses_before_loading_the_data(line, message, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model_name_or_path: embedded:smollm2\ndataset_name: {tmp_path / 'no-such-data'}\n"
                      f"output_dir: {tmp_path / 'out'}\nuse_cpu: true\nreport_to: none\n{line}\n")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "recipes" / "llama7b_recycled.py"), "--config", str(config)],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, result.stderr[-2000:]
    assert "no-such-data" not in result.stderr  # never got to the data
    assert not (tmp_path / "out").exists()
    print(f"refused after {time.perf_counter() - started:.1f} s (mostly importing torch and TRL)")
