"""benchmarks/gpu_train_check.py's CPU path (--dry): the script runs end to end and both training paths agree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "gpu_train_check.py"


@pytest.mark.slow
def test_gpu_check_dry_path_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parent.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry", "--json", str(tmp_path / "out.json")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["dry"] and result["device"] == "cpu" and result["steps"] == 2
    off, on = result["train"]["off"], result["train"]["on"]
    assert len(off["loss"]) == len(on["loss"]) == 2
    # fp32 on CPU: the fused head and the logits path train the same model on the same batches.
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5)
    assert result["extract"]["tokens"] > 0 and result["extract"]["plain_forward_tokens_per_s"] > 0
