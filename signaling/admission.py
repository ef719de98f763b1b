"""Admission control for connection set-ups: refuse early rather than queue forever.

After a deploy or a network blip every client reconnects at once. Accepting every
upgrade then makes each connect wait behind thousands of others, clients time out and
retry, and the server does all that work for nothing (congestion collapse). A cheap
HTTP 503 sends a client to its backoff while the connects already admitted finish.

When to refuse depends on how fast this process gets through connects, which depends
on the machine, its other load and the broker's latency, so a fixed count is either
too low (refusals while the server keeps up) or too high (connects queue past the
clients' time-outs). :class:`ConnectAdmission` watches how long connects take: while
those finishing now took longer than ``max_wait_s`` (a moving average), or none has
finished for that long, and more than a few are in progress, it refuses.
``max_connecting`` stays as a hard cap on connects in progress: upgrades are
refused past it, and so are connect commands on sockets upgraded before it filled.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, Literal

__all__ = ["ADMIT_FLOOR", "LATENCY_WEIGHT", "ConnectAdmission", "Refusal"]

# Connects in progress that are always admitted (below the hard cap): so few cannot
# make a queue, and admitting them is how a slow average gets measured again.
ADMIT_FLOOR: Final = 64
# Weight of each finished connect in the moving average of their durations: the
# average follows the last few dozen, which a storm renews many times a second.
LATENCY_WEIGHT: Final = 1 / 32

# Which limit refused: the hard cap, or the wait (metric label values).
Refusal = Literal["connecting", "connect_wait"]


class ConnectAdmission:
    """Counts connect commands in progress in one process, times them, and decides
    whether to admit another upgrade.

    Args:
        max_connecting: hard cap on connects in progress, 0 = none.
        max_wait_s: refuse while connects take longer than this, 0 = never on
            this ground.
        clock: monotonic seconds (tests pass their own).
    """

    __slots__ = (
        "_clock",
        "_crowded_since",
        "_last_end",
        "_max_connecting",
        "_max_wait_s",
        "connecting",
        "latency_s",
    )

    def __init__(
        self,
        max_connecting: int,
        max_wait_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_connecting = max_connecting
        self._max_wait_s = max_wait_s
        self._clock = clock
        self.connecting = 0
        self.latency_s = 0.0  # moving average of recent connects' durations
        self._last_end = clock()
        self._crowded_since = 0.0  # when the count last reached the floor

    def begin(self) -> float:
        """A connect command starts being processed; pass the result to :meth:`end`."""
        self.connecting += 1
        now = self._clock()
        if self.connecting == ADMIT_FLOOR:
            self._crowded_since = now
        return now

    def end(self, started: float) -> None:
        """The connect begun at ``started`` finished (connected, refused or failed:
        the server's work on it is done)."""
        self.connecting -= 1
        now = self._last_end = self._clock()
        self.latency_s += (now - started - self.latency_s) * LATENCY_WEIGHT

    def at_cap(self) -> bool:
        """Whether the hard cap is reached: a connect command arriving now
        (on a socket upgraded before the cap filled) is refused too."""
        return bool(self._max_connecting) and self.connecting >= self._max_connecting

    def refusal(self) -> Refusal | None:
        """Why an upgrade arriving now is refused, or None to admit it."""
        connecting = self.connecting
        if self._max_connecting and connecting >= self._max_connecting:
            return "connecting"
        max_wait = self._max_wait_s
        if connecting < ADMIT_FLOOR or not max_wait:
            return None
        if self.latency_s > max_wait:
            return "connect_wait"
        # Nothing finished for that long while crowded: stuck (a broker that stopped
        # answering, say), and the average cannot tell until something finishes.
        if self._clock() - max(self._last_end, self._crowded_since) > max_wait:
            return "connect_wait"
        return None
