"""Background-thread read-ahead with a hard bound on how many results exist at once."""

from __future__ import annotations

import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from loaders.thread_priority import lower_current_thread_priority

T = TypeVar("T")
I = TypeVar("I")

_POLL_S = 0.05


def prefetch(fn: Callable[[I], T], items: Iterable[I], ahead: int, threads: int = 1) -> Iterator[T]:
    """Yields ``fn(item)`` for each item, computing up to ``ahead`` results ahead on background threads.

    At most ``ahead + 1`` results are alive at once, counting the one the consumer holds (a token is taken
    before each ``fn`` call and given back when the consumer asks for the next result, so the consumer must
    drop its reference to a result before asking for the next one). ``ahead == 0`` runs ``fn`` inline.
    An exception raised by ``fn`` is re-raised in the consumer. Closing the generator (or garbage
    collecting it) stops and joins the thread, so no reader thread outlives its loop (a thread alive at a
    later ``fork`` could leave a lock held in the child).

    Args:
        fn: the work (e.g. read one I/O group).
        items: its inputs, in order.
        ahead: results computed ahead of the consumer (>= 0).
        threads: background threads computing results concurrently (at most ``ahead`` run at once; results are
            still yielded in item order). More than one pays when ``fn`` spends its time outside the GIL with
            cores to spare (a TileDB query, object-store latency). With more than one, ``items`` is advanced on
            the consumer's thread, so it should be cheap to iterate (e.g. indices); with one, the background
            thread advances it (so a generator's own work happens there too).

    Returns:
        An iterator of results in item order.
    """
    if ahead <= 0:
        for item in items:
            yield fn(item)
        return
    if threads > 1 and ahead > 1:
        yield from _prefetch_concurrent(fn, items, ahead, min(threads, ahead))
        return
    tokens = threading.Semaphore(ahead + 1)
    results: queue.Queue = queue.Queue()
    stop = threading.Event()

    def produce() -> None:
        lower_current_thread_priority()  # read on cycles the trainer leaves idle (see thread_priority)
        try:
            for item in items:
                while not tokens.acquire(timeout=_POLL_S):
                    if stop.is_set():
                        return
                if stop.is_set():
                    return
                results.put((True, fn(item)))
            results.put((False, None))
        except BaseException as exc:  # handed to the consumer, which re-raises it with its traceback
            results.put((False, exc))

    thread = threading.Thread(target=produce, name="streamtotal-prefetch", daemon=True)
    thread.start()
    holding = False
    try:
        while True:
            if holding:
                tokens.release()  # the consumer is done with the result it was given last
                holding = False
            ok, value = results.get()
            if not ok:
                if value is not None:
                    raise value
                return
            holding = True
            yield value
            value = None  # drop our reference so the token count bounds live results
    finally:
        stop.set()
        thread.join()


def _prefetch_concurrent(fn: Callable[[I], T], items: Iterable[I], ahead: int, threads: int) -> Iterator[T]:
    """``prefetch`` with a pool of ``threads`` readers: ``ahead`` calls are submitted in item order, and one more is
    submitted each time the consumer asks for the next result, so at most ``ahead + 1`` results are alive (the
    same bound as one reader thread). Closing cancels what has not started and waits for what has."""
    pool = ThreadPoolExecutor(threads, thread_name_prefix="streamtotal-prefetch",
                              initializer=lower_current_thread_priority)
    pending: deque[Future] = deque()
    source = iter(items)

    def submit_next() -> None:
        for item in source:
            pending.append(pool.submit(fn, item))
            return

    try:
        # The first result alone, then the read-ahead: started together, the reads share the CPU (or the link) and
        # the first arrives late, while the consumer waits for nothing else (~0.1-0.3 s a cold start, 2 cores).
        submit_next()
        if not pending:
            return
        first = pending.popleft().result()
        for _ in range(ahead):
            submit_next()
        yield first
        first = None
        while pending:
            value = pending.popleft().result()  # re-raises fn's exception here, in the consumer
            yield value
            value = None  # drop our reference before the next result is computed (memory bound)
            submit_next()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
