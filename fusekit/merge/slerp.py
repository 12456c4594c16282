"""Spherical linear interpolation of two models, each tensor flattened to one vector (as mergekit does).

t = 0 gives the first model, t = 1 the second; when the two directions are nearly colinear
(|cos| > 0.9995) the sine formula is ill-conditioned and plain linear interpolation is used.
"""

from __future__ import annotations

import math

import torch

from fusekit.merge.registry import Merged, TensorInputs, register_method

DOT_THRESHOLD = 0.9995
EPS = 1e-8


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.reshape(-1), v1.reshape(-1)
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    na, nb = (na if na > EPS else 1.0), (nb if nb > EPS else 1.0)
    dot = float(torch.dot(a / na, b / nb).clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s) * v0 + (math.sin(t * theta) / s) * v1


@register_method(
    "slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp", options=("t",), min_models=1, max_models=2
)
def slerp_method(x: TensorInputs) -> Merged:
    # One model: interpolate from the base to it; two: between them (the engine puts the base first if it is one).
    v0, v1 = (x.base, x.models[0]) if len(x.models) == 1 else (x.models[0], x.models[1])
    return Merged(slerp(x.t, v0, v1))
