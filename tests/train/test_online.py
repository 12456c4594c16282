"""Online distillation (`fusekit distill`): the teachers run beside the target, and the result equals the
offline pipeline (extract → align → train) on the same data, up to the extraction store's codec."""

from __future__ import annotations

import json

import numpy as np
import pytest

import fusekit
from fusekit.train.online import TeacherMemoryError, distill

OPTS = dict(max_length=32, batch_size=2, shuffle=False, lr=1e-3, progress=False)


@pytest.fixture(scope="module")
def setup(online_models, tmp_path_factory):
    """The tiny target and teachers of `online_models` (conftest.py) and the offline pipeline's aligned store
    over their corpus (top-4, windows of 32 tokens)."""
    root = tmp_path_factory.mktemp("online")
    m = online_models
    x = {name: fusekit.run_extract(model, m["corpus"], root / f"x-{name}", top_k=4, max_length=32, progress=False)
         for name, model in (("target", m["target"]), ("t1", m["teachers"][0]), ("t2", m["teachers"][1]))}
    aligned = fusekit.run_align(x["target"], [x["t1"], x["t2"]], root / "aligned", vocab_map_cache=root / "cache", progress=False)
    return {**m, "aligned": aligned.out, "root": root}


def store_values(k: int, vocab_sizes: list[int]):
    """A windows hook that passes each model's windows through the extraction store's codec and back:
    the top-k log-probs (and CE) exactly as an extraction store holds them."""
    from fusekit.store.extract_codec import decode_frame, encode_shard
    from fusekit.store.extract_format import shard_codec

    def hook(model: int, windows):
        frame, meta, _ = encode_shard(windows, k=k, vocab_size=vocab_sizes[model])
        table, prior = shard_codec(meta)
        decoded = decode_frame(frame, table, k, float(meta["fusekit.step"]), prior=prior)
        back = {(w.text_id, w.window): w for w in decoded}
        return [back[(w.text_id, w.window)] for w in windows]

    return hook


def first_loss(out) -> dict:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])


def vocab(model) -> int:
    return json.loads((model / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("fusion, granularity", [("min_ce", "window"), ("avg_ce", "token")])
def test_online_equals_offline_on_the_first_batch(setup, tmp_path, fusion, granularity):
    """Same corpus, same windows, same first batch: offline (store) and online give the same loss, to float
    rounding, once the online top-k goes through the store's codec; without it they differ by what the
    codec quantises (log-probs on a 1/8-nat grid), a small share of the fusion term."""
    s = setup
    opts = dict(OPTS, max_steps=1, fusion=fusion, granularity=granularity, lam=0.5)
    offline = first_loss(fusekit.run_train(s["target"], s["aligned"], tmp_path / "off", **opts).out)
    sizes = [vocab(m) for m in (s["target"], *s["teachers"])]
    online = first_loss(distill(s["target"], s["teachers"], s["corpus"], tmp_path / "on", top_k=4,
                                windows_hook=store_values(4, sizes), **opts))
    assert online["tokens"] == offline["tokens"]
    for key in ("loss", "clm", "fusion"):
        assert online[key] == pytest.approx(offline[key], rel=1e-5, abs=1e-6), key
    raw = first_loss(distill(s["target"], s["teachers"], s["corpus"], tmp_path / "raw", top_k=4, **opts))
    assert raw["clm"] == pytest.approx(offline["clm"], rel=1e-6)  # the target's own CE: nothing quantised
    assert raw["fusion"] == pytest.approx(offline["fusion"], rel=0.02)


@pytest.mark.parametrize("loss, fusion, granularity", [
    ("kl", "min_ce", "window"), ("kl", "avg_ce", "token"), ("reverse_kl", "min_ce", "window"),
    ("jsd", "avg_ce", "window"), ("uld", "min_ce", "token"), ("gold", "min_ce", "window"),
])
def test_every_loss_is_the_same_online_and_offline(setup, tmp_path, loss, fusion, granularity):
    """The divergences read each teacher's kept mass (the rest bucket): the store's c{c}_mass offline, the
    same mass computed in memory online — so they agree too, once the online top-k goes through the codec."""
    s = setup
    beta = {"jsd": 0.3, "gold": 0.5}.get(loss)
    opts = dict(OPTS, max_steps=1, fusion=fusion, granularity=granularity, lam=0.5, loss=loss,
                **({"jsd_beta": beta} if beta else {}))
    offline = first_loss(fusekit.run_train(s["target"], s["aligned"], tmp_path / "off", **opts).out)
    sizes = [vocab(m) for m in (s["target"], *s["teachers"])]
    online = first_loss(distill(s["target"], s["teachers"], s["corpus"], tmp_path / "on", top_k=4,
                                windows_hook=store_values(4, sizes), **opts))
    for key in ("loss", "clm", "fusion"):
        assert online[key] == pytest.approx(offline[key], rel=1e-5, abs=1e-6), key


def test_online_aligned_windows_equal_the_aligned_store(setup):
    """Window by window, every candidate (target first, then each teacher) equals the aligned store's:
    ids exactly, CE and mass to float rounding (the online top-k through the extraction store's codec), and
    probabilities to the aligned store's float16 (relative step 2⁻¹¹, rows renormalised on reading)."""
    from fusekit.store.aligned_store import AlignedStore
    from fusekit.train.online import OnlineWindows, load_online_model, read_corpus

    s = setup
    models = [load_online_model(str(m), "float32", _cpu(), 32) for m in (s["target"], *s["teachers"])]
    source = OnlineWindows(read_corpus(s["corpus"]), models[0], models[1:], top_k=4,
                           windows_hook=store_values(4, [m.vocab_size for m in models]))
    store = AlignedStore(s["aligned"])
    assert source.lengths().tolist() == store.window_lengths().tolist()
    got = source.read(0, len(source.lengths()), list(range(len(source.lengths()))))
    for i, (a, b) in enumerate(zip(got, store.iter_windows())):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        assert len(a.candidates) == len(b.candidates) == 3
        for c, (x, y) in enumerate(zip(a.candidates, b.candidates)):
            live = y.probs > 0
            np.testing.assert_array_equal(np.where(live, x.ids, -1), np.where(live, y.ids, -1), err_msg=f"window {i} cand {c}")
            np.testing.assert_allclose(x.probs, y.probs, rtol=2e-3, atol=1e-5, err_msg=f"window {i} cand {c}")
            np.testing.assert_allclose(x.ce, y.ce, rtol=1e-4, atol=1e-5, equal_nan=True)
            # The mass each row held before renormalising: float32 in the store, the same value online.
            np.testing.assert_allclose(x.mass, y.mass, rtol=1e-5, atol=1e-6, err_msg=f"window {i} cand {c}")
            assert x.mean_ce == pytest.approx(y.mean_ce, rel=1e-4, nan_ok=True)


def test_teacher_that_does_not_fit_is_refused_before_any_step(setup, tmp_path, capsys):
    s = setup
    with pytest.raises(TeacherMemoryError, match=r"MiB free: distil offline instead — `fusekit extract`"):
        distill(s["target"], s["teachers"], s["corpus"], tmp_path / "x", top_k=4, memory_available=10_000, max_steps=1, **OPTS)
    err = capsys.readouterr().err
    assert "teacher " in err and "MiB of parameters" in err
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def _cpu():
    import torch

    return torch.device("cpu")


def test_on_policy_batches_are_a_pure_function_of_the_seed():
    from fusekit.train.on_policy import is_on_policy

    picks = [is_on_policy(3, i, 0.3) for i in range(2000)]
    assert picks == [is_on_policy(3, i, 0.3) for i in range(2000)]
    assert picks != [is_on_policy(4, i, 0.3) for i in range(2000)]
    assert abs(np.mean(picks) - 0.3) < 0.04  # binomial sd ≈ 0.01
    assert not any(is_on_policy(3, i, 0.0) for i in range(50)) and all(is_on_policy(3, i, 1.0) for i in range(50))


def test_sampling_is_deterministic_given_the_seed(setup):
    from transformers import AutoModelForCausalLM

    from fusekit.train.on_policy import sample

    lm = AutoModelForCausalLM.from_pretrained(setup["target"]).eval()
    prompt = np.array([5, 17, 42, 9], dtype=np.int64)
    a, b, c = (sample(lm, prompt, 24, seed=s, eos=None) for s in (7, 7, 8))
    assert len(a) == 24 and np.array_equal(a[:4], prompt)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_on_policy_run_is_deterministic_and_differs_from_off_policy(setup, tmp_path):
    """ratio 1: every micro-batch is the target's samples, scored by the teachers; two runs with the same
    seed give the same losses, and they are not the corpus's."""
    s = setup
    opts = dict(OPTS, max_steps=2, lam=0.5)
    runs = [distill(s["target"], s["teachers"], s["corpus"], tmp_path / name, top_k=4, on_policy_ratio=1.0, **opts)
            for name in ("a", "b")]
    a, b = ([json.loads(x) for x in (r / "metrics.jsonl").read_text().splitlines()] for r in runs)
    assert [m["loss"] for m in a] == [m["loss"] for m in b] and [m["tokens"] for m in a] == [m["tokens"] for m in b]
    off = first_loss(distill(s["target"], s["teachers"], s["corpus"], tmp_path / "off", top_k=4, **opts))
    # A random tiny target's loss is near ln V on any text, so the samples show only as a different value.
    assert a[0]["fusion"] > 0 and a[0]["loss"] != off["loss"]


def test_cli_and_api(setup, tmp_path):
    from typer.testing import CliRunner

    from fusekit.cli import app

    s = setup
    args = ["distill", "-m", str(s["target"]), "-t", str(s["teachers"][0]), "-t", str(s["teachers"][1]), "-d", str(s["corpus"]),
            "-o", str(tmp_path / "cli"), "--top-k", "4", "--max-length", "32", "--batch-size", "2", "--max-steps", "1",
            "--fusion", "avg_ce", "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "MiB of parameters" in result.output and (tmp_path / "cli" / "config.json").is_file()
    bad = CliRunner().invoke(app, [*args[:-1], "--on-policy-ratio", "1.5", "-o", str(tmp_path / "bad")])
    assert bad.exit_code == 1 and "--on-policy-ratio must lie in [0, 1]" in bad.output

    done = fusekit.run_distill(s["target"], s["teachers"], s["corpus"], tmp_path / "api", top_k=4, max_steps=1, **OPTS)
    assert (done.stage, done.out) == ("distill", tmp_path / "api") and done.report["steps"] == 1


@pytest.mark.slow  # two torchrun processes importing torch: ~35 s on a shared 2-core machine
def test_two_processes_equal_one_with_double_accumulation(setup, tmp_path):
    """`fusekit distill` under torchrun (gloo, 2 CPU processes): each rank runs the teachers over its own
    windows' texts; the losses equal one process reading both ranks' micro-batches (grad_accum 2)."""
    import os
    import subprocess
    import sys

    s = setup
    common = ["-m", str(s["target"]), "-t", str(s["teachers"][0]), "-t", str(s["teachers"][1]), "-d", str(s["corpus"]),
              "--top-k", "4", "--max-length", "32", "--batch-size", "1", "--max-steps", "2", "--lr", "1e-3", "--lam", "0.5",
              "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "fusekit.cli",
           "distill", *common, "-o", str(tmp_path / "ddp")]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    single = distill(s["target"], s["teachers"], s["corpus"], tmp_path / "one", top_k=4, max_length=32, batch_size=1,
                     grad_accum=2, max_steps=2, lr=1e-3, lam=0.5, progress=False)
    ddp, one = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (tmp_path / "ddp", single))
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
