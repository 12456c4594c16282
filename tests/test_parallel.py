"""`fusekit._parallel.in_parallel`: results in the items' order, jobs side by side, the first error raised
after the running jobs have ended, the jobs not begun dropped."""

from __future__ import annotations

import threading
import time

import pytest

from fusekit._parallel import in_parallel


def test_results_come_in_the_items_order_whatever_order_the_jobs_end_in():
    def job(x: int) -> int:
        time.sleep(0.01 * (5 - x))  # the first items end last
        return x * x

    assert in_parallel(job, list(range(6)), threads=3) == [x * x for x in range(6)]
    assert in_parallel(job, [], threads=3) == []


def test_jobs_run_side_by_side():
    both = threading.Barrier(2, timeout=10)  # broken (an error) if the two jobs ran one after the other

    def job(x: int) -> str:
        both.wait()
        return threading.current_thread().name

    names = in_parallel(job, [0, 1], threads=2)
    assert names[0] != names[1]


def test_one_thread_runs_the_jobs_here_in_order():
    seen: list[int] = []
    assert in_parallel(lambda x: seen.append(x) or threading.current_thread(), [1, 2, 3], threads=1) == [threading.current_thread()] * 3
    assert seen == [1, 2, 3]


def test_the_first_error_is_raised_once_the_running_jobs_have_ended_and_the_rest_are_dropped():
    stop = threading.Event()
    ended: list[int] = []
    started: list[int] = []
    slow_started = threading.Event()

    def job(x: int) -> int:
        started.append(x)
        if x == 0:  # running while the other fails: it sees `stop` and ends early
            slow_started.set()
            while not stop.is_set():
                time.sleep(0.005)
            ended.append(x)
            return x
        slow_started.wait(10)
        if x > 1:  # a job begun before the first error was seen fails later
            time.sleep(0.2)
        raise ValueError(f"job {x} failed")

    with pytest.raises(ValueError, match="job 1 failed"):
        in_parallel(job, list(range(10)), threads=2, stop=stop)
    assert stop.is_set()
    assert ended == [0]  # the running job ended before the error was raised here
    assert sorted(started) in ([0, 1], [0, 1, 2])  # jobs not begun by then were dropped
