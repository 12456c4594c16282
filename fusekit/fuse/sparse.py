"""Blend candidate top-k distributions into one sparse distribution per position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EMPTY = np.iinfo(np.int32).max  # sorts after every real id, so empty slots gather at the end


@dataclass
class SparseTarget:
    """A sparse next-token distribution per position: ids int32 [n, m] (−1 = empty), probs float32 [n, m]."""

    ids: np.ndarray
    probs: np.ndarray


def merge_weighted(ids: list[np.ndarray], probs: list[np.ndarray], weights: np.ndarray) -> SparseTarget:
    """Σ_c weights[:, c] · candidate_c, with equal ids summed; at most Σ k_c non-zeros per position.

    ids[c] int [n, k_c] (−1 empty), probs[c] float [n, k_c], weights float [n, C]. Slots with zero
    weighted mass are dropped, so MinCE yields exactly the chosen candidate's support.
    """
    n = weights.shape[0]
    all_ids = np.concatenate([np.asarray(i, dtype=np.int64) for i in ids], axis=1)
    all_p = np.concatenate([np.asarray(p, dtype=np.float64) * weights[:, c, None] for c, p in enumerate(probs)], axis=1)
    live = (all_ids >= 0) & (all_p > 0)
    all_ids = np.where(live, all_ids, _EMPTY)
    all_p = np.where(live, all_p, 0.0)
    order = np.argsort(all_ids, axis=1, kind="stable")
    s_ids = np.take_along_axis(all_ids, order, axis=1)
    s_p = np.take_along_axis(all_p, order, axis=1)
    width = s_ids.shape[1]
    # Segment number of each slot within its row: runs of equal ids share one output slot.
    starts = np.ones_like(s_ids, dtype=bool)
    starts[:, 1:] = s_ids[:, 1:] != s_ids[:, :-1]
    seg = np.cumsum(starts, axis=1) - 1
    flat = (np.arange(n)[:, None] * width + seg).ravel()
    out_p = np.bincount(flat, weights=s_p.ravel(), minlength=n * width).reshape(n, width)
    out_ids = np.full((n, width), _EMPTY, dtype=np.int64)
    out_ids.ravel()[flat] = s_ids.ravel()
    real = out_ids != _EMPTY
    m = int(real.sum(axis=1).max()) if n else 0
    out_ids = np.where(real, out_ids, -1)[:, :m].astype(np.int32)
    out_p = np.where(real, out_p, 0.0)[:, :m].astype(np.float32)
    return SparseTarget(out_ids, out_p)
