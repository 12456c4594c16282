"""benchmarks/gpu_train_check.py's CPU path (--dry): the script runs end to end, both training paths agree, and the
FSDP2 + bf16 runs with and without activation checkpointing agree."""

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
    # FSDP2 + bf16 on 2 gloo ranks, without and with activation checkpointing: the same losses (the
    # recomputation repeats the same bf16 operations), a sharded checkpoint and an exported model each.
    fsdp = result["fsdp"]
    assert fsdp["ranks"] == 2 and set(fsdp["runs"]) == {"off", "on"}
    plain, recomputed = fsdp["runs"]["off"], fsdp["runs"]["on"]
    assert len(plain["loss"]) == len(recomputed["loss"]) == 2
    assert recomputed["loss"] == pytest.approx(plain["loss"], abs=1e-4)
    for run in (plain, recomputed):
        assert run["tokens_per_s"] > 0 and run["peak_memory_mib"] > 0
        assert run["export_files"] == 1 and run["checkpoint_files"] >= 4  # model + optimizer parts of 2 ranks
