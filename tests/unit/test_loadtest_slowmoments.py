"""The load tool's watch for the server core's slow moments during a run
(loadtest/slowmoments.py)."""

from __future__ import annotations

import os
import signal
import time

from loadtest.slowmoments import SlowMomentWatch, slow_moment_notes, summarize
from loadtest.speed import SLOW_MOMENTS, Pieces


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


def test_notes_before_and_during_a_run_but_not_for_idle_runs() -> None:
    jerky_probe = Pieces(median_us=50.0, p99_us=90.0, p999_us=50.0 * SLOW_MOMENTS, max_us=900.0)
    jerky_run = summarize([100.0] * 90 + [100.0 * SLOW_MOMENTS] * 10, switched_out=0)
    steady_probe = Pieces(median_us=50.0, p99_us=60.0, p999_us=80.0, max_us=100.0)
    steady_run = summarize([100.0] * 100, switched_out=0)
    notes = slow_moment_notes("chat", jerky_probe, jerky_run)
    assert len(notes) == 2
    assert notes[0].startswith("before the run") and notes[1].startswith("during the run")
    assert slow_moment_notes("fanout", steady_probe, jerky_run) == notes[1:]
    assert slow_moment_notes("fanout", jerky_probe, steady_run) == notes[:1]
    assert slow_moment_notes("calls", None, None) == []
    # An idle run measures no latency: no notes about latency tails.
    assert slow_moment_notes("idle", jerky_probe, jerky_run) == []


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


def test_a_watcher_that_cannot_watch_says_why_and_the_run_goes_on() -> None:
    # No such CPU: the watcher cannot pin itself to the server's core, so it
    # does not watch at all (anywhere else its pieces would mean nothing).
    watch = SlowMomentWatch([os.cpu_count() or 1024])
    watch.start()
    started = time.monotonic()
    watch.begin(timeout_s=20.0)
    assert time.monotonic() - started < 15.0  # told, not timed out
    assert watch.unavailable is not None and watch.unavailable.startswith("unavailable")
    assert watch.stop() is None
    assert not watch.running


def test_a_watcher_that_died_is_noticed_at_once() -> None:
    watch = SlowMomentWatch(None)
    watch.start()
    pid = watch.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while watch.running and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    watch.begin(timeout_s=20.0)
    assert time.monotonic() - started < 5.0  # EOF, not the time-out
    assert watch.unavailable is not None and "died" in watch.unavailable
    assert watch.stop() is None
