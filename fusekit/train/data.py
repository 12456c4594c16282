"""From aligned windows to micro-batches: which windows go in which row, and each micro-batch's arrays.

Rows: `rows.py` (next-fit packing, or one window per padded row; `collate`).

Order. Each epoch reads the windows in `shuffle.buffered_order`: row groups of the store permuted, then
windows permuted inside buffers of `buffer_groups` groups (windows held in memory: one permutation).
The micro-batches are a pure function of (window lengths, group sizes, seed, epoch), which is what
makes resume and DDP exact: optimizer step s, rank r, accumulation slot g reads global micro-batch
s·G·W + g·W + r, so rank r reads micro-batches r, r + W, r + 2W, … and the ranks' windows are disjoint.

Reading. A rank's micro-batches are read in that order; the row groups they need are requested from an
`ExampleFeed` ahead of use (decoded and fused in worker processes with `workers` > 0), each group once
per epoch with only the windows this rank trains on, and every example is dropped once used. Asking
for another micro-batch than the next one (a resumed run, a test) restarts the reading there: the same
batches, whatever was read before.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from fusekit.train.examples import IGNORE, ExampleSpec, TrainDataError
from fusekit.train.feed import ExampleFeed
from fusekit.train.rows import Batch, collate, pack_rows, single_rows
from fusekit.train.shuffle import BUFFER_GROUPS, buffered_order
from fusekit.train.source import WindowSource


class DataPlan:
    """Which windows go in which micro-batch, for every step, rank and accumulation slot; and the
    micro-batches themselves (`micro_batch`).

    Optimizer step s consumes global micro-batches [s·G·W, (s+1)·G·W); rank r takes s·G·W + g·W + r for
    g < G. One process with G·W accumulation slots therefore sees the same micro-batches per step as W
    processes with G each. `pack=False`: one window per row with an attention mask (models that fail
    `packing_supported`). `workers`: loader processes that decode and fuse ahead (a store folder only).
    Call `close()` when done (it stops the workers).
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
        pack: bool = True,
        workers: int = 0,
        buffer_groups: int = BUFFER_GROUPS,
    ):
        self.source = source
        self.max_length, self.batch_size, self.piece_length = max_length, batch_size, piece_length
        self.grad_accum, self.world_size = grad_accum, world_size
        self.seed = seed
        self.shuffle = shuffle and source.random_access
        self.fusion, self.granularity, self.with_target = fusion, granularity, with_target
        self.temperature, self.require_loss_mask = temperature, require_loss_mask
        self.pack, self.workers, self.buffer_groups = pack, int(workers), int(buffer_groups)
        self.spec = ExampleSpec(fusion, granularity, with_target, temperature, require_loss_mask)
        lengths = source.lengths()
        if len(lengths) == 0 or int(lengths.sum()) == 0:
            raise TrainDataError("the aligned data holds no windows: nothing to train on")
        self._lengths = lengths
        # Decode groups: a store's row groups, else each window alone.
        self._bounds = source.groups()
        self._group_of = (
            np.searchsorted(self._bounds, np.arange(len(lengths)), side="right") - 1 if self._bounds is not None else None
        )
        self._epoch_rows: dict[int, tuple[list, np.ndarray]] = {}
        self._streams: dict[int, _RankStream] = {}
        self._groups_read = 0
        # Next-fit row counts depend on the order, so each epoch is planned on its own order.
        self.micro_per_epoch = [math.ceil(len(self._rows(e)[0]) / batch_size) for e in range(math.ceil(epochs))]
        whole = int(math.floor(epochs))
        tail = math.ceil((epochs - whole) * self.micro_per_epoch[-1]) if epochs > whole else 0
        self.total_micro = max(1, sum(self.micro_per_epoch[:whole]) + tail)
        self._starts = np.cumsum([0, *self.micro_per_epoch])
        self.per_step = grad_accum * world_size
        steps = math.ceil(self.total_micro / self.per_step)
        self.total_steps = min(steps, max_steps) if max_steps else steps

    def order(self, epoch: int) -> np.ndarray:
        """Store-order window indices in the order epoch `epoch` reads them."""
        n = len(self._lengths)
        if not self.shuffle:
            return np.arange(n)
        return buffered_order(n, self._bounds, self.seed, epoch, self.buffer_groups)

    def _rows(self, epoch: int) -> tuple[list, np.ndarray]:
        if epoch not in self._epoch_rows:
            order = self.order(epoch)
            layout = pack_rows if self.pack else single_rows
            if len(self._epoch_rows) >= 2:  # the epoch being read and the next (read ahead across the boundary)
                del self._epoch_rows[min(self._epoch_rows)]
            self._epoch_rows[epoch] = (layout(self._lengths[order], self.max_length, self.piece_length), order)
        return self._epoch_rows[epoch]

    def micro_indices(self, step: int, rank: int) -> list[int | None]:
        """This rank's global micro-batch indices for `step` (None: no data left, a padding pass)."""
        base = step * self.per_step
        idx = [base + g * self.world_size + rank for g in range(self.grad_accum)]
        return [i if i < self.total_micro else None for i in idx]

    def epoch_of(self, index: int) -> int:
        return int(np.searchsorted(self._starts, index, side="right")) - 1

    def segments(self, index: int) -> tuple[int, list[list[tuple[int, int, int]]]]:
        """(epoch, rows of (store-order window, start, end)) of global micro-batch `index`."""
        epoch = self.epoch_of(index)
        within = index - int(self._starts[epoch])
        rows, order = self._rows(epoch)
        chosen = rows[within * self.batch_size : (within + 1) * self.batch_size]
        return epoch, [[(int(order[item]), s, e) for item, s, e in row] for row in chosen]

    def group_of(self, window: int) -> int:
        """The decode group (row group, or the window itself) that holds store-order window `window`."""
        return int(self._group_of[window]) if self._group_of is not None else int(window)

    def group_range(self, group: int) -> tuple[int, int]:
        if self._bounds is None:
            return group, group + 1
        return int(self._bounds[group]), int(self._bounds[group + 1])

    def micro_batch(self, index: int) -> Batch:
        """Global micro-batch `index` (its rank is index mod W); fastest when each rank asks in order."""
        rank = index % self.world_size
        if rank not in self._streams:
            feed = ExampleFeed(
                lambda start, stop, wanted: self.source.read(start, stop, wanted, self.with_target),
                self.spec, self.source.folder, self.workers,
            )
            self._streams[rank] = _RankStream(self, rank, feed, lookahead=2 * self.buffer_groups if feed.workers else 0)
        return self._streams[rank].batch(index)

    def empty_batch(self) -> Batch:
        """A one-token batch with no labels: lets a rank without data join the gradient all-reduce."""
        z = np.zeros((1, 1), dtype=np.int64)
        t_ids = np.full((1, 1, 1), -1, dtype=np.int32) if self.with_target else None
        t_p = np.zeros((1, 1, 1), dtype=np.float32) if self.with_target else None
        mask = None if self.pack else np.ones((1, 1), dtype=np.int64)
        t_mass = np.zeros((1, 1), dtype=np.float32) if self.with_target else None
        return Batch(z, z.copy(), np.full((1, 1), IGNORE, dtype=np.int64), t_ids, t_p, mask, real_tokens=0, target_mass=t_mass)

    @property
    def groups_read(self) -> int:
        """Decode groups (row groups of a store) read so far by this plan's readers, all ranks in this process."""
        return self._groups_read + sum(stream.feed.jobs_done for stream in self._streams.values())

    def close(self) -> None:
        """Stop the loader's worker processes (the plan can still be read afterwards, without them)."""
        self._groups_read = self.groups_read
        for stream in self._streams.values():
            stream.feed.close()
        self._streams.clear()

    def __enter__(self) -> "DataPlan":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _RankStream:
    """One rank's micro-batches r, r + W, r + 2W, … in order, with the row groups they need requested
    from the feed ahead of use (`lookahead` jobs in hand at most; 0: only the micro-batch at hand)."""

    def __init__(self, plan: DataPlan, rank: int, feed: ExampleFeed, lookahead: int):
        self.plan, self.rank, self.feed, self.lookahead = plan, rank, feed, lookahead
        self.expected: int | None = None  # the micro-batch that continues the reading
        self._restart(rank)

    def _restart(self, index: int) -> None:
        self.feed.reset()
        self.origin = self.scan = index  # uses are counted from `origin`; groups requested up to `scan`
        self.requested: set[tuple[int, int]] = set()
        self._uses: dict[int, dict[int, dict[int, int]]] = {}

    def batch(self, index: int) -> Batch:
        if index != self.expected:
            self._restart(index)
        self._request(index)
        plan = self.plan
        epoch, rows = plan.segments(index)
        segments = [[(self.feed.take((epoch, plan.group_of(w)), w), s, e) for w, s, e in row] for row in rows]
        self.expected = index + plan.world_size
        return collate(segments, plan.with_target, packed=plan.pack)

    def _uses_in(self, epoch: int) -> dict[int, dict[int, int]]:
        """group → window → segments of it in this rank's micro-batches of `epoch` (from `origin` on)."""
        if epoch not in self._uses:
            plan, w = self.plan, self.plan.world_size
            first, last = int(plan._starts[epoch]), min(int(plan._starts[epoch + 1]), plan.total_micro)
            lo = max(first, self.origin)
            lo += (self.rank - lo) % w
            rows, order = plan._rows(epoch)
            uses: dict[int, dict[int, int]] = defaultdict(lambda: defaultdict(int))
            for m in range(lo, last, w):
                within = m - first
                for row in rows[within * plan.batch_size : (within + 1) * plan.batch_size]:
                    for item, _, _ in row:
                        window = int(order[item])
                        uses[plan.group_of(window)][window] += 1
            for old in [e for e in self._uses if e < epoch - 1]:
                del self._uses[old]
            self.requested = {key for key in self.requested if key[0] >= epoch - 1}
            self._uses[epoch] = uses
        return self._uses[epoch]

    def _request(self, index: int) -> None:
        """Request every group that micro-batch `index` needs, then further ahead while jobs in hand < lookahead."""
        plan = self.plan
        while self.scan < plan.total_micro and (self.scan <= index or self.feed.live() < self.lookahead):
            epoch, rows = plan.segments(self.scan)
            for row in rows:
                for window, _, _ in row:
                    key = (epoch, plan.group_of(window))
                    if key not in self.requested:
                        self.requested.add(key)
                        start, stop = plan.group_range(key[1])
                        self.feed.request(key, start, stop, self._uses_in(epoch)[key[1]])
            self.scan += plan.world_size
