"""Tests of streamtotal.training.gc_control.ManualGC."""

import gc

import pytest

from streamtotal.training.gc_control import ManualGC


class _Cycle:
    def __init__(self):
        self.me = self


def test_collection_is_manual_inside_and_restored_after():
    assert gc.isenabled()
    alive_before = _Cycle()
    collections = []

    def count(phase, info):
        if phase == "stop":
            collections.append(info["generation"])

    gc.callbacks.append(count)
    try:
        with ManualGC(every=3) as collector:
            assert not gc.isenabled()
            assert gc.get_freeze_count() > 0  # what was alive (alive_before included) is never scanned again
            for _ in range(7):
                collector.step()
            assert collections == [1, 1]  # steps 3 and 6
            collector.epoch_end()
            assert collections[-1] == 2
        assert gc.isenabled() and gc.get_freeze_count() == 0
    finally:
        gc.callbacks.remove(count)
    del alive_before


def test_epoch_end_frees_cycles_made_during_training():
    import weakref

    with ManualGC(every=1000) as collector:
        ref = weakref.ref(_Cycle())  # a cycle: refcounting alone never frees it
        assert ref() is not None
        collector.epoch_end()
        assert ref() is None


def test_a_callers_own_freeze_and_disabled_collector_are_left_as_they_were():
    # The collector is process-wide state: in the test process, threads that earlier tests left behind (a moto
    # server, a loader's prefetch thread) may re-enable it or free frozen objects at any moment. A fresh interpreter
    # has none, so the check runs there.
    import subprocess
    import sys

    program = """
import gc
from streamtotal.training.gc_control import ManualGC
gc.disable()
gc.freeze()
frozen = gc.get_freeze_count()
with ManualGC():
    pass
# Not undone: an unfreeze() would empty the permanent generation.
assert frozen > 0, frozen
assert not gc.isenabled(), "ManualGC re-enabled a collector its caller had disabled"
assert gc.get_freeze_count() == frozen, (gc.get_freeze_count(), frozen)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    with pytest.raises(ValueError, match="every"):
        ManualGC(every=0)
