"""TIES-Merging (Yadav et al. 2023): trim each task vector to its top-`density` magnitudes, elect a sign per
parameter, and average only the values that agree with it (the disjoint mean).

Weights scale the trimmed task vectors before the election, as mergekit does; the elected sign is that of
Σ_j w_j τ̂_j (positive on a tie), and a zero never counts as agreeing. θ = θ_base + λ · merged vector.
Both steps work model by model on a handful of full-size buffers (no [K, …] stacks, no full sort).
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method
from fusekit.merge.sparsify import l1, rescale_l1
from fusekit.merge.topk import top_k_mask


def trim_top_magnitude(delta: torch.Tensor, density: float, *, inplace: bool = False) -> torch.Tensor:
    """Keep exactly k = max(1, ⌊density·n⌋) entries of largest |δ| (ties at the threshold: lowest index first)."""
    n = delta.numel()
    if density >= 1 or n == 0:
        return delta
    if density <= 0:
        return delta.zero_() if inplace else torch.zeros_like(delta)
    k = max(1, int(density * n))
    mag = delta.abs().reshape(-1)
    keep = top_k_mask(mag, k)
    del mag
    keep = keep.reshape(delta.shape)
    return delta.mul_(keep) if inplace else delta * keep


def elect_and_merge(x: TensorInputs, deltas: list[torch.Tensor]) -> Merged:
    """Sign election and disjoint (weighted) mean of already-sparsified task vectors.

    Consumes `deltas` (they are zeroed where they disagree): callers pass buffers of their own.
    """
    total = torch.zeros_like(x.base)
    for d, w in zip(deltas, x.weights):
        total.add_(d, alpha=w)
    positive = total >= 0  # the elected sign: positive on a tie
    del total
    mixed = torch.zeros_like(x.base)
    divisor = torch.zeros_like(x.base) if x.normalize else None
    for d, w in zip(deltas, x.weights):
        if w == 0:
            continue
        # w·d agrees when its sign is the elected one; zeros never agree.
        up, down = (d > 0, d < 0) if w > 0 else (d < 0, d > 0)
        agree = torch.where(positive, up, down)
        del up, down
        mixed.add_(d.mul_(agree), alpha=w)
        if divisor is not None:
            divisor.add_(agree, alpha=w)
        del agree
    if divisor is not None:
        divisor.masked_fill_(divisor == 0, 1.0)
        mixed.div_(divisor)
    return Merged(mixed.mul_(x.lam).add_(x.base))


@register_method(
    "ties",
    "TIES",
    "https://arxiv.org/abs/2306.01708",
    options=("weights", "density", "lambda", "normalize"),
    default_normalize=True,
    default_density=0.2,
    parameters={"rescale": False, "int8_mask": False},
)
def ties(x: TensorInputs) -> Merged:
    rescale = bool(x.param("rescale", False))
    deltas = x.task_vectors()
    for delta, d in zip(deltas, x.densities):
        before = l1(delta) if rescale and d < 1 else None
        trim_top_magnitude(delta, d, inplace=True)
        if before is not None:
            rescale_l1(before, delta)
    return elect_and_merge(x, deltas)
