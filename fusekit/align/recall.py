"""Perfect-source recall: how much of a source's knowledge can reach the target's tokens, model-free.

A *perfect source* always predicts its own true next token: probability 1 − ε on it and ε spread over
k − 1 other ids (ε = 1e-3, so chains of many source tokens stay above ½). Transferred onto the target, a
target position *recalls* when its transferred distribution (not the one-hot fallback) puts ≥ ½ on the
target's true next token. The share of predicted target positions that recall is the ceiling of what any
real source can pass on through that tokenizer pair and transfer method.
"""

from __future__ import annotations

import numpy as np

from fusekit.align.transfer import Transfer

EPSILON = 1e-3


def perfect_source_topk(ids: np.ndarray, k: int, vocab_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(top-k ids int64 [m, k], log-probs float32 [m, k]) of a perfect source over its tokens `ids` [m].

    Row i puts 1 − ε on ids[i+1] and ε/(k−1) on each of k−1 distinct random other ids (the last row,
    with no next token, on random ids only). Deterministic for a seed.
    """
    ids = np.asarray(ids, dtype=np.int64)
    m = len(ids)
    rng = np.random.default_rng(seed)
    out = np.empty((m, k), dtype=np.int64)
    out[:, 0] = np.r_[ids[1:], rng.integers(0, vocab_size, 1)] if m else ids
    for c in range(1, k):
        out[:, c] = rng.integers(0, vocab_size, m)
    # Distractors must differ from the true id and from each other: redraw collisions.
    for _ in range(8):
        clash = np.zeros((m, k), bool)
        for c in range(1, k):
            clash[:, c] = (out[:, c:c + 1] == out[:, :c]).any(axis=1)
        if not clash.any():
            break
        out[clash] = rng.integers(0, vocab_size, int(clash.sum()))
    true, other = perfect_logp(k)
    logp = np.full((m, k), other, dtype=np.float32)
    logp[:, 0] = true
    return out, logp


def perfect_logp(k: int) -> tuple[float, float]:
    """(log-probability on the true next token, on each of the k − 1 others) of a perfect source's top-k,
    as float32 values."""
    other = float(np.float32(np.log(EPSILON / max(k - 1, 1))))
    return float(np.float32(np.log1p(-EPSILON) if k > 1 else 0.0)), other


def recalled(result: Transfer, tgt_ids: np.ndarray) -> np.ndarray:
    """bool [n − 1]: predicted target positions whose transferred row puts ≥ ½ on the next target token."""
    return recalled_rows(result.ids, result.probs, result.carried, tgt_ids)


def recalled_rows(ids: np.ndarray, probs: np.ndarray, carried: np.ndarray, tgt_ids: np.ndarray) -> np.ndarray:
    """`recalled` on plain arrays: ids/probs [n, k], carried [n], the target's tokens [n]."""
    tgt_ids = np.asarray(tgt_ids)
    if len(tgt_ids) < 2:
        return np.zeros(0, bool)
    nxt = tgt_ids[1:, None]
    mass = np.where(ids[:-1] == nxt, probs[:-1], 0.0).sum(axis=1)
    return carried[:-1] & (mass >= 0.5)
