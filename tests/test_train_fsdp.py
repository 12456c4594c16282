"""FSDP2 (`fully_shard`) on gloo: 2 real CPU processes match 1 process, and resume through gathered checkpoints."""

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

pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")

WORKER = """
import pickle, sys
import fusekit
model, windows_file, out, stop = sys.argv[1:5]
with open(windows_file, "rb") as f:
    windows = pickle.load(f)
for limit in ([int(stop), None] if stop != "0" else [None]):
    fusekit.train(model, windows, out, lam=0.7, fusion="min_ce", granularity="token", lr=1e-3, fsdp=True,
                  batch_size=1, grad_accum=1, max_length=24, save_every=2, stop_after=limit, resume=limit is None,
                  progress=False)
"""


def torchrun(tmp_path, model, out, stop: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(tmp_path / "worker.py"), str(model), str(tmp_path / "windows.pkl"), str(out), str(stop)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as exc:  # say where the workers were, not only that they hung
        raise AssertionError(f"torchrun timed out; its stderr ends with: {str(exc.stderr)[-3000:]}") from None
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_and_resume_is_exact(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "model", hidden=32)
    rng = np.random.default_rng(0)
    windows = [random_window(rng, n=n, k=3, vocab=len(tok), sources=2, text_id=i)
               for i, n in enumerate([24, 17, 13, 24, 20, 14, 24, 16, 19])]
    with open(tmp_path / "windows.pkl", "wb") as f:
        pickle.dump(windows, f)
    (tmp_path / "worker.py").write_text(WORKER)

    torchrun(tmp_path, model, tmp_path / "fsdp", stop=3)  # stops at a step-3 checkpoint, then resumes
    single = fusekit.train(model, windows, tmp_path / "single", lam=0.7, fusion="min_ce", granularity="token",
                           lr=1e-3, batch_size=1, grad_accum=2, max_length=24, progress=False)
    fsdp_log = [json.loads(x) for x in (tmp_path / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    one_log = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(fsdp_log) == len(one_log) == 5
    for a, b in zip(fsdp_log, one_log):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    got, want = load_file(str(tmp_path / "fsdp" / "model.safetensors")), load_file(str(single / "model.safetensors"))
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5)
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step-00000004"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "rng-rank1.json").is_file()
    # The checkpoint holds the whole model and the whole optimizer state, not one rank's shard.
    from fusekit.train.safe_state import load_state

    state = load_state(ckpt / "trainer_state")
    n_params = sum(t.numel() for t in load_file(str(ckpt / "model.safetensors")).values())
    moments = sum(v["exp_avg"].numel() for v in state["optimizer"]["state"].values())
    assert moments == n_params
