"""The embedded broker: history, offsets, epochs and presence in this process.

Used when ``REDIS_URL`` is unset (one process). Delivery is synchronous: the
publication reaches the hub before ``publish`` returns, so the publisher's own
subscribers see the push before its publish reply.

Memory is bounded: each stream keeps at most ``size`` publications, each at
most ``ttl_s`` seconds; its epoch and offset counter live on for
``META_TTL_S`` (30 days) after it was created or last published to, as on
Redis, and are then dropped by :meth:`MemoryBroker.sweep` (run periodically).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from signaling.broker.base import (
    META_TTL_S,
    BrokerHandler,
    HistoryOptions,
    HistoryPage,
    UnrecoverablePosition,
)
from signaling.ids import unique_id
from signaling.protocol import ClientInfo, Publication, StreamPosition
from signaling.values import compact

__all__ = ["MemoryBroker"]

SWEEP_INTERVAL_S = 10.0


def new_epoch() -> str:
    """A fresh stream epoch, unique across processes and restarts. (It is
    passed to every publish script, used only when a stream starts.)"""
    return unique_id()


@dataclass(slots=True)
class _Stream:
    epoch: str
    expires_at: float
    top: int = 0
    # (publication with its offset, monotonic time it expires)
    # A list, not a deque: an empty deque costs ~600 bytes and most channels
    # (one status channel per user) keep a publication or two; trimming the
    # front of at most ``size`` entries is a short memmove.
    entries: list[tuple[Publication, float]] = field(default_factory=list)


class MemoryBroker:
    """In-process :class:`~signaling.broker.base.Broker` and
    :class:`~signaling.broker.base.PresenceStore`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._handler: BrokerHandler | None = None
        self._streams: dict[str, _Stream] = {}
        self._presence: dict[str, dict[str, ClientInfo]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._sweep_hooks: list[Callable[[], None]] = []

    # --- lifecycle ---------------------------------------------------------

    def bind(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="memory-broker-sweep")

    def is_ready(self) -> bool:
        return True

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            self.sweep()

    def on_sweep(self, hook: Callable[[], None]) -> None:
        """Also run ``hook`` on every periodic sweep (the state store's)."""
        self._sweep_hooks.append(hook)

    def sweep(self) -> None:
        """Drop expired publications, and streams idle past ``META_TTL_S``."""
        for hook in self._sweep_hooks:
            hook()
        now = self._clock()
        for channel in [c for c, s in self._streams.items() if s.expires_at <= now]:
            del self._streams[channel]
        for stream in self._streams.values():
            _trim_expired(stream, now)

    # --- pub/sub -----------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        # Every publication reaches the hub, which keeps only channels with
        # local subscribers: nothing to do here.
        return None

    async def unsubscribe(self, channel: str) -> None:
        return None

    async def publish(
        self, channel: str, pub: Publication, history: HistoryOptions
    ) -> StreamPosition:
        handler = self._require_handler()
        if not history.enabled:
            if pub.offset:
                pub = Publication(pub.data, pub.info, 0, pub.tags, pub.time_ms)
            handler.on_publication(channel, pub, "")
            return StreamPosition(0, "")
        now = self._clock()
        stream = self._stream(channel, now)
        stream.top += 1
        stored = Publication(compact(pub.data), pub.info, stream.top, pub.tags, pub.time_ms)
        stream.entries.append((stored, now + history.ttl_s))
        excess = len(stream.entries) - history.size
        if excess > 0:
            del stream.entries[:excess]
        stream.expires_at = now + META_TTL_S
        handler.on_publication(channel, stored, stream.epoch)
        return StreamPosition(stream.top, stream.epoch)

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        self._require_handler().on_join(channel, info)

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        self._require_handler().on_leave(channel, info)

    async def publish_leaves(self, leaves: Sequence[tuple[str, ClientInfo]]) -> None:
        for channel, info in leaves:
            await self.publish_leave(channel, info)

    async def publish_control(self, message: bytes) -> None:
        self._require_handler().on_control(message)

    # --- history -----------------------------------------------------------

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None,
        limit: int,
        reverse: bool,
        history: HistoryOptions,
    ) -> HistoryPage:
        if not history.enabled:
            return HistoryPage((), StreamPosition(0, ""))
        now = self._clock()
        stream = self._stream(channel, now)
        _trim_expired(stream, now)
        top = StreamPosition(stream.top, stream.epoch)
        if since is not None and since.epoch != stream.epoch:
            raise UnrecoverablePosition(channel)
        if limit == 0:
            return HistoryPage((), top)
        pubs = [p for p, _ in stream.entries]
        if since is not None:
            if reverse:
                pubs = [p for p in pubs if p.offset < since.offset]
            else:
                pubs = [p for p in pubs if p.offset > since.offset]
        if reverse:
            pubs.reverse()
        if limit > 0:
            pubs = pubs[:limit]
        return HistoryPage(pubs, top)

    async def positions(self, channels: Sequence[str]) -> dict[str, StreamPosition]:
        now = self._clock()
        return {
            c: StreamPosition(s.top, s.epoch)
            for c in channels
            if (s := self._streams.get(c)) is not None and s.expires_at > now
        }

    def _stream(self, channel: str, now: float) -> _Stream:
        stream = self._streams.get(channel)
        if stream is None or stream.expires_at <= now:
            stream = _Stream(new_epoch(), now + META_TTL_S)
            self._streams[channel] = stream
        return stream

    # --- presence ----------------------------------------------------------

    async def add_presence(self, channel: str, info: ClientInfo, ttl_s: float) -> None:
        # One process: entries die with it, so no expiry is needed here.
        self._presence.setdefault(channel, {})[info.client] = info

    async def refresh_presence(
        self, entries: Sequence[tuple[str, ClientInfo]], ttl_s: float
    ) -> None:
        # Entries never expire in one process: nothing to refresh.
        return None

    async def remove_presence(self, channel: str, client_id: str) -> None:
        clients = self._presence.get(channel)
        if clients is not None:
            clients.pop(client_id, None)
            if not clients:
                del self._presence[channel]

    async def remove_presences(self, entries: Sequence[tuple[str, str]]) -> None:
        for channel, client_id in entries:
            await self.remove_presence(channel, client_id)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        return dict(self._presence.get(channel, {}))

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        clients = self._presence.get(channel, {})
        return len(clients), len({i.user for i in clients.values()})

    def _require_handler(self) -> BrokerHandler:
        if self._handler is None:
            raise RuntimeError("broker used before bind()")
        return self._handler


def _trim_expired(stream: _Stream, now: float) -> None:
    entries = stream.entries
    expired = 0
    while expired < len(entries) and entries[expired][1] <= now:
        expired += 1
    if expired:
        del entries[:expired]
