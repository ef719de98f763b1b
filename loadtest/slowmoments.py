"""The server's core's slow moments *during* a run.

The speed probe (:mod:`loadtest.speed`) times short pieces of reference work
before a run; on this kind of machine the host slows a guest's core for
milliseconds at a time, a few times a second on a bad day, and whether the
probe's third of a second catches such a moment is luck. A delivery p99 cannot
be better than those moments allow, so the tool watches for them while it
measures: a small process on the server's CPUs times one piece of the same
reference work every :data:`PERIOD_S`.

It must not compete with the server it watches: it runs under ``SCHED_IDLE``
(the kernel gives it the core only when nothing else wants it, and takes it
back at once), and a piece during which it was switched out (the server woke)
is not counted, so each counted piece's wall time is its own. Its CPU (≈ 1-1.5 %
of a core, taken only when the core is idle) is counted as the tool's own, not as
machine noise.

What it cannot see: the moments while the server keeps the core busy (it only
runs when the server leaves the core idle). A slow moment that builds a queue
in the server is timed by the server's latency tail, not here; the pieces tell
how often the core was slow when it could be watched.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection

from loadtest.speed import PIECE_ITERATIONS, SLOW_MOMENTS, Pieces, one_piece, quantile

__all__ = ["PERIOD_S", "SlowMomentWatch", "SlowMoments", "slow_moment_notes", "summarize"]

PERIOD_S = 0.02


@dataclass(frozen=True, slots=True)
class SlowMoments:
    """Pieces timed during the run: how many were counted (and how many were
    dropped because the watcher was switched out), the median, p99 and max
    piece, and the share of pieces at :data:`SLOW_MOMENTS` times the median
    or more."""

    pieces: int
    switched_out: int
    median_us: float
    p99_us: float
    max_us: float
    slow_share: float

    def note(self) -> str | None:
        """A note for the run's report when at least 1 % of pieces were slow."""
        if self.slow_share < 0.01:
            return None
        return (
            f"during the run the server's core had slow moments: {self.slow_share * 100:.1f} % "
            f"of short pieces of reference work took {SLOW_MOMENTS:g}x their median or more "
            "(machine.slow_moments); latency tails include them whatever the server's code"
        )

    def to_json(self) -> dict[str, float | int]:
        return {
            "pieces": self.pieces,
            "switched_out": self.switched_out,
            "median_us": self.median_us,
            "p99_us": self.p99_us,
            "max_us": self.max_us,
            "slow_share": self.slow_share,
        }


def slow_moment_notes(
    scenario: str, before: Pieces | None, during: SlowMoments | None
) -> list[str]:
    """The run's notes on the core's slow moments, before it (the speed probe's
    pieces) and during it. None for an idle run: the notes speak of latency
    tails, and an idle run measures none."""
    if scenario == "idle":
        return []
    notes = [
        before.slow_moments_note() if before is not None else None,
        during.note() if during is not None else None,
    ]
    return [note for note in notes if note is not None]


def summarize(times_us: list[float], switched_out: int) -> SlowMoments | None:
    """The figures of a run's timed pieces (None if there were none)."""
    if not times_us:
        return None
    ordered = sorted(times_us)
    median = statistics.median(ordered)
    slow = sum(1 for t in ordered if t >= SLOW_MOMENTS * median)
    return SlowMoments(
        pieces=len(ordered),
        switched_out=switched_out,
        median_us=round(median, 1),
        p99_us=round(quantile(ordered, 0.99), 1),
        max_us=round(ordered[-1], 1),
        slow_share=round(slow / len(ordered), 4),
    )


def _switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_nvcsw + usage.ru_nivcsw


def _cpu_s() -> float:
    # Not os.times(): its clock ticks (10 ms) read 0 for the few ms a short
    # watch costs on a fast machine.
    return time.process_time()


def _watch(cpus: Sequence[int] | None, period_s: float, conn: Connection) -> None:
    """The watcher process. Settles first (its interpreter's start-up must not
    land on the server's core during the measurement), says "ready", then on
    "go" times a piece every ``period_s`` until "stop", and sends back (piece
    times in µs, pieces dropped as switched out, its CPU seconds since "go")."""
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError as exc:
        # At any other priority it would compete with the server: no watch.
        conn.send(f"unavailable: {exc}")
        return
    one_piece(0, PIECE_ITERATIONS)  # warm-up
    conn.send("ready")
    if conn.recv() != "go":
        return
    cpu_at_go = _cpu_s()
    times: list[float] = []
    switched_out = 0
    clock = time.perf_counter
    while not conn.poll(period_s):
        before = _switches()
        started = clock()
        one_piece(0, PIECE_ITERATIONS)
        elapsed = clock() - started
        if _switches() == before:
            times.append(elapsed * 1e6)
        else:
            switched_out += 1
    conn.send((times, switched_out, _cpu_s() - cpu_at_go))


class SlowMomentWatch:
    """:meth:`start` it before the run (it takes a moment to be ready),
    :meth:`begin` when the measured phase starts, :meth:`stop` when it ends."""

    def __init__(self, cpus: Sequence[int] | None, period_s: float = PERIOD_S) -> None:
        ctx = mp.get_context("spawn")
        self._conn, self._child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_watch,
            args=(cpus, period_s, self._child_conn),
            name="loadtest-slow-moments",
            daemon=True,
        )
        self._watching = False
        self.unavailable: str | None = None  # why the watcher could not watch
        self.cpu_s = 0.0  # the watcher's CPU while watching, known once stopped

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.is_alive()

    def start(self) -> None:
        self._process.start()
        # The child's end lives on in the child only: if the watcher dies, this
        # end then reads EOF at once instead of waiting out a time-out.
        self._child_conn.close()

    def begin(self, timeout_s: float = 30.0) -> None:
        """Start timing pieces, once the watcher is ready (if it is not ready
        in time, cannot watch, or died, the run goes on without it:
        :meth:`stop` gives None)."""
        try:
            if not self._conn.poll(timeout_s):
                self.unavailable = "not ready in time"
                return
            message = self._conn.recv()
            if message != "ready":
                self.unavailable = str(message)
                return
            self._conn.send("go")
            self._watching = True
        except (OSError, EOFError) as exc:
            self.unavailable = f"the watcher died: {exc!r}"

    def stop(self, timeout_s: float = 5.0) -> SlowMoments | None:
        """The run's figures (None if the watcher never began or did not
        answer in time). Ends the watcher."""
        try:
            self._conn.send("stop")
            if not self._watching or not self._conn.poll(timeout_s):
                return None
            times, switched_out, self.cpu_s = self._conn.recv()
            return summarize(times, switched_out)
        except (OSError, EOFError):
            return None  # the watcher died: the run goes on without its figures
        finally:
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout_s)
