"""Token alignment and vocabulary mapping: typed, validated wrappers over the Rust core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

import fusekit._core as _core

DTW_CHUNK = 256  # sequence pairs per align_ids_batch call: enough to keep every thread busy, bounded memory

TokenTable = _core.TokenTable


def _check_strings(name: str, tokens: Sequence[str]) -> list[str]:
    if isinstance(tokens, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of token strings, not a single {type(tokens).__name__}")
    tokens = list(tokens)
    for pos, tok in enumerate(tokens):
        if not isinstance(tok, str):
            raise TypeError(f"{name}[{pos}] is {type(tok).__name__}, expected str")
    return tokens


def align_tokens(src: Sequence[str], tgt: Sequence[str]) -> np.ndarray:
    """DTW alignment of two tokenisations of the same text.

    cost(i, j) is the Levenshtein distance between the token strings as given (code points);
    ties prefer the diagonal, then (i−1, j), then (i, j−1). Returns an int64 array (P, 2) of 0-based
    (i, j) pairs from (0, 0) to (m−1, n−1), increasing. Raises ValueError on an empty sequence.
    """
    return _core.align_tokens(_check_strings("src", src), _check_strings("tgt", tgt))


def align_tokens_batch(
    pairs: Sequence[tuple[Sequence[str], Sequence[str]]], threads: int | None = None
) -> list[np.ndarray]:
    """`align_tokens` over many pairs on `threads` cores (default: all), GIL released."""
    checked = [(_check_strings(f"pairs[{n}][0]", s), _check_strings(f"pairs[{n}][1]", t)) for n, (s, t) in enumerate(pairs)]
    return _core.align_tokens_batch(checked, threads)


def _ids(name: str, ids: np.ndarray) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be a 1-D integer array, got {arr.dtype} with shape {arr.shape}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def align_ids_batch(
    src_table: TokenTable,
    tgt_table: TokenTable,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    threads: int | None = None,
) -> list[np.ndarray]:
    """Align token-id sequences through two `TokenTable`s (normalised vocabularies), in parallel."""
    arrays = [(_ids(f"pairs[{n}][0]", s), _ids(f"pairs[{n}][1]", t)) for n, (s, t) in enumerate(pairs)]
    return _core.align_ids_batch(src_table, tgt_table, arrays, threads)


@dataclass(frozen=True)
class VocabMapStats:
    exact: int
    min_ed: int

    @property
    def exact_share(self) -> float:
        total = self.exact + self.min_ed
        return self.exact / total if total else 0.0


def map_vocab_with_stats(
    src_vocab: Sequence[str], tgt_vocab: Sequence[str], threads: int | None = None, tgt_usable: Sequence[bool] | None = None
) -> tuple[np.ndarray, VocabMapStats]:
    """Like `map_vocab`, also counting exact and MinED matches. `tgt_usable` bool [V_t]: only those
    target ids may be chosen (default: all)."""
    src = _check_strings("src_vocab", src_vocab)
    usable = None if tgt_usable is None else [bool(u) for u in tgt_usable]
    mapping, exact = _core.map_vocab(src, _check_strings("tgt_vocab", tgt_vocab), threads, usable)
    return mapping, VocabMapStats(exact=exact, min_ed=len(src) - exact)


def map_vocab(src_vocab: Sequence[str], tgt_vocab: Sequence[str], threads: int | None = None) -> np.ndarray:
    """For every source token the target index: the identical string if present (its first
    occurrence), else the minimum Levenshtein distance, ties to the lowest target index."""
    return map_vocab_with_stats(src_vocab, tgt_vocab, threads)[0]


@dataclass(frozen=True)
class AlignedTopk:
    """Per target position: top-k ids in the target vocabulary (−1 = empty), probabilities, whether the
    source's distribution was carried (else one-hot on the next target token), and the source position
    it came from (−1 on fallback)."""

    ids: np.ndarray  # int32 [n, k]
    probs: np.ndarray  # float32 [n, k]
    carried: np.ndarray  # bool [n]
    src_pos: np.ndarray  # int32 [n]


def align_topk(
    path: np.ndarray,
    src_ids: np.ndarray,
    tgt_ids: np.ndarray,
    vocab_map: np.ndarray,
    src_topk_ids: np.ndarray,
    src_topk_logp: np.ndarray,
    one_to_one: bool = False,
) -> AlignedTopk:
    """Move a source's per-position top-k (ids, log-probs) onto the target positions along `path`.

    A target position with exactly one aligned source position whose token maps (through
    `vocab_map`) to the target token carries the source's top-k, ids mapped, probabilities renormalised
    over the kept entries; ids that collide after mapping are merged by summing their probabilities.
    Every other position gets one-hot on the *next* target token; the last position gets nothing.

    `one_to_one`: also require the source position to be aligned with that target position only. The
    `fusechat` map sends a source token to the target piece it begins with, so without this check the
    first piece of a 1:n group would carry the row that predicts what follows the *whole* source token.
    """
    path = np.asarray(path)
    if path.ndim != 2 or path.shape[1] != 2 or not np.issubdtype(path.dtype, np.integer):
        raise TypeError(f"path must be an integer array of shape (P, 2), got {path.dtype} {path.shape}")
    topk_ids = np.asarray(src_topk_ids)
    topk_logp = np.asarray(src_topk_logp)
    if topk_ids.ndim != 2 or not np.issubdtype(topk_ids.dtype, np.integer):
        raise TypeError(f"src_topk_ids must be a 2-D integer array, got {topk_ids.dtype} {topk_ids.shape}")
    if topk_logp.ndim != 2 or not np.issubdtype(topk_logp.dtype, np.floating):
        raise TypeError(f"src_topk_logp must be a 2-D float array, got {topk_logp.dtype} {topk_logp.shape}")
    ids, probs, carried, src_pos = _core.align_topk(
        np.ascontiguousarray(path, dtype=np.int64),
        _ids("src_ids", src_ids),
        _ids("tgt_ids", tgt_ids),
        _ids("vocab_map", vocab_map),
        np.ascontiguousarray(topk_ids, dtype=np.int64),
        np.ascontiguousarray(topk_logp, dtype=np.float32),
    )
    if one_to_one and carried.any():
        fanout = np.bincount(path[:, 0], minlength=len(src_ids))  # target positions per source position
        wide = np.flatnonzero(carried & (fanout[np.maximum(src_pos, 0)] > 1))
        if wide.size:
            tgt = np.asarray(tgt_ids)
            ids[wide], probs[wide] = -1, 0.0
            inner = wide[wide + 1 < len(tgt)]
            ids[inner, 0], probs[inner, 0] = tgt[inner + 1], 1.0
            carried[wide], src_pos[wide] = False, -1
    return AlignedTopk(ids=ids, probs=probs, carried=carried, src_pos=src_pos)


def carried_mass(carried: np.ndarray, src_pos: np.ndarray, src_topk_ids: np.ndarray, src_topk_logp: np.ndarray, vocab_map: np.ndarray) -> np.ndarray:
    """float64 [n]: at each carried target position, the probability mass of the source's top-k entries
    that `align_topk` kept there — Σ exp(log-prob) over the source row's entries whose id maps to a target
    id (`vocab_map` ≥ 0; an unmapped id's mass is dropped before renormalising) — and 0 elsewhere.

    `carried` bool [n] and `src_pos` int [n] as `align_topk` returns them; top-k ids int [m, k] (−1 empty)
    and full-softmax log-probs float [m, k] of the source. This is what the carried row's probabilities
    were renormalised from: 1 − it is the mass the source put outside what the row holds.
    """
    carried = np.asarray(carried, dtype=bool)
    out = np.zeros(len(carried), dtype=np.float64)
    rows = np.asarray(src_pos)[carried]
    if not rows.size:
        return out
    ids = np.asarray(src_topk_ids)[rows]
    lp = np.asarray(src_topk_logp, dtype=np.float64)[rows]
    vmap = np.asarray(vocab_map)
    kept = (ids >= 0) & np.isfinite(lp)
    kept &= vmap[np.where(kept, ids, 0)] >= 0
    out[carried] = np.where(kept, np.exp(np.where(kept, lp, 0.0)), 0.0).sum(axis=1)
    return out
