"""The distillation losses (kl, reverse_kl, jsd, uld, gold) against a dense reference over the full vocabulary.

The reference builds the teacher's dense [V] distribution, forms the rest bucket by summing the student's
softmax over the ids outside the support, sorts whole vocabularies for ULD, and lets autograd take the
gradient — none of the chunked code's log-space shortcuts or closed-form gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fusekit.train.config import TrainConfigError, build_config
from fusekit.train.divergence import GOLD_DEFAULT_BETA, REVERSE_KL_REST_FLOOR
from fusekit.train.linear_loss import linear_fusion_loss
from fusekit.train.loss import IGNORE, dense_fused_loss, fused_loss

DIVERGENCES = ["kl", "reverse_kl", "jsd", "uld", "gold"]


def make_batch(seed: int, b=2, l=6, v=19, m=5, full_mass=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, l, v, generator=g, dtype=torch.float64) * 2.5
    labels = torch.randint(0, v, (b, l), generator=g)
    labels[:, -1] = IGNORE
    labels[0, 2] = IGNORE
    ids = torch.randint(0, v, (b, l, m), generator=g)
    ids[..., 1] = ids[..., 0]  # a repeated id counts once, its probabilities summed
    ids[0, 0, 3:] = -1
    probs = torch.rand(b, l, m, generator=g, dtype=torch.float64)
    probs[ids < 0] = 0
    probs[1, 1, 2] = 0  # a live id with zero probability is outside the support
    mass = 1.0 if full_mass else torch.rand(b, l, 1, generator=g, dtype=torch.float64) * 0.5 + 0.4
    probs = probs / probs.sum(-1, keepdim=True) * mass
    return logits, labels, ids, probs


def _jsd(p: float, q: float, beta: float) -> float:
    mix = beta * p + (1 - beta) * q
    out = 0.0
    if p > 0:
        out += beta * p * math.log(p / mix)
    if q > 0:
        out += (1 - beta) * q * math.log(q / mix)
    return out


def dense_row(loss: str, beta: float | None, z: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """One position's fusion loss from its full [V] logits, differentiable (float64)."""
    v = z.shape[0]
    q = torch.softmax(z, 0)
    p = torch.zeros(v, dtype=torch.float64)
    for i, pi in zip(ids.tolist(), probs.tolist()):
        if i >= 0:
            p[i] += pi
    support = p > 0
    whole = bool(support.all())
    p_rest = 0.0 if whole else max(0.0, 1.0 - float(p.sum()))
    q_rest = q[~support].sum()
    if loss == "reverse_kl" and not whole:
        new_rest = max(p_rest, REVERSE_KL_REST_FLOOR)
        p = p * min(1.0, (1.0 - new_rest) / float(p.sum()))
        p_rest = new_rest
    total = torch.zeros((), dtype=torch.float64)
    if loss in ("kl", "reverse_kl", "jsd"):
        buckets = [(p[i], q[i]) for i in range(v) if support[i]] + [(torch.tensor(p_rest, dtype=torch.float64), q_rest)]
        for pi, qi in buckets:
            if loss == "kl" and pi > 0:
                total = total + pi * (torch.log(pi) - torch.log(qi))
            elif loss == "reverse_kl" and qi > 0:
                total = total + qi * (torch.log(qi) - torch.log(pi))
            elif loss == "jsd":
                mix = beta * pi + (1 - beta) * qi
                if pi > 0:
                    total = total + beta * pi * torch.log(pi / mix)
                if qi > 0:
                    total = total + (1 - beta) * qi * torch.log(qi / mix)
        return total
    if loss == "uld":
        teacher = torch.cat([p, torch.tensor([p_rest], dtype=torch.float64)]).sort(descending=True).values
        student = torch.cat([q, torch.zeros(1, dtype=torch.float64)]).sort(descending=True).values
        return (teacher - student).abs().sum()
    if loss == "gold":
        for i in range(v):
            if support[i]:
                mix = beta * p[i] + (1 - beta) * q[i]
                total = total + beta * p[i] * torch.log(p[i] / mix) + (1 - beta) * q[i] * torch.log(q[i] / mix)
        outside = q[~support].sort(descending=True).values
        teacher = torch.zeros(max(1, outside.shape[0]), dtype=torch.float64)
        teacher[0] = p_rest
        student = torch.cat([outside, torch.zeros(teacher.shape[0] - outside.shape[0], dtype=torch.float64)])
        return total + (teacher - student).abs().sum()
    raise AssertionError(loss)


def dense_reference(loss, beta, logits, labels, ids, probs, lam):
    """λ·Σ CE(label) + (1−λ)·Σ row losses over positions with a label (and a target)."""
    v = logits.shape[-1]
    z = logits.reshape(-1, v)
    flat_labels = labels.reshape(-1)
    flat_ids, flat_probs = ids.reshape(-1, ids.shape[-1]), probs.reshape(-1, probs.shape[-1])
    total = torch.zeros((), dtype=torch.float64)
    for r in range(z.shape[0]):
        y = int(flat_labels[r])
        if y == IGNORE:
            continue
        total = total + lam * -torch.log_softmax(z[r], 0)[y]
        if float(flat_probs[r].sum()) > 0:
            total = total + (1 - lam) * dense_row(loss, beta, z[r], flat_ids[r], flat_probs[r])
    return total


def beta_for(loss: str) -> float | None:
    return 0.3 if loss == "jsd" else (GOLD_DEFAULT_BETA if loss == "gold" else None)


@pytest.mark.parametrize("full_mass", [True, False])
@pytest.mark.parametrize("loss", DIVERGENCES)
def test_logits_path_equals_the_dense_reference_in_value_and_gradient(loss, full_mass):
    logits, labels, ids, probs = make_batch(1, full_mass=full_mass)
    beta, lam = beta_for(loss), 0.4
    a = logits.clone().requires_grad_()
    got = fused_loss(a, labels, ids, probs, lam, loss, beta)
    b = logits.clone().requires_grad_()
    want = dense_reference(loss, beta, b, labels, ids, probs, lam)
    torch.testing.assert_close(got.total, want, rtol=1e-9, atol=1e-10)
    (got.total * 1.3).backward()
    (want * 1.3).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)
    # No gradient where there is no label.
    assert torch.count_nonzero(a.grad[0, 2]) == 0 and torch.count_nonzero(a.grad[:, -1]) == 0


@pytest.mark.parametrize("loss", DIVERGENCES)
def test_fused_head_equals_the_dense_reference_in_value_and_gradient(loss):
    logits, labels, ids, probs = make_batch(2, full_mass=False)
    g = torch.Generator().manual_seed(3)
    b_, l_, v = logits.shape
    hidden = torch.randn(b_, l_, 8, generator=g, dtype=torch.float64)
    weight = torch.randn(v, 8, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    beta, lam = beta_for(loss), 0.25
    ha, wa, ba = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    # 3 rows a chunk (budget 6·V halved for two buffers): the chunking is exercised.
    got = linear_fusion_loss(ha, wa, ba, labels, ids, probs, lam, chunk_elements=6 * v, loss=loss, beta=beta)
    hb, wb, bb = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    want = dense_reference(loss, beta, hb @ wb.t() + bb, labels, ids, probs, lam)
    torch.testing.assert_close(got.total, want, rtol=1e-9, atol=1e-10)
    got.total.backward()
    want.backward()
    for x, y in ((ha, hb), (wa, wb), (ba, bb)):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-8, atol=1e-10)


def test_fp32_fused_head_matches_the_logits_path():
    logits, labels, ids, probs = make_batch(4, full_mass=False)
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(*logits.shape[:2], 8, generator=g)
    weight = torch.randn(logits.shape[-1], 8, generator=g)
    for loss in DIVERGENCES:
        h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        got = linear_fusion_loss(h1, w1, None, labels, ids, probs.float(), 0.5, chunk_elements=64, loss=loss, beta=beta_for(loss))
        h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        want = fused_loss(h2 @ w2.t(), labels, ids, probs.float(), 0.5, loss, beta_for(loss))
        torch.testing.assert_close(got.total, want.total, rtol=1e-5, atol=1e-5)
        got.total.backward()
        want.total.backward()
        torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("loss", ["reverse_kl", "jsd", "kl", "gold"])
def test_a_teacher_covering_the_whole_vocabulary_gives_the_exact_finite_divergence(loss):
    """Top-k = every id: the rest bucket is empty on both sides, and the loss is the textbook divergence."""
    v = 7
    g = torch.Generator().manual_seed(6)
    z = torch.randn(3, v, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(3, v, generator=g, dtype=torch.float64), -1)
    ids = torch.arange(v).repeat(3, 1)
    labels = torch.zeros(3, dtype=torch.long)
    got = fused_loss(z, labels, ids, p, 0.0, loss, beta_for(loss)).total
    q = torch.softmax(z, -1)
    if loss == "kl":
        want = (p * (p / q).log()).sum()
    elif loss == "reverse_kl":
        want = (q * (q / p).log()).sum()
    else:
        beta = beta_for(loss)
        mix = beta * p + (1 - beta) * q
        want = (beta * p * (p / mix).log() + (1 - beta) * q * (q / mix).log()).sum()
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_rest_bucket_keeps_reverse_kl_and_jsd_finite_for_a_truncated_teacher():
    """A top-2 teacher over 50k ids: dense KL(q‖p) over the vocabulary is +inf; with the rest bucket it is finite."""
    z = torch.zeros(1, 50_000, dtype=torch.float32)
    z[0, :2] = 5.0
    ids = torch.tensor([[0, 1]])
    p = torch.tensor([[0.6, 0.4]])
    labels = torch.tensor([0])
    for loss in ("reverse_kl", "jsd", "kl"):
        zz = z.clone().requires_grad_()
        out = fused_loss(zz, labels, ids, p, 0.0, loss, 0.5 if loss == "jsd" else None)
        out.total.backward()
        assert torch.isfinite(out.total) and torch.isfinite(zz.grad).all()
    # The student's rest = 49 998 / (2e⁵ + 49 998) ≈ 0.997 kept accurately in fp32, not as 1 − Σ q.
    q_rest = 49_998 / (2 * math.exp(5) + 49_998)
    rk = fused_loss(z, labels, ids, p, 0.0, "reverse_kl").total.item()
    q_top = (1 - q_rest) / 2
    p_top = [0.6 * (1 - REVERSE_KL_REST_FLOOR), 0.4 * (1 - REVERSE_KL_REST_FLOOR)]
    want = sum(q_top * math.log(q_top / pt) for pt in p_top) + q_rest * math.log(q_rest / REVERSE_KL_REST_FLOOR)
    assert rk == pytest.approx(want, rel=1e-5)


def test_rest_of_a_confident_student_is_accurate_in_fp32():
    """Σ q on the support ≈ 1 − 1e-9: 1 − Σq in fp32 is 0 (or noise); the complement's logsumexp is not."""
    z = torch.full((1, 1000), -25.0)
    z[0, 0] = 0.0
    ids, p = torch.tensor([[0]]), torch.tensor([[0.9]])  # teacher rest 0.1
    got = fused_loss(z, torch.tensor([0]), ids, p, 0.0, "kl").total.item()
    q_rest = 999 * math.exp(-25) / (1 + 999 * math.exp(-25))
    want = 0.9 * math.log(0.9 / (1 - q_rest)) + 0.1 * math.log(0.1 / q_rest)
    assert got == pytest.approx(want, rel=1e-5)


def test_uld_on_hand_worked_sorted_vectors():
    """Teacher (0.5, 0.3, 0.2) on 3 ids; student softmax of log(0.1, 0.6, 0.2, 0.1) over 4 ids.

    Sorted: teacher (0.5, 0.3, 0.2, 0, [rest 0]); student (0.6, 0.2, 0.1, 0.1, 0).
    L1 = |0.5−0.6| + |0.3−0.2| + |0.2−0.1| + |0−0.1| = 0.4.
    """
    z = torch.tensor([[0.1, 0.6, 0.2, 0.1]], dtype=torch.float64).log()
    ids = torch.tensor([[2, 0, 3]])
    p = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    got = fused_loss(z, torch.tensor([1]), ids, p, 0.0, "uld").total
    assert got.item() == pytest.approx(0.4, abs=1e-12)
    # A teacher with 0.2 of its mass left out of its top-2: (0.5, 0.3) + rest atom 0.2 → the same sorted vector.
    got = fused_loss(z, torch.tensor([1]), ids[:, :2], p[:, :2], 0.0, "uld").total
    assert got.item() == pytest.approx(0.4, abs=1e-12)
    # Student top-4 of 6 ids with its tail: teacher (1.0) vs student (0.5, 0.2, 0.1, 0.1, 0.05, 0.05) = 0.5 + 0.5.
    z6 = torch.tensor([[0.5, 0.2, 0.1, 0.1, 0.05, 0.05]], dtype=torch.float64).log()
    got = fused_loss(z6, torch.tensor([1]), torch.tensor([[3]]), torch.tensor([[1.0]], dtype=torch.float64), 0.0, "uld").total
    assert got.item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.9])
def test_ce_is_unchanged(lam):
    """loss="ce" is FuseLLM's path, bit for bit: the same function with the default and with the name."""
    logits, labels, ids, probs = make_batch(7)
    logits, probs = logits.float(), probs.float()
    a, b, c = (logits.clone().requires_grad_() for _ in range(3))
    default = fused_loss(a, labels, ids, probs, lam)
    named = fused_loss(b, labels, ids, probs, lam, "ce", None)
    dense = dense_fused_loss(c, labels, ids, probs, lam)
    assert torch.equal(default.total, named.total)
    default.total.backward()
    named.total.backward()
    dense.total.backward()
    assert torch.equal(a.grad, b.grad)
    torch.testing.assert_close(a.grad, c.grad, rtol=1e-5, atol=1e-6)


def teacher_with_mass(seed: int):
    """A batch whose teacher rows are renormalised (as the aligned store keeps them) and carry the mass
    their top-k held before, 0.35–0.95 per position (as `c{c}_mass` records it)."""
    logits, labels, ids, probs = make_batch(seed)
    g = torch.Generator().manual_seed(seed + 100)
    mass = torch.rand(probs.shape[:-1], generator=g, dtype=torch.float64) * 0.6 + 0.35
    return logits, labels, ids, probs, mass


@pytest.mark.parametrize("fused_head", [False, True])
@pytest.mark.parametrize("loss", DIVERGENCES)
def test_a_teacher_mass_below_one_is_the_rest_bucket_in_value_and_gradient(loss, fused_head):
    """Renormalised rows plus their mass: the dense reference sees the teacher as probs · mass on its ids and
    1 − mass outside them, over the full vocabulary."""
    logits, labels, ids, probs, mass = teacher_with_mass(11)
    beta, lam = beta_for(loss), 0.3
    b = logits.clone().requires_grad_()
    want = dense_reference(loss, beta, b, labels, ids, probs * mass[..., None], lam)
    want.backward()
    if fused_head:
        g = torch.Generator().manual_seed(12)
        hidden = torch.randn(*logits.shape[:2], 8, generator=g, dtype=torch.float64)
        weight = torch.randn(logits.shape[-1], 8, generator=g, dtype=torch.float64)
        # The same logits through the output layer: the reference is re-run on them.
        hb, wb = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        want = dense_reference(loss, beta, hb @ wb.t(), labels, ids, probs * mass[..., None], lam)
        want.backward()
        ha, wa = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        got = linear_fusion_loss(ha, wa, None, labels, ids, probs, lam, chunk_elements=6 * logits.shape[-1], loss=loss,
                                 beta=beta, target_mass=mass)
        torch.testing.assert_close(got.total, want, rtol=1e-9, atol=1e-10)
        got.total.backward()
        torch.testing.assert_close(ha.grad, hb.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(wa.grad, wb.grad, rtol=1e-8, atol=1e-10)
        return
    a = logits.clone().requires_grad_()
    got = fused_loss(a, labels, ids, probs, lam, loss, beta, target_mass=mass)
    torch.testing.assert_close(got.total, want, rtol=1e-9, atol=1e-10)
    got.total.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-8, atol=1e-10)


def test_kl_equals_ce_only_when_the_teacher_is_whole_on_its_ids():
    """KL(p‖q) = CE(p, q) − H(p): with mass 1 the gradients of kl and ce agree; with the teacher's real mass
    (< 1) kl also pulls the student's mass outside the ids towards the teacher's rest, and they differ."""
    logits, labels, ids, probs, mass = teacher_with_mass(13)

    def grad(loss, m):
        z = logits.clone().requires_grad_()
        fused_loss(z, labels, ids, probs, 0.0, loss, None, target_mass=m).total.backward()
        return z.grad

    ce = grad("ce", None)
    torch.testing.assert_close(grad("kl", torch.ones_like(mass)), ce, rtol=1e-5, atol=1e-6)  # ce runs in fp32
    assert (grad("kl", mass) - ce).abs().max() > 1e-2
    # `ce` reads no mass: FuseLLM's CE to the renormalised target, bit for bit.
    assert torch.equal(grad("ce", mass), ce)


def test_reverse_kl_keeps_a_real_rest_and_floors_only_a_missing_one():
    """A teacher rest of 0.1 is taken as it is; a mass of 1 (no rest) gets the floor, as before."""
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0, -1.0]], dtype=torch.float64)
    ids, p, labels = torch.tensor([[0, 1]]), torch.tensor([[0.75, 0.25]], dtype=torch.float64), torch.tensor([0])
    q = torch.softmax(z[0], 0)
    q_rest = float(q[2:].sum())

    def closed_form(p_top, p_rest):
        return sum(float(q[i]) * math.log(float(q[i]) / pt) for i, pt in enumerate(p_top)) + q_rest * math.log(q_rest / p_rest)

    got = fused_loss(z, labels, ids, p, 0.0, "reverse_kl", target_mass=torch.tensor([0.9], dtype=torch.float64)).total
    assert got.item() == pytest.approx(closed_form([0.675, 0.225], 0.1), rel=1e-12)
    whole = fused_loss(z, labels, ids, p, 0.0, "reverse_kl", target_mass=torch.tensor([1.0], dtype=torch.float64)).total
    f = 1 - REVERSE_KL_REST_FLOOR
    assert whole.item() == pytest.approx(closed_form([0.75 * f, 0.25 * f], REVERSE_KL_REST_FLOOR), rel=1e-12)


def test_loss_errors_in_the_kernels():
    logits, labels, ids, probs = make_batch(8)
    with pytest.raises(ValueError, match="unknown loss 'l2': choose one of ce, kl, reverse_kl, jsd, uld, gold"):
        fused_loss(logits, labels, ids, probs, 0.5, "l2")


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(loss="l2"), "unknown loss 'l2': choose one of ce, kl, reverse_kl, jsd, uld, gold"),
        (dict(loss="jsd"), "loss jsd needs jsd_beta"),
        (dict(loss="jsd", jsd_beta=1.0), "jsd_beta must lie strictly between 0 and 1, got 1.0"),
        (dict(loss="jsd", jsd_beta=0.0), "jsd_beta must lie strictly between 0 and 1, got 0.0"),
        (dict(loss="kl", jsd_beta=0.5), "jsd_beta applies to the jsd and gold losses only"),
    ],
)
def test_config_errors_are_one_line(options, message):
    with pytest.raises(TrainConfigError, match=message) as err:
        build_config(**options)
    assert "\n" not in str(err.value)


def test_config_identity_keeps_old_runs_resumable_and_tells_losses_apart():
    plain = build_config()
    assert "loss" not in plain.identity() and "jsd_beta" not in plain.identity()  # runs saved before the option
    jsd = build_config(loss="jsd", jsd_beta=0.5)
    assert jsd.identity()["loss"] == "jsd" and jsd.identity()["jsd_beta"] == 0.5
    assert build_config(loss="gold").loss_beta == GOLD_DEFAULT_BETA
    assert "loss" not in build_config().RESUMABLE_CHANGES


@pytest.fixture(scope="module")
def tiny_run(tokenizers_by_kind, corpus_texts, tmp_path_factory):
    """A tiny Llama target, one source, and aligned windows from their top-k (as tests/train/test_train.py)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from fusekit import zoo
    from fusion_data import model_windows

    tok = tokenizers_by_kind["bpe"]
    root = tmp_path_factory.mktemp("losses")
    target = zoo.build_tiny_model("llama", tok, root / "target", seed=0, hidden=32)
    source = zoo.build_tiny_model("llama", tok, root / "source", seed=1, hidden=32)
    ids = np.concatenate([tok(t)["input_ids"] for t in corpus_texts[:20]])
    chunks = [ids[i : i + 32] for i in range(0, 8 * 32, 32)]
    windows = model_windows(AutoModelForCausalLM.from_pretrained(target), [AutoModelForCausalLM.from_pretrained(source)], chunks, k=4)
    return target, windows


def test_run_train_with_jsd_through_the_fused_head(tiny_run, tmp_path):
    import json

    import fusekit
    from fusekit.train import TrainError

    target, windows = tiny_run
    out = tmp_path / "jsd"
    result = fusekit.run_train(target, windows, out, loss="jsd", jsd_beta=0.5, max_steps=2, lam=0.5, fused_head="on",
                               lr=1e-3, batch_size=2, max_length=32, progress=False)
    assert result.report["config"]["loss"] == "jsd" and result.report["config"]["jsd_beta"] == 0.5
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "fusion" in r and r["fusion"] is not None]
    assert len(steps) == 2 and all(0.0 < r["fusion"] < math.log(2) for r in steps)  # JSD_0.5 ≤ ln 2 per token
    # The loss is part of the run's identity: resuming with another one is refused, naming it.
    with pytest.raises(TrainError, match="loss: 'jsd' → 'kl'"):
        fusekit.run_train(target, windows, out, loss="kl", max_steps=2, lam=0.5, resume=True, lr=1e-3, batch_size=2,
                          max_length=32, progress=False)


def test_a_version_2_store_still_trains_and_a_divergence_on_it_warns(tiny_run, tmp_path):
    """A store written before the c{c}_mass columns reads with no mass (every teacher whole on its ids): `ce`
    trains on it as on a version-3 store, bit for bit; a divergence trains too, with one warning naming what
    to re-run, and without the teacher's rest its `kl` is not the version-3 store's."""
    import json
    import warnings

    import fusekit
    from fusekit.store.aligned_format import write_windows
    from fusekit.store.aligned_store import AlignedStore

    target, windows = tiny_run
    old = write_windows(tmp_path / "v2", windows, [4, 4], settings={"format_version": 2})
    new = write_windows(tmp_path / "v3", windows, [4, 4])
    assert not AlignedStore(old).has_mass and AlignedStore(new).has_mass
    w2, w3 = AlignedStore(old)[0], AlignedStore(new)[0]
    assert w2.candidates[1].mass is None and (w3.candidates[1].mass < 1).all()
    np.testing.assert_array_equal(w2.candidates[1].probs, w3.candidates[1].probs)
    opts = dict(max_steps=1, lam=0.5, lr=1e-3, batch_size=2, max_length=32, progress=False, shuffle=False)

    def first(store, name, loss, **extra):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fusekit.run_train(target, store, tmp_path / name, loss=loss, **opts, **extra)
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return rows[0], [str(w.message) for w in seen if "records no teacher mass" in str(w.message)]

    ce2, said = first(old, "ce2", "ce")
    ce3, _ = first(new, "ce3", "ce")
    assert said == [] and ce2["loss"] == ce3["loss"] and ce2["fusion"] == ce3["fusion"]
    kl2, said = first(old, "kl2", "kl")
    assert len(said) == 1 and "run `fusekit align` again" in said[0] and "format 2" in said[0] and "\n" not in said[0]
    kl3, said3 = first(new, "kl3", "kl")
    assert said3 == [] and math.isfinite(kl2["fusion"]) and kl2["fusion"] != pytest.approx(kl3["fusion"], rel=1e-3)


def test_cli_and_recipe_refuse_bad_loss_options_in_one_line(tmp_path):
    import subprocess
    import sys

    from fusekit.recipe import TrainOptions

    base = [sys.executable, "-c", "from fusekit.cli import main; main()", "train", "--model", "x", "--aligned",
            str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    run = subprocess.run(base + ["--loss", "l2"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == "error: unknown loss 'l2': choose one of ce, kl, reverse_kl, jsd, uld, gold"
    with pytest.raises(ValueError, match="loss jsd needs jsd_beta"):
        TrainOptions(loss="jsd")
    assert TrainOptions(loss="jsd", jsd_beta=0.3).jsd_beta == 0.3


def test_the_loss_names_agree_everywhere():
    import typing

    from fusekit.recipe import LossName
    from fusekit.train.config import TrainConfig
    from fusekit.train.loss_names import LOSSES

    assert typing.get_args(TrainConfig.model_fields["loss"].annotation) == LOSSES == typing.get_args(LossName)
