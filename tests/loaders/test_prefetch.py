"""Tests of loaders.prefetch: order, the bound on live results, concurrency, errors and shutdown."""

import threading
import time

import pytest

from loaders.prefetch import prefetch


@pytest.mark.parametrize("ahead, threads", [(0, 1), (1, 1), (3, 1), (2, 2), (4, 3)])
def test_results_come_in_item_order(ahead, threads):
    def slow_for_even(i):
        time.sleep(0.004 if i % 2 == 0 else 0.0)  # later items finish first under concurrency
        return i * i

    assert list(prefetch(slow_for_even, range(20), ahead, threads)) == [i * i for i in range(20)]


@pytest.mark.parametrize("ahead, threads", [(1, 1), (2, 1), (2, 2), (3, 3)])
def test_at_most_ahead_plus_one_results_are_alive(ahead, threads):
    lock = threading.Lock()
    started, consumed, worst = [0], [0], [0]

    def work(i):
        with lock:
            started[0] += 1
            worst[0] = max(worst[0], started[0] - consumed[0])  # results made but not yet released
        time.sleep(0.001)
        return i

    for _ in prefetch(work, range(30), ahead, threads):
        time.sleep(0.002)  # a slow consumer lets the readers run as far ahead as they may
        with lock:
            consumed[0] += 1
    assert worst[0] <= ahead + 1


def test_first_read_runs_alone_then_reads_overlap_with_two_threads():
    barrier = threading.Barrier(2, timeout=10)  # breaks unless two calls run at the same time
    running, seen_with_first = [0], []

    def work(i):
        if i == 0:  # the consumer waits for this one only: nothing else may be running beside it
            seen_with_first.append(running[0])
            return i
        running[0] += 1
        barrier.wait()
        running[0] -= 1
        return i

    assert list(prefetch(work, range(7), ahead=2, threads=2)) == list(range(7))
    assert seen_with_first == [0]


@pytest.mark.parametrize("threads", [1, 2])
def test_errors_reach_the_consumer_and_threads_stop(threads):
    before = threading.active_count()

    def work(i):
        if i == 5:
            raise ValueError("item 5 is bad")
        return i

    got = []
    with pytest.raises(ValueError, match="item 5 is bad"):
        for value in prefetch(work, range(10), ahead=2, threads=threads):
            got.append(value)
    assert got == [0, 1, 2, 3, 4]
    assert threading.active_count() == before


@pytest.mark.parametrize("threads", [1, 2])
def test_closing_early_joins_the_readers(threads):
    before = threading.active_count()
    it = prefetch(lambda i: i, range(100), ahead=2, threads=threads)
    assert next(it) == 0
    it.close()
    assert threading.active_count() == before
