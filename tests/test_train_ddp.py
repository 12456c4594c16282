"""DDP on gloo: 2 real processes (torchrun) match 1 process with twice the gradient accumulation."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fusekit
from fusekit import zoo
from fusion_data import random_window

WORKER = """
import pickle, sys
import fusekit
model, windows_file, out = sys.argv[1:4]
with open(windows_file, "rb") as f:
    windows = pickle.load(f)
fusekit.train(model, windows, out, lam=0.7, fusion="min_ce", granularity="token", lr=1e-3,
              batch_size=1, grad_accum=1, max_length=24, save_every=2, progress=False)
"""


def test_two_processes_equal_one_with_double_accumulation(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "model", hidden=32)
    rng = np.random.default_rng(0)
    # Uneven lengths (no two fit one row), so micro-batches differ in token counts; 9 rows: the last step
    # leaves rank 1 idle.
    windows = [random_window(rng, n=n, k=3, vocab=len(tok), sources=2, text_id=i)
               for i, n in enumerate([24, 17, 13, 24, 20, 14, 24, 16, 19])]
    with open(tmp_path / "windows.pkl", "wb") as f:
        pickle.dump(windows, f)
    (tmp_path / "worker.py").write_text(WORKER)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "worker.py"), str(model), str(tmp_path / "windows.pkl"), str(tmp_path / "ddp")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]

    single = fusekit.train(model, windows, tmp_path / "single", lam=0.7, fusion="min_ce", granularity="token",
                           lr=1e-3, batch_size=1, grad_accum=2, max_length=24, progress=False)
    ddp_log = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(ddp_log) == len(one_log) == 5
    for a, b in zip(ddp_log, one_log):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ddp_w, one_w = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(single / "model.safetensors"))
    for name in one_w:
        torch.testing.assert_close(ddp_w[name], one_w[name], rtol=0, atol=1e-6)
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000004" / "rng-rank1.json").is_file()
