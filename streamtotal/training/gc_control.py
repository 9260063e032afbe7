"""Python's cyclic garbage collector under manual control during training.

A training process holds a few million Python objects (torch, scvi-tools-sized imports, zarr, the registry), and
the automatic collector's full (generation 2) passes walk all of them: 17-160 ms each on the 2-core benchmark
machine, a few per 3-epoch fit, landing on whatever step allocated at that moment. During training the objects
alive at the start are frozen (``gc.freeze``: never scanned again) and automatic collection is off; the young
generations are collected every ``every`` steps, and everything at each epoch's end, both of which then scan
only what training created. As torchtitan does. The previous state is restored afterwards.
"""

from __future__ import annotations

import gc


class ManualGC:
    """Freezes the objects alive now, turns automatic collection off, and collects on a schedule.

    ``start()`` before the training loop and ``stop()`` after it (or use it as a context manager); call ``step()``
    after every optimiser step and ``epoch_end()`` after every epoch.

    Args:
        every: collect generations 0 and 1 every this many steps (>= 1).
    """

    def __init__(self, every: int = 100) -> None:
        if every < 1:
            raise ValueError(f"ManualGC(every={every}): must be >= 1")
        self.every = every
        self._steps = 0
        self._was_enabled = gc.isenabled()
        self._froze = False

    def start(self) -> ManualGC:
        """Freezes the objects alive now and turns automatic collection off."""
        self._was_enabled = gc.isenabled()
        # A caller that froze objects itself keeps its freeze; ours would be undone with it by unfreeze().
        self._froze = gc.get_freeze_count() == 0
        if self._froze:
            gc.freeze()
        gc.disable()
        return self

    def step(self) -> None:
        """Counts a step; collects the young generations every ``every`` steps."""
        self._steps += 1
        if self._steps % self.every == 0:
            gc.collect(1)

    def epoch_end(self) -> None:
        """Collects everything not frozen (cyclic garbage that outlived the young generations)."""
        gc.collect()

    def stop(self) -> None:
        """Restores the collector as ``start`` found it."""
        if self._froze:
            gc.unfreeze()
        if self._was_enabled:
            gc.enable()

    def __enter__(self) -> ManualGC:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
