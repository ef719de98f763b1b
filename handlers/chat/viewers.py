"""Live-room viewer counts, published across instances.

Every ``viewer_count_interval_s`` each node looks at the live rooms it has
local subscribers in. For each, one node per interval wins a claim
(``chat:viewers-claim:{room}``, set_if_absent with the interval as TTL), reads
the exact count from the channel presence store (``presence_stats``: distinct
users, across instances) and, only if count or peak changed since the last
publication, publishes ``{"type": "viewers", "count", "peak"}`` to the room,
live only. The last published values live in ``chat:viewers:{room}``; the
peak starts over once a room has had no viewers anywhere for
:func:`state_ttl_s` (nobody refreshes the key).

The claim's TTL equals the interval, so two publications for a room are at
least an interval apart whichever nodes make them.
"""

from __future__ import annotations

import asyncio
import logging

from handlers.channels import room_owner
from handlers.chat.metrics import ChatMetrics
from handlers.chat.schema import viewers_event
from signaling.broker.base import BrokerUnavailable
from signaling.node import Node
from signaling.state.base import StateStore

__all__ = ["ViewerCounter", "state_ttl_s", "viewers_key"]

log = logging.getLogger("handlers.chat.viewers")

# Rooms checked concurrently per tick (the Redis store pipelines them).
_BATCH = 100


def viewers_key(room: str) -> str:
    return f"chat:viewers:{{{room}}}"


def _claim_key(room: str) -> str:
    return f"chat:viewers-claim:{{{room}}}"


def state_ttl_s(interval_s: float) -> float:
    """How long the last count and peak outlive the room's last viewer."""
    return max(60.0, 12 * interval_s)


class ViewerCounter:
    def __init__(self, node: Node, metrics: ChatMetrics) -> None:
        self._node = node
        self._store: StateStore = node.store
        self._metrics = metrics
        self._interval_s = node.settings.viewer_count_interval_s

    async def run(self) -> None:
        """Tick forever (node.spawn'ed; cancelled when the node closes)."""
        while True:
            await asyncio.sleep(self._interval_s)
            rooms = [c for c in self._node.hub.channels("room") if room_owner(c) is not None]
            for start in range(0, len(rooms), _BATCH):
                batch = rooms[start : start + _BATCH]
                results = await asyncio.gather(
                    *(self.tick(room) for room in batch), return_exceptions=True
                )
                self._log_failures(results)

    def _log_failures(self, results: list[BaseException | None]) -> None:
        failures = [r for r in results if isinstance(r, BaseException)]
        if not failures:
            return
        first = failures[0]
        if isinstance(first, BrokerUnavailable):
            log.warning("viewer counts: broker unavailable (%d rooms): %s", len(failures), first)
        else:
            log.error("viewer counts failed for %d rooms", len(failures), exc_info=first)

    async def tick(self, room: str) -> None:
        """Publish ``room``'s count if this node wins the interval's claim and
        the count or peak changed."""
        store = self._store
        if not await store.set_if_absent(_claim_key(room), self._node.name, self._interval_s):
            return
        _clients, users = await self._node.presence.presence_stats(room)
        last = await store.hgetall(viewers_key(room))
        last_count, last_peak = int(last.get("count", -1)), int(last.get("peak", 0))
        peak = max(last_peak, users)
        ttl = state_ttl_s(self._interval_s)
        # Written even when unchanged: refreshing the TTL keeps the peak for
        # as long as the room has viewers.
        await store.hset(viewers_key(room), {"count": str(users), "peak": str(peak)}, ttl)
        if users == last_count and peak == last_peak:
            return
        await self._node.publish(room, viewers_event(users, peak), history=False)
        self._metrics.viewer_counts.inc()
