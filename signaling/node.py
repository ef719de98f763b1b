"""The node: one server instance's shared state and the core's public API.

Sessions (one per connection) call into the node; handlers in ``handlers/``
use it to register RPC methods, publish, and learn of connects and
disconnects. The node owns the hub, the broker, the channel policy, the
heartbeat and the metrics, and does the bookkeeping that spans connections:
users' connections, and subscribing the broker to a channel on its first
local subscriber and unsubscribing after the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

import orjson

from signaling.admission import ConnectAdmission
from signaling.auth import Credentials, TokenVerifier
from signaling.broker.base import (
    Broker,
    BrokerUnavailable,
    Claim,
    ClaimResult,
    HistoryOptions,
    PresenceStore,
)
from signaling.channels import ChannelOptions, ChannelPolicy
from signaling.config import Settings
from signaling.errors import ERROR_UNKNOWN_CHANNEL, Disconnect, SignalError
from signaling.heartbeat import Heartbeat
from signaling.hub import Hub, Subscriber
from signaling.metrics import Metrics
from signaling.protocol import ClientInfo, Publication, StreamPosition
from signaling.state.base import StateStore
from signaling.users import UserPresence
from signaling.values import JSON, JSONObject, record

if TYPE_CHECKING:
    from signaling.session import ClientSession

__all__ = [
    "ClaimedPublisher",
    "ConnectionEvent",
    "Node",
    "PublishContext",
    "PublishDecision",
    "PublishHook",
    "RpcContext",
    "RpcHandler",
    "SubscribeContext",
    "SubscribeHook",
]

log = logging.getLogger("signaling.node")


@record
class RpcContext:
    """Who calls an RPC method, for the handler."""

    user: str
    client: str
    info: ClientInfo
    credentials: Credentials
    node: Node


RpcHandler = Callable[[RpcContext, JSON], Awaitable[JSON]]


@record
class ConnectionEvent:
    """A user's connection opened (after connect) or closed on this node."""

    user: str
    client: str
    # Connections this user still has on this node, this one included on open.
    user_connections: int


ConnectionHook = Callable[[ConnectionEvent], Awaitable[None]]

# A broker's one-step Node.publish_claimed (RedisBroker.publish_claimed).
ClaimedPublisher = Callable[[str, Publication, HistoryOptions, Claim], Awaitable[ClaimResult]]


@record
class PublishContext:
    """A client's publication, before the broker sees it."""

    user: str
    client: str
    info: ClientInfo
    channel: str
    data: JSON
    raw: bytes
    options: ChannelOptions


@record
class PublishDecision:
    """What a publish hook decides (None from a hook: carry on unchanged)."""

    # Acknowledge without publishing (e.g. a retried message already sent).
    skip: bool = False
    # Publish this raw JSON instead of the client's (e.g. normalized).
    raw: bytes | None = None
    # False: deliver live only, never kept in history (e.g. typing).
    history: bool = True
    tags: dict[str, str] | None = None


# Raise SignalError to refuse; return a decision to alter or skip.
PublishHook = Callable[[PublishContext], Awaitable[PublishDecision | None]]


@record
class SubscribeContext:
    user: str
    client: str
    channel: str
    options: ChannelOptions


# Raise SignalError to refuse the subscription. Also run, without subscribing,
# for the history and presence reads of a client not subscribed to the channel:
# a hook must only check, never change anything.
SubscribeHook = Callable[[SubscribeContext], Awaitable[None]]

# Presence entries refreshed per broker batch (one round trip on Redis).
PRESENCE_REFRESH_BATCH = 2000
# How often each channel's position is compared with its stream: Centrifuge's
# default (ClientChannelPositionCheckDelay, 40 s). A safety net for pub/sub
# messages lost without a disconnect; a gap is also caught by the next
# publication's offset and by the check after every broker reconnect. It
# covers every channel of the node, so it is a large share of idle CPU.
POSITION_CHECK_S = 40.0
# How long close() waits for queued connection work (presence, leaves) to be
# written before cancelling it.
CLOSE_FLUSH_S = 2.0


def _rolled_back(position: tuple[int, str], top: StreamPosition) -> bool:
    """Whether the stream is behind a position this node saw in the same
    epoch: it lost its last publications (offsets only grow otherwise)."""
    offset, epoch = position
    return epoch == top.epoch and offset > top.offset


def _behind(position: tuple[int, str] | None, top: StreamPosition) -> bool:
    if position is None:
        return False
    offset, epoch = position
    return epoch != top.epoch or offset < top.offset


# Control messages between nodes (broker.publish_control).
_CONTROL_UNSUBSCRIBE = "unsubscribe"
_CONTROL_DISCONNECT = "disconnect"


class Node:
    def __init__(
        self,
        settings: Settings,
        broker: Broker,
        presence: PresenceStore,
        store: StateStore,
        policy: ChannelPolicy,
        verifier: TokenVerifier,
        metrics: Metrics,
        frame_encoder: Callable[[bytes], bytes],
        name: str | None = None,
        publish_claimed: ClaimedPublisher | None = None,
    ) -> None:
        self.settings = settings
        self.name = name or uuid.uuid4().hex[:12]
        self.broker = broker
        self.presence = presence
        # Shared domain state (calls, moderation...) and users' online state.
        self.store = store
        # The broker's one-step claim + publish when it can run one against
        # ``store`` (Redis: one script); otherwise publish_claimed takes two.
        self._publish_claimed = publish_claimed
        self.user_presence = UserPresence(store, self.name)
        self.policy = policy
        self.verifier = verifier
        self.metrics = metrics
        self.hub = Hub(
            frame_encoder,
            on_delivered=metrics.deliveries.inc,
            on_control=self._on_control,
            on_reconnected=self._on_broker_reconnected,
            # Fan-out written at the end of the iteration (a run of one
            # channel's publications in one write per subscriber).
            defer=lambda flush: self.loop.call_soon(flush),
        )
        self.heartbeat = Heartbeat(settings.ping_interval_s, settings.pong_timeout_s)
        self.rpc_handlers: dict[str, RpcHandler] = {}
        self.publish_hooks: list[PublishHook] = []
        self.subscribe_hooks: list[SubscribeHook] = []
        self.on_connect: list[ConnectionHook] = []
        self.on_disconnect: list[ConnectionHook] = []
        self.draining = False
        # Connect commands being processed, and whether to admit more upgrades.
        self.admission = ConnectAdmission(settings.max_connecting, settings.max_connect_wait_s)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._deferred: list[tuple[Callable[[], Awaitable[None]], str]] = []
        # Every open connection, authenticated or not (drain closes them all).
        self.sessions: set[ClientSession] = set()
        self._users: dict[str, set[ClientSession]] = {}
        # Users' connects past their limit check, not connected yet (they
        # count toward the per-user limit meanwhile).
        self._connecting_users: dict[str, int] = {}
        # Channel subscribe/unsubscribe transitions in flight, so that a
        # subscriber arriving while the broker subscribes waits for it.
        self._channel_locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task[None]] = set()
        # Connection events and rounds in flight: close() lets them finish.
        self._pending_work: set[asyncio.Task[None]] = set()
        # Awaited by close() once they have: the handlers' own queued work.
        self.on_close: list[Callable[[], Awaitable[None]]] = []
        # Closed connections' presence to remove and leaves to publish, in rounds.
        self._leaving: list[tuple[str, ClientInfo, bool]] = []
        self._leave_round = False
        broker.bind(self.hub)

    # --- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start()
        self._started = True
        for factory, name in self._deferred:
            self.spawn(factory(), name)
        self._deferred.clear()
        self.heartbeat.start()
        self.spawn(self._refresh_user_presence(), "user-presence-refresh")
        self.spawn(self._refresh_channel_presence(), "channel-presence-refresh")
        self.spawn(self._check_positions_forever(), "position-checks")

    def _on_broker_reconnected(self) -> None:
        self.metrics.broker_reconnects.inc()
        self.spawn(self._check_positions_after_reconnect(), "position-check")

    async def _check_positions_after_reconnect(self) -> None:
        # Right after a reconnect the broker may still fail a command or two.
        for attempt in range(5):
            try:
                await self.check_positions()
                return
            except BrokerUnavailable:
                if attempt == 4:
                    raise
                await asyncio.sleep(0.5)

    async def _check_positions_forever(self) -> None:
        while True:
            await asyncio.sleep(POSITION_CHECK_S)
            try:
                await self.check_positions()
            except BrokerUnavailable as exc:
                log.debug("position check skipped: %s", exc)
            except Exception:
                # An error the store answers (OOM, READONLY ...): this loop must
                # outlive it, or lost publications would go unnoticed for good.
                log.exception("position check failed")

    async def check_positions(self, confirm_delay_s: float = 1.0) -> None:
        """Compare each channel's position on this node with its stream top;
        where this node is behind (publications lost in transit), make the
        channel's local subscribers recover. A channel behind is re-checked
        after ``confirm_delay_s`` so that publications still in flight are
        not mistaken for lost ones."""
        hub = self.hub
        # Taken before the read: a stream's top can only be at or past them.
        before = {c: p for c in hub.channels() if (p := hub.position(c)) is not None}
        channels = list(before)
        if not channels:
            return
        tops = await self.broker.positions(channels)
        # A stream that vanished (Redis restarted empty, meta expired) is a
        # new epoch: whatever this node had not delivered yet is gone.
        lost = StreamPosition(0, "")
        for channel in channels:
            if _rolled_back(before[channel], tops.get(channel, lost)):
                # Redis restored from an older snapshot, or failed over to a
                # replica behind it, with the epoch it had: the next offsets
                # are ones this node has seen, and the hub would drop them
                # as seen. Its subscribers recover (and are told they could
                # not, their position being past the stream's).
                log.warning("channel %s: its stream went back; subscribers recover", channel)
                hub.lose_position(channel)
        suspects = {
            c: tops.get(c, lost) for c in channels if _behind(hub.position(c), tops.get(c, lost))
        }
        if not suspects:
            return
        await asyncio.sleep(confirm_delay_s)
        for channel, top in suspects.items():
            if _behind(hub.position(channel), top):
                log.info("channel %s behind its stream; subscribers recover", channel)
                hub.lose_position(channel)

    async def _refresh_channel_presence(self) -> None:
        """Re-add the presence entries of every local subscription before
        they expire in the broker (they expire on their own if we die)."""
        ttl = self.settings.presence_ttl_s
        while True:
            await asyncio.sleep(ttl / 3)
            if self.draining:
                continue  # the drain closes them all; refreshing competes with it
            entries = [
                (channel, info)
                for session in list(self.sessions)
                for channel, info in session.presence_entries()
            ]
            # Sorted by channel, a batch holds each channel's entries side by
            # side (a busy one's may run into the next batch), and the broker
            # writes a channel's entries of a batch at once.
            entries.sort(key=itemgetter(0))
            for start in range(0, len(entries), PRESENCE_REFRESH_BATCH):
                batch = entries[start : start + PRESENCE_REFRESH_BATCH]
                try:
                    await self.presence.refresh_presence(batch, ttl)
                except BrokerUnavailable as exc:
                    log.warning("refreshing presence failed: %s", exc)
                    break
                except Exception:
                    # As for the position check: the next round tries again.
                    log.exception("refreshing presence failed")
                    break

    async def _refresh_user_presence(self) -> None:
        interval = self.user_presence.ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            if self.draining:
                continue  # as for channel presence
            try:
                await self.user_presence.refresh(list(self._users))
            except BrokerUnavailable as exc:
                log.warning("refreshing user presence failed: %s", exc)
            except Exception:
                # Ended, this loop would let every user here expire "offline".
                log.exception("refreshing user presence failed")

    async def close(self) -> None:
        self.heartbeat.stop()
        await self._finish_pending_work()
        for task in list(self._background):
            task.cancel()
        await self.broker.close()
        await self.verifier.aclose()

    async def _finish_pending_work(self) -> None:
        """Let connection events in flight, the rounds they queue and the
        handlers' ``on_close`` work finish, within ``CLOSE_FLUSH_S``: the last
        connections a drain closes would otherwise stay listed online and
        present in their channels until their entries expire."""
        try:
            async with asyncio.timeout(CLOSE_FLUSH_S):
                while self._pending_work:
                    await asyncio.wait(set(self._pending_work))
                for flush in self.on_close:
                    try:
                        await flush()
                    except BrokerUnavailable as exc:
                        log.warning("closing: queued work not written: %s", exc)
                    except Exception:
                        log.exception("closing: queued work failed")
        except TimeoutError:
            log.warning("closing: queued work not finished within %.1f s", CLOSE_FLUSH_S)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this node runs on. Hot paths create tasks through it:
        ``asyncio.create_task`` looks the running loop up, and on Python 3.11
        that costs a ``getpid()`` system call each time (5 % of a chat
        publication's CPU)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def is_ready(self) -> bool:
        return not self.draining and self.broker.is_ready()

    # --- registration (handlers) -------------------------------------------

    def register_rpc(self, method: str, handler: RpcHandler) -> None:
        if method in self.rpc_handlers:
            raise ValueError(f"RPC method {method!r} registered twice")
        self.rpc_handlers[method] = handler

    # --- channels -------------------------------------------------------------

    def channel_options(self, channel: str) -> ChannelOptions:
        """The policy's options, or :class:`SignalError` 102."""
        options = self.policy.options(channel)
        if options is None:
            raise SignalError(ERROR_UNKNOWN_CHANNEL)
        return options

    async def add_subscriber(
        self, channel: str, client_id: str, sub: Subscriber, *, join_leave: bool
    ) -> None:
        """Register a syncing local subscriber; subscribe the broker on the
        channel's first. On a broker failure the registration is undone."""
        lock = self._channel_locks.setdefault(channel, asyncio.Lock())
        try:
            async with lock:
                first = self.hub.add(channel, client_id, sub, join_leave=join_leave)
                if first:
                    try:
                        await self.broker.subscribe(channel)
                    except BaseException:
                        if self.hub.remove(channel, client_id):
                            # The subscribe may have gone out (cancelled or
                            # timed out waiting for its confirmation): a
                            # channel nobody here wants must not keep coming.
                            with contextlib.suppress(Exception):
                                await self.broker.unsubscribe(channel)
                        raise
        finally:
            self._release_lock(channel, lock)

    async def remove_subscriber(self, channel: str, client_id: str) -> None:
        lock = self._channel_locks.setdefault(channel, asyncio.Lock())
        try:
            async with lock:
                # A draining node keeps its broker subscriptions until it closes
                # the broker (an unsubscribe per channel is a drain's cost, and
                # what still arrives has nobody here to go to).
                if self.hub.remove(channel, client_id) and not self.draining:
                    await self.broker.unsubscribe(channel)
        finally:
            self._release_lock(channel, lock)

    def leave_presence(self, info: ClientInfo, channels: Sequence[tuple[str, bool]]) -> None:
        """A closed connection's presence in ``channels`` ((name, join_leave)
        pairs): its entries are removed and its leaves published in the
        node's next round, with those of every connection closed meanwhile,
        in a few commands (a drain closes thousands of connections at once).
        Only for connections that are gone: the client id never comes back,
        so a later round cannot undo a newer join of it."""
        if not channels:
            return
        self._leaving += [(channel, info, join_leave) for channel, join_leave in channels]
        if not self._leave_round:
            self._leave_round = True
            self._spawn_pending_work([("presence-leaves", self._leave_rounds())], "presence-leaves")

    async def _leave_rounds(self) -> None:
        try:
            while self._leaving:
                batch, self._leaving = self._leaving, []
                try:
                    await self.presence.remove_presences([(c, info.client) for c, info, _ in batch])
                    await self.broker.publish_leaves([(c, info) for c, info, jl in batch if jl])
                except BrokerUnavailable as exc:
                    # Presence entries expire by themselves in the broker.
                    log.warning("presence of %d subscriptions not removed: %s", len(batch), exc)
        finally:
            self._leave_round = False

    def _release_lock(self, channel: str, lock: asyncio.Lock) -> None:
        # Drop the lock once nobody holds or waits for it.
        if (
            not lock.locked()
            and self._channel_locks.get(channel) is lock
            and not getattr(lock, "_waiters", None)
        ):
            del self._channel_locks[channel]

    # --- publishing -----------------------------------------------------------

    async def publish(
        self,
        channel: str,
        data: bytes,
        *,
        info: ClientInfo | None = None,
        tags: dict[str, str] | None = None,
        history: bool = True,
        options: ChannelOptions | None = None,
    ) -> StreamPosition:
        """Publish raw JSON ``data`` to ``channel`` on every instance; returns
        once the broker accepted it. ``history=False`` delivers live only
        (no offset); ``options`` saves asking the policy again when the
        caller already did. Raises BrokerUnavailable."""
        if options is None:
            options = self.channel_options(channel)
        pub = Publication(data, info, 0, tags, int(time.time() * 1000))
        kept = options.history if history else HistoryOptions()
        position = await self.broker.publish(channel, pub, kept)
        self.metrics.publications.inc()
        return position

    async def publish_claimed(
        self,
        channel: str,
        data: bytes,
        claim: Claim,
        *,
        info: ClientInfo | None = None,
        options: ChannelOptions | None = None,
    ) -> ClaimResult:
        """:meth:`publish`, only if no ``claim.guards`` key exists in the state
        store and ``claim.key`` can be taken (as ``set_if_absent``); on Redis
        the checks, the claim and the publish are one script and one round
        trip. Returns the position, or why nothing was published: a guard
        found (nothing claimed) or the claim taken already. Raises
        BrokerUnavailable, after which the claim is held if and only if the
        publication was made (it may have been, its reply lost): the caller
        releases nothing, and the client's retry is delivered or found a
        duplicate accordingly."""
        if options is None:
            options = self.channel_options(channel)
        pub = Publication(data, info, 0, None, int(time.time() * 1000))
        kept = options.history
        if self._publish_claimed is not None and kept.enabled:
            result = await self._publish_claimed(channel, pub, kept, claim)
        else:
            result = await self._claim_then_publish(channel, pub, kept, claim)
        if result.position is not None:
            self.metrics.publications.inc()
        return result

    async def _claim_then_publish(
        self, channel: str, pub: Publication, history: HistoryOptions, claim: Claim
    ) -> ClaimResult:
        # The embedded store never awaits inside claim_unless, so with the
        # memory broker this is as atomic as the Redis script.
        found, claimed = await self.store.claim_unless(
            claim.key, claim.value, claim.ttl_s, guards=claim.guards
        )
        for key, value in zip(claim.guards, found, strict=False):
            if value is not None:
                return ClaimResult(None, key)
        if not claimed:
            return ClaimResult(None)
        try:
            return ClaimResult(await self.broker.publish(channel, pub, history))
        except BaseException:
            # Two steps here (a channel without history, on Redis): a claim
            # must not outlive a publication that failed. A reply lost after
            # the PUBLISH ran makes the retry a second delivery, which a
            # channel without history cannot tell from a first.
            with contextlib.suppress(BrokerUnavailable):
                await self.store.delete_if_equals(claim.key, claim.value)
            raise

    # --- users ------------------------------------------------------------------

    def user_connection_count(self, user: str) -> int:
        return len(self._users.get(user, ()))

    def user_connections_and_connects(self, user: str) -> int:
        """The user's connections here, and their connects in progress."""
        return self.user_connection_count(user) + self._connecting_users.get(user, 0)

    @contextlib.contextmanager
    def connect_in_progress(self, user: str) -> Iterator[None]:
        """Counts a connect of ``user`` toward :meth:`user_connections_and_connects`
        from its limit check to :meth:`session_connected` (the personal
        channel's subscribe is awaited in between: concurrent connects of one
        user would all pass the check)."""
        counts = self._connecting_users
        counts[user] = counts.get(user, 0) + 1
        try:
            yield
        finally:
            left = counts[user] - 1
            if left:
                counts[user] = left
            else:
                del counts[user]

    def user_sessions(self, user: str) -> list[ClientSession]:
        return list(self._users.get(user, ()))

    def session_connected(self, session: ClientSession, user: str) -> None:
        sessions = self._users.setdefault(user, set())
        sessions.add(session)
        steps: list[tuple[str, Awaitable[None]]] = []
        if len(sessions) == 1:
            steps.append(("user-online", self.user_presence.went_online(user)))
        event = ConnectionEvent(user, session.client_id, len(sessions))
        steps += self._hook_steps(self.on_connect, event)
        self._spawn_pending_work(steps, "connect-event")

    def session_closed(
        self, session: ClientSession, user: str, cleanup: Awaitable[None] | None = None
    ) -> None:
        """Forget a closed session of ``user``; ``cleanup`` (the session's
        leaving of its channels) runs first, in the same background task as
        the user's presence and the disconnect hooks."""
        steps: list[tuple[str, Awaitable[None]]] = []
        if cleanup is not None:
            steps.append(("session-cleanup", cleanup))
        sessions = self._users.get(user)
        if sessions is not None and session in sessions:
            sessions.discard(session)
            if not sessions:
                del self._users[user]
                steps.append(("user-offline", self.user_presence.went_offline(user)))
            event = ConnectionEvent(user, session.client_id, len(sessions))
            steps += self._hook_steps(self.on_disconnect, event)
        self._spawn_pending_work(steps, "disconnect-event")

    def disconnect_user(self, user: str, disconnect: Disconnect) -> int:
        """Close every connection of ``user`` on this node."""
        sessions = self.user_sessions(user)
        for session in sessions:
            session.disconnect(disconnect)
        return len(sessions)

    async def disconnect_user_everywhere(self, user: str, disconnect: Disconnect) -> None:
        """Close every connection of ``user`` on every node."""
        message: JSONObject = {"op": _CONTROL_DISCONNECT, "user": user}
        message |= {"code": disconnect.code, "reason": disconnect.reason}
        await self.broker.publish_control(orjson.dumps(message))

    async def unsubscribe_user_everywhere(
        self, user: str, channel: str, code: int, reason: str
    ) -> None:
        """End ``user``'s subscriptions to ``channel`` on every node, with the
        protocol's unsubscribe push (code < 2500: the client stays out)."""
        message: JSONObject = {"op": _CONTROL_UNSUBSCRIBE, "user": user, "channel": channel}
        message |= {"code": code, "reason": reason}
        await self.broker.publish_control(orjson.dumps(message))

    def _on_control(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
            op, user = message["op"], message["user"]
            code, reason = int(message["code"]), str(message["reason"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            log.warning("ignored a malformed control message")
            return
        if op == _CONTROL_DISCONNECT:
            self.disconnect_user(user, Disconnect(code, reason))
        elif op == _CONTROL_UNSUBSCRIBE:
            for session in self.user_sessions(user):
                session.server_unsubscribe(str(message.get("channel", "")), code, reason)

    # --- background work ----------------------------------------------------------

    def run_in_background(self, factory: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``factory()`` in the background once the node has started
        (now, if it has): handlers' long-running loops (timers, counters)."""
        if self._started:
            self.spawn(factory(), name)
        else:
            self._deferred.append((factory, name))

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run a coroutine in the background, keeping a reference and logging
        its failure (a lost task would swallow the exception)."""
        self.spawn_steps([(name, coro)], name)

    def _spawn_pending_work(self, steps: list[tuple[str, Awaitable[None]]], name: str) -> None:
        """:meth:`spawn_steps` for work that :meth:`close` lets finish."""
        task = self.spawn_steps(steps, name)
        if task is not None:
            self._pending_work.add(task)
            task.add_done_callback(self._pending_work.discard)

    def spawn_steps(
        self, steps: list[tuple[str, Awaitable[None]]], name: str
    ) -> asyncio.Task[None] | None:
        """Run ``(name, awaitable)`` steps one after the other in ONE
        background task; a step's failure is logged and the next one runs.

        A connection event has several steps (channels left, presence, the
        handlers' hooks): a task each cost ≈ 3.4 µs to create and run, and a
        drain closes thousands of connections at once."""
        if not steps:
            return None
        task = self.loop.create_task(_run_steps(steps), name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    @staticmethod
    def _hook_steps(
        hooks: list[ConnectionHook], event: ConnectionEvent
    ) -> list[tuple[str, Awaitable[None]]]:
        return [(f"hook-{getattr(hook, '__name__', 'connection')}", hook(event)) for hook in hooks]


async def _run_steps(steps: list[tuple[str, Awaitable[None]]]) -> None:
    remaining = iter(steps)
    try:
        for name, step in remaining:
            try:
                await step
            except asyncio.CancelledError:
                raise
            except BrokerUnavailable as exc:
                # Expected while the broker is down; no traceback needed.
                log.warning("background task %s: broker unavailable (%s)", name, exc)
            except Exception:
                log.exception("background task %s failed", name)
    finally:
        # Cancelled (shutdown): the steps not started are closed, not leaked
        # as "never awaited" coroutines.
        for _, step in remaining:
            if inspect.iscoroutine(step):
                step.close()
