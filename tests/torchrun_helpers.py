"""Real CPU processes under torchrun (gloo), for the DDP and FSDP tests. Not a test module."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np

from fusion_data import random_window


def uneven_windows(vocab: int) -> list:
    """9 aligned windows of uneven lengths (no two fit one row), so micro-batches differ in token counts
    and the last step leaves rank 1 idle."""
    rng = np.random.default_rng(0)
    return [random_window(rng, n=n, k=3, vocab=vocab, sources=2, text_id=i)
            for i, n in enumerate([24, 17, 13, 24, 20, 14, 24, 16, 19])]


def torchrun(tmp_path: Path, worker: str, windows: list, *args: str, timeout: int = 300, nproc: int = 2,
             check: bool = True) -> subprocess.CompletedProcess:
    """Run the script `worker` on `nproc` processes with argv = (windows pickle, *args); with `check`, fail
    with its stderr unless every process succeeded."""
    (tmp_path / "worker.py").write_text(worker)
    with open(tmp_path / "windows.pkl", "wb") as f:
        pickle.dump(windows, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           str(tmp_path / "worker.py"), str(tmp_path / "windows.pkl"), *map(str, args)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:  # say where the workers were, not only that they hung
        raise AssertionError(f"torchrun timed out; its stderr ends with: {str(exc.stderr)[-3000:]}") from None
    if check:
        assert run.returncode == 0, run.stderr[-3000:]
    return run


def metrics(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
