"""The fusion rules of FuseLLM (arXiv 2401.10491 §3.3): MinCE and AvgCE."""

from __future__ import annotations

import numpy as np

from fusekit.fuse.registry import register_fusion

_PAPER = "https://arxiv.org/abs/2401.10491"


def _usable(ce: np.ndarray) -> np.ndarray:
    """Candidates that may receive weight; where none is usable the target (index 0) stands alone."""
    usable = np.isfinite(ce)
    none = ~usable.any(axis=-1)
    usable[none, 0] = True
    return usable


@register_fusion("min_ce", "MinCE", _PAPER)
def min_ce(ce: np.ndarray) -> np.ndarray:
    """All weight on the lowest-CE candidate; ties go to the earliest (the target first)."""
    usable = _usable(ce)
    best = np.argmin(np.where(usable, ce, np.inf), axis=-1)
    weights = np.zeros(ce.shape, dtype=np.float64)
    np.put_along_axis(weights, best[..., None], 1.0, axis=-1)
    return weights


@register_fusion("avg_ce", "AvgCE", _PAPER)
def avg_ce(ce: np.ndarray) -> np.ndarray:
    """Weights softmax(exp(−CE)) over the usable candidates.

    A candidate without a CE (fallback to one-hot) gets weight 0: left in, exp(−∞) = 0 would still give
    it a softmax share of e⁰ against at most e¹ for a real candidate.
    """
    usable = _usable(ce)
    score = np.where(usable, np.exp(-np.where(usable, ce, 0.0)), -np.inf)
    score = score - score.max(axis=-1, keepdims=True)
    e = np.exp(score)
    return e / e.sum(axis=-1, keepdims=True)
