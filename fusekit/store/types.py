"""In-memory records that move between the pipeline stages (one text window each).

The stores (`extract_store.py`, `aligned_store.py`) read and write these; stages and users only ever
see these dataclasses of numpy arrays, never the on-disk encoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Window:
    """One extracted window of one model over one text.

    Position t holds the model's distribution after input_ids[..t], i.e. its prediction of token t+1.
    """

    text_id: int  # 0-based index of the text in the corpus order
    window: int  # 0-based window index within the text
    char_start: int  # the window's span in the text, in characters (code points)
    char_end: int
    input_ids: np.ndarray  # int64 [n]
    offsets: np.ndarray  # int64 [n]: character offset in the text where each token starts
    topk_ids: np.ndarray  # int32 [n, k], by decreasing probability
    topk_logp: np.ndarray  # float32 [n, k]: log-probabilities under the full-vocabulary softmax
    ce: np.ndarray  # float32 [n]: −log p(token t+1); NaN at the last position
    mean_ce: float  # mean of ce over the predicted positions (the window's "metric")
    loss_mask: np.ndarray | None = None  # bool [n] or None (= every position); chat data: assistant tokens
    text: str | None = None  # the window's text, characters [char_start, char_end) (None: a store without texts)


@dataclass
class Candidate:
    """One fusion candidate (the target itself or one source) on the target's positions.

    `probs` are renormalised over each row's kept entries; `mass` is what those entries held before,
    under the candidate's own full distribution, so `probs · mass` is the candidate's probability of each
    id and 1 − mass the probability it puts on every other id together (the divergence losses' "rest",
    `fusekit.train.divergence`). Per row: the kept top-k mass where the row carries a distribution
    (target: Σ exp(topk_logp); a 1:1-carried source: its source row's usable top-k; `bytespan`: the
    transferred row before its renormalisation — docs/ALIGN.md), 1 where the row is the one-hot
    fallback on the next token (exact by construction), 0 where the row is empty. None: not recorded
    (a version-2 aligned store, a hand-made candidate) — read as 1 on every row that holds probability
    (`row_mass`), i.e. a teacher with nothing outside its kept ids, as before version 3.
    """

    ids: np.ndarray  # int32 [n, k], target-vocabulary ids, −1 = empty slot
    probs: np.ndarray  # float32 [n, k], rows sum to 1 where non-empty
    ce: np.ndarray  # float32 [n]: the candidate's CE at that position; NaN where it fell back
    mean_ce: float  # the candidate's mean CE over the window (window-level fusion metric)
    mass: np.ndarray | None = None  # float32 [n] in [0, 1]: the kept entries' mass before renormalising


def whole_mass(probs: np.ndarray) -> np.ndarray:
    """float32 [n]: the mass of rows `probs` [n, k] known to be whole on their ids — 1 on each row that
    holds probability (a one-hot fallback, a candidate that recorded no mass), 0 on an empty row."""
    return (np.asarray(probs).sum(axis=-1) > 0).astype(np.float32)


def row_mass(candidate: Candidate) -> np.ndarray:
    """float32 [n]: the candidate's `mass`, or where it has none, `whole_mass` of its rows."""
    if candidate.mass is not None:
        return np.asarray(candidate.mass, dtype=np.float32)
    return whole_mass(candidate.probs)


@dataclass
class AlignedWindow:
    """A target window with every candidate distribution on its positions: the input of fusion."""

    text_id: int
    window: int
    input_ids: np.ndarray  # int64 [n], target tokens
    candidates: list[Candidate] = field(default_factory=list)  # [0] = target, then sources in order
    loss_mask: np.ndarray | None = None  # bool [n] or None
