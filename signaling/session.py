"""One client connection speaking the Centrifuge protocol.

A :class:`ClientSession` is the transport's per-connection handler and the
hub's subscriber. Frames are decoded as they arrive; their commands run in
order, one at a time, in a task that exists only while commands are in flight
(an idle connection has no task). Errors reach the client at one point,
:meth:`ClientSession._run_command`: an :class:`ErrorReply` becomes an error
reply, a :class:`Disconnect` a close frame, anything else the internal-error
disconnect with a logged traceback.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import orjson

from signaling.auth import Credentials, KeysUnavailable, TokenError, TokenExpired
from signaling.broker.base import BrokerUnavailable, UnrecoverablePosition
from signaling.channels import ChannelOptions
from signaling.errors import (
    DISCONNECT_BAD_REQUEST,
    DISCONNECT_CONNECTION_LIMIT,
    DISCONNECT_EXPIRED,
    DISCONNECT_INSUFFICIENT_STATE,
    DISCONNECT_INTERNAL,
    DISCONNECT_INVALID_TOKEN,
    DISCONNECT_NO_PONG,
    DISCONNECT_NOT_AVAILABLE,
    DISCONNECT_SHUTDOWN,
    DISCONNECT_STALE,
    DISCONNECT_TOO_MANY_REQUESTS,
    ERROR_ALREADY_SUBSCRIBED,
    ERROR_INTERNAL,
    ERROR_LIMIT_EXCEEDED,
    ERROR_METHOD_NOT_FOUND,
    ERROR_NOT_AVAILABLE,
    ERROR_PERMISSION_DENIED,
    ERROR_TOKEN_EXPIRED,
    ERROR_TOO_MANY_REQUESTS,
    ERROR_UNRECOVERABLE_POSITION,
    Disconnect,
    ErrorReply,
    SignalError,
)
from signaling.ids import random_uuid
from signaling.logs import Throttle
from signaling.node import Node, PublishContext, RpcContext, SubscribeContext
from signaling.protocol import (
    PING_FRAME,
    ClientInfo,
    Command,
    ConnectRequest,
    ConnectResult,
    HistoryRequest,
    HistoryResult,
    PingRequest,
    PongCommand,
    PresenceRequest,
    PresenceResult,
    PresenceStatsRequest,
    PresenceStatsResult,
    ProtocolError,
    PublishRequest,
    RefreshRequest,
    RefreshResult,
    RpcRequest,
    SendRequest,
    StreamPosition,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
    UnknownRequest,
    UnsubscribeRequest,
    decode_frame,
    encode_empty_reply,
    encode_error,
    encode_pub_push,
    encode_reply,
    encode_unsubscribe_push,
)
from signaling.transport import WebSocketConnection, encode_text_frame
from signaling.values import JSON, compact

__all__ = ["SERVER_VERSION", "ClientSession"]

log = logging.getLogger("signaling.session")
# Client mistakes are logged at INFO, but a flood of them cannot flood the log.
refusals_log = Throttle(log)
_PING_WIRE = encode_text_frame(PING_FRAME)

SERVER_VERSION = "digis-signal 0.1"
# Commands queued behind a slow one: at this many the connection stops being
# read (the client's writes wait in TCP, its own back-pressure) until the
# queue is down to RESUME_READING_AT. A client that is fast, not abusive (the
# command rate limit is for those), is slowed down instead of disconnected.
PAUSE_READING_AT = 256
RESUME_READING_AT = 64
# More than this in the queue at once (commands already read when it paused,
# packed many to a frame) is flooding: 3013.
MAX_QUEUED_COMMANDS = 10_000
# Subscribe flag bit: reply 112 instead of recovered=false (client.proto).
FLAG_REJECT_UNRECOVERED = 1 << 1
# Close codes the transport sends by itself: 1007 invalid UTF-8, 1009 too
# big, 1011 handler crash, 3008 slow client.
TRANSPORT_CLOSE_CODES = frozenset({1007, 1009, 1011, 3008})
# Unsubscribe push codes (centrifuge unsubscribe.go): >= 2500 resubscribes.
UNSUBSCRIBE_EXPIRED = (2501, "subscription expired")
UNSUBSCRIBE_INSUFFICIENT_STATE = (2500, "insufficient state")


@dataclass(slots=True)
class _Identity:
    """What a connection is once authenticated."""

    credentials: Credentials
    info: ClientInfo


@dataclass(slots=True)
class _Subscription:
    options: ChannelOptions
    expires_at: float | None = None
    # Made by the server at connect (the personal channel).
    server_side: bool = False
    # Still recovering: not yet live in the hub.
    syncing: bool = True
    # An unsubscribe (code, reason) that came while syncing: sent after the
    # subscribe reply (_go_live).
    deferred: tuple[int, str] | None = None


class ClientSession:
    """Protocol state of one WebSocket connection."""

    __slots__ = (
        "_closed",
        "_commands",
        "_connect_seen",
        "_expiry_due",
        "_finalized",
        "_first_frame",
        "_identity",
        "_last_refill",
        "_pong_deadline",
        "_reading_paused",
        "_runner",
        "_stale_timer",
        "_tokens",
        "client_id",
        "conn",
        "deliver",
        "node",
        "subs",
    )

    def __init__(self, node: Node, conn: WebSocketConnection) -> None:
        self.node = node
        self.conn = conn
        # The hub's fan-out calls this per recipient: the transport's own
        # method, with no wrapper call in between.
        self.deliver: Callable[[bytes], None] = conn.write_frame
        self.client_id = random_uuid()
        self.subs: dict[str, _Subscription] = {}
        self._identity: _Identity | None = None
        # Created when a command arrives: most connections are idle.
        self._commands: deque[Command] | None = None
        self._runner: asyncio.Task[None] | None = None
        # The socket is not read while too many commands wait (PAUSE_READING_AT).
        self._reading_paused = False
        self._closed = False
        self._finalized = False
        self._pong_deadline = 0.0
        # Wall time of the earliest token expiry (the connection's, with its
        # close delay, or a subscription's) that the pings must look at; never
        # later than the true one, maybe earlier (a refresh moved it on): see
        # _check_expiry. Most pings then cost one comparison.
        self._expiry_due = math.inf
        settings = node.settings
        self._tokens = float(settings.command_burst)
        self._last_refill = time.monotonic()
        # No frame read yet: the first may carry the connect and every
        # subscription of a reconnecting client (see on_text).
        self._first_frame = True
        # Runs while the connection is not through its connect command.
        self._stale_timer: asyncio.TimerHandle | None = node.loop.call_later(
            settings.connect_timeout_s, self.disconnect, DISCONNECT_STALE
        )
        self._connect_seen = False
        node.metrics.active_connections.inc()
        node.sessions.add(self)

    # --- transport callbacks --------------------------------------------------

    def on_text(self, data: bytes) -> None:
        if self._closed:
            return
        if data == b"{}":
            # A pong, as every SDK writes it: most of an idle server's reads,
            # answered without the JSON parse and the command it would build.
            self._on_pong()
            return
        try:
            commands = decode_frame(data)
        except ProtocolError as exc:
            refusals_log.log(logging.INFO, "bad frame from %s: %s", self.conn.remote_address, exc)
            self.disconnect(DISCONNECT_BAD_REQUEST)
            return
        # The SDKs batch a connect with every subscription they restore into
        # one frame: those (as many as a connection may hold) do not draw on
        # the rate limit, or a client with more subscriptions than the burst
        # would find some refused at each reconnect.
        free = 0
        if self._first_frame:
            self._first_frame = False
            if commands and isinstance(commands[0].request, ConnectRequest):
                free = self.node.settings.max_subscriptions_per_connection + 1
        for cmd in commands:
            request = cmd.request
            if isinstance(request, PongCommand):
                # Answered inline: pongs are most of an idle server's traffic.
                self._on_pong()
                continue
            if free > 0 and isinstance(request, ConnectRequest | SubscribeRequest):
                free -= 1
            elif not self._take_token():
                if self._closed:
                    return
                self._refuse(cmd, ERROR_TOO_MANY_REQUESTS, "command_rate")
                continue
            if self._commands is None:
                self._commands = deque()
            self._commands.append(cmd)
        queue = self._commands
        if queue is None:
            return
        if len(queue) > MAX_QUEUED_COMMANDS:
            self.node.metrics.rate_limited.inc()
            self.disconnect(DISCONNECT_TOO_MANY_REQUESTS)
            return
        if len(queue) >= PAUSE_READING_AT and not self._reading_paused:
            self._reading_paused = True
            self.conn.pause_reading()
        if queue and self._runner is None:
            self._runner = self.node.loop.create_task(self._run_commands())

    def on_binary(self, data: bytes) -> None:
        # JSON protocol only: binary frames are not ours (decode would fail).
        self.disconnect(DISCONNECT_BAD_REQUEST)

    def on_closed(self, code: int | None, reason: str) -> None:
        if self._finalized:
            return
        self._finalized = True
        if not self._closed and code in TRANSPORT_CLOSE_CODES:
            # Closed by the transport itself (slow client, oversized or invalid frame).
            self.node.metrics.disconnects.labels(str(code)).inc()
        self._closed = True
        self._end_connecting()
        node = self.node
        node.metrics.active_connections.dec()
        node.sessions.discard(self)
        node.heartbeat.remove(self)
        if self._runner is not None:
            self._runner.cancel()
            self._runner = None
        identity = self._identity
        if identity is not None:
            cleanup = self._leave_all(identity, list(self.subs.items())) if self.subs else None
            node.session_closed(self, identity.credentials.user, cleanup)
            self.subs = {}
        log.debug("connection %s closed (%s %s)", self.client_id, code, reason)

    # --- hub callbacks ----------------------------------------------------------

    def lost_position(self, channel: str) -> None:
        if self._closed:
            return
        sub = self.subs.get(channel)
        if sub is None:
            # Removed already, its hub entry not yet (an earlier gap's or an
            # unsubscribe's cleanup is on its way): nothing left to tell.
            return
        if sub.server_side:
            # Server-side subscriptions are recovered through a reconnect.
            self.disconnect(DISCONNECT_INSUFFICIENT_STATE)
        else:
            # The SDK resubscribes from its last position (code >= 2500); one
            # still syncing is told after its reply (server_unsubscribe).
            self.server_unsubscribe(channel, *UNSUBSCRIBE_INSUFFICIENT_STATE)

    # --- heartbeat callbacks ------------------------------------------------------

    def send_ping(self, now: float) -> None:
        if self._pong_deadline and now >= self._pong_deadline:
            self.disconnect(DISCONNECT_NO_PONG)
            return
        if time.time() >= self._expiry_due and self._check_expiry():
            return
        self._pong_deadline = now + self.node.settings.pong_timeout_s
        # The same pre-built frame for every connection: pings are most of an
        # idle server's writes, and framing each one in Python cost 2-3 µs.
        self.conn.write_frame(_PING_WIRE)

    def check_pong(self, now: float) -> None:
        if self._pong_deadline and now >= self._pong_deadline:
            self.disconnect(DISCONNECT_NO_PONG)

    def _on_pong(self) -> None:
        if not self._pong_deadline:
            # An answer to no ping: the client does not follow the protocol.
            self.disconnect(DISCONNECT_BAD_REQUEST)
            return
        self._pong_deadline = 0.0

    def _check_expiry(self) -> bool:
        """Close an expired connection; end expired subscriptions; find when
        to look again. Uses wall time (token claims are unix seconds)."""
        identity = self._identity
        if identity is None:
            return False
        wall = time.time()
        due = self._close_due(identity.credentials.expires_at)
        if wall > due:
            self.disconnect(DISCONNECT_EXPIRED)
            return True
        for channel, sub in list(self.subs.items()):
            if wall > self._close_due(sub.expires_at):
                self.server_unsubscribe(channel, *UNSUBSCRIBE_EXPIRED)
        for sub in self.subs.values():
            # One still syncing stays until its reply is sent: looked at again.
            due = min(due, self._close_due(sub.expires_at))
        self._expiry_due = due
        return False

    def _expires_at(self, when: float) -> None:
        """A token expiry was set: the pings look at it by then."""
        if when < self._expiry_due:
            self._expiry_due = when

    def _close_due(self, expires_at: float | None) -> float:
        """When an expired token (the connection's or a subscription's) ends
        what it grants: its close delay after the expiry, for the SDK's
        refresh (it asks for a new token when the ttl runs out; Centrifuge
        waits 25 s too). Never without an expiry."""
        if expires_at is None:
            return math.inf
        return expires_at + self.node.settings.expired_close_delay_s

    def _connect_arrived(self) -> None:
        """The client sent connect in time: not stale. Should the server take
        as long again to answer it (a stalled store or key server), the
        connection ends with 3004, which the SDKs retry, not with 3502, after
        which they give up. Once: a client sending connect after connect
        (each refused) does not keep an unauthenticated socket for ever."""
        if self._connect_seen:
            return
        self._connect_seen = True
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = self.node.loop.call_later(
                self.node.settings.connect_timeout_s, self.disconnect, DISCONNECT_INTERNAL
            )

    def _end_connecting(self) -> None:
        """Connected, or closed before: the connect deadline no longer applies."""
        if self._stale_timer is not None:
            self._stale_timer.cancel()
            self._stale_timer = None

    # --- public API (node, handlers) --------------------------------------------

    @property
    def user(self) -> str | None:
        return None if self._identity is None else self._identity.credentials.user

    def disconnect(self, disconnect: Disconnect) -> None:
        """Close the connection with the protocol's code. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.node.metrics.disconnects.labels(str(disconnect.code)).inc()
        if disconnect.code == DISCONNECT_SHUTDOWN.code:
            log.debug("connection %s: shutdown", self.client_id)
        else:
            log.debug("connection %s: disconnect %s", self.client_id, disconnect.code)
        self.conn.close(disconnect.code, disconnect.reason)

    def presence_entries(self) -> list[tuple[str, ClientInfo]]:
        """(channel, info) of this connection's presence in its channels."""
        identity = self._identity
        if identity is None:
            return []
        return [(c, identity.info) for c, s in self.subs.items() if s.options.presence]

    def server_unsubscribe(self, channel: str, code: int, reason: str) -> None:
        """Remove a subscription from the server side (unsubscribe push). One
        whose subscribe (or connect) reply is not sent yet is removed right
        after it (:meth:`_go_live`): the SDKs take a reply that follows the
        push for a live subscription, which the server would no longer feed."""
        sub = self.subs.get(channel)
        if sub is None:
            return
        if sub.syncing:
            if sub.deferred is None:
                sub.deferred = (code, reason)
            return
        del self.subs[channel]
        identity = self._identity
        if identity is None:
            return
        self.conn.send_text(encode_unsubscribe_push(channel, code, reason))
        self.node.spawn(self._cleanup(identity, channel, sub), "server-unsubscribe")

    # --- command loop -------------------------------------------------------------

    def _take_token(self) -> bool:
        rate = self.node.settings.commands_per_second
        if rate <= 0:
            return True
        now = time.monotonic()
        burst = self.node.settings.command_burst
        self._tokens = min(float(burst), self._tokens + (now - self._last_refill) * rate)
        self._last_refill = now
        self._tokens -= 1.0
        if self._tokens >= 0:
            return True
        if self._tokens <= -burst:
            # Refused a whole burst more and still sending: cut it off.
            self.node.metrics.rate_limited.inc()
            self.disconnect(DISCONNECT_TOO_MANY_REQUESTS)
        return False

    def _refuse(self, cmd: Command, error: ErrorReply, limit: str) -> None:
        self.node.metrics.limit_refusals.labels(limit).inc()
        self.node.metrics.commands.labels(cmd.method, str(error.code)).inc()
        if cmd.id:
            self.conn.send_text(encode_error(cmd.id, error))

    async def _run_commands(self) -> None:
        queue = self._commands
        try:
            while queue and not self._closed:
                await self._run_command(queue.popleft())
                if self._reading_paused and len(queue) <= RESUME_READING_AT:
                    self._reading_paused = False
                    self.conn.resume_reading()
        finally:
            self._runner = None
            if self._commands is queue and not queue:
                self._commands = None  # idle again: free the deque

    async def _run_command(self, cmd: Command) -> None:
        metrics = self.node.metrics
        method = cmd.method
        started = time.perf_counter()
        result = "ok"
        try:
            if self._identity is None and not isinstance(cmd.request, ConnectRequest):
                raise SignalError(DISCONNECT_BAD_REQUEST)
            await self._dispatch(cmd)
        except SignalError as exc:
            value = exc.value
            result = str(value.code)
            if isinstance(value, ErrorReply):
                self._send(encode_error(cmd.id, value))
            else:
                self.disconnect(value)
        except BrokerUnavailable as exc:
            result = str(ERROR_INTERNAL.code)
            log.warning("broker unavailable during %s: %s", method, exc)
            self._send(encode_error(cmd.id, ERROR_INTERNAL))
        except asyncio.CancelledError:
            raise
        except Exception:
            result = "exception"
            log.exception("%s failed on connection %s", method, self.client_id)
            self.disconnect(DISCONNECT_INTERNAL)
        metrics.command_done(method, result, time.perf_counter() - started)

    def _send(self, message: bytes) -> None:
        if not self._closed:
            self.conn.send_text(message)

    async def _dispatch(self, cmd: Command) -> None:
        req = cmd.request
        if isinstance(req, PublishRequest):
            # The publisher's own copy usually arrives with the broker's
            # acknowledgement: held, it leaves with the reply in one write.
            conn = self.conn
            conn.hold()
            try:
                await self._publish(req)
            except BaseException:
                conn.release()
                raise
            self._send(encode_empty_reply(cmd.id, "publish"))
            if conn.held_frames == 1 and req.channel in self.subs:
                # Only the reply is held: the copy is still in the hub's
                # pending fan-out, or (through Redis) on the pub/sub
                # connection, often one loop iteration after the broker's
                # reply. Released at the next iteration, after its poll for
                # I/O and the fan-out so far, the two usually leave in one write.
                self.node.loop.call_soon(self._release_after_fan_out)
            else:
                conn.release()
        elif isinstance(req, SubscribeRequest):
            await self._subscribe(cmd.id, req)
        elif isinstance(req, UnsubscribeRequest):
            await self._unsubscribe(req.channel)
            self._send(encode_empty_reply(cmd.id, "unsubscribe"))
        elif isinstance(req, RpcRequest):
            self._send(encode_reply(cmd.id, "rpc", await self._rpc(req)))
        elif isinstance(req, ConnectRequest):
            # Counted while the server works on it (admission control in
            # App.websocket_allowed): the count grows when set-ups queue for
            # the CPU or the broker, not when clients are slow to send connect.
            admission = self.node.admission
            if admission.at_cap():
                # Upgraded while there was room, connecting when there is none:
                # refused like an upgrade would be now, as temporary (the SDKs
                # back off and retry).
                self.node.metrics.limit_refusals.labels("connecting").inc()
                raise SignalError(ERROR_TOO_MANY_REQUESTS)
            started = admission.begin()
            self._connect_arrived()
            try:
                await self._connect(cmd.id, req)
            finally:
                admission.end(started)
        elif isinstance(req, PresenceRequest):
            self._send(encode_reply(cmd.id, "presence", await self._presence(req.channel)))
        elif isinstance(req, PresenceStatsRequest):
            stats = await self._presence_stats(req.channel)
            self._send(encode_reply(cmd.id, "presence_stats", stats))
        elif isinstance(req, HistoryRequest):
            self._send(encode_reply(cmd.id, "history", await self._history(req)))
        elif isinstance(req, RefreshRequest):
            self._send(encode_reply(cmd.id, "refresh", await self._refresh(req)))
        elif isinstance(req, SubRefreshRequest):
            self._send(encode_reply(cmd.id, "sub_refresh", await self._sub_refresh(req)))
        elif isinstance(req, PingRequest):
            self._send(encode_empty_reply(cmd.id, "ping"))
        elif isinstance(req, SendRequest):
            # No asynchronous message handler on this server (disconnect.go).
            raise SignalError(DISCONNECT_NOT_AVAILABLE)
        elif isinstance(req, UnknownRequest):
            raise SignalError(ERROR_METHOD_NOT_FOUND)
        else:  # PongCommand is handled inline in on_text.
            raise SignalError(DISCONNECT_BAD_REQUEST)

    def _release_after_fan_out(self) -> None:
        self.node.hub.flush()
        self.conn.release()

    def _require_identity(self) -> _Identity:
        if self._identity is None:
            raise SignalError(DISCONNECT_BAD_REQUEST)
        return self._identity

    # --- connect, refresh ------------------------------------------------------------

    async def _connect(self, cmd_id: int, req: ConnectRequest) -> None:
        node = self.node
        settings = node.settings
        if self._identity is not None:
            raise SignalError(DISCONNECT_BAD_REQUEST)  # connect twice
        try:
            credentials = await node.verifier.verify_connection(req.token)
        except TokenExpired:
            node.metrics.connection_attempts.labels("token_expired").inc()
            raise SignalError(ERROR_TOKEN_EXPIRED) from None
        except KeysUnavailable:
            # The issuer's keys are unreachable: temporary, the SDK retries.
            node.metrics.connection_attempts.labels("keys_unavailable").inc()
            raise SignalError(ERROR_INTERNAL) from None
        except TokenError as exc:
            node.metrics.connection_attempts.labels("invalid_token").inc()
            refusals_log.log(
                logging.INFO, "invalid token from %s: %s", self.conn.remote_address, exc
            )
            raise SignalError(DISCONNECT_INVALID_TOKEN) from None
        if self._closed:
            return
        user = credentials.user
        limit = settings.max_connections_per_user
        if limit and node.user_connections_and_connects(user) >= limit:
            node.metrics.connection_attempts.labels("connection_limit").inc()
            node.metrics.limit_refusals.labels("connections_per_user").inc()
            raise SignalError(DISCONNECT_CONNECTION_LIMIT)
        if node.draining:
            raise SignalError(DISCONNECT_SHUTDOWN)

        identity = _Identity(credentials, ClientInfo(user, self.client_id, _conn_info(credentials)))
        self._identity = identity
        self._expires_at(self._close_due(credentials.expires_at))
        subs: dict[str, SubscribeResult] = {}
        with node.connect_in_progress(user):
            personal = node.policy.personal_channel(user)
            if personal is not None:
                recover = req.subs.get(personal) or SubscribeRequest(personal)
                try:
                    subs[personal] = await self._start_subscription(personal, recover, None)
                except BaseException:
                    # Connect is all or nothing: not authenticated after all.
                    self._identity = None
                    raise
                self.subs[personal].server_side = True
            if self._closed:
                return
            self._end_connecting()
            node.session_connected(self, user)
        node.metrics.connection_attempts.labels("ok").inc()
        expires, ttl = _ttl(credentials.expires_at)
        result = ConnectResult(
            client=self.client_id,
            version=SERVER_VERSION,
            # The heartbeat pings on whole-second ticks: advertise the ceiling.
            ping_s=max(1, math.ceil(settings.ping_interval_s)),
            pong=True,
            expires=expires,
            ttl_s=ttl,
            subs=subs,
        )
        self._send(encode_reply(cmd_id, "connect", result))
        for channel in subs:
            self._go_live(channel, subs[channel])
        node.heartbeat.add(self)
        log.debug("connection %s authenticated as user %s", self.client_id, user)

    async def _refresh(self, req: RefreshRequest) -> RefreshResult:
        identity = self._require_identity()
        try:
            credentials = await self.node.verifier.verify_connection(req.token)
        except TokenExpired:
            # Not 109 as at connect: a refresh answered with a permanent error
            # ends the SDKs' connection for good. 3005 makes them reconnect, and
            # that connect's 109 makes them fetch a new token.
            raise SignalError(DISCONNECT_EXPIRED) from None
        except KeysUnavailable:
            # Temporary: the SDK retries the refresh (as a connect's, above).
            raise SignalError(ERROR_INTERNAL) from None
        except TokenError:
            raise SignalError(DISCONNECT_INVALID_TOKEN) from None
        if credentials.user != identity.credentials.user:
            raise SignalError(DISCONNECT_INVALID_TOKEN)
        identity.credentials = credentials
        # A later expiry leaves an earlier due time: the check then finds it.
        self._expires_at(self._close_due(credentials.expires_at))
        expires, ttl = _ttl(credentials.expires_at)
        return RefreshResult(self.client_id, SERVER_VERSION, expires, ttl)

    # --- subscriptions -------------------------------------------------------------------

    async def _subscribe(self, cmd_id: int, req: SubscribeRequest) -> None:
        identity = self._require_identity()
        node = self.node
        channel = req.channel
        if channel in self.subs:
            raise SignalError(ERROR_ALREADY_SUBSCRIBED)
        if len(self.subs) >= node.settings.max_subscriptions_per_connection:
            node.metrics.limit_refusals.labels("subscriptions").inc()
            raise SignalError(ERROR_LIMIT_EXCEEDED)
        options = node.channel_options(channel)
        expires_at: float | None = None
        user = identity.credentials.user
        if req.token:
            expires_at = await self._check_sub_token(req.token, user, channel)
        elif options.token_required or not node.policy.can_subscribe(user, channel):
            raise SignalError(ERROR_PERMISSION_DENIED)
        await self._run_subscribe_hooks(user, channel, options)
        result = await self._start_subscription(channel, req, expires_at)
        self._send(encode_reply(cmd_id, "subscribe", result))
        self._go_live(channel, result)

    async def _check_sub_token(self, token: str, user: str, channel: str) -> float | None:
        try:
            grant = await self.node.verifier.verify_subscription(token, user=user, channel=channel)
        except TokenExpired:
            raise SignalError(ERROR_TOKEN_EXPIRED) from None
        except KeysUnavailable:
            # Temporary: the SDK retries the subscribe or the refresh.
            raise SignalError(ERROR_INTERNAL) from None
        except TokenError:
            raise SignalError(ERROR_PERMISSION_DENIED) from None
        return grant.expires_at

    async def _start_subscription(
        self, channel: str, req: SubscribeRequest, expires_at: float | None
    ) -> SubscribeResult:
        """Register in the hub (syncing), recover or read the stream top, add
        presence. The caller sends the reply, then calls :meth:`_go_live`."""
        identity = self._require_identity()
        node = self.node
        options = node.channel_options(channel)
        self.subs[channel] = sub = _Subscription(options, expires_at)
        self._expires_at(self._close_due(expires_at))
        join_leave = options.join_leave and req.join_leave
        try:
            await node.add_subscriber(channel, self.client_id, self, join_leave=join_leave)
        except BaseException:
            self.subs.pop(channel, None)
            raise
        try:
            result = await self._recover(channel, req, options)
            if options.presence:
                await node.presence.add_presence(
                    channel, identity.info, node.settings.presence_ttl_s
                )
                if options.join_leave:
                    await node.broker.publish_join(channel, identity.info)
        except BaseException:
            self.subs.pop(channel, None)
            await node.remove_subscriber(channel, self.client_id)
            raise
        if self._closed or self.subs.get(channel) is not sub:
            # Closed meanwhile: on_closed cleaned what it saw; finish here.
            await node.remove_subscriber(channel, self.client_id)
        expires, ttl = _ttl(expires_at)
        if expires:
            result = _replace_expiry(result, ttl)
        return result

    async def _recover(
        self, channel: str, req: SubscribeRequest, options: ChannelOptions
    ) -> SubscribeResult:
        if not options.recoverable:
            return SubscribeResult()
        known = self._known_position(channel, req)
        if known is not None:
            return known
        broker = self.node.broker
        if req.recover:
            try:
                page = await broker.history(
                    channel,
                    since=StreamPosition(req.offset, req.epoch),
                    limit=-1,
                    reverse=False,
                    history=options.history,
                )
            except UnrecoverablePosition:
                page = None
            if page is not None:
                pubs = list(page.publications)
                recovered = (
                    pubs[0].offset == req.offset + 1 and pubs[-1].offset == page.top.offset
                    if pubs
                    else page.top.offset == req.offset
                )
                if recovered:
                    return SubscribeResult(
                        recoverable=True,
                        positioned=True,
                        epoch=page.top.epoch,
                        offset=req.offset,
                        publications=pubs,
                        recovered=True,
                        was_recovering=True,
                    )
            if req.flag & FLAG_REJECT_UNRECOVERED:
                raise SignalError(ERROR_UNRECOVERABLE_POSITION)
        top = await broker.history(
            channel, since=None, limit=0, reverse=False, history=options.history
        )
        return SubscribeResult(
            recoverable=True,
            positioned=True,
            epoch=top.top.epoch,
            offset=top.top.offset,
            was_recovering=req.recover,
        )

    def _known_position(self, channel: str, req: SubscribeRequest) -> SubscribeResult | None:
        """The reply from the channel's position on this node, when the node
        follows the channel already and the stream need not be read: a new
        subscription, or a recovery from exactly that position.

        Sound because the caller is registered (syncing) before asking:
        whatever the stream holds past this position is still on its way
        through pub/sub and reaches this subscriber from the hub's buffer,
        as it reaches the channel's live subscribers here. If the node has
        in fact missed some, the hub's gap checks make every local
        subscriber recover, this one included. Saves a broker round trip
        per subscription in a room the node serves (most of a reconnect
        storm's room subscriptions)."""
        position = self.node.hub.position(channel)
        if position is None:
            return None
        offset, epoch = position
        if req.recover and (req.offset, req.epoch) != position:
            return None  # behind or elsewhere: the stream has what it missed
        return SubscribeResult(
            recoverable=True,
            positioned=True,
            epoch=epoch,
            offset=offset,
            recovered=req.recover,
            was_recovering=req.recover,
        )

    def _go_live(self, channel: str, result: SubscribeResult) -> None:
        """After the subscribe reply: deliver what arrived while syncing and
        was not in the reply, then switch to live fan-out."""
        sub = self.subs.get(channel)
        if sub is None or self._closed:
            return
        sub.syncing = False
        if sub.deferred is not None:
            # Unsubscribed while it recovered (a gap, say: the reply is sound up
            # to its position, from which the client recovers the rest).
            if sub.server_side:
                # Recovered through a reconnect, as in lost_position.
                self.disconnect(DISCONNECT_INSUFFICIENT_STATE)
            else:
                self.server_unsubscribe(channel, *sub.deferred)
            return
        hub = self.node.hub
        # Where the reply leaves the client: its last publication, or the top.
        last = result.publications[-1].offset if result.publications else result.offset
        if result.epoch:
            hub.note_position(channel, last, result.epoch)
        buffered = hub.go_live(channel, self.client_id, last, result.epoch)
        if not buffered:
            return
        for pub in buffered:
            # Each offset once: the hub buffers for a syncing subscriber what
            # the live ones have already, and its reply may hold it too.
            if pub.offset == 0 or pub.offset > last:
                self.conn.send_text(encode_pub_push(channel, pub))
                last = max(last, pub.offset)

    async def _unsubscribe(self, channel: str) -> None:
        identity = self._require_identity()
        sub = self.subs.pop(channel, None)
        if sub is not None:
            await self._cleanup(identity, channel, sub)

    async def _leave_all(self, identity: _Identity, subs: list[tuple[str, _Subscription]]) -> None:
        """A closed connection leaves its channels: hub and broker now,
        presence and leave pushes in the node's next round of them."""
        node = self.node
        for channel, _ in subs:
            try:
                await node.remove_subscriber(channel, self.client_id)
            except BrokerUnavailable as exc:
                log.warning("cleanup of %s failed: %s", channel, exc)
        node.leave_presence(
            identity.info,
            [(channel, sub.options.join_leave) for channel, sub in subs if sub.options.presence],
        )

    async def _cleanup(self, identity: _Identity, channel: str, sub: _Subscription) -> None:
        """A live connection leaves a channel: hub, broker, presence, leave
        push, at once (it may subscribe again right after)."""
        node = self.node
        try:
            await node.remove_subscriber(channel, self.client_id)
            if sub.options.presence:
                await node.presence.remove_presence(channel, self.client_id)
                if sub.options.join_leave:
                    await node.broker.publish_leave(channel, identity.info)
        except BrokerUnavailable as exc:
            # Presence entries expire by themselves in the broker.
            log.warning("cleanup of %s failed: %s", channel, exc)

    async def _sub_refresh(self, req: SubRefreshRequest) -> SubRefreshResult:
        identity = self._require_identity()
        sub = self.subs.get(req.channel)
        if sub is None:
            raise SignalError(ERROR_PERMISSION_DENIED)
        try:
            sub.expires_at = await self._check_sub_token(
                req.token, identity.credentials.user, req.channel
            )
        except SignalError as exc:
            if exc.value is ERROR_TOKEN_EXPIRED:
                # 109 alone would end the SDKs' subscription for good (a
                # permanent error to a refresh); 2501 first makes them subscribe
                # again with a new token, and they then ignore the reply.
                self.server_unsubscribe(req.channel, *UNSUBSCRIBE_EXPIRED)
            raise
        self._expires_at(self._close_due(sub.expires_at))
        expires, ttl = _ttl(sub.expires_at)
        return SubRefreshResult(expires, ttl)

    # --- publish, presence, history, rpc -------------------------------------------------

    async def _publish(self, req: PublishRequest) -> None:
        identity = self._require_identity()
        node = self.node
        options = node.channel_options(req.channel)
        if not options.client_publish or not node.policy.can_publish(
            identity.credentials.user, req.channel
        ):
            raise SignalError(ERROR_PERMISSION_DENIED)
        if len(req.raw_data) > node.settings.max_publication_bytes:
            node.metrics.limit_refusals.labels("publication_size").inc()
            raise SignalError(ERROR_LIMIT_EXCEEDED)
        raw, history, tags = req.raw_data, True, None
        if node.publish_hooks:
            ctx = PublishContext(
                identity.credentials.user,
                self.client_id,
                identity.info,
                req.channel,
                req.data,
                req.raw_data,
                options,
            )
            for hook in node.publish_hooks:
                decision = await hook(ctx)
                if decision is None:
                    continue
                if decision.skip:
                    return
                raw = decision.raw if decision.raw is not None else raw
                history = history and decision.history
                tags = decision.tags or tags
        await node.publish(
            req.channel, raw, info=identity.info, tags=tags, history=history, options=options
        )

    async def _check_read(self, channel: str) -> ChannelOptions:
        """Presence and history are for those who may subscribe: subscribers,
        and those a subscribe would admit (the policy, then the subscribe hooks,
        so that a user banned from a room cannot read it through history)."""
        if channel in self.subs:
            return self.node.channel_options(channel)
        user = self._require_identity().credentials.user
        node = self.node
        options = node.channel_options(channel)
        if options.token_required or not node.policy.can_subscribe(user, channel):
            raise SignalError(ERROR_PERMISSION_DENIED)
        await self._run_subscribe_hooks(user, channel, options)
        return options

    async def _run_subscribe_hooks(self, user: str, channel: str, options: ChannelOptions) -> None:
        """The node's subscribe hooks (moderation's ban check); each raises
        SignalError to refuse."""
        hooks = self.node.subscribe_hooks
        if hooks:
            ctx = SubscribeContext(user, self.client_id, channel, options)
            for hook in hooks:
                await hook(ctx)

    async def _presence(self, channel: str) -> PresenceResult:
        if not (await self._check_read(channel)).presence:
            raise SignalError(ERROR_NOT_AVAILABLE)
        return PresenceResult(await self.node.presence.presence(channel))

    async def _presence_stats(self, channel: str) -> PresenceStatsResult:
        if not (await self._check_read(channel)).presence:
            raise SignalError(ERROR_NOT_AVAILABLE)
        clients, users = await self.node.presence.presence_stats(channel)
        return PresenceStatsResult(clients, users)

    async def _history(self, req: HistoryRequest) -> HistoryResult:
        options = await self._check_read(req.channel)
        if not options.recoverable:
            raise SignalError(ERROR_NOT_AVAILABLE)
        limit = req.limit
        if limit < 0 or limit > options.history.size:
            limit = options.history.size
        try:
            page = await self.node.broker.history(
                req.channel,
                since=req.since,
                limit=limit,
                reverse=req.reverse,
                history=options.history,
            )
        except UnrecoverablePosition:
            raise SignalError(ERROR_UNRECOVERABLE_POSITION) from None
        pubs = list(page.publications)
        since = req.since
        top = page.top.offset
        if since is not None and not req.reverse and limit != 0 and top > since.offset:
            # What follows ``since`` must start the page; if the stream no
            # longer holds it (trimmed, or expired while the position lives
            # on), an empty or later page would pass for "nothing missed".
            first = pubs[0].offset if pubs else top + 1
            if first > since.offset + 1:
                raise SignalError(ERROR_UNRECOVERABLE_POSITION)
        return HistoryResult(pubs, page.top)

    async def _rpc(self, req: RpcRequest) -> JSON:
        identity = self._require_identity()
        handler = self.node.rpc_handlers.get(req.method)
        if handler is None:
            raise SignalError(ERROR_METHOD_NOT_FOUND)
        ctx = RpcContext(
            identity.credentials.user,
            self.client_id,
            identity.info,
            identity.credentials,
            self.node,
        )
        return await handler(ctx, req.data)


def _conn_info(credentials: Credentials) -> bytes | None:
    """The token's ``info`` (plus its display ``name``), as shown to others."""
    info = dict(credentials.info or {})
    if credentials.name is not None and "name" not in info:
        info["name"] = credentials.name
    return compact(orjson.dumps(info)) if info else None


def _ttl(expires_at: float | None) -> tuple[bool, int]:
    if expires_at is None:
        return False, 0
    return True, max(1, int(expires_at - time.time()))


def _replace_expiry(result: SubscribeResult, ttl: int) -> SubscribeResult:
    return replace(result, expires=True, ttl_s=ttl)
