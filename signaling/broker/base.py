"""The broker interface: what the hub and sessions need from a message engine.

Two implementations: :mod:`signaling.broker.memory` (one process) and the Redis
broker (many instances). Both keep the same contract:

* ``publish`` appends to the channel's history (when the channel keeps one),
  assigns the next offset in the channel's epoch and delivers the publication
  to the bound :class:`BrokerHandler` of every instance subscribed to the
  channel. It returns only after the engine accepted the publication, so an
  acknowledged publish is in history; live delivery is at-most-once, and
  recovery from history closes the gaps.
* ``history`` raises :class:`UnrecoverablePosition` when ``since`` belongs to
  another epoch; gaps inside an epoch are the caller's to detect.
* Any engine failure raises :class:`BrokerUnavailable`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from signaling.protocol import ClientInfo, Publication, StreamPosition
from signaling.values import record

__all__ = [
    "META_TTL_S",
    "Broker",
    "BrokerError",
    "BrokerHandler",
    "BrokerUnavailable",
    "Claim",
    "ClaimResult",
    "HistoryOptions",
    "HistoryPage",
    "PresenceStore",
    "UnrecoverablePosition",
]


# A stream's epoch and offset counter outlive its publications (as in
# Centrifuge), for this long after it was created or last published to: a
# subscriber of a channel quiet for longer than its history keeps its position
# (and a client returning after the history expired learns it cannot recover),
# instead of every subscriber being made to recover once a day.
META_TTL_S = 30 * 86400


class BrokerError(Exception):
    """Base of broker failures."""


class BrokerUnavailable(BrokerError):
    """The engine cannot be reached or refused the operation (temporary)."""


class UnrecoverablePosition(BrokerError):
    """The requested stream position is not in the channel's current epoch."""


@record
class HistoryOptions:
    """How a channel keeps its history: ``size`` publications at most (0 = no
    history and no offsets), each kept ``ttl_s`` seconds at most."""

    size: int = 0
    ttl_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return self.size > 0 and self.ttl_s > 0


@record
class Claim:
    """A state-store key to take with a publication (``Node.publish_claimed``):
    the publication goes out only if no ``guards`` key exists and ``key`` is
    absent, and then ``key`` holds ``value`` for ``ttl_s`` (> 0). Keys are the
    state store's, and all of them must carry the channel's hash tag
    (``{<channel>}``) so that one script can touch them with the stream."""

    key: str
    value: str
    ttl_s: float
    guards: tuple[str, ...] = ()


@record
class ClaimResult:
    """What became of a claimed publication: ``position`` when published;
    otherwise ``guard`` is the first guard key found (nothing claimed), or
    None when the claim was taken already (a duplicate)."""

    position: StreamPosition | None
    guard: str | None = None


@record
class HistoryPage:
    publications: Sequence[Publication]
    top: StreamPosition


class BrokerHandler(Protocol):
    """Receives what the broker delivers to this instance (the hub)."""

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None: ...

    def on_join(self, channel: str, info: ClientInfo) -> None: ...

    def on_leave(self, channel: str, info: ClientInfo) -> None: ...

    def on_control(self, message: bytes) -> None:
        """A node-to-node message (e.g. "unsubscribe user U from C")."""

    def on_broker_reconnected(self) -> None:
        """Deliveries may have been lost while the broker was unreachable."""

    def channels(self) -> list[str]:
        """The channels this node needs delivered (to resubscribe after a
        reconnect)."""

    def has_channel(self, channel: str) -> bool:
        """Whether this node needs ``channel`` delivered now."""


class Broker(Protocol):
    def bind(self, handler: BrokerHandler) -> None:
        """Set the receiver of deliveries; called once before ``start``."""

    async def start(self) -> None:
        """Connect. A broker that cannot connect yet keeps retrying in the
        background and reports it through ``is_ready``."""

    def is_ready(self) -> bool:
        """True while the engine is reachable."""

    async def subscribe(self, channel: str) -> None:
        """Start delivering ``channel`` to this instance."""

    async def unsubscribe(self, channel: str) -> None:
        """Stop delivering ``channel`` to this instance."""

    async def publish(
        self, channel: str, pub: Publication, history: HistoryOptions
    ) -> StreamPosition:
        """Append and deliver; returns the publication's position (offset 0
        when the channel keeps no history). ``pub.offset`` is ignored."""

    async def publish_join(self, channel: str, info: ClientInfo) -> None: ...

    async def publish_leave(self, channel: str, info: ClientInfo) -> None: ...

    async def publish_leaves(self, leaves: Sequence[tuple[str, ClientInfo]]) -> None:
        """:meth:`publish_leave` for each (channel, info), in one batch."""

    async def publish_control(self, message: bytes) -> None:
        """Deliver ``message`` to every node's handler, this one included."""

    async def history(
        self,
        channel: str,
        *,
        since: StreamPosition | None,
        limit: int,
        reverse: bool,
        history: HistoryOptions,
    ) -> HistoryPage:
        """Publications after ``since`` (before it when ``reverse``), at most
        ``limit`` (0: none, only the top; < 0: all kept), and the stream top.
        Creates the stream's epoch if the channel has none yet."""

    async def positions(self, channels: Sequence[str]) -> dict[str, StreamPosition]:
        """Current stream tops of ``channels`` with history (for position
        checks); channels that never had a stream may be left out."""

    async def close(self) -> None: ...


class PresenceStore(Protocol):
    """Who is subscribed to a channel, across instances. Entries expire after
    ``ttl_s`` unless refreshed, so a crashed instance's entries age out."""

    async def add_presence(self, channel: str, info: ClientInfo, ttl_s: float) -> None: ...

    async def refresh_presence(
        self, entries: Sequence[tuple[str, ClientInfo]], ttl_s: float
    ) -> None:
        """Re-add many (channel, info) entries before they expire, in one
        batch (each node refreshes its own periodically)."""

    async def remove_presence(self, channel: str, client_id: str) -> None: ...

    async def remove_presences(self, entries: Sequence[tuple[str, str]]) -> None:
        """:meth:`remove_presence` for each (channel, client id), in one
        batch (the connections a drain closed meanwhile)."""

    async def presence(self, channel: str) -> dict[str, ClientInfo]: ...

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        """(number of clients, number of distinct users)."""
