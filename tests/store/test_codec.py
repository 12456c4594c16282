"""The top-k codec through its Python binding: exact parts, error bounds, KL figures, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from fusekit import _core

FINE = 1 / 256  # the codec's grid for the kept mass and the CE


def make_window(rng: np.random.Generator, n: int, k: int, *, sharp: float, vocab: int = 3000, mask: bool = False):
    """A window whose top-k come from a softmax over `vocab` logits of scale `sharp`, the next token
    among them about half the time (as a model's would be)."""
    inp = rng.integers(0, vocab, n).astype(np.uint32)
    logits = rng.standard_normal((n, vocab)) * sharp
    for t in range(n - 1):
        if rng.random() < 0.5:
            logits[t, inp[t + 1]] += 3 * sharp
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    top = np.argsort(-logp, axis=1, kind="stable")[:, :k]
    top_lp = np.take_along_axis(logp, top, axis=1)
    ce = np.full(n, np.nan)
    ce[:-1] = -logp[np.arange(n - 1), inp[1:]]
    offsets = np.cumsum(rng.integers(0, 6, n)).astype(np.int64) + 11
    m = rng.random(n) < 0.4 if mask else None
    return inp, offsets, 11, top.astype(np.uint32), top_lp.astype(np.float32), ce.astype(np.float32), m


def kl_rows(orig: np.ndarray, stored: np.ndarray) -> np.ndarray:
    o = orig.astype(np.float64) - np.logaddexp.reduce(orig.astype(np.float64), axis=1, keepdims=True)
    s = stored.astype(np.float64) - np.logaddexp.reduce(stored.astype(np.float64), axis=1, keepdims=True)
    return (np.exp(o) * (o - s)).sum(axis=1)


@pytest.mark.parametrize("k,sharp,mask", [(10, 1.0, False), (5, 4.0, True), (20, 2.0, False), (1, 2.0, True)])
def test_round_trip_exact_parts_and_bounded_log_probs(k, sharp, mask):
    rng = np.random.default_rng(k)
    windows = [make_window(rng, n, k, sharp=sharp, mask=mask) for n in (1, 2, 37, 128)]
    step = 0.125
    coded = _core.codec_encode_windows(windows, k, step, 2)
    decoded = _core.codec_decode_windows([(b, len(w[0]), w[2], w[6] is not None) for (b, _, _), w in zip(coded, windows)], k, step, 2)
    for (inp, offsets, _, top, lp, ce, m), (blob, kl_sum, kl_max), (d_inp, d_off, d_top, d_lp, d_ce, d_mask) in zip(windows, coded, decoded):
        np.testing.assert_array_equal(d_inp, inp)
        np.testing.assert_array_equal(d_off, offsets)
        np.testing.assert_array_equal(d_top, top)
        if m is None:
            assert d_mask is None
        else:
            np.testing.assert_array_equal(d_mask, m)
        # the kept mass to its grid; each log-prob within a step; CE to half its grid
        mass = np.logaddexp.reduce(lp.astype(np.float64), axis=1)
        d_mass = np.logaddexp.reduce(d_lp.astype(np.float64), axis=1)
        assert np.abs(mass - d_mass).max() <= FINE / 2 + 1e-5
        assert np.abs(d_lp - lp).max() <= step + FINE
        assert np.isnan(d_ce[-1])
        if len(ce) > 1:
            assert np.abs(d_ce[:-1] - ce[:-1]).max() <= FINE / 2 + 1e-5
        # the KL the encoder reports is the KL of what decodes
        kl = kl_rows(lp, d_lp)
        assert kl_sum == pytest.approx(kl.sum(), rel=1e-3, abs=1e-6)
        assert kl_max == pytest.approx(kl.max(), rel=1e-3, abs=1e-6)


def test_kl_figures_stay_under_the_budget_and_shrink_with_the_step():
    """Uniform quantisation with step s gives KL ≲ s²/24 per position (flattest case); sharper
    distributions concentrate on the exact top slot and lose less."""
    rng = np.random.default_rng(0)
    windows = [make_window(rng, 200, 10, sharp=sharp) for sharp in (0.5, 1.0, 3.0)]
    kl = {}
    for step in (0.0625, 0.125, 0.25):
        coded = _core.codec_encode_windows(windows, 10, step)
        kl[step] = [c[1] / 200 for c in coded]
        assert all(x <= step**2 / 24 * 1.2 for x in kl[step])
    assert kl[0.0625][0] < kl[0.125][0] < kl[0.25][0]
    assert max(kl[0.125]) <= 1e-3
    assert kl[0.125][2] < kl[0.125][0]  # sharper → less loss


def test_real_model_distributions(tokenizers_by_kind, corpus_texts, tmp_path):
    """Distributions of a real (tiny, random) transformers model, in its own top-k order."""
    import torch

    from fusekit import zoo

    tok = tokenizers_by_kind["bpe"]
    model_dir = zoo.build_tiny_model("gpt2", tok, tmp_path / "m", hidden=32, context=128)
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = tok(corpus_texts[3][:600], add_special_tokens=False)["input_ids"][:100]
    with torch.no_grad():
        logp = torch.log_softmax(net(torch.tensor([ids])).logits[0].double(), -1)
    v, i = logp.topk(10)
    ce = np.full(len(ids), np.nan, dtype=np.float32)
    ce[:-1] = (-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]).numpy()
    w = (np.array(ids, np.uint32), np.arange(len(ids), dtype=np.int64), 0, i.numpy().astype(np.uint32), v.numpy().astype(np.float32), ce, None)
    [(blob, kl_sum, _)] = _core.codec_encode_windows([w], 10, 0.125)
    [(d_inp, _, d_top, d_lp, d_ce, _)] = _core.codec_decode_windows([(blob, len(ids), 0, False)], 10, 0.125)
    np.testing.assert_array_equal(d_top, i.numpy())
    assert kl_sum / len(ids) <= 1e-3
    assert np.abs(d_ce[:-1] - ce[:-1]).max() <= FINE
    assert len(blob) / len(ids) < 40  # near-uniform distributions over 800 tokens: the worst case


def test_bad_input_is_a_clear_error():
    rng = np.random.default_rng(1)
    w = make_window(rng, 5, 3, sharp=1.0)
    with pytest.raises(ValueError, match="k must be at least 1"):
        _core.codec_encode_windows([w], 0, 0.125)
    with pytest.raises(ValueError, match="step"):
        _core.codec_encode_windows([w], 3, 0.0)
    with pytest.raises(ValueError, match="knee"):
        _core.codec_encode_windows([w], 3, 0.125, None, -1.0)
    with pytest.raises(ValueError, match="shapes"):
        _core.codec_encode_windows([w], 4, 0.125)
    unsorted = list(w)
    unsorted[4] = np.ascontiguousarray(w[4][:, ::-1])
    with pytest.raises(ValueError, match="window 0: position 0: .*sorted"):
        _core.codec_encode_windows([tuple(unsorted)], 3, 0.125)
    bad_ce = list(w)
    bad_ce[5] = w[5].copy()
    bad_ce[5][1] = np.nan
    with pytest.raises(ValueError, match="CE is NaN"):
        _core.codec_encode_windows([tuple(bad_ce)], 3, 0.125)
    short = list(w)
    short[1] = w[1][:3]
    with pytest.raises(ValueError, match="disagree"):
        _core.codec_encode_windows([tuple(short)], 3, 0.125)
    [(blob, _, _)] = _core.codec_encode_windows([w], 3, 0.125)
    with pytest.raises(ValueError, match="corrupt|short"):
        _core.codec_decode_windows([(blob[: len(blob) // 3], 5, 0, False)], 3, 0.125)


def short_model_windows(rng: np.random.Generator, count: int, k: int) -> list[tuple]:
    """Many short windows of one 'model': the texts share a skewed token distribution (a Zipf-like
    vocabulary, as ranks in a shard are) and the model's sharpness, so a shard's statistics repeat."""
    out = []
    for _ in range(count):
        inp, offsets, cs, top, lp, ce, m = make_window(rng, int(rng.integers(20, 60)), k, sharp=2.0, vocab=300)
        out.append((np.minimum(inp, rng.zipf(1.3, len(inp)) - 1).astype(np.uint32), offsets, cs, top, lp, ce, m))
    return out


def test_a_prior_codes_short_windows_in_fewer_bytes_to_the_same_values():
    rng = np.random.default_rng(7)
    windows = short_model_windows(rng, 120, 10)
    prior = _core.codec_train_prior(windows, 10, 0.125)
    # counted in parallel, the same prior whatever the thread count (the shard bytes depend on it)
    assert _core.codec_train_prior(windows, 10, 0.125, 1) == prior == _core.codec_train_prior(windows, 10, 0.125, 2)
    fresh = _core.codec_encode_windows(windows, 10, 0.125)
    primed = _core.codec_encode_windows(windows, 10, 0.125, None, 0.0, prior)
    keys = [(b, len(w[0]), w[2], w[6] is not None) for (b, _, _), w in zip(primed, windows)]
    got = _core.codec_decode_windows(keys, 10, 0.125, None, 0.0, prior)
    want = _core.codec_decode_windows([(b, len(w[0]), w[2], w[6] is not None) for (b, _, _), w in zip(fresh, windows)], 10, 0.125)
    for w, g, f, (_, kl_p, _), (_, kl_f, _) in zip(windows, got, want, primed, fresh):
        np.testing.assert_array_equal(g[0], w[0])
        np.testing.assert_array_equal(g[2], w[3])
        for a, b in zip(g, f):  # the prior changes how the values are coded, not what decodes
            if a is None:
                assert b is None
            else:
                np.testing.assert_array_equal(a, b)
        assert kl_p == kl_f
    tokens = sum(len(w[0]) for w in windows)
    fresh_bpt = sum(len(b) for b, _, _ in fresh) / tokens
    primed_bpt = sum(len(b) for b, _, _ in primed) / tokens
    assert primed_bpt < 0.85 * fresh_bpt, (primed_bpt, fresh_bpt)


def test_a_corrupt_or_foreign_prior_is_a_clear_error():
    rng = np.random.default_rng(3)
    windows = short_model_windows(rng, 4, 3)
    prior = _core.codec_train_prior(windows, 3, 0.125)
    with pytest.raises(ValueError, match="codec prior has 10 cells"):
        _core.codec_encode_windows(windows, 3, 0.125, None, 0.0, prior[:10])
    with pytest.raises(ValueError, match="level 200"):
        _core.codec_decode_windows([(b"\0" * 8, 1, 0, False)], 3, 0.125, None, 0.0, bytes([200]) + prior[1:])
    bad = list(windows[0])
    bad[4] = np.ascontiguousarray(bad[4][:, ::-1])
    with pytest.raises(ValueError, match="window 0: .*sorted"):
        _core.codec_train_prior([tuple(bad)], 3, 0.125)
