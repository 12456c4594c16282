"""From aligned windows to packed micro-batches: labels, fused targets, position ids.

Windows are packed next-fit into rows of `max_length` tokens; a window that does not fit in what is left
of a row starts a new row, and a window longer than a row is cut into row-sized pieces. Each piece
restarts its position ids at 0, which transformers reads as a packed sequence boundary: attention stays
inside each window, as it was during extraction (verified in tests by comparing logits).

Position t of a window predicts token t+1, so the last position has no label. The order of micro-batches
is a pure function of (window lengths, seed, epoch), which is what makes resume and DDP exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

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


@dataclass
class Batch:
    input_ids: np.ndarray  # int64 [B, L]
    position_ids: np.ndarray  # int64 [B, L]
    labels: np.ndarray  # int64 [B, L]
    target_ids: np.ndarray | None  # int32 [B, L, m]
    target_probs: np.ndarray | None  # float32 [B, L, m]

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def tokens(self) -> int:
        return int(self.input_ids.size)


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
    return Example(ids, labels, fused.ids, with_temperature(probs, temperature))


# ---------------------------------------------------------------------------------------------- sources


class WindowSource:
    """Windows by index. Random access (`get`) for lists and stores that offer it; otherwise a
    forward-only reader that restarts when asked for an earlier index."""

    def __init__(self, windows: Sequence[AlignedWindow] | None = None, store=None):
        self._windows = windows
        self._store = store
        self._iter: Iterator[AlignedWindow] | None = None
        self._cursor = -1
        self._current: AlignedWindow | None = None
        self._lengths: np.ndarray | None = None

    @property
    def random_access(self) -> bool:
        if self._windows is not None:
            return True
        return hasattr(self._store, "__getitem__") and hasattr(self._store, "__len__")

    def lengths(self) -> np.ndarray:
        if self._lengths is None:
            if self._windows is not None:
                self._lengths = np.array([len(w.input_ids) for w in self._windows], dtype=np.int64)
            elif callable(getattr(self._store, "window_lengths", None)):
                self._lengths = np.asarray(self._store.window_lengths(), dtype=np.int64)
            else:
                self._lengths = np.array([len(w.input_ids) for w in self._store.iter_windows()], dtype=np.int64)
        return self._lengths

    def get(self, index: int) -> AlignedWindow:
        if self._windows is not None:
            return self._windows[index]
        if self.random_access:
            return self._store[index]
        if self._iter is None or index < self._cursor:
            self._iter, self._cursor, self._current = iter(self._store.iter_windows()), -1, None
        while self._cursor < index:
            self._current = next(self._iter)
            self._cursor += 1
        return self._current


def open_source(aligned: str | Path | Iterable[AlignedWindow]) -> WindowSource:
    """An aligned store folder, an object with `iter_windows()`, or any iterable of AlignedWindows."""
    if isinstance(aligned, (str, Path)):
        path = Path(aligned)
        if not path.exists():
            raise TrainDataError(f"no aligned store at {path}: run `fusekit align` first, or check the path")
        from fusekit.store.aligned_store import AlignedStore

        return WindowSource(store=AlignedStore(path))
    if hasattr(aligned, "iter_windows"):
        return WindowSource(store=aligned)
    windows = list(aligned)
    bad = next((w for w in windows if not isinstance(w, AlignedWindow)), None)
    if bad is not None:
        raise TrainDataError(f"expected AlignedWindow objects, got {type(bad).__name__}")
    return WindowSource(windows=windows)


# ---------------------------------------------------------------------------------------------- packing


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


class DataPlan:
    """Which windows go in which micro-batch, for every step, rank and accumulation slot.

    Optimizer step s consumes global micro-batches [s·G·W, (s+1)·G·W); rank r takes s·G·W + g·W + r for
    g < G. One process with G·W accumulation slots therefore sees the same micro-batches per step as W
    processes with G each.
    """

    def __init__(
        self,
        source: WindowSource,
        *,
        max_length: int,
        batch_size: int,
        piece_length: int | None = None,
        grad_accum: int,
        epochs: float,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        max_steps: int | None = None,
        fusion: str = "min_ce",
        granularity: str = "window",
        with_target: bool = True,
        temperature: float = 1.0,
        require_loss_mask: bool = False,
    ):
        self.source = source
        self.max_length, self.batch_size, self.piece_length = max_length, batch_size, piece_length
        self.grad_accum, self.world_size = grad_accum, world_size
        self.seed = seed
        self.shuffle = shuffle and source.random_access
        self.fusion, self.granularity, self.with_target = fusion, granularity, with_target
        self.temperature, self.require_loss_mask = temperature, require_loss_mask
        lengths = source.lengths()
        if len(lengths) == 0 or int(lengths.sum()) == 0:
            raise TrainDataError("the aligned data holds no windows: nothing to train on")
        self._lengths = lengths
        self._epoch_rows: tuple[int, list, np.ndarray] | None = None
        # Next-fit row counts depend on the order, so each epoch is planned on its own order.
        self.micro_per_epoch = [
            math.ceil(len(pack_rows(lengths[self.order(e)], max_length, piece_length)) / batch_size) for e in range(math.ceil(epochs))
        ]
        whole = int(math.floor(epochs))
        tail = math.ceil((epochs - whole) * self.micro_per_epoch[-1]) if epochs > whole else 0
        self.total_micro = max(1, sum(self.micro_per_epoch[:whole]) + tail)
        self._starts = np.cumsum([0, *self.micro_per_epoch])
        self.per_step = grad_accum * world_size
        steps = math.ceil(self.total_micro / self.per_step)
        self.total_steps = min(steps, max_steps) if max_steps else steps

    def order(self, epoch: int) -> np.ndarray:
        n = len(self._lengths)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def _rows(self, epoch: int) -> tuple[list, np.ndarray]:
        if self._epoch_rows is None or self._epoch_rows[0] != epoch:
            order = self.order(epoch)
            self._epoch_rows = (epoch, pack_rows(self._lengths[order], self.max_length, self.piece_length), order)
        return self._epoch_rows[1], self._epoch_rows[2]

    def micro_indices(self, step: int, rank: int) -> list[int | None]:
        """This rank's global micro-batch indices for `step` (None: no data left, a padding pass)."""
        base = step * self.per_step
        idx = [base + g * self.world_size + rank for g in range(self.grad_accum)]
        return [i if i < self.total_micro else None for i in idx]

    def micro_batch(self, index: int) -> Batch:
        epoch = int(np.searchsorted(self._starts, index, side="right")) - 1
        within = index - int(self._starts[epoch])
        rows, order = self._rows(epoch)
        chosen = rows[within * self.batch_size : (within + 1) * self.batch_size]
        cache: dict[int, Example] = {}

        def example(item: int) -> Example:
            if item not in cache:
                window = self.source.get(int(order[item]))
                cache[item] = window_example(
                    window, self.fusion, self.granularity, self.with_target, self.temperature, self.require_loss_mask
                )
            return cache[item]

        segments = [[(example(item), s, e) for item, s, e in row] for row in chosen]
        return collate(segments, self.with_target)

    def empty_batch(self) -> Batch:
        """A one-token batch with no labels: lets a rank without data join the gradient all-reduce."""
        z = np.zeros((1, 1), dtype=np.int64)
        t_ids = np.full((1, 1, 1), -1, dtype=np.int32) if self.with_target else None
        t_p = np.zeros((1, 1, 1), dtype=np.float32) if self.with_target else None
        return Batch(z, z.copy(), np.full((1, 1), IGNORE, dtype=np.int64), t_ids, t_p)


def collate(rows: list[list[tuple[Example, int, int]]], with_target: bool) -> Batch:
    """Rows of (example, start, end) segments → padded arrays; padding is its own segment, unlabelled."""
    width = max(sum(e - s for _, s, e in row) for row in rows)
    m = max((ex.target_ids.shape[1] for row in rows for ex, _, _ in row), default=1) if with_target else 0
    b = len(rows)
    input_ids = np.zeros((b, width), dtype=np.int64)
    position_ids = np.zeros((b, width), dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    t_ids = np.full((b, width, max(m, 1)), -1, dtype=np.int32) if with_target else None
    t_p = np.zeros((b, width, max(m, 1)), dtype=np.float32) if with_target else None
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
            at += n
        position_ids[r, at:] = np.arange(width - at)
    return Batch(input_ids, position_ids, labels, t_ids, t_p)


def check_target(source: WindowSource, tokenizer, config, model_ref: str) -> None:
    """Refuse an aligned store built for another target model, before any training step.

    The aligned manifest records the target's tokenizer fingerprint and vocabulary size
    (`settings.target`); `config` is the model's (its logits count) and `tokenizer` the model's own
    (None for a weights-only folder: then only the vocabulary size is compared). Windows given in
    memory carry no manifest and are not checked. Raises TrainDataError naming both.
    """
    store = getattr(source, "_store", None)
    settings = getattr(store, "settings", None)
    target = settings.get("target") if isinstance(settings, dict) else None
    if not isinstance(target, dict):
        return
    from fusekit.models.identity import logit_size, tokenizer_fingerprint

    folder = getattr(store, "folder", "the aligned store")
    built_for = target.get("model") or "another model"
    size, want = logit_size(config), target.get("vocab_size")
    if want is not None and int(want) != size:
        raise TrainDataError(
            f"{folder} was aligned for {built_for} (vocabulary of {want} tokens), but {model_ref} predicts {size}: "
            "train the model whose extraction store was the --target of `fusekit align`, or align again for this one"
        )
    want_fp = target.get("tokenizer_fingerprint")
    if tokenizer is not None and want_fp and getattr(tokenizer, "backend_tokenizer", None) is not None:
        if tokenizer_fingerprint(tokenizer) != want_fp:
            raise TrainDataError(
                f"{folder} was aligned for {built_for}, whose tokenizer differs from {model_ref}'s (same vocabulary size, "
                "other tokens): train the model whose extraction store was the --target of `fusekit align`, or align again for this one"
            )
