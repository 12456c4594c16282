"""Blend candidate top-k distributions into one sparse distribution per position."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_EMPTY = np.iinfo(np.int32).max  # sorts after every real id, so empty slots gather at the end


@dataclass
class SparseTarget:
    """A sparse next-token distribution per position: ids int32 [n, m] (−1 = empty), probs float32 [n, m].

    `mass` float32 [n] (None: not known): the teacher's probability mass on these ids before its
    candidates' rows were renormalised — Σ_c w_c · mass_c (`fuse_window`); 1 − mass is what the teacher
    puts outside them. `probs` stay FuseLLM's blend of renormalised rows whatever the mass.
    """

    ids: np.ndarray
    probs: np.ndarray
    mass: np.ndarray | None = None


def merge_weighted(ids: list[np.ndarray], probs: list[np.ndarray], weights: np.ndarray) -> SparseTarget:
    """Σ_c weights[:, c] · candidate_c, with equal ids summed; at most Σ k_c non-zeros per position.

    ids[c] int [n, k_c] (−1 empty), probs[c] float [n, k_c], weights float [n, C]. Slots with zero
    weighted mass are dropped, so MinCE yields exactly the chosen candidate's support. The order of a
    position's slots carries no meaning (ascending ids, or a lone candidate's own order).
    """
    ids, probs, weights = _only_weighted(ids, probs, np.asarray(weights))
    whole = _one_candidate_whole(ids, probs, weights)
    if whole is not None:
        return whole
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
    if np.all(starts | (s_ids == _EMPTY)):
        out_ids, out_p = s_ids, s_p  # no id twice in any row (MinCE's one candidate): nothing to sum
    else:
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


def _only_weighted(ids: list[np.ndarray], probs: list[np.ndarray], weights: np.ndarray):
    """The same merge on fewer slots: candidates with no weight anywhere are left out, and where each
    position takes one candidate whole (MinCE) only that candidate's slots are kept, gathered per row.

    Slots of weight 0 are dropped by the merge anyway, so the result is unchanged; the sort and the
    bincount then run over k instead of Σ k_c slots per position — the trainer's loader spends most of
    its fusion time there.
    """
    used = np.flatnonzero(weights.any(axis=0))
    if 0 < len(used) < weights.shape[1]:
        ids, probs, weights = [ids[c] for c in used], [probs[c] for c in used], weights[:, used]
    if weights.shape[1] < 2 or not np.all((weights == 0) | (weights == 1)) or not np.all(weights.sum(axis=1) == 1):
        return ids, probs, weights
    n, k = weights.shape[0], max(np.shape(i)[1] for i in ids)
    all_ids = np.full((n, len(ids), k), -1, dtype=np.int64)
    all_p = np.zeros((n, len(ids), k), dtype=np.float64)
    for c, (i, p) in enumerate(zip(ids, probs)):
        all_ids[:, c, : np.shape(i)[1]] = i
        all_p[:, c, : np.shape(p)[1]] = p
    rows, best = np.arange(n), weights.argmax(axis=1)
    return [all_ids[rows, best]], [all_p[rows, best]], np.ones((n, 1))


def _one_candidate_whole(ids: list[np.ndarray], probs: list[np.ndarray], weights: np.ndarray) -> SparseTarget | None:
    """The merge when every position takes one candidate whole (after `_only_weighted`): its own slots,
    empty ones marked — if no id repeats within a position (a top-k never repeats one; alignment sums
    ids that collide). None when it does not apply."""
    if weights.shape[1] != 1 or not np.all(weights == 1):
        return None
    i = np.asarray(ids[0])
    p = np.asarray(probs[0], dtype=np.float32)
    live = (i >= 0) & (p > 0)
    k = i.shape[1]
    distinct_dead = np.where(live, i, -1 - np.arange(k))  # empty slots must not count as repeats
    if k > 1 and np.any(np.diff(np.sort(distinct_dead, axis=1), axis=1) == 0):
        return None
    return SparseTarget(np.where(live, i, -1).astype(np.int32), np.where(live, p, 0.0).astype(np.float32))
