"""NuSLERP (mergekit's `nuslerp`): spherical interpolation of two models' weights, or of their task vectors
when there is a base, with t from the models' weights: t = w_2 / (w_1 + w_2) (0.5 if that sum is ~0).

With a base: θ = θ_base + slerp(t, θ_1 − θ_base, θ_2 − θ_base) (task-vector SLERP); without one, slerp of
the weights themselves. `nuslerp_flatten` (default true) treats the tensor as one vector; otherwise each
row (last dimension) is interpolated on its own, or each column with `nuslerp_row_wise: true`. Where
sin θ < 1e-8 (colinear), linear interpolation. Reference: mergekit/merge_methods/nuslerp.py and
https://en.wikipedia.org/wiki/Slerp.
"""

from __future__ import annotations

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method

EPS = 1e-8
NORM_EPS = 1e-7


def nuslerp(t: float, v0: torch.Tensor, v1: torch.Tensor, *, flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    """Slerp of v0 → v1 at t along the last dimension (whole tensor if flatten; dim 0 if row_wise).

    Per vector: cos θ = v0·v1 / (max(‖v0‖, 1e-7) · max(‖v1‖, 1e-7)) clamped to [−1, 1];
    result = (sin((1 − t)θ) v0 + sin(tθ) v1) / sin θ, or (1 − t) v0 + t v1 where sin θ < 1e-8.
    Holds one output-sized buffer besides the inputs (the coefficients are per vector).
    """
    shape = v0.shape
    if flatten:
        a, b = v0.reshape(1, -1), v1.reshape(1, -1)
    elif row_wise:
        a, b = v0.transpose(0, -1), v1.transpose(0, -1)
    else:
        a, b = v0, v1
    na = torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_(min=NORM_EPS)
    nb = torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_(min=NORM_EPS)
    cos = torch.linalg.vecdot(a, b, dim=-1).unsqueeze(-1).div_(na * nb).clamp_(-1, 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = sin.abs() < EPS
    c0 = torch.where(colinear, torch.full_like(sin, 1 - t), torch.sin((1 - t) * theta) / sin)
    c1 = torch.where(colinear, torch.full_like(sin, t), torch.sin(t * theta) / sin)
    res = (a * c0).addcmul_(b, c1)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


@register_method(
    "nuslerp", "NuSLERP", "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    options=("weights",), min_models=2, max_models=2, needs_base=False,
    parameters={"nuslerp_flatten": True, "nuslerp_row_wise": False},
)  # fmt: skip
def nuslerp_method(x: TensorInputs) -> Merged:
    w0, w1 = x.weights
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    flatten = bool(x.param("nuslerp_flatten", True))
    row_wise = bool(x.param("nuslerp_row_wise", False))
    if not x.has_base:
        return Merged(nuslerp(t, x.models[0], x.models[1], flatten=flatten, row_wise=row_wise))
    d1, d2 = x.task_vectors()
    return Merged(nuslerp(t, d1, d2, flatten=flatten, row_wise=row_wise).add_(x.base))
