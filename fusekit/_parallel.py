"""Independent jobs on a few threads, their results in the jobs' order.

Worth it where the jobs spend their time outside the GIL (Rust kernels, Polars' encoder): one job's
Python steps then run while another's kernels do, and no job waits on its own read or write.
"""

from __future__ import annotations

import threading
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_POLL_S = 0.1


def in_parallel(job: Callable[[T], R], items: Sequence[T], threads: int, stop: threading.Event | None = None) -> list[R]:
    """`[job(x) for x in items]`, run on up to `threads` threads (in this one when 1), in the items' order.

    On the first exception (a job's, or KeyboardInterrupt while waiting) the jobs not begun are dropped,
    `stop` is set (jobs that check it end early), and that exception is raised here once the running
    jobs have returned: no job outlives this call.
    """
    if threads <= 1 or len(items) <= 1:
        return [job(x) for x in items]
    stop = stop or threading.Event()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fusekit-job")
    futures: list[Future] = []
    try:
        futures = [pool.submit(job, x) for x in items]
        pending: set[Future] = set(futures)
        failed: BaseException | None = None
        while pending and failed is None:
            # In short waits: a Ctrl-C that the OS hands to another thread of the process wakes no untimed
            # wait here, and Python runs its handler in this thread only.
            done, pending = wait(pending, timeout=_POLL_S, return_when=FIRST_EXCEPTION)
            failed = next((f.exception() for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            raise failed
        return [f.result() for f in futures]
    except BaseException:
        for f in futures:  # before `stop`: a job ended by it must not free its thread for one not begun
            f.cancel()
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
