"""Tests of loaders.split_reads: results in order, errors raised only once nothing runs, helper priority, fork."""

from __future__ import annotations

import multiprocessing
import sys
import threading
import time

import pytest

from loaders.split_reads import run_split
from loaders.thread_priority import current_thread_lowered, lower_current_thread_priority


def test_results_come_back_in_job_order_and_the_first_job_runs_on_a_helper():
    caller = threading.get_ident()
    out = run_split([lambda: ("a", threading.get_ident()), lambda: ("b", threading.get_ident()), lambda: "c"])
    assert [out[0][0], out[1][0], out[2]] == ["a", "b", "c"]
    assert out[0][1] != caller and out[1][1] == caller
    assert run_split([lambda: 1]) == [1] and run_split([]) == []


def test_an_error_is_raised_after_the_helper_job_has_finished():
    finished = threading.Event()

    def slow():
        time.sleep(0.2)
        finished.set()
        return 1

    def fails():
        raise ValueError("caller's job")

    with pytest.raises(ValueError, match="caller's job"):
        run_split([slow, fails])
    assert finished.is_set()  # no read is left running behind the caller

    def helper_fails():
        raise KeyError("helper's job")

    with pytest.raises(KeyError, match="helper's job"):
        run_split([helper_fails, lambda: 2])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities are Linux only")
def test_the_helper_runs_at_its_callers_priority():
    assert run_split([current_thread_lowered, lambda: None])[0] is False
    result = {}

    def lowered_caller():
        lower_current_thread_priority()
        result["helper_lowered"] = run_split([current_thread_lowered, lambda: None])[0]

    thread = threading.Thread(target=lowered_caller)
    thread.start()
    thread.join()
    assert result["helper_lowered"] is True
    assert run_split([current_thread_lowered, lambda: None])[0] is False  # the normal helper stayed normal


def _in_child(queue):
    queue.put(run_split([lambda: "child helper", lambda: "child caller"]))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_forked_child_makes_its_own_helper():
    run_split([lambda: 0, lambda: 0])  # the parent's helper exists before the fork
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0
    assert queue.get(timeout=5) == ["child helper", "child caller"]
