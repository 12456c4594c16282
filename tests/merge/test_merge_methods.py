"""Merge methods on small tensors, against values worked out by hand and invariants of each formula."""

from __future__ import annotations

import math
import re

import pytest
import torch

from fusekit.merge import METHODS, MergeError, TensorInputs, get_method
from fusekit.merge.dare import drop_and_rescale
from fusekit.merge.options import resolve_options
from fusekit.merge.slerp import slerp
from fusekit.merge.ties import trim_top_magnitude
from fusekit.merge.varm import variation_ratios


def run(method: str, base, models, **kw) -> torch.Tensor:
    k = len(models)
    x = TensorInputs(
        name=kw.pop("name", "w"),
        base=torch.as_tensor(base, dtype=torch.float32),
        models=[torch.as_tensor(m, dtype=torch.float32) for m in models],
        weights=tuple(kw.pop("weights", (1.0,) * k)),
        densities=tuple(kw.pop("densities", (1.0,) * k)),
        **kw,
    )
    return get_method(method).fn(x).tensor


# --- VaRM -------------------------------------------------------------------------------------------


def test_varm_hand_example():
    base = torch.zeros(2, 2)
    m1 = torch.ones(2, 2)  # mean squared change 1
    m2 = torch.full((2, 2), 2.0)  # mean squared change 4
    changes, weights = variation_ratios(base, [m1, m2])
    assert changes == pytest.approx([1.0, 4.0])
    assert weights == pytest.approx([0.2, 0.8])
    # 0.2·1 + 0.8·2 = 1.8 everywhere
    assert torch.allclose(run("varm", base, [m1, m2]), torch.full((2, 2), 1.8))
    # Equal mean squares from differently shaped changes: equal weights.
    m3 = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # mean square 4/4 = 1, like m1
    assert torch.allclose(run("varm", base, [m1, m3]), torch.tensor([[1.5, 0.5], [0.5, 0.5]]))


def test_varm_weights_sum_to_one_on_random_tensors():
    g = torch.Generator().manual_seed(1)
    for shape in [(7,), (5, 3), (4, 3, 2)]:
        base = torch.randn(shape, generator=g)
        models = [base + s * torch.randn(shape, generator=g) for s in (0.1, 0.5, 2.0)]
        changes, weights = variation_ratios(base, models)
        assert sum(weights) == pytest.approx(1.0, abs=1e-12)
        assert all(w >= 0 for w in weights)
        # weights ∝ mean squared change, computed here in float64
        ms = [float(((m.double() - base.double()) ** 2).mean()) for m in models]
        assert weights == pytest.approx([v / sum(ms) for v in ms], rel=1e-5)
        expect = sum(w * m.double() for w, m in zip(weights, models))
        assert torch.allclose(run("varm", base, models).double(), expect, atol=1e-5)


def test_varm_matrix_changed_only_in_one_model_takes_its_values_exactly():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(16, 8, generator=g)
    m1 = base + torch.randn(16, 8, generator=g)
    m2 = base.clone()
    m3 = base.clone()
    assert torch.equal(run("varm", base, [m1, m2, m3]), m1)
    assert torch.equal(run("varm", base, [m2, m1, m3]), m1)


def test_varm_unchanged_tensor_takes_equal_weights_and_stays_the_base():
    base = torch.randn(4, 4)
    _, weights = variation_ratios(base, [base.clone(), base.clone(), base.clone()])
    assert weights == pytest.approx([1 / 3] * 3)
    assert torch.allclose(run("varm", base, [base.clone(), base.clone(), base.clone()]), base)


# --- linear, task arithmetic -------------------------------------------------------------------------


def test_linear_and_task_arithmetic_by_hand():
    base = torch.tensor([1.0, 1.0])
    m1 = torch.tensor([2.0, 0.0])
    m2 = torch.tensor([5.0, 3.0])
    # (1·m1 + 3·m2) / 4
    assert torch.allclose(run("linear", base, [m1, m2], weights=(1, 3), normalize=True), torch.tensor([4.25, 2.25]))
    assert torch.allclose(run("linear", base, [m1, m2], weights=(1, 3), normalize=False), torch.tensor([17.0, 9.0]))
    # base + λ(1·δ1 + 3·δ2) with δ1 = (1, −1), δ2 = (4, 2): sum (13, 5); λ = 0.5
    assert torch.allclose(run("task_arithmetic", base, [m1, m2], weights=(1, 3), lam=0.5), torch.tensor([7.5, 3.5]))
    # normalised: divide the sum by Σw = 4
    assert torch.allclose(
        run("task_arithmetic", base, [m1, m2], weights=(1, 3), normalize=True), torch.tensor([4.25, 2.25])
    )


# --- TIES --------------------------------------------------------------------------------------------

BASE5 = torch.ones(5)
D1 = torch.tensor([3.0, -1.0, 0.5, 2.0, -4.0])
D2 = torch.tensor([2.0, 1.0, 1.5, -3.0, -1.0])


def test_trim_keeps_exactly_k_largest_magnitudes():
    # density 0.6 of 5 → k = 3: |−4|, |3|, |2| survive
    assert torch.equal(trim_top_magnitude(D1, 0.6), torch.tensor([3.0, 0.0, 0.0, 2.0, -4.0]))
    assert torch.equal(trim_top_magnitude(D2, 0.6), torch.tensor([2.0, 0.0, 1.5, -3.0, 0.0]))
    # ties at the threshold: exactly k kept, lowest indices first
    assert torch.equal(trim_top_magnitude(torch.tensor([1.0, -1.0, 1.0, 1.0]), 0.5), torch.tensor([1.0, -1.0, 0, 0]))
    # at least one entry survives a tiny density
    assert int((trim_top_magnitude(torch.arange(1.0, 11.0), 0.01) != 0).sum()) == 1


def test_ties_trim_elect_disjoint_mean_by_hand():
    # Trimmed (density 0.6): τ1 = (3, 0, 0, 2, −4), τ2 = (2, 0, 1.5, −3, 0); weights (1, 3) → 3·τ2 = (6, 0, 4.5, −9, 0).
    # Σ = (9, 0, 4.5, −7, −4) → elected signs (+, +, +, −, −).
    # Disjoint weighted mean: (3+6)/(1+3), 0, 4.5/3, −9/3, −4/1.
    merged = run("ties", BASE5, [BASE5 + D1, BASE5 + D2], weights=(1, 3), densities=(0.6, 0.6), normalize=True)
    assert torch.allclose(merged, BASE5 + torch.tensor([2.25, 0.0, 1.5, -3.0, -4.0]))
    # Without normalising: the sums of the agreeing weighted values; λ scales them.
    merged = run("ties", BASE5, [BASE5 + D1, BASE5 + D2], weights=(1, 3), densities=(0.6, 0.6), lam=0.5)
    assert torch.allclose(merged, BASE5 + 0.5 * torch.tensor([9.0, 0.0, 4.5, -9.0, -4.0]))


def test_ties_zero_sum_elects_positive_and_zero_never_agrees():
    base = torch.zeros(2)
    merged = run("ties", base, [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], normalize=True)
    assert torch.equal(merged, torch.tensor([1.0, 0.0]))


# --- DARE --------------------------------------------------------------------------------------------


def test_dare_keeps_density_share_and_restores_the_l1_norm():
    # mergekit's rule: each entry kept with probability density, survivors scaled by ‖δ‖₁ / ‖kept‖₁.
    delta = torch.randn(20_000, generator=torch.Generator().manual_seed(3)) + 5.0  # no zeros
    out = drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(0))
    kept = out != 0
    # kept share within 5σ of 0.3 (σ = √(0.3·0.7/20000) ≈ 0.0032)
    assert abs(float(kept.float().mean()) - 0.3) < 0.017
    factor = float(delta.double().abs().sum() / delta.double()[kept].abs().sum())
    assert torch.allclose(out[kept].double(), delta[kept].double() * factor, rtol=1e-5)  # float32 norms
    assert float(out.double().abs().sum()) == pytest.approx(float(delta.double().abs().sum()), rel=1e-5)
    # rescale: false keeps the survivors' values; density 1 drops nothing
    plain = drop_and_rescale(delta, 0.3, torch.Generator().manual_seed(0), rescale=False)
    assert torch.equal(plain != 0, kept) and torch.equal(plain[kept], delta[kept])
    assert drop_and_rescale(delta, 1.0, torch.Generator()) is delta


def test_l1_rescale_by_hand_and_its_tiny_norm_guard():
    from fusekit.merge.sparsify import rescale_l1

    # ‖(1, −2, 3, −4)‖₁ = 10, ‖(0, −2, 3, 0)‖₁ = 5 → factor 2
    out = rescale_l1(torch.tensor([1.0, -2.0, 3.0, -4.0]), torch.tensor([0.0, -2.0, 3.0, 0.0]))
    assert torch.equal(out, torch.tensor([0.0, -4.0, 6.0, 0.0]))
    # below 1e-7 (either norm) mergekit leaves the masked vector as it is
    tiny = torch.tensor([1e-8, 0.0])
    assert torch.equal(rescale_l1(tiny, tiny * torch.tensor([1.0, 0.0])), tiny * torch.tensor([1.0, 0.0]))


def test_dare_drops_every_entry_with_the_same_probability():
    # The drop ignores magnitudes: over many seeds each entry of a skewed vector survives ~density of the time.
    delta = torch.tensor([100.0, -0.01, 3.0, 0.5, -7.0, 1e-3])
    draws = torch.stack([drop_and_rescale(delta, 0.4, torch.Generator().manual_seed(s)) != 0 for s in range(3000)])
    share = draws.float().mean(0)
    # σ = √(0.4·0.6/3000) ≈ 0.009; 5σ
    assert torch.all((share - 0.4).abs() < 0.045), share
    # one tensor-wide factor: every survivor of a draw is scaled alike
    out = drop_and_rescale(delta, 0.4, torch.Generator().manual_seed(1))
    ratios = out[out != 0] / delta[out != 0]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))


def test_dare_masks_depend_on_seed_tensor_name_and_model_not_on_other_inputs():
    base = torch.zeros(1000)
    m = torch.ones(1000)
    a = run("dare_linear", base, [m, m], name="layers.0.w", densities=(0.5, 0.5), weights=(1, 0), seed=7)
    b = run("dare_linear", base, [m, 3 * m], name="layers.0.w", densities=(0.5, 0.9), weights=(1, 0), seed=7)
    assert torch.equal(a, b)  # model 0's mask ignores model 1
    c = run("dare_linear", base, [m, m], name="layers.1.w", densities=(0.5, 0.5), weights=(1, 0), seed=7)
    d = run("dare_linear", base, [m, m], name="layers.0.w", densities=(0.5, 0.5), weights=(1, 0), seed=8)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_dare_ties_is_ties_election_over_the_dare_vectors():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(500, generator=g)
    m1, m2 = base + torch.randn(500, generator=g), base + torch.randn(500, generator=g)
    kw = dict(name="x", densities=(0.4, 0.6), seed=11)
    # Each model's dropped-and-rescaled vector, recovered alone (its weight 1, the other's 0).
    t1 = run("dare_linear", base, [m1, m2], weights=(1, 0), **kw) - base
    t2 = run("dare_linear", base, [m1, m2], weights=(0, 1), **kw) - base
    w1, w2 = 1.0, 2.0
    s = w1 * t1 + w2 * t2
    sign = torch.where(s >= 0, 1.0, -1.0)
    a1, a2 = (torch.sign(t1) == sign).float(), (torch.sign(t2) == sign).float()
    mixed = w1 * t1 * a1 + w2 * t2 * a2
    divisor = w1 * a1 + w2 * a2
    expect = base + mixed / torch.where(divisor == 0, 1.0, divisor)
    got = run("dare_ties", base, [m1, m2], weights=(w1, w2), normalize=True, **kw)
    assert torch.allclose(got, expect, atol=1e-5)
    assert torch.allclose(run("dare_ties", base, [m1, m2], weights=(w1, w2), **kw), base + mixed, atol=1e-5)
    # dare_linear: task arithmetic over the same vectors
    assert torch.allclose(run("dare_linear", base, [m1, m2], weights=(w1, w2), **kw), base + s, atol=1e-5)


# --- SLERP -------------------------------------------------------------------------------------------


def test_slerp_by_hand():
    v0, v1 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    # 90° apart: coefficients sin((1−t)·π/2), sin(t·π/2) on the unnormalised vectors
    r = math.sqrt(0.5)
    assert torch.allclose(slerp(0.5, v0, v1), torch.tensor([2 * r, 4 * r]))
    assert torch.allclose(slerp(0.0, v0, v1), v0) and torch.allclose(slerp(1.0, v0, v1), v1)
    t = 0.25
    expect = math.sin(0.75 * math.pi / 2) * v0 + math.sin(0.25 * math.pi / 2) * v1
    assert torch.allclose(slerp(t, v0, v1), expect)


def test_slerp_falls_back_to_linear_for_colinear_vectors():
    v0 = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert torch.allclose(slerp(0.3, v0, 2 * v0), 0.7 * v0 + 0.6 * v0)
    assert torch.allclose(slerp(0.3, v0, v0 * 1.0001 + 1e-6), 0.7 * v0 + 0.3 * (v0 * 1.0001 + 1e-6))


def test_slerp_of_one_model_goes_from_the_base():
    base, m = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(run("slerp", base, [m], t=0.5), torch.tensor([math.sqrt(0.5)] * 2))


# --- options -----------------------------------------------------------------------------------------


def test_every_method_is_registered_with_a_paper():
    assert {"varm", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"} <= set(METHODS)
    assert all(m.reference.startswith("https://") and m.pretty_name for m in METHODS.values())


@pytest.mark.parametrize(
    ("method", "k", "kw", "message"),
    [
        ("varm", 2, {"density": 0.5}, "varm takes no density"),
        ("slerp", 3, {}, "slerp merges 1–2"),
        ("dare_ties", 2, {}, "needs a density"),
        ("ties", 2, {"density": 1.5}, "(0, 1]"),
        ("linear", 2, {"weights": [1.0]}, "1 weights given for 2 models"),
        ("linear", 2, {"weights": [1.0, -1.0]}, "sum to 0"),
        ("slerp", 2, {"t": 2.0}, "[0, 1]"),
        ("nope", 2, {}, "unknown merge method"),
    ],
)
def test_bad_options_are_rejected(method, k, kw, message):
    with pytest.raises(MergeError, match=re.escape(message)):
        args = dict(weights=None, density=None, t=None, lam=None, normalize=None, seed=0) | kw
        resolve_options(get_method(method), k, **args)


def test_defaults_follow_the_papers_and_mergekit():
    ties = resolve_options(get_method("ties"), 2, weights=None, density=None, t=None, lam=None, normalize=None, seed=0)
    assert ties.densities == (0.2, 0.2) and ties.normalize and ties.weights == (1.0, 1.0)
    lin = resolve_options(get_method("linear"), 3, weights=None, density=None, t=None, lam=None, normalize=None, seed=0)
    assert lin.normalize and lin.weights == (1.0, 1.0, 1.0)
    dare = resolve_options(get_method("dare_ties"), 2, weights=None, density=0.1, t=None, lam=None, normalize=None, seed=0)
    assert not dare.normalize and dare.densities == (0.1, 0.1)


def test_kth_largest_is_exact_even_where_the_sample_misses():
    from fusekit.merge.topk import kth_largest

    g = torch.Generator().manual_seed(5)
    n = 1 << 20
    periodic = torch.rand(n, generator=g) + 1.0
    periodic[:: n // (1 << 16)] = 0.0  # the strided sample sees only zeros: the bracket misses
    cases = [
        torch.randn(n, generator=g).abs(),
        torch.rand(n, generator=g) ** 8,
        torch.randint(0, 5, (n,), generator=g).float(),  # heavy ties
        periodic,
    ]
    for values in cases:
        ordered = values.sort(descending=True).values
        for k in (1, 17, n // 5, n // 2, n - 3, n):
            assert kth_largest(values, k) == ordered[k - 1], k
