"""Sparsifying a task vector as mergekit does (mergekit/sparsify.py): random drops (DARE), rank-dependent
drops (DELLA), magnitude bands (Model Breadcrumbs), and the norm-preserving rescale they share.

Every function takes one task vector δ (float32/float64) and returns a new tensor (or δ itself where
nothing is dropped); none writes into δ unless `inplace=True` (then it returns δ, masked). Random masks come from the generator the
caller passes (seeded per tensor and model by TensorInputs.generator).
"""

from __future__ import annotations

import torch

from fusekit.merge.errors import MergeError
from fusekit.merge.topk import top_k_mask

RESCALE_EPS = 1e-7  # mergekit's: below it (either norm), the masked vector is returned unscaled


def l1(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, ord=1))


def rescale_l1(original: torch.Tensor | float, masked: torch.Tensor) -> torch.Tensor:
    """`masked` scaled in place so that its L1 norm is `original`'s (a tensor, or its L1 norm already
    taken) — mergekit's `rescale: true`.

    Left as is where either L1 norm is below 1e-7. Note this is one factor per tensor, ‖δ‖₁ / ‖m ⊙ δ‖₁,
    not the DARE paper's 1/density per entry (the two agree in expectation for large tensors).
    """
    before = original if isinstance(original, float) else l1(original)
    after = l1(masked)
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return masked
    return masked.mul_(before / after)


def _apply(delta: torch.Tensor, keep: torch.Tensor, rescale: bool, inplace: bool) -> torch.Tensor:
    before = l1(delta) if rescale else 0.0
    masked = delta.mul_(keep) if inplace else delta * keep
    return rescale_l1(before, masked) if rescale else masked


def bernoulli_drop(
    delta: torch.Tensor, density: float, generator: torch.Generator, *, rescale: bool, inplace: bool = False
) -> torch.Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099): keep each entry independently with probability `density`.

    Returns δ itself for density ≥ 1. With `rescale`, the survivors are scaled to keep ‖δ‖₁ (mergekit).
    """
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=torch.float32) < density
    return _apply(delta, keep, rescale, inplace)


def magnitude_band(delta: torch.Tensor, density: float, gamma: float, *, rescale: bool, inplace: bool = False) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): drop the γ·n largest |δ| (outliers)
    and the smallest, keeping ⌊density·n⌋ entries (mergekit's `magnitude_outliers`).

    n_top = ⌊γ·n⌋ outliers go; if density·n + n_top > n, fewer outliers go so that ⌊density·n⌋ remain.
    mergekit keeps nothing when n_top = 0 (its slice `[n_bot:-0]` is empty, so small tensors lose their
    whole task vector); here the band is kept as intended.
    """
    if density >= 1:
        return delta
    n = delta.numel()
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
    mag = delta.abs().reshape(-1)
    keep = top_k_mask(mag, target + n_top)
    if n_top > 0:
        keep &= ~top_k_mask(mag, n_top)
    del mag
    return _apply(delta, keep.reshape(delta.shape), rescale, inplace)


def della_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probabilities (Deep et al. 2024, arXiv:2406.11617), as mergekit's `della_magprune`.

    Per row of a matrix (a vector is one row; higher ranks as [shape[0], −1]): entries ranked by |δ|
    ascending, r = rank / (row length − 1) ∈ [0, 1], p = density − ε + 2ε·r. Raises MergeError unless
    0 < density − ε and density + ε < 1.
    """
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise MergeError(
            f"della: density ± epsilon must lie in (0, 1); got density {density}, epsilon {epsilon}: lower epsilon"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    n = rows.shape[1]
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(n, dtype=rows.dtype, device=rows.device).expand_as(rows).contiguous())
    del order
    scale = 2 * epsilon / (n - 1) if n > 1 else 0.0
    return ranks.mul_(scale).add_(density - epsilon).reshape(delta.shape)


def della_drop(
    delta: torch.Tensor, density: float, epsilon: float, generator: torch.Generator, *, rescale: bool,
    inplace: bool = False,
) -> torch.Tensor:
    """DELLA's MagPrune: keep each entry with its rank-dependent probability (larger |δ|, likelier kept)."""
    if density >= 1:
        return delta
    p = della_probabilities(delta, density, epsilon)
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=p.dtype) < p
    del p
    return _apply(delta, keep, rescale, inplace)
