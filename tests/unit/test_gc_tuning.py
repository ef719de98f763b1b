"""The server tunes CPython's garbage collector once it is set up (see tune_gc)."""

from __future__ import annotations

import gc

from signaling.server import GC_YOUNG_THRESHOLD, tune_gc


def test_tune_gc_freezes_the_setup_heap_and_raises_the_young_threshold() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        kept = [[i] for i in range(1000)]  # long-lived containers made during set-up
        tune_gc()
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() >= len(kept)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
