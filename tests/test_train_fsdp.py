"""FSDP2 (`fully_shard`) on gloo: 2 real CPU processes match 1 process, and resume through gathered checkpoints."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fusekit
from fusekit import zoo
from torchrun_helpers import metrics, torchrun, uneven_windows

pytest.importorskip("torch.distributed.fsdp", reason="this torch has no FSDP2")

WORKER = """
import pickle, sys
import fusekit
windows_file, model, out, stop = sys.argv[1:5]
with open(windows_file, "rb") as f:
    windows = pickle.load(f)
for limit in ([int(stop), None] if stop != "0" else [None]):
    fusekit.train(model, windows, out, lam=0.7, fusion="min_ce", granularity="token", lr=1e-3, fsdp=True,
                  batch_size=1, grad_accum=1, max_length=24, save_every=2, stop_after=limit, resume=limit is None,
                  progress=False)
"""


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_and_resume_is_exact(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "model", hidden=32)
    windows = uneven_windows(len(tok))
    torchrun(tmp_path, WORKER, windows, model, tmp_path / "fsdp", 3)  # stops at a step-3 checkpoint, then resumes
    single = fusekit.train(model, windows, tmp_path / "single", lam=0.7, fusion="min_ce", granularity="token",
                           lr=1e-3, batch_size=1, grad_accum=2, max_length=24, progress=False)
    fsdp_log, one_log = metrics(tmp_path / "fsdp"), metrics(single)
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
