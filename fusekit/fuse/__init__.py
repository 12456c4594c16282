"""Fusion (FUSION-METHOD.md §4): choose or blend the K+1 candidate distributions of a window.

`fuse_window(window, "min_ce", "window")` is the reference FuseLLM rule; "token" granularity decides
per position instead. Rules live in a registry (`FUSION_RULES`); `register_fusion` adds one.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from fusekit.fuse import rules as _rules  # noqa: F401  (registers the built-in rules)
from fusekit.fuse.registry import FUSION_RULES, FusionError, FusionRule, get_fusion, register_fusion
from fusekit.fuse.sparse import SparseTarget, merge_weighted
from fusekit.store.types import AlignedWindow, row_mass

Granularity = Literal["window", "token"]
GRANULARITIES = ("window", "token")


def candidate_ce(window: AlignedWindow, granularity: Granularity) -> np.ndarray:
    """The CE matrix a rule decides on: [1, C] window means or [n, C] per-token; NaN → +inf."""
    if granularity == "window":
        ce = np.array([[c.mean_ce for c in window.candidates]], dtype=np.float64)
    elif granularity == "token":
        ce = np.stack([np.asarray(c.ce, dtype=np.float64) for c in window.candidates], axis=1)
    else:
        raise FusionError(f"unknown granularity {granularity!r}: choose 'window' or 'token'")
    return np.where(np.isnan(ce), np.inf, ce)


def fusion_weights(window: AlignedWindow, fusion: str = "min_ce", granularity: Granularity = "window") -> np.ndarray:
    """Per-position candidate weights, float64 [n, C]."""
    if not window.candidates:
        raise FusionError(f"window (text {window.text_id}, window {window.window}) has no candidates to fuse")
    weights = get_fusion(fusion).fn(candidate_ce(window, granularity))
    return np.broadcast_to(weights, (len(window.input_ids), len(window.candidates)))


def fuse_window(window: AlignedWindow, fusion: str = "min_ce", granularity: Granularity = "window") -> SparseTarget:
    """The fused sparse distribution on the window's positions (≤ Σ k_c non-zeros each), with its mass.

    probs: the rule's blend Σ_c w_c · probs_c of the candidates' renormalised rows (FuseLLM's target,
    what `ce` trains on). mass float32 [n]: Σ_c w_c · mass_c, the blend's own mass before renormalising
    (`store.types.row_mass`: 1 where a candidate recorded none) — MinCE: the chosen candidate's mass;
    AvgCE: the weighted mean. The divergence losses take the teacher as probs scaled to sum to that mass,
    and 1 − mass as its rest (`fusekit.train.divergence`).
    """
    weights = fusion_weights(window, fusion, granularity)
    n = len(window.input_ids)
    for c in window.candidates:
        bad_mass = c.mass is not None and np.shape(c.mass) != (n,)
        if c.ids.shape[0] != n or c.probs.shape != c.ids.shape or c.ce.shape != (n,) or bad_mass:
            raise FusionError(
                f"window (text {window.text_id}, window {window.window}): candidate shapes ids {c.ids.shape}, "
                f"probs {c.probs.shape}, ce {c.ce.shape}{f', mass {np.shape(c.mass)}' if bad_mass else ''} do not match {n} positions"
            )
    fused = merge_weighted([c.ids for c in window.candidates], [c.probs for c in window.candidates], weights)
    masses = np.stack([row_mass(c).astype(np.float64) for c in window.candidates], axis=1)
    fused.mass = (weights * masses).sum(axis=1).astype(np.float32)
    return fused


__all__ = [
    "FUSION_RULES",
    "GRANULARITIES",
    "FusionError",
    "FusionRule",
    "Granularity",
    "SparseTarget",
    "candidate_ce",
    "fuse_window",
    "fusion_weights",
    "get_fusion",
    "merge_weighted",
    "register_fusion",
]
