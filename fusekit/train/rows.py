"""Rows and micro-batch arrays: which windows (or pieces of them) share a row, and the row arrays.

With packing, windows are packed next-fit into rows of `max_length` tokens: a window that does not
fit in what is left of a row starts a new row, and a window longer than a row is cut into row-sized
pieces. Each piece restarts its position ids at 0, which transformers reads as a packed sequence
boundary, so attention stays inside each window as it did during extraction. Packing is for models
that pass `fusekit.models.packing.packing_supported` (the check extraction uses); for any other model
(`pack=False`) each row holds one window (or piece), right-padded, with an attention mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusekit.store.types import whole_mass
from fusekit.train.examples import IGNORE, Example


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [B, L]
    position_ids: np.ndarray  # int64 [B, L]
    labels: np.ndarray  # int64 [B, L]
    target_ids: np.ndarray | None  # int32 [B, L, m]
    target_probs: np.ndarray | None  # float32 [B, L, m]
    attention_mask: np.ndarray | None = None  # int64 [B, L], 1 = a window's token (unpacked rows); None when packed
    real_tokens: int | None = None  # tokens of windows, padding excluded (None: every position)
    target_mass: np.ndarray | None = None  # float32 [B, L]: the teacher's mass on its ids (with a target)

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def tokens(self) -> int:
        """Tokens of the windows in the batch — the padding that fills rows out is not counted."""
        return int(self.input_ids.size) if self.real_tokens is None else self.real_tokens


def pack_rows(
    lengths: Sequence[int], max_length: int, piece_length: int | None = None
) -> list[list[tuple[int, int, int]]]:
    """Next-fit packing: rows of (item, start, end) segments, each row ≤ max_length tokens.

    Items longer than `piece_length` (default: max_length; the model's context when that is shorter)
    are cut into pieces of that length first.
    """
    piece = min(piece_length or max_length, max_length)
    rows: list[list[tuple[int, int, int]]] = []
    row: list[tuple[int, int, int]] = []
    used = 0
    for item, n in enumerate(lengths):
        n = int(n)
        for start in range(0, n, piece):
            end = min(n, start + piece)
            if used + end - start > max_length and row:
                rows.append(row)
                row, used = [], 0
            row.append((item, start, end))
            used += end - start
    if row:
        rows.append(row)
    return rows


def single_rows(lengths: Sequence[int], max_length: int, piece_length: int | None = None) -> list[list[tuple[int, int, int]]]:
    """No packing: one (item, start, end) piece per row, items cut as `pack_rows` cuts them."""
    piece = min(piece_length or max_length, max_length)
    return [[(item, start, min(int(n), start + piece))] for item, n in enumerate(lengths) for start in range(0, int(n), piece)]


def collate(rows: list[list[tuple[Example, int, int]]], with_target: bool, packed: bool = True) -> Batch:
    """Rows of (example, start, end) segments → padded arrays; padding is its own segment, unlabelled.

    `packed=False` adds the attention mask of unpacked rows (1 on each row's window, 0 on padding).
    """
    width = max(sum(e - s for _, s, e in row) for row in rows)
    m = max((ex.target_ids.shape[1] for row in rows for ex, _, _ in row), default=1) if with_target else 0
    b = len(rows)
    input_ids = np.zeros((b, width), dtype=np.int64)
    position_ids = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    t_ids = np.full((b, width, max(m, 1)), -1, dtype=np.int32) if with_target else None
    t_p = np.zeros((b, width, max(m, 1)), dtype=np.float32) if with_target else None
    t_mass = np.zeros((b, width), dtype=np.float32) if with_target else None
    mask = None if packed else np.zeros((b, width), dtype=np.int64)
    real = 0
    for r, row in enumerate(rows):
        at = 0
        for ex, s, e in row:
            n = e - s
            input_ids[r, at : at + n] = ex.input_ids[s:e]
            position_ids[r, at : at + n] = np.arange(n)
            labels[r, at : at + n] = ex.labels[s:e]
            if with_target:
                k = ex.target_ids.shape[1]
                t_ids[r, at : at + n, :k] = ex.target_ids[s:e]
                t_p[r, at : at + n, :k] = ex.target_probs[s:e]
                # An example made without a mass (a hand-made one) has its teacher whole on its ids.
                t_mass[r, at : at + n] = ex.target_mass[s:e] if ex.target_mass is not None else whole_mass(ex.target_probs[s:e])
            at += n
        if mask is not None:
            mask[r, :at] = 1
        position_ids[r, at:] = np.arange(width - at)
        real += at
    return Batch(input_ids, position_ids, labels, t_ids, t_p, mask, real_tokens=real, target_mass=t_mass)
