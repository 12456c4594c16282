"""One aligned window → one training example: shifted labels and the fused, temperature-scaled target.

Position t of a window predicts token t+1, so the last position has no label. This module needs numpy
and the fusion rules only (no torch), so the loader's worker processes import it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusekit.fuse import fuse_window
from fusekit.store.types import AlignedWindow

IGNORE = -100


class TrainDataError(ValueError):
    """Training data that cannot be used, with what to do about it."""


@dataclass
class Example:
    """One window's training signal; labels are already shifted (IGNORE where no loss)."""

    input_ids: np.ndarray  # int64 [n]
    labels: np.ndarray  # int64 [n]
    target_ids: np.ndarray | None  # int32 [n, m], −1 empty
    target_probs: np.ndarray | None  # float32 [n, m]
    target_mass: np.ndarray | None = None  # float32 [n]: the fused teacher's mass on its ids (`SparseTarget.mass`)


def position_mask(window: AlignedWindow) -> np.ndarray:
    """Positions whose prediction is trained on: all but the last, and where loss_mask says so.

    `loss_mask[j]` marks token j as a loss token (chat data: an assistant token); position t predicts
    token t+1, so it counts when token t+1 does.
    """
    n = len(window.input_ids)
    keep = np.zeros(n, dtype=bool)
    keep[:-1] = True
    if window.loss_mask is not None:
        mask = np.asarray(window.loss_mask, dtype=bool)
        if mask.shape != (n,):
            raise TrainDataError(
                f"window (text {window.text_id}, window {window.window}): loss_mask has shape {mask.shape}, "
                f"expected ({n},)"
            )
        keep[:-1] &= mask[1:]
    return keep


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Teacher temperature on a sparse target: p_T ∝ p^(1/T) over each position's non-zero ids, with the
    position's mass kept.

    probs float32 [n, m] (0 at empty slots). A target whose probabilities are a softmax over kept top-k
    logits (FUSION-METHOD.md §1) becomes the softmax of those logits / T — what FuseAI's trainer does
    with `distill_teacher_temperature`. T = 1 returns `probs` unchanged; T > 1 flattens, T < 1 sharpens.
    """
    if temperature == 1.0:
        return probs
    p = probs.astype(np.float64)
    mass = p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        logp = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) / temperature, -np.inf)
    top = logp.max(-1, keepdims=True)
    top[~np.isfinite(top)] = 0.0
    w = np.exp(logp - top)
    total = w.sum(-1, keepdims=True)
    return np.where(total > 0, w / np.where(total > 0, total, 1.0) * mass, 0.0).astype(np.float32)


def window_example(
    window: AlignedWindow,
    fusion: str,
    granularity: str,
    with_target: bool,
    temperature: float = 1.0,
    require_loss_mask: bool = False,
) -> Example:
    """One window's labels and (when `with_target`) its fused, temperature-scaled target.

    `require_loss_mask`: the window must say which tokens are trained on (chat data, assistant tokens);
    raises TrainDataError when it does not.
    """
    ids = np.asarray(window.input_ids, dtype=np.int64)
    if require_loss_mask and window.loss_mask is None:
        raise TrainDataError(
            f"window (text {window.text_id}, window {window.window}) has no loss_mask, but the loss is on "
            "assistant tokens only (preset fusechat / loss_on: assistant): align chat data (messages), "
            "or train with loss_on: all"
        )
    keep = position_mask(window)
    labels = np.full(len(ids), IGNORE, dtype=np.int64)
    labels[:-1] = ids[1:]
    labels[~keep] = IGNORE
    if not with_target:
        return Example(ids, labels, None, None)
    fused = fuse_window(window, fusion, granularity)
    probs = np.where(keep[:, None], fused.probs, 0.0).astype(np.float32)
    # The temperature reshapes the teacher on its ids and keeps their mass, so the rest (1 − mass) stays.
    mass = np.where(keep, fused.mass, 0.0).astype(np.float32)
    return Example(ids, labels, fused.ids, with_temperature(probs, temperature), mass)


@dataclass(frozen=True)
class ExampleSpec:
    """How every window of a run becomes an Example (`window_example`'s options), sent to the workers."""

    fusion: str = "min_ce"
    granularity: str = "window"
    with_target: bool = True
    temperature: float = 1.0
    require_loss_mask: bool = False

    def example(self, window: AlignedWindow) -> Example:
        return window_example(window, self.fusion, self.granularity, self.with_target, self.temperature, self.require_loss_mask)
