"""SCE, FuseChat-2.0's merge (Wan et al. 2024, arXiv:2408.07990): Select, Calculate, Erase — as mergekit's `sce`.

With task vectors δ_j = θ_j − θ_base (j = 1…K), per tensor:
  Select:    if select_topk < 1, keep the ⌊select_topk · nnz(v)⌋ positions of largest variance across the
             models, v = Var_j(δ_j) (population variance), and zero the rest in every δ_j;
  Calculate: W_j = mean(δ_j²) / Σ_i mean(δ_i²) — equal weights 1/K when Σ_i mean(δ_i²) < 1e-6
             (mergekit's absolute threshold: on real LLM deltas, mean squares are often that small, so
             the weights are then equal);
  Erase:     elect sign(Σ_j δ_j) (positive on a tie); drop the entries of the other sign (and zeros);
  θ = θ_base + Σ_j W_j δ_j [agrees] / max(Σ_j W_j [agrees], 1e-6).
Model weights and densities are not used (as in mergekit). Ties in the variance at the selection
threshold keep the lowest indices (mergekit's topk breaks them arbitrarily).
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method
from fusekit.merge.topk import top_k_mask

WEIGHT_FLOOR = 1e-6


def sce_select_mask(deltas: list[torch.Tensor], select_topk: float) -> torch.Tensor | None:
    """Bool mask of the positions SCE keeps (None: keep everything)."""
    if select_topk >= 1:
        return None
    if select_topk <= 0:
        return torch.zeros_like(deltas[0], dtype=torch.bool)
    k_models = len(deltas)
    mean = torch.zeros_like(deltas[0])
    for d in deltas:
        mean.add_(d)
    mean.div_(k_models)
    var = torch.zeros_like(deltas[0])
    tmp = torch.empty_like(deltas[0])
    for d in deltas:
        var.add_(torch.sub(d, mean, out=tmp).square_())
    del mean, tmp
    var.div_(k_models)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return top_k_mask(var.reshape(-1), k).reshape(var.shape)


def sce_weights(deltas: list[torch.Tensor]) -> list[float]:
    """W_j = mean(δ_j²) / Σ_i mean(δ_i²); equal weights where that sum is below 1e-6 (mergekit)."""
    means = [float(d.square().mean()) if d.numel() else 0.0 for d in deltas]
    total = sum(means)
    if abs(total) < WEIGHT_FLOOR:
        return [1.0 / len(deltas)] * len(deltas)
    return [m / total for m in means]


@register_method(
    "sce", "SCE (FuseChat-2.0)", "https://arxiv.org/abs/2408.07990",
    parameters={"select_topk": 1.0, "int8_mask": False},
)  # fmt: skip
def sce(x: TensorInputs) -> Merged:
    deltas = x.task_vectors()
    keep = sce_select_mask(deltas, float(x.param("select_topk", 1.0)))
    if keep is not None:
        for d in deltas:
            d.mul_(keep)
        del keep
    weights = sce_weights(deltas)
    total = torch.zeros_like(x.base)
    for d in deltas:
        total.add_(d)
    positive = total >= 0
    del total
    mixed = torch.zeros_like(x.base)
    divisor = torch.zeros_like(x.base)
    for d, w in zip(deltas, weights):
        agree = torch.where(positive, d > 0, d < 0)  # zeros never agree
        mixed.add_(d.mul_(agree), alpha=w)
        divisor.add_(agree, alpha=w)
        del agree
    return Merged(mixed.div_(divisor.clamp_(min=WEIGHT_FLOOR)).add_(x.base), {"weights": weights})
