"""Call timers that survive the instance that set them.

Each live call has one member, its id, in the sorted set ``calls:{timers}``
of the shared store, scored with the unix millisecond when the call next
needs attention (ring timeout, next tick or warning, max duration, next
liveness check). Every instance polls the set (:func:`run_timers`) and
claims due members with ``zpop_due``, an atomic claim, so each due timer is
run by one instance; the run decides, from the call's state alone, what is
due and when to look again (:meth:`CallService.run_timer`).

A claimed member is re-scored with a lease (now + ``LEASE_MS``) in the
same atomic step: if the instance dies while running it, or never hears
the claim's reply, another one runs it when the lease runs out. A run
that finds something left to do re-schedules the member; a finished
call's member is removed. Running a timer twice or early is
harmless, since every change it makes is a compare-and-set on the call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from signaling.broker.base import BrokerUnavailable
from signaling.state.base import StateStore

__all__ = ["ACTIVE_KEY", "LEASE_MS", "POLL_S", "TIMERS_KEY", "TimerQueue", "run_timers"]

log = logging.getLogger("handlers.calls.timers")

TIMERS_KEY = "calls:{timers}"
# Accepted calls, scored with the time past which they cannot be live any
# more (a safety bound); counted for the active-calls gauge.
ACTIVE_KEY = "calls:{active}"
# Every instance polls this often (seconds): the precision of every call timer.
POLL_S = 0.25
# A claimed timer comes back after this if its instance never finishes it (ms).
LEASE_MS = 2000
# Timers claimed per poll.
BATCH = 100
# How often the active-calls gauge is refreshed (seconds).
GAUGE_S = 5.0


class TimerQueue:
    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def schedule(self, call_id: str, due_ms: int) -> None:
        """(Re)schedule the call's timer; replaces an earlier due time."""
        await self._store.zadd(TIMERS_KEY, call_id, float(due_ms))

    async def cancel(self, call_id: str) -> None:
        await self._store.zrem(TIMERS_KEY, call_id)

    async def claim(self, now_ms: int, limit: int = BATCH) -> list[str]:
        """Claim the timers due by ``now_ms``, each leased for ``LEASE_MS``."""
        lease = float(now_ms + LEASE_MS)
        due = await self._store.zpop_due(TIMERS_KEY, float(now_ms), limit, lease=lease)
        return [member for member, _ in due]


async def run_timers(
    queue: TimerQueue,
    fire: Callable[[str], Awaitable[None]],
    now_ms: Callable[[], int],
    *,
    poll_s: float = POLL_S,
) -> None:
    """Claim and fire due timers forever (one task per instance).

    ``fire`` must handle its own failures; a failure here is logged and the
    loop goes on.
    """
    while True:
        claimed = 0
        try:
            ids = await queue.claim(now_ms())
            claimed = len(ids)
            if ids:
                await asyncio.gather(*(fire(call_id) for call_id in ids))
        except BrokerUnavailable as exc:
            log.warning("call timers: store unavailable: %s", exc)
        except Exception:
            # Whatever went wrong, this loop must keep running: a node that
            # stops polling leaves its share of calls to the others only.
            log.exception("call timers: poll failed")
        # A full batch means more may be due: claim again at once.
        if claimed < BATCH:
            await asyncio.sleep(poll_s)
