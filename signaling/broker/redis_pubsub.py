"""One Redis pub/sub connection and its reader: a shard of the broker's
subscriptions (one per Redis node; one in all on a standalone Redis).

SUBSCRIBE and UNSUBSCRIBE calls issued in one loop iteration go out as one
command each (batched under churn); ``subscribe`` returns only once Redis
confirmed it, so nothing published afterwards is missed. Confirmations come
in the order the SUBSCRIBEs went out, so each SUBSCRIBE sent has its own,
matched in that order; a subscribe shares a pending one only if no
UNSUBSCRIBE of the name went out since. On a lost
connection the reader reconnects with full-jitter backoff, resubscribes to
what the hub needs now (not a copy of its own) and reports the reconnect,
since messages may have been lost meanwhile; an open ends with a PING whose
PONG comes after every confirmation, so the shard is ready (and positions are
checked) only once its subscriptions took effect. A PING after HEALTH_CHECK_S
of silence must come back within PING_TIMEOUT_S, or the connection counts as
lost (a node gone without a TCP reset). The reader never dies: any error
is logged and retried. It also reports the loss itself (``on_lost``), and a
sharded shard reports the channels Redis unsubscribed by itself
(``on_dropped``: their slot moved to another primary), so that the broker can
follow the cluster's slot map.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.crc import key_slot

from signaling.broker.base import BrokerUnavailable
from signaling.broker.resp import RedisAddress
from signaling.broker.resp_pubsub import RespPubSub
from signaling.state.redis import in_batches

__all__ = ["PubSubShard", "RespPubSubShard", "cluster_slot"]

log = logging.getLogger("signaling.redis")

SUBSCRIBE_TIMEOUT_S = 5.0
# Channels per SUBSCRIBE command (centrifuge uses 512).
SUBSCRIBE_BATCH = 512
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0
# Liveness of a shard's connection: a PING after this much silence...
HEALTH_CHECK_S = 15.0
# ...must come back within this.
PING_TIMEOUT_S = 5.0
# The payload of a PubSubShard's own PINGs (redis-py's health check PINGs
# "redis-py-health-check" on the same connection, and drops their PONGs).
PING_PAYLOAD = "digis-signal-ping"


class _Shard:
    """What both shards share: readiness, subscribe confirmations, and the
    reconnect loop. Subclasses open the connection (``_open``), serve it
    until it fails (``_serve``) and send (un)subscribes (``_send_subscribe``)."""

    def __init__(
        self,
        *,
        label: str,
        control: str | None,
        wanted: Callable[[], list[str]],
        on_message: Callable[[str, bytes], None],
        on_reconnected: Callable[[], None],
        on_lost: Callable[[], None] | None = None,
        takes_over: bool = False,
    ) -> None:
        self.label = label
        # Opened for slots another shard served (a failover, a scale-out):
        # its first connection may follow lost messages, like a reconnect.
        self._takes_over = takes_over
        self._control = control
        self._wanted = wanted
        self._on_message = on_message
        self._on_reconnected = on_reconnected
        self._on_lost = on_lost
        self.ready = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        # Per name, a future per SUBSCRIBE sent and not yet confirmed, oldest
        # first: Redis confirms them in the order they went out.
        self._confirm: dict[str, deque[asyncio.Future[None]]] = {}
        # Per name, the future a subscribe may share: its newest SUBSCRIBE's,
        # while no UNSUBSCRIBE went out after it (Redis runs that UNSUBSCRIBE
        # after confirming it, so a subscribe then needs one of its own).
        self._joinable: dict[str, asyncio.Future[None]] = {}
        self.reconnects = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run_forever(), name=f"redis-pubsub-{self.label}")

    async def _stop_task(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def subscribe(self, name: str) -> None:
        """Subscribe to ``name``; returns once Redis confirmed it."""
        if not self.ready or not self._connected():
            raise BrokerUnavailable(f"redis pub/sub unavailable ({self.label})")
        future = self._joinable.get(name)
        if future is None:
            future = self._send_confirmed(name)
        # Shielded: a waiter cancelled must not cancel the others' future.
        await asyncio.shield(future)

    def _send_confirmed(self, name: str) -> asyncio.Future[None]:
        """Send a SUBSCRIBE of ``name``; the future its confirmation resolves."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        pending = self._confirm.get(name)
        if pending is None:
            pending = self._confirm[name] = deque()
        pending.append(future)
        self._joinable[name] = future
        # One timer per subscribe sent, not a wait_for per waiter: a
        # connection storm subscribes to thousands of personal channels.
        timer = loop.call_later(SUBSCRIBE_TIMEOUT_S, self._not_confirmed, name, future)
        future.add_done_callback(lambda _: timer.cancel())
        self._send_subscribe(True, name)
        return future

    def unsubscribe(self, name: str) -> None:
        if self.ready and self._connected():
            # Redis confirms a pending SUBSCRIBE before it runs this: a
            # subscribe from now on must wait for a SUBSCRIBE sent after it.
            self._joinable.pop(name, None)
            self._send_subscribe(False, name)

    def _not_confirmed(self, name: str, future: asyncio.Future[None]) -> None:
        if self._joinable.get(name) is future:
            del self._joinable[name]
        # It stays in its FIFO: its confirmation may still come (a slow
        # Redis), and must not be taken for a later SUBSCRIBE's.
        if not future.done():
            future.set_exception(BrokerUnavailable("redis subscribe not confirmed"))
            future.exception()  # retrieved: every waiter may have been cancelled

    def _confirmed(self, name: str) -> None:
        pending = self._confirm.get(name)
        if pending is None:
            return  # not ours (the control channel, a resubscribe on reopening)
        future = pending.popleft()
        if not pending:
            del self._confirm[name]
        if self._joinable.get(name) is future:
            del self._joinable[name]
        if not future.done():
            future.set_result(None)

    async def _run_forever(self) -> None:
        backoff = BACKOFF_MIN_S
        connected_before = False
        while not self._closing:
            try:
                await self._open()
                self.ready = True
                if connected_before:
                    self.reconnects += 1
                    log.warning("redis pub/sub %s reconnected; checking positions", self.label)
                    self._on_reconnected()
                elif self._takes_over:
                    log.info("redis pub/sub %s took over slots; checking positions", self.label)
                    self._on_reconnected()
                else:
                    log.info("redis pub/sub %s connected", self.label)
                connected_before = True
                backoff = BACKOFF_MIN_S
                await self._serve()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.ready or not connected_before:
                    log.warning("redis pub/sub %s unavailable: %s", self.label, exc)
                self._lost()
            # Full jitter: instances do not reconnect in lockstep.
            await asyncio.sleep(random.uniform(BACKOFF_MIN_S, backoff))
            backoff = min(BACKOFF_MAX_S, backoff * 2)
        self._lost()

    def _lost(self) -> None:
        self.ready = False
        confirm, self._confirm = self._confirm, {}
        self._joinable = {}
        for pending in confirm.values():
            for future in pending:
                if not future.done():
                    future.set_exception(BrokerUnavailable("redis pub/sub connection lost"))
                    future.exception()  # retrieved: a waiter may have timed out
        if self._on_lost is not None and not self._closing:
            self._on_lost()

    # --- for subclasses --------------------------------------------------------------

    def _connected(self) -> bool:
        raise NotImplementedError

    def _send_subscribe(self, subscribe: bool, name: str) -> None:
        raise NotImplementedError

    async def _open(self) -> None:
        """Connect and subscribe to the control channel and ``wanted()``."""
        raise NotImplementedError

    async def _serve(self) -> None:
        """Deliver messages until the connection fails (then raise)."""
        raise NotImplementedError


class PubSubShard(_Shard):
    """A shard over redis-py's pub/sub (Redis Cluster: sharded pub/sub)."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        label: str,
        sharded: bool,
        control: str | None,
        wanted: Callable[[], list[str]],
        on_message: Callable[[str, bytes], None],
        on_reconnected: Callable[[], None],
        on_lost: Callable[[], None] | None = None,
        on_dropped: Callable[[str], None] | None = None,
        takes_over: bool = False,
    ) -> None:
        super().__init__(
            label=label,
            control=control,
            wanted=wanted,
            on_message=on_message,
            on_reconnected=on_reconnected,
            on_lost=on_lost,
            takes_over=takes_over,
        )
        self._client = client
        # Sharded pub/sub (SSUBSCRIBE) for channels; classic for control.
        self._sharded = sharded
        self._on_dropped = on_dropped
        self._pubsub: PubSub | None = None
        self._ops: list[tuple[bool, str]] = []
        self._ops_scheduled = False
        # The connection's sender: it sends the queued groups of
        # (un)subscribes one after the other, in the order they were queued
        # (a task per flush could let a later SUBSCRIBE overtake an earlier
        # UNSUBSCRIBE of the name whose send suspended).
        self._groups: asyncio.Queue[tuple[bool, list[str]]] = asyncio.Queue()
        self._sender: asyncio.Task[None] | None = None
        self._pings = 0
        # SUNSUBSCRIBEs sent and not yet confirmed, by name: a sunsubscribe
        # that matches none is Redis's own (the channel's slot moved away).
        self._unsubscribing: dict[str, int] = {}

    async def close(self) -> None:
        await self._stop_task()
        await self._close_pubsub()
        with contextlib.suppress(Exception):
            await self._client.aclose()

    async def _close_pubsub(self) -> None:
        self._stop_sender()
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = None

    def _stop_sender(self) -> None:
        """End the connection's sender and drop what it had still to send
        (a new connection subscribes to ``wanted()``)."""
        if self._sender is not None:
            self._sender.cancel()
            self._sender = None
        self._groups = asyncio.Queue()
        self._ops.clear()

    def _lost(self) -> None:
        self._stop_sender()
        super()._lost()

    def _connected(self) -> bool:
        return self._pubsub is not None

    def _send_subscribe(self, subscribe: bool, name: str) -> None:
        self._ops.append((subscribe, name))
        if not subscribe:
            self._unsubscribing[name] = self._unsubscribing.get(name, 0) + 1
        if not self._ops_scheduled:
            self._ops_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_ops)

    def _flush_ops(self) -> None:
        """Send queued (un)subscribes in order, consecutive ones of a kind
        in one command."""
        self._ops_scheduled = False
        ops, self._ops = self._ops, []
        groups: list[tuple[bool, list[str]]] = []
        for subscribe, name in ops:
            if groups and groups[-1][0] == subscribe:
                groups[-1][1].append(name)
            else:
                groups.append((subscribe, [name]))
        if self._sender is not None:
            for group in groups:
                self._groups.put_nowait(group)

    def _batches(self, names: list[str]) -> list[list[str]]:
        """``names`` in (un)subscribe commands of at most SUBSCRIBE_BATCH; for
        sharded pub/sub one slot per command, as Redis Cluster requires
        (CROSSSLOT otherwise)."""
        return in_batches(names, SUBSCRIBE_BATCH, cluster_slot if self._sharded else None)

    async def _send_forever(
        self, pubsub: PubSub, groups: asyncio.Queue[tuple[bool, list[str]]]
    ) -> None:
        """Send the connection's queued groups of (un)subscribes, in order,
        until the connection ends (then the task is cancelled)."""
        while True:
            subscribe, names = await groups.get()
            try:
                for chunk in self._batches(names):
                    if subscribe:
                        await self._subscribe_names(pubsub, chunk)
                    elif self._sharded:
                        await pubsub.sunsubscribe(*chunk)
                    else:
                        await pubsub.unsubscribe(*chunk)
            except Exception as exc:
                # The reader notices a broken connection and resubscribes all.
                log.warning("redis (un)subscribe failed on %s: %s", self.label, exc)

    async def _subscribe_names(self, pubsub: PubSub, names: list[str]) -> None:
        if self._sharded:
            await pubsub.ssubscribe(*names)
        else:
            await pubsub.subscribe(*names)

    def take_control(self, name: str) -> None:
        """Carry the control channel from now on (the shard that did is gone)."""
        self._control = name
        if self._pubsub is not None and self.ready:
            pubsub = self._pubsub
            asyncio.get_running_loop().create_task(self._subscribe_control(pubsub, name))

    async def _subscribe_control(self, pubsub: PubSub, name: str) -> None:
        try:
            await pubsub.subscribe(name)
        except Exception as exc:
            # The reader notices a broken connection and subscribes it on reopening.
            log.warning("redis control subscribe failed on %s: %s", self.label, exc)

    async def _open(self) -> None:
        await self._close_pubsub()
        self._unsubscribing.clear()
        pubsub = self._pubsub = self._client.pubsub()
        if self._control is not None:
            await pubsub.subscribe(self._control)
        for chunk in self._batches(self._wanted()):
            await self._subscribe_names(pubsub, chunk)
        # Redis answers in order: once the PONG is here, every SUBSCRIBE took
        # effect, before the shard is ready and positions are checked.
        await self._ping(pubsub)
        self._sender = asyncio.get_running_loop().create_task(
            self._send_forever(pubsub, self._groups), name=f"redis-pubsub-send-{self.label}"
        )

    async def _serve(self) -> None:
        """Deliver messages; raise once the connection fails, or a PING after
        HEALTH_CHECK_S without a message does not come back (redis-py's own
        health check sends PINGs but never misses their PONGs)."""
        pubsub = self._pubsub
        assert pubsub is not None
        while True:
            message = await pubsub.get_message(timeout=HEALTH_CHECK_S)
            if message is None:
                await self._ping(pubsub)
            else:
                self._handle(message)

    async def _ping(self, pubsub: PubSub) -> None:
        """PING and handle what comes until its PONG; BrokerUnavailable if
        nothing comes for PING_TIMEOUT_S (while messages keep coming the
        connection lives: an open reads a confirmation per channel first)."""
        self._pings += 1
        payload = f"{PING_PAYLOAD}-{self._pings}"
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(PING_TIMEOUT_S) as deadline:
                await pubsub.ping(payload)
                while True:
                    message = await pubsub.get_message(timeout=PING_TIMEOUT_S)
                    if message is None:
                        continue  # redis-py's own health check PONG
                    if self._handle(message) == payload:
                        return
                    deadline.reschedule(loop.time() + PING_TIMEOUT_S)
        except TimeoutError:
            raise BrokerUnavailable(
                f"redis pub/sub {self.label}: no answer to a PING within {PING_TIMEOUT_S}s"
            ) from None

    def _handle(self, message: dict[str, Any]) -> str | None:
        """Deliver a message or take a confirmation; a PONG's payload."""
        kind = message["type"]
        if kind == "pong":
            data = message["data"]
            return data.decode() if isinstance(data, bytes) else str(data)
        raw_name = message["channel"]
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        if kind in ("message", "smessage"):
            self._on_message(name, message["data"])
        elif kind in ("subscribe", "ssubscribe"):
            self._confirmed(name)
        elif kind == "sunsubscribe":
            self._unsubscribed(name)
        return None

    def _unsubscribed(self, name: str) -> None:
        pending = self._unsubscribing.get(name, 0)
        if pending > 1:
            self._unsubscribing[name] = pending - 1
        elif pending == 1:
            del self._unsubscribing[name]
        elif self._on_dropped is not None:
            self._on_dropped(name)


class RespPubSubShard(_Shard):
    """A shard on a standalone Redis over :class:`RespPubSub`: messages are
    handed over from ``data_received``, with no reader task polling and no
    parsing in redis-py."""

    def __init__(
        self,
        address: RedisAddress,
        *,
        label: str,
        control: str | None,
        wanted: Callable[[], list[str]],
        on_message: Callable[[str, bytes], None],
        on_reconnected: Callable[[], None],
    ) -> None:
        super().__init__(
            label=label,
            control=control,
            wanted=wanted,
            on_message=on_message,
            on_reconnected=on_reconnected,
        )
        self._address = address
        self._ssl_context = address.ssl_context()
        self._ps: RespPubSub | None = None

    async def close(self) -> None:
        await self._stop_task()
        if self._ps is not None:
            self._ps.close()

    def _connected(self) -> bool:
        return self._ps is not None

    def _send_subscribe(self, subscribe: bool, name: str) -> None:
        assert self._ps is not None
        # Batched per loop iteration by RespPubSub.
        if subscribe:
            self._ps.subscribe(name)
        else:
            self._ps.unsubscribe(name)

    def _message(self, channel: bytes, data: bytes) -> None:
        self._on_message(channel.decode(), data)

    async def _open(self) -> None:
        if self._ps is not None:
            self._ps.close()
        ps = self._ps = RespPubSub(
            self._address,
            on_message=self._message,
            on_subscribed=lambda channel: self._confirmed(channel.decode()),
        )
        await ps.connect(ssl_context=self._ssl_context)
        names = self._wanted()
        if self._control is not None:
            names.insert(0, self._control)
        if names:
            ps.subscribe(*names)
        # The PONG comes after every confirmation (or the connection drops).
        await ps.ping(PING_TIMEOUT_S)

    async def _serve(self) -> None:
        """Raise once the connection is lost or a PING after HEALTH_CHECK_S
        of waiting does not come back."""
        ps = self._ps
        assert ps is not None
        while True:
            try:
                await asyncio.wait_for(ps.wait_closed(), HEALTH_CHECK_S)
            except TimeoutError:
                await ps.ping(PING_TIMEOUT_S)
                continue
            raise BrokerUnavailable(f"redis pub/sub connection lost: {ps.lost_reason!r}")


def cluster_slot(key: str) -> int:
    """The Redis Cluster hash slot of ``key`` (its hash tag decides)."""
    return int(key_slot(key.encode()))
