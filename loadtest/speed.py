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
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

__all__ = ["SpeedProbe", "probe_speed"]

# One round is this many iterations (≈ 10-20 ms on the machines seen here).
# The host's speed flips within seconds (rounds of 1.7 and 3.4 µs a second
# apart on an idle machine): the median of many short rounds is the figure.
_ITERATIONS = 5_000
_ROUNDS = 21

_COMMAND = (
    b'{"id":7,"publish":{"channel":"room:creator-42","data":'
    b'{"text":"hello there, how is everyone doing tonight?","client_msg_id":"m-1"}}}'
)


@dataclass(frozen=True, slots=True)
class SpeedProbe:
    """Microseconds per iteration of the reference work: the fastest round
    (the core's speed when undisturbed) and the median round."""

    best_us: float
    median_us: float

    def to_json(self) -> dict[str, float]:
        return {"best_us": self.best_us, "median_us": self.median_us}


def _channel_kind(channel: str) -> str | None:
    kind, _, rest = channel.partition(":")
    return kind if rest else None


def _frame(payload: bytes) -> bytes:
    return b"".join((b"\x81", bytes((len(payload),)) if len(payload) < 126 else b"\x7e", payload))


def _one_round(iterations: int) -> float:
    started = time.perf_counter()
    for offset in range(iterations):
        command = orjson.loads(_COMMAND)
        publish = command["publish"]
        if _channel_kind(publish["channel"]) is None:
            raise AssertionError("reference channel has no kind")
        push = {"push": {"channel": publish["channel"], "pub": {"data": publish["data"]}}}
        push["push"]["pub"]["offset"] = offset
        _frame(orjson.dumps(push))
    return (time.perf_counter() - started) / iterations * 1e6


def probe_speed(cpus: Sequence[int] | None = None) -> SpeedProbe:
    """Run the reference work (≈ 0.3-0.5 s), on ``cpus`` if given."""
    previous = os.sched_getaffinity(0) if cpus else None
    try:
        if cpus:
            os.sched_setaffinity(0, cpus)
        _one_round(_ITERATIONS // 10)  # warm-up
        rounds = [_one_round(_ITERATIONS) for _ in range(_ROUNDS)]
    finally:
        if previous is not None:
            os.sched_setaffinity(0, previous)
    return SpeedProbe(round(min(rounds), 3), round(statistics.median(rounds), 3))
