"""The training loop on tiny real models: λ = 1 is plain CLM, resume identity, learning, configs, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import fusekit
from fusekit import zoo
from fusekit.train import TrainConfigError, TrainError, build_config
from fusion_data import model_windows

WINDOW = 32


@pytest.fixture(scope="module")
def setup(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    """A tiny Llama target, a GPT-2 one (it has dropout), a source, and aligned windows from their top-k."""
    from transformers import AutoModelForCausalLM

    tok = tokenizers_by_kind["bpe"]
    root = tmp_path_factory.mktemp("train")
    target = zoo.build_tiny_model("llama", tok, root / "target", seed=0, hidden=32)
    gpt2 = zoo.build_tiny_model("gpt2", tok, root / "gpt2", seed=0, hidden=32)
    source = zoo.build_tiny_model("llama", tok, root / "source", seed=1, hidden=32)
    ids = np.concatenate([tok(t)["input_ids"] for t in corpus_texts[:40]])
    chunks = [ids[i : i + WINDOW] for i in range(0, 24 * WINDOW, WINDOW)]
    t_model = AutoModelForCausalLM.from_pretrained(target)
    s_model = AutoModelForCausalLM.from_pretrained(source)
    windows = model_windows(t_model, [s_model], chunks, k=4)
    held_out = [tok.decode(ids[i : i + WINDOW]) for i in range(30 * WINDOW, 34 * WINDOW, WINDOW)]
    return {"target": target, "gpt2": gpt2, "windows": windows, "held_out": held_out, "root": root}


def weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def metrics(path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


FAST = dict(lr=1e-3, batch_size=2, max_length=WINDOW, progress=False)


@pytest.mark.parametrize("fused_head, atol", [("off", 2e-6), ("on", 2e-5)])
def test_lambda_one_is_plain_clm_training(setup, tmp_path, fused_head, atol):
    """Against an independent loop (HF's own loss and schedule), and bitwise blind to the fusion targets.

    The fused head sums in another order; Adam's normalisation lifts that fp32 rounding to ~1e-5 in weights.
    """
    from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

    windows = setup["windows"][:8]
    FAST = dict(globals()["FAST"], fused_head=fused_head)
    out = fusekit.run_train(setup["target"], windows, tmp_path / "a", lam=1.0, warmup_ratio=0.0, shuffle=False, **FAST).out

    model = AutoModelForCausalLM.from_pretrained(setup["target"])
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.95)
    )
    sched = get_cosine_schedule_with_warmup(opt, 0, 4)
    for step in range(4):  # windows of exactly WINDOW tokens: one per row, two rows per step
        ids = torch.as_tensor(np.stack([w.input_ids for w in windows[2 * step : 2 * step + 2]]))
        model(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
    got = weights(out)
    for name, p in model.state_dict().items():
        if name in got:
            torch.testing.assert_close(got[name], p, rtol=0, atol=atol)

    # Other fusion candidates (here: none but the target's own, token-level AvgCE) change nothing at λ = 1.
    stripped = [type(w)(w.text_id, w.window, w.input_ids, w.candidates[:1]) for w in windows]
    other = fusekit.run_train(
        setup["target"], stripped, tmp_path / "b", lam=1.0, warmup_ratio=0.0, shuffle=False,
        fusion="avg_ce", granularity="token", **FAST,
    ).out
    other_w = weights(other)
    assert all(torch.equal(got[k], other_w[k]) for k in got)


def test_resume_reaches_the_weights_of_an_uninterrupted_run(setup, tmp_path):
    windows = setup["windows"][:12]
    kw = dict(lam=0.8, fusion="avg_ce", granularity="token", **FAST)
    full = fusekit.run_train(setup["gpt2"], windows, tmp_path / "full", save_every=2, **kw).out
    part = tmp_path / "part"
    fusekit.run_train(setup["gpt2"], windows, part, stop_after=2, **kw).out
    assert not (part / "fusekit_train.json").exists() and (part / "checkpoints" / "step-00000002").is_dir()
    fusekit.run_train(setup["gpt2"], windows, part, resume=True, stop_after=3, **kw).out
    fusekit.run_train(setup["gpt2"], windows, part, resume=True, **kw).out
    a, b = weights(full), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [m["loss"] for m in metrics(full)] == [m["loss"] for m in metrics(part)]
    assert len(metrics(part)) == 6
    # Resuming a finished run is a no-op; resuming with other options, or reusing OUT without --resume, is refused.
    assert fusekit.run_train(setup["gpt2"], windows, part, resume=True, **kw).out == part
    with pytest.raises(TrainError, match="lam: 0.8 → 0.5"):
        fusekit.run_train(setup["gpt2"], windows, part, resume=True, **{**kw, "lam": 0.5}).out
    with pytest.raises(TrainError, match="pass --resume"):
        fusekit.run_train(setup["gpt2"], windows, part, **kw).out


def test_training_lowers_held_out_ce(setup, tmp_path):
    before = fusekit.run_eval(setup["target"], setup["held_out"], max_length=WINDOW, progress=False).report
    out = fusekit.run_train(setup["target"], setup["windows"], tmp_path / "t", epochs=3, lam=0.9, lr=3e-3,
                        batch_size=2, max_length=WINDOW, progress=False).out
    after = fusekit.run_eval(out, setup["held_out"], max_length=WINDOW, progress=False).report
    assert after["tokens"] == before["tokens"] > 0
    assert after["mean_ce"] < before["mean_ce"] - 0.3, (before, after)
    log = metrics(out)
    assert log[-1]["lr"] < log[0]["lr"] or len(log) < 3  # cosine decay
    assert np.mean([m["loss"] for m in log[-4:]]) < np.mean([m["loss"] for m in log[:4]])


def test_config_file_and_overrides(tmp_path):
    (tmp_path / "t.yaml").write_text("lam: 0.7\nlr: 2.0e-5\nfusion: avg_ce\n")
    (tmp_path / "t.toml").write_text('lam = 0.6\ngranularity = "token"\n')
    cfg = build_config(tmp_path / "t.yaml", lr=3e-5, epochs=None)
    assert (cfg.lam, cfg.lr, cfg.fusion, cfg.epochs, cfg.weight_decay) == (0.7, 3e-5, "avg_ce", 1.0, 0.1)
    assert build_config(tmp_path / "t.toml").granularity == "token"
    (tmp_path / "bad.yaml").write_text("lamda: 0.7\n")
    with pytest.raises(TrainConfigError, match="lamda: unknown option"):
        build_config(tmp_path / "bad.yaml")
    with pytest.raises(TrainConfigError, match="unknown fusion rule 'max_ce'"):
        build_config(fusion="max_ce")
    with pytest.raises(TrainConfigError, match="lam"):
        build_config(lam=1.5)


def cli(*args: str) -> "subprocess.CompletedProcess[str]":
    import subprocess
    import sys

    cmd = [sys.executable, "-c", "from fusekit.cli import main; main()", "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cli_reports_bad_input_in_one_line(setup, tmp_path):
    run = cli("--model", str(setup["target"]), "--aligned", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "error: no aligned store at" in run.stderr
    (tmp_path / "bad.yaml").write_text("lamda: 0.5\n")
    run = cli("--model", str(setup["target"]), "--aligned", str(tmp_path), "--out", str(tmp_path / "o"),
              "--config", str(tmp_path / "bad.yaml"))
    assert run.returncode == 1 and "lamda: unknown option" in run.stderr and "Traceback" not in run.stderr
