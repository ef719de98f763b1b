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
is not counted, so each counted piece's wall time is its own. Its CPU (≈ 0.5 %
of a core) is counted as the tool's own, not as machine noise.
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

from loadtest.speed import PIECE_ITERATIONS, SLOW_MOMENTS, one_piece

__all__ = ["PERIOD_S", "SlowMomentWatch", "SlowMoments", "summarize"]

PERIOD_S = 0.01


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
        p99_us=round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
        max_us=round(ordered[-1], 1),
        slow_share=round(slow / len(ordered), 4),
    )


def _switches() -> int:
    usage = resource.getrusage(resource.RUSAGE_THREAD)
    return usage.ru_nvcsw + usage.ru_nivcsw


def _watch(cpus: Sequence[int] | None, period_s: float, conn: Connection) -> None:
    """The watcher process: a piece every ``period_s`` until told to stop, then
    send back (piece times in µs, pieces dropped as switched out, its own CPU
    seconds)."""
    if cpus:
        os.sched_setaffinity(0, cpus)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    one_piece(0, PIECE_ITERATIONS)  # warm-up
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
    own = os.times()
    conn.send((times, switched_out, own.user + own.system))


class SlowMomentWatch:
    """Start with :meth:`start` when the measured phase starts, :meth:`stop`
    when it ends."""

    def __init__(self, cpus: Sequence[int] | None, period_s: float = PERIOD_S) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_watch, args=(cpus, period_s, child), name="loadtest-slow-moments", daemon=True
        )
        self.cpu_s = 0.0  # the watcher's own CPU, known once stopped

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process.is_alive()

    def start(self) -> None:
        self._process.start()

    def stop(self, timeout_s: float = 5.0) -> SlowMoments | None:
        """The run's figures (None if the watcher did not answer in time)."""
        try:
            self._conn.send("stop")
            if not self._conn.poll(timeout_s):
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
