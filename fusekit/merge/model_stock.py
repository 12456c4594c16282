"""Model Stock (Jang et al. 2024, arXiv:2403.19522): move from the base towards the models' average by
the ratio the angle between their task vectors gives — as mergekit's `model_stock`.

With N ≥ 2 models and offsets δ_j = θ_j − θ_base: cos θ = the mean over pairs i < j of
δ_i·δ_j / max(‖δ_i‖‖δ_j‖, 1e-6), clamped to [−1, 1]; t = N cos θ / (1 + (N − 1) cos θ);
θ = t · mean_j θ_j + (1 − t) · θ_base. The whole tensor is one vector, or with `filter_wise: true`
each row (last dimension) gets its own angle and t (a vector is one row).
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method


def model_stock_ratio(offsets: list[torch.Tensor]) -> torch.Tensor:
    """t per row (offsets shaped [rows, n]) from the mean pairwise cosine of the offsets."""
    norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = (offsets[i] * offsets[j]).sum(dim=-1)
            cosines.append((dot / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    n = len(offsets)
    return (n * cos) / (1 + (n - 1) * cos)


@register_method(
    "model_stock", "Model Stock", "https://arxiv.org/abs/2403.19522", min_models=2,
    parameters={"filter_wise": False},
)  # fmt: skip
def model_stock(x: TensorInputs) -> Merged:
    shape = x.base.shape
    rows = x.param("filter_wise", False) and x.base.dim() >= 2
    view = (lambda v: v) if rows else (lambda v: v.reshape(1, -1))  # noqa: E731
    offsets = [view(d) for d in x.task_vectors()]
    t = model_stock_ratio(offsets).unsqueeze(-1)
    # t·mean θ_j + (1 − t)·θ_base = θ_base + t·mean δ_j
    mean = torch.zeros_like(offsets[0])
    for o in offsets:
        mean.add_(o)
    mean.div_(len(offsets))
    return Merged(mean.mul_(t).add_(view(x.base)).reshape(shape))
