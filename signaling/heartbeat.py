"""Application-level pings for every connection, from one timer.

The protocol's server ping is an empty reply ``{}`` every ``ping`` seconds,
answered by an empty command (pong). Instead of a timer per connection, the
connections are spread over a wheel of one-second slots; each tick pings one
slot, checks the pongs of the slot pinged ``pong_timeout`` ago, and lets each
connection check its token expiry. Random slots spread the pings of a
reconnect wave (centrifuge randomizes the first ping for the same reason).
"""

from __future__ import annotations

import asyncio
import math
import random
from typing import Protocol

__all__ = ["Beating", "Heartbeat"]

TICK_S = 1.0


class Beating(Protocol):
    def send_ping(self, now: float) -> None:
        """Send ``{}`` and start waiting for the pong."""

    def check_pong(self, now: float) -> None:
        """Disconnect (3012) if the last ping is still unanswered."""


class Heartbeat:
    def __init__(self, ping_interval_s: float, pong_timeout_s: float) -> None:
        self._slots: list[set[Beating]] = [
            set() for _ in range(max(1, math.ceil(ping_interval_s / TICK_S)))
        ]
        self._pong_lag = max(1, math.ceil(pong_timeout_s / TICK_S))
        self._where: dict[Beating, int] = {}
        self._index = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="heartbeat")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def add(self, conn: Beating) -> None:
        slot = random.randrange(len(self._slots))
        self._slots[slot].add(conn)
        self._where[conn] = slot

    def remove(self, conn: Beating) -> None:
        slot = self._where.pop(conn, None)
        if slot is not None:
            self._slots[slot].discard(conn)

    def __len__(self) -> int:
        return len(self._where)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_tick = loop.time()
        while True:
            next_tick += TICK_S
            await asyncio.sleep(max(0.0, next_tick - loop.time()))
            if loop.time() - next_tick > TICK_S:
                # The loop stalled for more than a tick: start again from now
                # rather than run the missed ticks back to back (a check in
                # that burst would find pings sent a moment before it unanswered).
                next_tick = loop.time()
            # The tick's own time, not the wake-up's: a ping sent by a late
            # tick gets its deadline from when it was due, so the check
            # ``pong_lag`` ticks on still finds it past (with the wake-up's,
            # an on-time check after a late ping waited a whole round more).
            self.tick(next_tick)

    def tick(self, now: float) -> None:
        n = len(self._slots)
        self._index = (self._index + 1) % n
        if self._pong_lag < n:
            # Copies: a check may disconnect, which removes from the slot.
            for conn in list(self._slots[(self._index - self._pong_lag) % n]):
                conn.check_pong(now)
        for conn in list(self._slots[self._index]):
            conn.send_ping(now)
