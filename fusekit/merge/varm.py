"""VaRM, FuseChat's variation ratio merge (FUSION-METHOD.md §6).

For each parameter tensor m (matrices and vectors alike), with Δ_j = θ_{T_j,m} − θ_{pivot,m}:
    W_j = mean(Δ_j²) / Σ_i mean(Δ_i²),    θ_merged,m = Σ_j W_j θ_{T_j,m}.
A tensor no model changed (all Δ_j = 0) takes equal weights 1/K — every θ_{T_j,m} equals the pivot's
then, so the result is the pivot's value either way. The released FuseChat code ends up with equal
weights everywhere; this is the formula as the paper states it.
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method, weighted_sum


def variation_ratios(base: torch.Tensor, models: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """(mean squared change per model, VaRM weights) for one tensor."""
    n = max(base.numel(), 1)
    changes = [float(torch.linalg.vector_norm(m - base)) ** 2 / n for m in models]
    total = sum(changes)
    if total == 0:
        return changes, [1.0 / len(models)] * len(models)
    return changes, [c / total for c in changes]


@register_method("varm", "VaRM (FuseChat)", "https://arxiv.org/abs/2402.16107", min_models=1)
def varm(x: TensorInputs) -> Merged:
    changes, weights = variation_ratios(x.base, x.models)
    info = {"mean_sq_change": changes, "weights": weights, "unchanged": sum(changes) == 0}
    return Merged(weighted_sum(x.models, tuple(weights)), info)
