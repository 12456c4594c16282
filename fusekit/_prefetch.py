"""Pipelining of a producer and its consumer: `prefetched(items)` runs the producer in a background
thread, a bounded number of items ahead.

Worth it where both sides spend their time outside the GIL (Rust kernels, Polars' encoder): the next
batch is decoded and aligned while the previous one is written, instead of one after the other.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


def prefetched(items: Iterable[T], depth: int = 1, name: str = "fusekit-prefetch") -> Iterator[T]:
    """The items of `items` in their order, produced in a background thread up to `depth` ahead.

    An exception raised while producing is raised here, in the consumer's thread, after the items
    produced before it. Closing this generator early (or an exception in the consumer) stops the
    producer before its next item; the thread is joined before this generator finishes.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def hand_over(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slots.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            hand_over((_DONE, exc))

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item, exc = slots.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()
