"""DDP on gloo: 2 real processes (torchrun), with activation checkpointing, match 1 process without it and with
twice the gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import fusekit
from fusekit import zoo
from torchrun_helpers import metrics, torchrun, uneven_windows

WORKER = """
import pickle, sys
import fusekit
windows_file, model, out = sys.argv[1:4]
with open(windows_file, "rb") as f:
    windows = pickle.load(f)
fusekit.run_train(model, windows, out, lam=0.7, fusion="min_ce", granularity="token", lr=1e-3, gradient_checkpointing=True,
              batch_size=1, grad_accum=1, max_length=24, save_every=2, progress=False).out
"""


def test_two_processes_equal_one_with_double_accumulation(tokenizers_by_kind, tmp_path):
    tok = tokenizers_by_kind["bpe"]
    model = zoo.build_tiny_model("llama", tok, tmp_path / "model", hidden=32)
    windows = uneven_windows(len(tok))
    torchrun(tmp_path, WORKER, windows, model, tmp_path / "ddp")

    single = fusekit.run_train(model, windows, tmp_path / "single", lam=0.7, fusion="min_ce", granularity="token",
                           lr=1e-3, batch_size=1, grad_accum=2, max_length=24, progress=False).out
    ddp_log, one_log = metrics(tmp_path / "ddp"), metrics(single)
    assert len(ddp_log) == len(one_log) == 5
    for a, b in zip(ddp_log, one_log):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    ddp_w, one_w = load_file(str(tmp_path / "ddp" / "model.safetensors")), load_file(str(single / "model.safetensors"))
    for name in one_w:
        torch.testing.assert_close(ddp_w[name], one_w[name], rtol=0, atol=1e-6)
    assert (tmp_path / "ddp" / "checkpoints" / "step-00000004" / "rng-rank1.json").is_file()
