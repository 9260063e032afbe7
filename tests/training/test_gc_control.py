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
    gc.disable()
    gc.freeze()
    try:
        frozen = gc.get_freeze_count()
        with ManualGC():
            pass
        # Not undone: an unfreeze() would empty the permanent generation. (>=, not ==: another thread of the test
        # process, e.g. a server an earlier test started, may freeze or track objects meanwhile.)
        assert not gc.isenabled() and gc.get_freeze_count() >= frozen > 0
    finally:
        gc.unfreeze()
        gc.enable()
    with pytest.raises(ValueError, match="every"):
        ManualGC(every=0)
