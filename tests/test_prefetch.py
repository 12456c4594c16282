"""`fusekit._prefetch.prefetched`: the same items in order, errors where the consumer is, no thread left behind."""

from __future__ import annotations

import threading
import time

import pytest

from fusekit._prefetch import prefetched


def test_yields_every_item_in_order():
    assert list(prefetched(iter(range(1000)), depth=3)) == list(range(1000))
    assert list(prefetched(iter([]))) == []


def test_producer_runs_ahead_by_at_most_depth():
    made: list[int] = []

    def items():
        for i in range(10):
            made.append(i)
            yield i

    it = prefetched(items(), depth=2)
    assert next(it) == 0
    time.sleep(0.2)  # the producer fills the queue, then waits
    # item 0 handed over, items 1 and 2 queued, item 3 made and waiting for a free slot
    assert len(made) <= 4
    assert list(it) == list(range(1, 10))


def test_an_error_while_producing_reaches_the_consumer_after_the_items_before_it():
    def items():
        yield 1
        yield 2
        raise ValueError("broken shard")

    got = []
    with pytest.raises(ValueError, match="broken shard"):
        for x in prefetched(items()):
            got.append(x)
    assert got == [1, 2]


def test_closing_early_stops_and_joins_the_producer():
    made: list[int] = []

    def items():
        for i in range(10_000):
            made.append(i)
            yield i

    before = threading.active_count()
    it = prefetched(items(), depth=1, name="test-prefetch")
    assert next(it) == 0
    it.close()
    assert not any(t.name == "test-prefetch" for t in threading.enumerate())
    assert threading.active_count() == before
    assert len(made) < 10


def test_depth_must_be_positive():
    with pytest.raises(ValueError, match="depth"):
        list(prefetched(iter([1]), depth=0))
