"""Background-thread read-ahead with a hard bound on how many results exist at once."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

from loaders.thread_priority import lower_current_thread_priority

T = TypeVar("T")
I = TypeVar("I")

_POLL_S = 0.05


def prefetch(fn: Callable[[I], T], items: Iterable[I], ahead: int) -> Iterator[T]:
    """Yields ``fn(item)`` for each item, computing up to ``ahead`` results ahead on a background thread.

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

    Returns:
        An iterator of results in item order.
    """
    if ahead <= 0:
        for item in items:
            yield fn(item)
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
