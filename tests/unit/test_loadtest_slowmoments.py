"""The load tool's watch for the server core's slow moments during a run
(loadtest/slowmoments.py)."""

from __future__ import annotations

import os
import time

from loadtest.slowmoments import SlowMomentWatch, summarize
from loadtest.speed import SLOW_MOMENTS


def test_summary_counts_the_pieces_at_the_slow_multiple_of_the_median() -> None:
    times = [100.0] * 95 + [100.0 * SLOW_MOMENTS] * 3 + [100.0 * SLOW_MOMENTS - 1] * 2
    moments = summarize(times, switched_out=7)
    assert moments is not None
    assert moments.pieces == 100
    assert moments.switched_out == 7
    assert moments.median_us == 100.0
    assert moments.max_us == 100.0 * SLOW_MOMENTS
    # The two pieces just under the multiple are not slow.
    assert moments.slow_share == 0.03
    note = moments.note()
    assert note is not None and "3.0 %" in note
    assert moments.to_json()["slow_share"] == 0.03


def test_no_note_under_one_percent_and_no_summary_without_pieces() -> None:
    moments = summarize([100.0] * 999 + [1000.0], switched_out=0)
    assert moments is not None and moments.slow_share == 0.001
    assert moments.note() is None
    assert summarize([], switched_out=3) is None


def test_the_watcher_times_pieces_at_idle_priority_on_the_given_cpu() -> None:
    cpu = min(os.sched_getaffinity(0))
    watch = SlowMomentWatch([cpu], period_s=0.005)
    watch.start()
    try:
        pid = watch.pid
        assert pid is not None
        # The spawned interpreter needs a moment before it sets its own policy.
        deadline = time.monotonic() + 10.0
        while os.sched_getscheduler(pid) != os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.sched_getscheduler(pid) == os.SCHED_IDLE
        assert os.sched_getaffinity(pid) == {cpu}
        watch.begin()
        time.sleep(0.5)
    finally:
        moments = watch.stop()
    assert moments is not None
    assert moments.pieces + moments.switched_out > 10
    assert 0 < moments.median_us <= moments.p99_us <= moments.max_us
    # Only the CPU spent watching (not the interpreter's start-up): a piece of
    # tens of µs per 5 ms, whatever the machine, stays well under half a core.
    assert 0 < watch.cpu_s < 0.25, watch.cpu_s
    assert not watch.running


def test_a_watcher_stopped_before_it_began_gives_nothing_and_ends() -> None:
    watch = SlowMomentWatch(None)
    watch.start()
    assert watch.stop() is None
    assert not watch.running
