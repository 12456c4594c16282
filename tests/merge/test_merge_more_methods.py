"""sce, della, breadcrumbs, model_stock and nuslerp on small tensors: hand-worked values, slow float64
re-implementations from the papers / mergekit's definitions, and the distributions of the random ones."""

from __future__ import annotations

import math

import pytest
import torch

from fusekit.merge import METHODS, MergeError, TensorInputs, get_method
from fusekit.merge.sparsify import della_drop, della_probabilities, magnitude_band


def run(method: str, base, models, *, params=None, model_params=None, has_base=True, **kw) -> torch.Tensor:
    k = len(models)
    x = TensorInputs(
        name=kw.pop("name", "w"),
        base=torch.as_tensor(base, dtype=torch.float32),
        models=[torch.as_tensor(m, dtype=torch.float32) for m in models],
        weights=tuple(kw.pop("weights", (1.0,) * k)),
        densities=tuple(kw.pop("densities", (1.0,) * k)),
        params=params or {},
        model_params=tuple(model_params or ({},) * k),
        has_base=has_base,
        **kw,
    )
    return get_method(method).fn(x).tensor


def test_new_methods_are_registered_with_papers():
    assert {"sce", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "model_stock", "nuslerp"} <= set(METHODS)


# --- SCE ---------------------------------------------------------------------------------------------


def test_sce_by_hand_without_selection():
    # δ1 = (1, −2, .5, 0), δ2 = (3, 1, −.5, 2): mean squares 1.3125 and 3.5625 → W = (7/26, 19/26).
    # Σδ = (4, −1, 0, 2) → elected (+, −, + (tie), +). Entry 0: both agree → 7/26·1 + 19/26·3 = 32/13;
    # entry 1: only δ1 → −2; entry 2: only δ1 (+.5) → .5; entry 3: only δ2 (δ1 = 0 never agrees) → 2.
    base = torch.full((4,), 0.5)
    d1, d2 = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 2.0])
    got = run("sce", base, [base + d1, base + d2])
    assert torch.allclose(got, base + torch.tensor([32 / 13, -2.0, 0.5, 2.0]), atol=1e-6)


def test_sce_selects_the_highest_variance_entries_by_hand():
    # Differences δ2 − δ1 = (2, 3, −1, 2.5) → variances (1, 2.25, .25, 1.5625); select_topk .5 of 4 nonzero
    # → k = 2: entries 1 and 3. δ1 → (0, −2, 0, 0), δ2 → (0, 1, 0, 2.5); weights from these masked vectors;
    # entry 1: elected − → δ1 alone → −2; entry 3: + → δ2 alone → 2.5; the unselected entries stay the base's.
    base = torch.zeros(4)
    d1, d2 = torch.tensor([1.0, -2.0, 0.5, 0.0]), torch.tensor([3.0, 1.0, -0.5, 2.5])
    got = run("sce", base, [d1, d2], params={"select_topk": 0.5})
    assert torch.allclose(got, torch.tensor([0.0, -2.0, 0.0, 2.5]))


def sce_reference(base: torch.Tensor, models: list[torch.Tensor], topk: float) -> torch.Tensor:
    """SCE from the paper's three steps, stacked, in float64 (mergekit's thresholds)."""
    b = base.double()
    tv = torch.stack([m.double() - b for m in models])
    if topk < 1:
        var = tv.var(dim=0, unbiased=False)
        k = int(int((var != 0).sum()) * topk)
        order = var.reshape(-1).argsort(descending=True, stable=True)
        mask = torch.zeros(var.numel(), dtype=torch.float64)
        mask[order[:k]] = 1
        tv = tv * mask.reshape(var.shape)
    w = (tv**2).mean(dim=tuple(range(1, tv.dim())))
    w = torch.full_like(w, 1 / len(models)) if float(w.sum()) < 1e-6 else w / w.sum()
    majority = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = (tv.sign() == majority).double()
    ew = w.reshape(-1, *[1] * (tv.dim() - 1)) * agree
    return b + (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)


@pytest.mark.parametrize("topk", [1.0, 0.3])
@pytest.mark.parametrize("scale", [1.0, 1e-4])  # 1e-4: mean squares below 1e-6 → equal weights
def test_sce_matches_a_stacked_float64_reference(topk, scale):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(24, 16, generator=g)
    models = [base + scale * s * torch.randn(24, 16, generator=g) for s in (0.5, 1.0, 2.0)]
    got = run("sce", base, models, params={"select_topk": topk})
    torch.testing.assert_close(got.double(), sce_reference(base, models, topk), rtol=1e-5, atol=1e-6 * scale)


# --- DELLA -------------------------------------------------------------------------------------------


def test_della_probabilities_by_hand():
    # ranks of |(.1, −3, 2, .5)|: 0, 3, 2, 1 → r = rank/3; p = (.5 − .1) + 2·.1·r
    p = della_probabilities(torch.tensor([0.1, -3.0, 2.0, 0.5]), 0.5, 0.1)
    assert torch.allclose(p, torch.tensor([0.4, 0.6, 0.4 + 0.2 * 2 / 3, 0.4 + 0.2 / 3]))
    # matrices: per row
    p = della_probabilities(torch.tensor([[1.0, 2.0, 3.0], [-9.0, 0.0, 4.0]]), 0.5, 0.2)
    assert torch.allclose(p, torch.tensor([[0.3, 0.5, 0.7], [0.7, 0.3, 0.5]]))
    with pytest.raises(MergeError, match="density ± epsilon"):
        della_probabilities(torch.ones(3), 0.9, 0.15)


def test_della_keep_frequencies_follow_the_rank_and_survivors_keep_the_l1_norm():
    delta = torch.tensor([[0.1, -3.0, 2.0, 0.5, -1.0]])
    expect = della_probabilities(delta, 0.5, 0.2)  # .3, .7, .6, .4, .5
    draws = torch.stack([della_drop(delta, 0.5, 0.2, torch.Generator().manual_seed(s), rescale=False) != 0 for s in range(3000)])
    share = draws.float().mean(0)
    assert torch.all((share - expect).abs() < 0.045), share  # 5σ, σ ≤ √(.25/3000) ≈ .009
    out = della_drop(delta, 0.5, 0.2, torch.Generator().manual_seed(3), rescale=True)
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-6)
    kept = out != 0
    ratios = out[kept] / delta[kept]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios))


def test_della_merges_like_ties_over_its_pruned_vectors():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(8, 50, generator=g)
    m1, m2 = base + torch.randn(8, 50, generator=g), base + torch.randn(8, 50, generator=g)
    kw = dict(name="x", densities=(0.4, 0.6), seed=11, model_params=({"epsilon": 0.1}, {"epsilon": 0.2}))
    t1 = run("della_linear", base, [m1, m2], weights=(1, 0), params={"rescale": True}, **kw) - base
    t2 = run("della_linear", base, [m1, m2], weights=(0, 1), params={"rescale": True}, **kw) - base
    s = t1 + 2 * t2
    sign = torch.where(s >= 0, 1.0, -1.0)
    a1, a2 = (torch.sign(t1) == sign).float(), (torch.sign(2 * t2) == sign).float()
    expect = base + (t1 * a1 + 2 * t2 * a2) / torch.where(a1 + 2 * a2 == 0, 1.0, a1 + 2 * a2)
    got = run("della", base, [m1, m2], weights=(1, 2), normalize=True, params={"rescale": True}, **kw)
    assert torch.allclose(got, expect, atol=1e-5)


# --- Model Breadcrumbs -------------------------------------------------------------------------------


def test_breadcrumbs_band_by_hand():
    delta = torch.tensor([5.0, -1.0, 0.2, 3.0, -0.1, 4.0, 2.0, -0.5, 1.5, 10.0])
    # density .5, γ .1: keep 5 of 10; the largest (10) goes as an outlier, the 4 smallest (.1 .2 .5 1) go
    expect = torch.tensor([5.0, 0, 0, 3.0, 0, 4.0, 2.0, 0, 1.5, 0])
    assert torch.equal(magnitude_band(delta, 0.5, 0.1, rescale=False), expect)
    # density .95, γ .2: 9 must stay, so only 1 outlier (not 2) goes
    out = magnitude_band(delta, 0.95, 0.2, rescale=False)
    assert torch.equal(out, torch.where(delta.abs() == 10, 0.0, delta))
    # γ·n < 1: no outlier; the band is the top ⌊density·n⌋ (mergekit would zero the tensor)
    assert torch.equal(magnitude_band(delta, 0.3, 0.01, rescale=False), torch.where(delta.abs() >= 4, delta, 0.0))
    # rescale: the kept band carries ‖δ‖₁
    assert float(magnitude_band(delta, 0.5, 0.1, rescale=True).abs().sum()) == pytest.approx(float(delta.abs().sum()))


def test_breadcrumbs_merges_by_task_arithmetic_and_ties():
    base = torch.zeros(10)
    d1 = torch.tensor([5.0, -1.0, 0.2, 3.0, -0.1, 4.0, 2.0, -0.5, 1.5, 10.0])
    d2 = -d1.flip(0)
    b1 = torch.tensor([5.0, 0, 0, 3.0, 0, 4.0, 2.0, 0, 1.5, 0])
    b2 = -b1.flip(0)
    mp = ({"gamma": 0.1}, {"gamma": 0.1})
    got = run("breadcrumbs", base, [d1, d2], weights=(1.0, 0.5), densities=(0.5, 0.5), model_params=mp, lam=2.0)
    assert torch.allclose(got, 2.0 * (b1 + 0.5 * b2))
    got = run("breadcrumbs_ties", base, [d1, d2], weights=(1.0, 0.5), densities=(0.5, 0.5), model_params=mp, normalize=True)
    s = b1 + 0.5 * b2
    sign = torch.where(s >= 0, 1.0, -1.0)
    a1, a2 = (b1 * sign > 0).float(), (0.5 * b2 * sign > 0).float()
    expect = (b1 * a1 + 0.5 * b2 * a2) / torch.where(a1 + 0.5 * a2 == 0, 1.0, a1 + 0.5 * a2)
    assert torch.allclose(got, expect)


# --- Model Stock -------------------------------------------------------------------------------------


def test_model_stock_by_hand():
    base = torch.tensor([1.0, 1.0])
    # orthogonal offsets: cos 0 → t 0 → the base
    assert torch.allclose(run("model_stock", base, [base + torch.tensor([1.0, 0]), base + torch.tensor([0, 1.0])]), base)
    # parallel offsets: cos 1 → t = 2/(1+1) = 1 → the models' average
    got = run("model_stock", base, [base + torch.tensor([1.0, 0]), base + torch.tensor([2.0, 0])])
    assert torch.allclose(got, base + torch.tensor([1.5, 0]))
    # 60°: cos .5 → t = 2·.5/(1 + .5) = 2/3
    o1, o2 = torch.tensor([1.0, 0.0]), torch.tensor([0.5, math.sqrt(3) / 2])
    got = run("model_stock", base, [base + o1, base + o2])
    assert torch.allclose(got, base + (2 / 3) * (o1 + o2) / 2, atol=1e-6)


def test_model_stock_three_models_average_pairwise_cosines_and_filter_wise_rows():
    g = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, generator=g, dtype=torch.float64)
    models = [base + torch.randn(6, 5, generator=g, dtype=torch.float64) for _ in range(3)]

    def ref(b, ms):
        o = [m - b for m in ms]
        cos = sum(float(torch.dot(o[i], o[j]) / (o[i].norm() * o[j].norm())) for i, j in [(0, 1), (0, 2), (1, 2)]) / 3
        t = 3 * cos / (1 + 2 * cos)
        return t * sum(ms) / 3 + (1 - t) * b

    got = run("model_stock", base, models)
    assert torch.allclose(got.double(), ref(base.reshape(-1), [m.reshape(-1) for m in models]).reshape(6, 5), atol=1e-5)
    got = run("model_stock", base, models, params={"filter_wise": True})
    rows = torch.stack([ref(base[r], [m[r] for m in models]) for r in range(6)])
    assert torch.allclose(got.double(), rows, atol=1e-5)


# --- NuSLERP -----------------------------------------------------------------------------------------


def test_nuslerp_by_hand():
    base = torch.tensor([1.0, 1.0])
    d1, d2 = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 2.0])  # 90° apart, sin θ = 1
    # weights (1, 3) → t = 3/4: base + sin(π/8)·δ1 + sin(3π/8)·δ2
    got = run("nuslerp", base, [base + d1, base + d2], weights=(1.0, 3.0))
    assert torch.allclose(got, base + math.sin(math.pi / 8) * d1 + math.sin(3 * math.pi / 8) * d2)
    # no base: the two models' weights themselves
    got = run("nuslerp", base, [d1, d2], weights=(1.0, 1.0), has_base=False)
    assert torch.allclose(got, math.sin(math.pi / 4) * (d1 + d2))
    # colinear: linear interpolation
    got = run("nuslerp", torch.zeros(2), [d1, 3 * d1], weights=(1.0, 1.0))
    assert torch.allclose(got, 2 * d1)


def test_nuslerp_rows_and_columns_each_interpolate_on_their_own():
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    zero = torch.zeros(4, 3)

    def slerp64(t, u, v):
        u, v = u.double(), v.double()
        th = math.acos(float(torch.dot(u / u.norm(), v / v.norm())))
        return (math.sin((1 - t) * th) * u + math.sin(t * th) * v) / math.sin(th)

    w = (1.0, 2.0)  # t = 2/3
    flat = run("nuslerp", zero, [a, b], weights=w)
    assert torch.allclose(flat.double(), slerp64(2 / 3, a.reshape(-1), b.reshape(-1)).reshape(4, 3), atol=1e-5)
    rows = run("nuslerp", zero, [a, b], weights=w, params={"nuslerp_flatten": False})
    assert torch.allclose(rows.double(), torch.stack([slerp64(2 / 3, a[r], b[r]) for r in range(4)]), atol=1e-5)
    cols = run("nuslerp", zero, [a, b], weights=w, params={"nuslerp_flatten": False, "nuslerp_row_wise": True})
    assert torch.allclose(cols.double(), torch.stack([slerp64(2 / 3, a[:, c], b[:, c]) for c in range(3)], dim=1), atol=1e-5)
