"""How fast this machine's core runs Python right now: a fixed piece of work,
timed before each run, so that absolute figures of runs made on different
days (or hours) can be told apart from changes in the code.

The same commit has measured 142-206 µs per chat publication within one day
here, and twice that on a slower day, with Redis's own CPU per publication (a
fixed amount of work) moving with it. A guest's core is as fast as its host
lets it be; this probe says how fast that was. Ratios measured in one run, and
pairs of runs made back to back, do not need it.

The work is the kind a server does per message: JSON decode and encode with
orjson, dict and str handling, calls of small Python functions, bytes joins.
It runs on the server's CPUs when the server is pinned (the coordinator
borrows that affinity for the probe), while nothing else of the tool runs.

What it cannot do: a guest's core here changes speed within seconds (fast and
slow phases, about 2x apart), so a probe before a run tells the speed of the
hour, not of the run's every second. Within a run on Redis, Redis's own CPU
per publication (``machine.helpers_cpu_us_per_publication``) is the steadier
gauge: it is the same work for every publication.

It also times each short piece of a round (:data:`PIECE_ITERATIONS` iterations, tens of
µs: a few publications' worth) on its own. On a quiet core every piece takes
about the same time; on some days here one piece in a thousand took ten times
the median, with the process neither waiting for a CPU nor collecting garbage:
the host slowed the guest's core for milliseconds at a time. A server's
delivery p99 cannot be better than such moments allow, whatever its code, so
the slowest pieces (p99, p99.9, max) are reported beside the speed.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

__all__ = [
    "PIECE_ITERATIONS",
    "SLOW_MOMENTS",
    "Pieces",
    "SpeedProbe",
    "one_piece",
    "probe_speed",
    "quantile",
]

# One round is this many iterations (≈ 10-20 ms on the machines seen here).
# The host's speed flips within seconds (rounds of 1.7 and 3.4 µs a second
# apart on an idle machine): the median of many short rounds is the figure.
_ITERATIONS = 5_000
_ROUNDS = 21
# Iterations per timed piece (≈ 40-80 µs); a round is 200 pieces, the probe
# 4,200. Two clock reads per piece add ≈ 0.1 % to a round.
PIECE_ITERATIONS = 25
# A piece at this multiple of the median is a slow moment: the host slowed the
# core. Probes here on 2026-11-26 read 1.6-3.5x at p99.9 in calm seconds and
# 8.7-20.9x in others; chat's p99 was 12-43 ms that day (≈ 3 ms the day before,
# the same code).
SLOW_MOMENTS = 5.0

_COMMAND = (
    b'{"id":7,"publish":{"channel":"room:creator-42","data":'
    b'{"text":"hello there, how is everyone doing tonight?","client_msg_id":"m-1"}}}'
)


@dataclass(frozen=True, slots=True)
class Pieces:
    """Microseconds per piece of :data:`PIECE_ITERATIONS` iterations, over all rounds:
    the median piece and the slow ones."""

    median_us: float
    p99_us: float
    p999_us: float
    max_us: float

    @property
    def p999_over_median(self) -> float:
        """How many times the median the slowest 0.1 % of pieces took."""
        return round(self.p999_us / self.median_us, 1) if self.median_us > 0 else 0.0

    def slow_moments_note(self) -> str | None:
        """A note for the run's report when the core had slow moments."""
        slow = self.p999_over_median
        if slow < SLOW_MOMENTS:
            return None
        return (
            f"before the run the server's core had slow moments: 0.1 % of short pieces "
            f"of work took {slow:g}x their median (machine.speed_probe.pieces); "
            "latency tails (p99) include such moments whatever the server's code"
        )

    def to_json(self) -> dict[str, float]:
        return {
            "median_us": self.median_us,
            "p99_us": self.p99_us,
            "p999_us": self.p999_us,
            "max_us": self.max_us,
            "p999_over_median": self.p999_over_median,
        }


@dataclass(frozen=True, slots=True)
class SpeedProbe:
    """Microseconds per iteration of the reference work: the fastest round
    (the core's speed when undisturbed) and the median round; and how long
    its short pieces took (the core's slow moments)."""

    best_us: float
    median_us: float
    pieces: Pieces

    def to_json(self) -> dict[str, object]:
        return {
            "best_us": self.best_us,
            "median_us": self.median_us,
            "pieces": self.pieces.to_json(),
        }


def _channel_kind(channel: str) -> str | None:
    kind, _, rest = channel.partition(":")
    return kind if rest else None


def _frame(payload: bytes) -> bytes:
    return b"".join((b"\x81", bytes((len(payload),)) if len(payload) < 126 else b"\x7e", payload))


def one_piece(first_offset: int, iterations: int) -> None:
    """``iterations`` of the reference work (also timed during runs:
    :mod:`loadtest.slowmoments`)."""
    for offset in range(first_offset, first_offset + iterations):
        command = orjson.loads(_COMMAND)
        publish = command["publish"]
        if _channel_kind(publish["channel"]) is None:
            raise AssertionError("reference channel has no kind")
        push = {"push": {"channel": publish["channel"], "pub": {"data": publish["data"]}}}
        push["push"]["pub"]["offset"] = offset
        _frame(orjson.dumps(push))


def _one_round(iterations: int, pieces: list[float]) -> float:
    """µs per iteration over the round; appends each piece's µs to ``pieces``."""
    clock = time.perf_counter
    started = previous = clock()
    for first in range(0, iterations, PIECE_ITERATIONS):
        one_piece(first, min(PIECE_ITERATIONS, iterations - first))
        now = clock()
        pieces.append((now - previous) * 1e6)
        previous = now
    return (previous - started) / iterations * 1e6


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile of sorted, non-empty ``ordered`` (nearest rank below)."""
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def probe_speed(cpus: Sequence[int] | None = None) -> SpeedProbe:
    """Run the reference work (≈ 0.3-0.5 s), on ``cpus`` if given."""
    previous = os.sched_getaffinity(0) if cpus else None
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        _one_round(_ITERATIONS // 10, [])  # warm-up
        pieces: list[float] = []
        rounds = [_one_round(_ITERATIONS, pieces) for _ in range(_ROUNDS)]
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
    pieces.sort()
    return SpeedProbe(
        round(min(rounds), 3),
        round(statistics.median(rounds), 3),
        Pieces(
            round(statistics.median(pieces), 1),
            round(quantile(pieces, 0.99), 1),
            round(quantile(pieces, 0.999), 1),
            round(pieces[-1], 1),
        ),
    )
