"""Local subscriptions and fan-out.

The hub maps each channel to the connections of this instance subscribed to
it, and is the :class:`~signaling.broker.base.BrokerHandler` the broker
delivers to. A publication is encoded once per channel — push JSON and the
WebSocket frame around it — and the same bytes are handed to every local
subscriber; no coroutine or task per recipient (STYLE §5).

A subscriber that is still recovering (its subscribe reply not sent yet) is
"syncing": publications for it are buffered, bounded, and merged with what it
recovered from history when it goes live, so nothing falls between history
and the live stream.

Fan-out is written at the end of the loop iteration (with ``defer``): who gets
a publication is decided when it arrives, as without deferral, but the writes
wait for the iteration's last publication. Consecutive publications of one
channel to the same subscribers then leave in one write per subscriber: a
system call and a TCP segment per recipient are most of a delivery's cost,
and publications come in bursts exactly when the server is behind (several
commands or pub/sub messages per read). A lone publication costs one list
append and, once per iteration, one scheduled call more.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from signaling.protocol import (
    ClientInfo,
    Publication,
    encode_join_push,
    encode_leave_push,
    encode_pub_push,
)

__all__ = ["SYNC_BUFFER_MAX", "Hub", "Subscriber", "namespace_of"]

# Publications buffered for one syncing subscriber before it is considered
# hopelessly behind (it is then told to reconnect: insufficient state).
SYNC_BUFFER_MAX = 1000


class Subscriber(Protocol):
    """The hub's view of a connection."""

    def deliver(self, frame: bytes) -> None:
        """Write pre-encoded WebSocket frames (one, or several back to back).
        Must not await or raise."""

    def lost_position(self, channel: str) -> None:
        """The connection's stream of ``channel`` may have a gap (it fell too
        far behind while recovering, or the broker lost messages): make the
        client recover."""


Deliver = Callable[[bytes], None]


def namespace_of(channel: str) -> str:
    """A channel's namespace: its name before the first ``:`` (``room`` for
    ``room:alice``), or ``""`` if it has none (a personal ``#user``)."""
    namespace, colon, _ = channel.partition(":")
    return namespace if colon else ""


def _deliverers(subs: dict[str, Subscriber]) -> tuple[Deliver, ...]:
    return tuple([sub.deliver for sub in subs.values()])


@dataclass(slots=True)
class _Channel:
    live: dict[str, Subscriber] = field(default_factory=dict)
    join_leave: dict[str, Subscriber] = field(default_factory=dict)
    syncing: dict[str, list[Publication]] = field(default_factory=dict)
    syncing_subs: dict[str, Subscriber] = field(default_factory=dict)
    # Syncing subscribers that asked for join/leave: they get them once live.
    pending_join_leave: set[str] = field(default_factory=set)
    # Subscribers told to recover after a gap, until they leave (their
    # session's clean-up runs later): they get nothing more of the channel,
    # and the channel stays subscribed on the broker for them meanwhile.
    lost: dict[str, Subscriber] = field(default_factory=dict)
    # Syncing subscribers whose reply went past the channel's position here
    # (their stream read saw publications pub/sub had not brought yet), by
    # the offset their reply reached: live once the position gets there.
    ahead: dict[str, int] = field(default_factory=dict)
    # The live subscribers' deliver methods, for iteration: a delivery may close
    # a slow connection, which unsubscribes it while we iterate. The methods
    # themselves, not the subscribers: a fan-out to a thousand touches a
    # thousand fewer objects (each a likely cache miss after the last write's
    # trip through the kernel).
    snapshot: tuple[Deliver, ...] | None = None
    # Last offset/epoch seen from the broker: the channel's position on this
    # instance (for position checks after a broker reconnect).
    last_offset: int = 0
    epoch: str = ""

    def live_snapshot(self) -> tuple[Deliver, ...]:
        if self.snapshot is None:
            self.snapshot = _deliverers(self.live)
        return self.snapshot

    def empty(self) -> bool:
        return not self.live and not self.syncing_subs and not self.lost


class Hub:
    """Args:
    frame_encoder: payload -> WebSocket frame (once per publication).
    on_delivered: called with the number of frames written to subscribers.
    on_control: the broker's control messages.
    on_reconnected: the broker's connection came back.
    defer: schedules a call for the end of the loop iteration
        (``loop.call_soon``); None writes every broadcast at once.
    """

    def __init__(
        self,
        frame_encoder: Callable[[bytes], bytes],
        on_delivered: Callable[[int], None] | None = None,
        on_control: Callable[[bytes], None] | None = None,
        on_reconnected: Callable[[], None] | None = None,
        defer: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self._encode_frame = frame_encoder
        self._on_delivered = on_delivered
        self._on_control = on_control
        self._on_reconnected = on_reconnected
        self._defer = defer
        self.gaps = 0
        self._channels: dict[str, _Channel] = {}
        # The same channels by namespace: periodic work on one kind of channel
        # (live-room viewer counts) need not walk every personal channel.
        self._by_namespace: dict[str, set[str]] = {}
        # Broadcasts of this iteration not written yet (with defer), in order.
        self._pending: list[tuple[tuple[Deliver, ...], bytes]] = []

    # --- bookkeeping -------------------------------------------------------

    def add(self, channel: str, client_id: str, sub: Subscriber, *, join_leave: bool) -> bool:
        """Register a syncing subscriber; True if it is the channel's first
        on this instance (the broker must then subscribe)."""
        ch = self._channels.get(channel)
        first = ch is None
        if ch is None:
            ch = self._channels[channel] = _Channel()
            self._by_namespace.setdefault(namespace_of(channel), set()).add(channel)
        ch.syncing[client_id] = []
        ch.syncing_subs[client_id] = sub
        if join_leave:
            ch.pending_join_leave.add(client_id)
        return first

    def go_live(
        self, channel: str, client_id: str, top: int = 0, epoch: str = ""
    ) -> list[Publication]:
        """Move a syncing subscriber to live delivery; returns what was
        buffered for it meanwhile, in order.

        One whose reply reached ``top`` (of ``epoch``) past the channel's
        position here stays syncing until the position gets there: the
        publications in between are still on their way through pub/sub, and
        live delivery would repeat them. The hub then makes it live itself
        (:meth:`_catch_up`)."""
        ch = self._channels.get(channel)
        if ch is None or client_id not in ch.syncing_subs:
            return []
        if top > ch.last_offset and ch.epoch and epoch == ch.epoch:
            ch.ahead[client_id] = top
            return []
        return self._make_live(ch, client_id)

    def _make_live(self, ch: _Channel, client_id: str) -> list[Publication]:
        buffered = ch.syncing.pop(client_id)
        sub = ch.live[client_id] = ch.syncing_subs.pop(client_id)
        ch.snapshot = None
        if client_id in ch.pending_join_leave:
            ch.pending_join_leave.discard(client_id)
            ch.join_leave[client_id] = sub
        return buffered

    def _catch_up(self, channel: str, ch: _Channel) -> None:
        """Make live the subscribers the channel's position has caught up
        with. Their buffers hold no positioned publication past their
        replies: the position moves one offset at a time (a jump is a gap,
        which tells them all), so it reaches each one's reply with the
        publication at it. What else they hold is live-only (offset 0: typing,
        read receipts), in no reply and no history: delivered now, in order."""
        for client_id, top in list(ch.ahead.items()):
            if top <= ch.last_offset:
                del ch.ahead[client_id]
                buffered = self._make_live(ch, client_id)
                deliver = ch.live[client_id].deliver
                for pub in buffered:
                    if pub.offset == 0:
                        self._broadcast((deliver,), encode_pub_push(channel, pub))

    def remove(self, channel: str, client_id: str) -> bool:
        """Unregister; True if it was the channel's last subscriber here."""
        ch = self._channels.get(channel)
        if ch is None:
            return False
        if ch.live.pop(client_id, None) is not None:
            ch.snapshot = None
        ch.syncing.pop(client_id, None)
        ch.syncing_subs.pop(client_id, None)
        ch.join_leave.pop(client_id, None)
        ch.pending_join_leave.discard(client_id)
        ch.lost.pop(client_id, None)
        ch.ahead.pop(client_id, None)
        if ch.empty():
            del self._channels[channel]
            namespace = namespace_of(channel)
            same_kind = self._by_namespace[namespace]
            same_kind.discard(channel)
            if not same_kind:
                del self._by_namespace[namespace]
            return True
        return False

    def has_channel(self, channel: str) -> bool:
        return channel in self._channels

    def channels(self, namespace: str | None = None) -> list[str]:
        """The channels with subscribers here; given ``namespace``, only
        those in it (see :func:`namespace_of`)."""
        if namespace is None:
            return list(self._channels)
        return list(self._by_namespace.get(namespace, ()))

    def num_subscribers(self, channel: str) -> int:
        ch = self._channels.get(channel)
        return 0 if ch is None else len(ch.live) + len(ch.syncing_subs)

    def position(self, channel: str) -> tuple[int, str] | None:
        """(last offset, epoch) seen for ``channel``; None if not known."""
        ch = self._channels.get(channel)
        return None if ch is None or not ch.epoch else (ch.last_offset, ch.epoch)

    def note_position(self, channel: str, offset: int, epoch: str) -> None:
        """The stream top read by a subscriber: the channel's position when
        no publication has been seen yet."""
        ch = self._channels.get(channel)
        if ch is not None and not ch.epoch and epoch:
            ch.last_offset, ch.epoch = offset, epoch

    def lose_position(self, channel: str) -> None:
        """Every local subscriber of ``channel`` must recover (a gap). Each
        is told, and gets nothing of the channel after that: a publication
        past the gap, delivered before the client resubscribed, would move
        its position past what it missed (the SDKs then recover from there)."""
        ch = self._channels.get(channel)
        if ch is None:
            return
        # What arrived before the gap goes out before the clients are told.
        self.flush()
        self.gaps += 1
        ch.epoch, ch.last_offset = "", 0
        told = [*ch.live.items(), *ch.syncing_subs.items()]
        ch.lost.update(told)
        ch.live.clear()
        ch.snapshot = None
        ch.join_leave.clear()
        ch.syncing.clear()
        ch.syncing_subs.clear()
        ch.pending_join_leave.clear()
        ch.ahead.clear()
        for _, sub in told:
            sub.lost_position(channel)

    # --- deliveries from the broker ----------------------------------------

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        ch = self._channels.get(channel)
        if ch is None:
            return
        seen = False
        if pub.offset:
            if ch.epoch and (epoch != ch.epoch or pub.offset > ch.last_offset + 1):
                # Missed publications (broker pub/sub is at-most-once): this
                # one is not delivered, so that recovery starts before the gap.
                self.lose_position(channel)
                return
            # At or below the position: the live subscribers have it (the
            # position may come from a subscriber's stream read that saw it
            # before pub/sub brought it here).
            seen = bool(ch.epoch) and pub.offset <= ch.last_offset
            if not seen:
                ch.last_offset = pub.offset
                ch.epoch = epoch
        if ch.syncing:
            # Syncing subscribers sort out what they have by their own
            # position (the session's _go_live). A copy: an overflowing
            # subscriber may be removed right away.
            for client_id, buffered in list(ch.syncing.items()):
                if len(buffered) >= SYNC_BUFFER_MAX:
                    ch.syncing_subs[client_id].lost_position(channel)
                else:
                    buffered.append(pub)
        if seen:
            return
        subs = ch.live_snapshot()
        if subs:
            self._broadcast(subs, encode_pub_push(channel, pub))
        if ch.ahead:
            # After the broadcast: one made live now has this publication
            # in its buffer, not in that snapshot.
            self._catch_up(channel, ch)

    def on_join(self, channel: str, info: ClientInfo) -> None:
        ch = self._channels.get(channel)
        if ch is not None and ch.join_leave:
            self._broadcast(_deliverers(ch.join_leave), encode_join_push(channel, info))

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        ch = self._channels.get(channel)
        if ch is not None and ch.join_leave:
            self._broadcast(_deliverers(ch.join_leave), encode_leave_push(channel, info))

    def on_control(self, message: bytes) -> None:
        if self._on_control is not None:
            self._on_control(message)

    def on_broker_reconnected(self) -> None:
        if self._on_reconnected is not None:
            self._on_reconnected()

    def _broadcast(self, subs: tuple[Deliver, ...], payload: bytes) -> None:
        frame = self._encode_frame(payload)
        if self._defer is None:
            self._write(subs, frame, 1)
            return
        pending = self._pending
        if not pending:
            self._defer(self.flush)
        pending.append((subs, frame))

    def flush(self) -> None:
        """Write the broadcasts not written yet, in order; runs of one
        channel's publications to the same subscribers (the same snapshot)
        in one write per subscriber."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        start, end = 0, len(pending)
        while start < end:
            subs, frame = pending[start]
            stop = start + 1
            while stop < end and pending[stop][0] is subs:
                stop += 1
            if stop - start > 1:
                frame = b"".join([f for _, f in pending[start:stop]])
            self._write(subs, frame, stop - start)
            start = stop

    def _write(self, subs: tuple[Deliver, ...], frames: bytes, count: int) -> None:
        for deliver in subs:
            deliver(frames)
        if self._on_delivered is not None:
            self._on_delivered(len(subs) * count)
