"""Examples of whole row groups, computed ahead of the training thread in worker processes.

The trainer asks for examples by *job*: one decode group (a row group of the aligned store, or one
window held in memory) and the windows of it that this rank trains on, each with how many times it
will be taken (a window cut into pieces is taken once per piece). A job's examples are dropped as soon
as every use is taken, so memory holds only the groups between the current micro-batch and the
look-ahead.

With `workers` > 0 the jobs run in that many worker processes: each decodes a row group (Parquet
decoding on this rank's cores / `workers` threads) and fuses its windows (MinCE/AvgCE in numpy) while
the training thread computes. Workers are plain `python -c` subprocesses talking over two pipes — not
`multiprocessing`, whose spawn start re-runs the user's main script (a training script without an
`if __name__ == "__main__"` guard would start training again in every worker). They import numpy,
polars and the fusion rules only (no torch), open the store without
re-checking it (the parent did), and exit when the parent closes their pipe or dies. Without workers a
job runs in the calling thread the first time one of its examples is taken.

Results do not depend on the number of workers: a job's examples are a pure function of its windows.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import weakref
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Callable, Hashable, Sequence

from fusekit.store.types import AlignedWindow
from fusekit.train.examples import Example, ExampleSpec, TrainDataError

# read(start, stop, wanted): the windows `wanted` (store-order indices in [start, stop)) of one decode group.
Reader = Callable[[int, int, Sequence[int]], list[AlignedWindow]]


def store_windows(store, start: int, stop: int, wanted: Sequence[int], candidates: bool = True) -> list[AlignedWindow]:
    """Windows `wanted` of the aligned store's row group [start, stop), decoded in one read."""
    block = store.read_group(int(start), int(stop), candidates)
    return [block.window_at(int(w) - int(start)) for w in wanted]


def job_examples(read: Reader, spec: ExampleSpec, start: int, stop: int, wanted: Sequence[int]) -> dict[int, Example]:
    return {int(w): spec.example(window) for w, window in zip(wanted, read(start, stop, wanted))}


@dataclass
class _Job:
    start: int
    stop: int
    uses: dict[int, int]  # window → takes left
    left: int  # Σ uses
    worker: int | None = None
    ident: int = 0
    examples: dict[int, Example] | None = None
    error: BaseException | None = None


class _Worker:
    """One worker subprocess: jobs in, (ident, ok, examples or error) out, in submission order."""

    def __init__(self, folder: Path, spec: ExampleSpec, threads: int):
        to_child_r, to_child_w = os.pipe()
        from_child_r, from_child_w = os.pipe()
        env = {**os.environ, "POLARS_MAX_THREADS": str(threads), "OMP_NUM_THREADS": "1"}
        code = "import sys, fusekit.train.feed as feed; feed.serve(int(sys.argv[1]), int(sys.argv[2]))"
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, str(to_child_r), str(from_child_w)],
                pass_fds=(to_child_r, from_child_w), env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self.inbox = Connection(to_child_w, readable=False)
        self.outbox = Connection(from_child_r, writable=False)
        self.inbox.send((str(folder), spec))
        self.pending: deque[int] = deque()  # job idents sent and not yet answered, in order

    def close(self) -> None:
        for conn in (self.inbox, self.outbox):
            try:
                conn.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def serve(inbox_fd: int, outbox_fd: int) -> None:
    """A worker's main loop (run by `_Worker`'s subprocess): open the store, answer jobs until EOF."""
    inbox, outbox = Connection(inbox_fd, writable=False), Connection(outbox_fd, readable=False)
    folder, spec = inbox.recv()
    from fusekit.store.aligned_store import AlignedStore

    store = AlignedStore(folder, check=False)

    def read(start: int, stop: int, wanted: Sequence[int]) -> list[AlignedWindow]:
        return store_windows(store, start, stop, wanted, spec.with_target)

    while True:
        try:
            ident, start, stop, wanted = inbox.recv()
        except (EOFError, OSError):
            return
        try:
            answer = (ident, True, job_examples(read, spec, start, stop, wanted))
        except Exception as exc:  # sent back and raised in the trainer, where it is named
            answer = (ident, False, exc)
        try:
            try:
                outbox.send(answer)
            except (pickle.PicklingError, TypeError, AttributeError):  # an exception that does not pickle
                outbox.send((ident, False, TrainDataError(f"{type(answer[2]).__name__}: {answer[2]}")))
        except OSError:  # the trainer closed the pipe (finished, or gone): nothing left to do
            return


class ExampleFeed:
    """Examples by (job key, window): `request` a job, `take` its examples, `live` counts jobs in hand.

    `read` gives a group's windows in this process (used without workers); `folder` is the aligned
    store the workers open (None: no workers, whatever `workers` says).
    """

    def __init__(self, read: Reader, spec: ExampleSpec, folder: str | Path | None = None, workers: int = 0):
        self.read, self.spec = read, spec
        self.folder = Path(folder) if folder is not None else None
        self.n_workers = int(workers) if self.folder is not None else 0
        self._workers: list[_Worker] = []
        self._jobs: dict[Hashable, _Job] = {}
        self._by_ident: dict[int, _Job] = {}
        self._next_ident = 0
        self.jobs_done = 0  # jobs completed (row groups decoded, for a store), for the record
        self._finalizer = weakref.finalize(self, _close_workers, self._workers)

    @property
    def workers(self) -> int:
        return self.n_workers

    def live(self) -> int:
        """Jobs requested whose examples are not all taken yet."""
        return len(self._jobs)

    def has(self, key: Hashable) -> bool:
        return key in self._jobs

    def request(self, key: Hashable, start: int, stop: int, uses: dict[int, int]) -> None:
        """Schedule job `key`: windows `uses` (store order, in [start, stop)) of one decode group, each
        to be taken `uses[w]` times. With workers the job starts now; without, at its first `take`."""
        if key in self._jobs:
            raise ValueError(f"job {key!r} was already requested")
        job = _Job(int(start), int(stop), {int(w): int(u) for w, u in uses.items() if u > 0}, 0)
        job.left = sum(job.uses.values())
        if not job.left:
            return
        self._jobs[key] = job
        if self.n_workers:
            self._start_workers()
            job.ident, self._next_ident = self._next_ident, self._next_ident + 1
            job.worker = min(range(len(self._workers)), key=lambda i: len(self._workers[i].pending))
            worker = self._workers[job.worker]
            worker.inbox.send((job.ident, job.start, job.stop, sorted(job.uses)))
            worker.pending.append(job.ident)
            self._by_ident[job.ident] = job

    def take(self, key: Hashable, window: int) -> Example:
        """Window `window`'s example from job `key` (waits for the job); the job is dropped after its last use."""
        job = self._jobs.get(key)
        if job is None or job.uses.get(int(window), 0) <= 0:
            raise KeyError(f"window {window} is not due from job {key!r}")
        if job.examples is None:
            self._complete(job)
        example = job.examples[int(window)]
        job.uses[int(window)] -= 1
        job.left -= 1
        if job.left == 0:
            del self._jobs[key]
        return example

    def reset(self) -> None:
        """Forget every job (a jump to another place in the data); answers still on their way are dropped."""
        self._jobs.clear()
        self._by_ident.clear()

    def close(self) -> None:
        self.reset()
        self._finalizer()

    # ------------------------------------------------------------------------------------------ internals

    def _start_workers(self) -> None:
        if not self._workers:
            threads = max(1, cores_per_rank() // self.n_workers)
            self._workers.extend(_Worker(self.folder, self.spec, threads) for _ in range(self.n_workers))

    def _complete(self, job: _Job) -> None:
        self.jobs_done += 1
        if job.worker is None:
            job.examples = job_examples(self.read, self.spec, job.start, job.stop, sorted(job.uses))
            return
        worker = self._workers[job.worker]
        while job.examples is None and job.error is None:
            try:
                ident, ok, payload = worker.outbox.recv()
            except (EOFError, OSError):
                code = worker.proc.poll()
                raise TrainDataError(
                    f"a data-loader worker process exited (status {code}) while decoding {self.folder}; "
                    "see its message above (out of memory? lower loader_workers, or 0 to decode in the trainer)"
                ) from None
            worker.pending.popleft()
            answered = self._by_ident.pop(ident, None)
            if answered is None:
                continue  # a job forgotten by `reset`
            if ok:
                answered.examples = payload
            else:
                answered.error = payload
        if job.error is not None:
            raise job.error


def cores_per_rank() -> int:
    """This process's share of the machine's cores: those it may run on, over torchrun's ranks per node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def _close_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        worker.close()
    workers.clear()
