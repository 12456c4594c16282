"""What every method's candidates share in an aligned window.

Candidate [0] of every target window is the target's own: its top-k renormalised over the kept k (softmax
of the stored full-softmax log-probs), the mass those k held before (Σ exp of the log-probs, per row), its
per-token CE and the window's mean CE as extracted (`target_candidate`). Each source then adds one candidate, made by its method (`carry.py` for `fusellm`
and `fusechat`, `bytespan.py` for `bytespan`); while making them, each method adds up the same counts per
source (`SourceStats`, summed over shards into report.json) and checks that no mass lands on target ids
that must get none (`bad_target_ids`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from fusekit.store.types import Candidate, Window, whole_mass
from fusekit.vocab.info import EMPTY, SPECIAL, VocabInfo


def target_candidate(w: Window) -> Candidate:
    """The target's own candidate: its top-k renormalised over the kept k entries."""
    ids, probs, mass = _renormalised(np.asarray(w.topk_ids, dtype=np.int32), np.asarray(w.topk_logp, dtype=np.float64))
    return Candidate(ids=ids, probs=probs, ce=np.asarray(w.ce, dtype=np.float32).copy(), mean_ce=float(w.mean_ce), mass=mass)


def _renormalised(ids: np.ndarray, logp: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of top-k ids int32 [n, k] and full-softmax log-probs float64 [n, k] → (ids with −1 where
    unusable, probs float32 renormalised over each row's usable entries — all-zero rows stay zero —, and
    mass float32 [n]: what those entries held before, Σ exp(log-prob), clipped to [0, 1]: the extraction
    codec stores log-probs to ±1/512 nat, so a row that held nearly everything may sum a little past 1)."""
    valid = (ids >= 0) & np.isfinite(logp)
    top = np.max(np.where(valid, logp, -np.inf), axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    p = np.where(valid, np.exp(logp - top), 0.0)
    total = p.sum(axis=1, keepdims=True)
    probs = np.divide(p, total, out=np.zeros_like(p), where=total > 0).astype(np.float32)
    mass = np.clip(total[:, 0] * np.exp(top[:, 0]), 0.0, 1.0).astype(np.float32)
    return np.where(valid, ids, -1).astype(np.int32), probs, mass


def kept_mass(carried: np.ndarray, kept: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """A source candidate's `mass` per row, float32 [n]: `kept` (the carried row's mass before its
    renormalisation, clipped to [0, 1]) where `carried`; 1 on a one-hot fallback row (exact: nothing was
    cut from it); 0 on an empty row (no probability: a window's last row)."""
    kept = np.clip(np.nan_to_num(np.asarray(kept, dtype=np.float64), nan=0.0), 0.0, 1.0)
    return np.where(carried, kept, whole_mass(probs)).astype(np.float32)


def target_candidates(windows: Sequence[Window]) -> list[Candidate]:
    """`target_candidate` of each window of one text, computed over the text at once (row by row, so the
    same values): the candidates' ids and probs are views of the text's arrays."""
    if len(windows) < 2:
        return [target_candidate(w) for w in windows]
    ids, probs, mass = _renormalised(
        np.concatenate([np.asarray(w.topk_ids, dtype=np.int32) for w in windows]),
        np.concatenate([np.asarray(w.topk_logp, dtype=np.float64) for w in windows]),
    )
    out, lo = [], 0
    for w in windows:
        hi = lo + len(w.input_ids)
        out.append(Candidate(ids=ids[lo:hi], probs=probs[lo:hi], ce=np.asarray(w.ce, dtype=np.float32).copy(),
                             mean_ce=float(w.mean_ce), mass=mass[lo:hi]))
        lo = hi
    return out


@dataclass
class SourceStats:
    """Counts for one source over some target windows (sums, so shards add up)."""

    windows: int = 0
    positions: int = 0  # predicted target positions
    carried: int = 0  # of which carried 1:1
    empty_windows: int = 0  # target windows whose span held no source token
    topk_mass: float = 0.0  # Σ over carried positions of the source's top-k probability mass
    kept_mass: float = 0.0  # Σ over carried positions of the mass on exactly-mapped ids (fusellm method)
    recalled: int = 0  # predicted positions a perfect source would pass on (≥ ½ on the true next token)
    bad_mass: float = 0.0  # Σ probability on byte-fallback twins, special (not EOS) and empty target ids: must be 0

    def as_json(self) -> dict:
        return asdict(self)

    def add(self, other: dict) -> None:
        for key, value in other.items():
            if hasattr(self, key):
                setattr(self, key, getattr(self, key) + value)


def bad_target_ids(info: VocabInfo) -> np.ndarray:
    """bool [V_t]: target ids that must get no mass (twins, specials other than the end tokens, empty ids)."""
    bad = info.twin | (info.kind == SPECIAL) | (info.kind == EMPTY)
    for end in (info.eos, info.eot):
        if end is not None:
            bad[end] = False
    return bad


def mean_or_nan(values: np.ndarray) -> float:
    """The mean of `values`, NaN when there are none (a window no position of which counts)."""
    return float(values.mean()) if values.size else math.nan
