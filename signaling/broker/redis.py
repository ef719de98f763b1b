"""The Redis broker: many instances behave as one server.

* **Fan-out.** A node subscribes to a channel's Redis pub/sub channel only
  while it has local subscribers (the hub's first and last), over one pub/sub
  connection, with SUBSCRIBE/UNSUBSCRIBE batched per loop iteration. A
  publication crosses instances as one message carrying its offset and epoch
  and its body already encoded, so each instance only splices bytes.
* **History.** Each channel's publications live in a Redis Stream bounded in
  length (MAXLEN) and age (expiry), with an offset counter and an epoch in a
  meta hash. Appending and publishing happen in one Lua script; the publish is
  acknowledged only after the script returned.
* **Presence** in a hash + sorted set of expiry times per channel, refreshed
  by its nodes, so the entries of a crashed instance age out.
* **Failures.** Commands fail with BrokerUnavailable while Redis is down. The
  pub/sub reader reconnects with jittered backoff, resubscribes to the hub's
  channels (not a copy of its own) and tells the node, which checks every
  channel's position and makes clients with a possible gap recover.

Pub/sub is at-most-once; gaps are found by offsets (inline, and by the node's
periodic position check) and closed from the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import orjson
from redis.asyncio.client import PubSub
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from signaling.broker.base import (
    BrokerHandler,
    BrokerUnavailable,
    HistoryOptions,
    HistoryPage,
    UnrecoverablePosition,
)
from signaling.broker.memory import new_epoch
from signaling.broker.redis_exec import AutoPipeline, RedisClient, connect_client
from signaling.broker.redis_scripts import (
    HISTORY,
    POSITIONS,
    PRESENCE_ADD,
    PRESENCE_GET,
    PRESENCE_REMOVE,
    PUBLISH,
)
from signaling.protocol import ClientInfo, Publication, StreamPosition, publication_body

__all__ = ["RedisBroker"]

log = logging.getLogger("signaling.redis")

# The epoch and offset counter outlive the stream itself (as in centrifuge),
# so a client returning after its history expired learns it cannot recover.
META_TTL_S = 30 * 86400
SUBSCRIBE_TIMEOUT_S = 5.0
# Channels per SUBSCRIBE command when resubscribing (centrifuge uses 512).
SUBSCRIBE_BATCH = 512
BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 5.0


class RedisBroker:
    """:class:`~signaling.broker.base.Broker` and
    :class:`~signaling.broker.base.PresenceStore` on Redis."""

    def __init__(
        self,
        url: str,
        *,
        cluster: bool = False,
        pool_size: int = 16,
        prefix: str = "sig:",
    ) -> None:
        self.client: RedisClient = connect_client(url, cluster=cluster, pool_size=pool_size)
        self.executor = AutoPipeline(self.client)
        self.prefix = prefix
        self._cluster = cluster
        self._publish_cmd = "SPUBLISH" if cluster else "PUBLISH"
        self._control_name = f"{prefix}control"
        self._handler: BrokerHandler | None = None
        self._pubsub: PubSub | None = None
        self._ready = False
        self._closing = False
        self._reader: asyncio.Task[None] | None = None
        # Pending subscribe confirmations, by pub/sub channel name.
        self._confirm: dict[str, asyncio.Future[None]] = {}
        # Ordered (subscribe?, name) operations to send on the next flush.
        self._ops: list[tuple[bool, str]] = []
        self._ops_scheduled = False
        self.reconnects = 0

    # --- names ------------------------------------------------------------------

    def _ps_name(self, channel: str) -> str:
        # The hash tag puts the pub/sub shard channel in the stream's slot.
        return f"{self.prefix}ch:{{{channel}}}"

    def _channel_of(self, name: str) -> str | None:
        head = f"{self.prefix}ch:{{"
        if name.startswith(head) and name.endswith("}"):
            return name[len(head) : -1]
        return None

    def _stream_keys(self, channel: str) -> tuple[str, str]:
        return f"{self.prefix}stream:{{{channel}}}", f"{self.prefix}meta:{{{channel}}}"

    def _presence_keys(self, channel: str) -> tuple[str, str]:
        return f"{self.prefix}presence:{{{channel}}}", f"{self.prefix}presence-exp:{{{channel}}}"

    # --- lifecycle ----------------------------------------------------------------

    def bind(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def start(self) -> None:
        """Start the pub/sub reader; returns at once even if Redis is down
        (``is_ready`` tells, and the reader keeps retrying)."""
        self._reader = asyncio.create_task(self._read_forever(), name="redis-pubsub")
        # Give a reachable Redis a moment so that a healthy start is ready.
        for _ in range(40):
            if self._ready:
                break
            await asyncio.sleep(0.05)

    def is_ready(self) -> bool:
        return self._ready

    async def close(self) -> None:
        self._closing = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        await self.executor.close()

    # --- pub/sub ------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        if not self._ready or self._pubsub is None:
            raise BrokerUnavailable("redis pub/sub unavailable")
        name = self._ps_name(channel)
        future = self._confirm.get(name)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._confirm[name] = future
            self._queue_op(True, name)
        try:
            await asyncio.wait_for(asyncio.shield(future), SUBSCRIBE_TIMEOUT_S)
        except TimeoutError:
            self._confirm.pop(name, None)
            raise BrokerUnavailable("redis subscribe not confirmed") from None

    async def unsubscribe(self, channel: str) -> None:
        if self._pubsub is not None and self._ready:
            self._queue_op(False, self._ps_name(channel))

    def _queue_op(self, subscribe: bool, name: str) -> None:
        self._ops.append((subscribe, name))
        if not self._ops_scheduled:
            self._ops_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_ops)

    def _flush_ops(self) -> None:
        """Send queued (un)subscribes, consecutive ones of a kind together."""
        self._ops_scheduled = False
        ops, self._ops = self._ops, []
        groups: list[tuple[bool, list[str]]] = []
        for subscribe, name in ops:
            if groups and groups[-1][0] == subscribe:
                groups[-1][1].append(name)
            else:
                groups.append((subscribe, [name]))
        if groups:
            asyncio.get_running_loop().create_task(self._send_ops(groups))

    async def _send_ops(self, groups: list[tuple[bool, list[str]]]) -> None:
        pubsub = self._pubsub
        if pubsub is None:
            return
        try:
            for subscribe, names in groups:
                for start in range(0, len(names), SUBSCRIBE_BATCH):
                    chunk = names[start : start + SUBSCRIBE_BATCH]
                    if subscribe:
                        await self._ps_subscribe(pubsub, chunk)
                    else:
                        await self._ps_unsubscribe(pubsub, chunk)
        except (RedisError, OSError) as exc:
            # The reader notices the broken connection and resubscribes all.
            log.warning("redis (un)subscribe failed: %s", exc)

    async def _ps_subscribe(self, pubsub: PubSub, names: list[str]) -> None:
        if self._cluster:
            await pubsub.ssubscribe(*names)
        else:
            await pubsub.subscribe(*names)

    async def _ps_unsubscribe(self, pubsub: PubSub, names: list[str]) -> None:
        if self._cluster:
            await pubsub.sunsubscribe(*names)
        else:
            await pubsub.unsubscribe(*names)

    async def _read_forever(self) -> None:
        backoff = BACKOFF_MIN_S
        first = True
        while not self._closing:
            try:
                await self._open_pubsub()
                if not first:
                    self.reconnects += 1
                    log.warning("redis pub/sub reconnected; checking channel positions")
                    self._require_handler().on_broker_reconnected()
                else:
                    log.info("redis pub/sub connected")
                first = False
                backoff = BACKOFF_MIN_S
                await self._read_messages()
            except asyncio.CancelledError:
                raise
            except (RedisConnectionError, RedisTimeoutError, OSError, RedisError) as exc:
                if self._ready or first:
                    log.warning("redis unavailable: %s", exc)
                self._lost()
            # Full jitter: instances do not reconnect in lockstep.
            await asyncio.sleep(random.uniform(BACKOFF_MIN_S, backoff))
            backoff = min(BACKOFF_MAX_S, backoff * 2)
        self._lost()

    async def _open_pubsub(self) -> None:
        if self._pubsub is not None:
            with contextlib.suppress(Exception):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        self._pubsub = self.client.pubsub()
        pubsub = self._pubsub
        # The control channel is classic pub/sub even in a cluster: every
        # node must see it.
        await pubsub.subscribe(self._control_name)
        names = [self._ps_name(c) for c in self._require_handler().channels()]
        for start in range(0, len(names), SUBSCRIBE_BATCH):
            chunk = names[start : start + SUBSCRIBE_BATCH]
            await self._ps_subscribe(pubsub, chunk)
        self._ready = True

    def _lost(self) -> None:
        self._ready = False
        confirm, self._confirm = self._confirm, {}
        for future in confirm.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("redis pub/sub connection lost"))
                future.exception()  # retrieved: nobody may be waiting any more

    async def _read_messages(self) -> None:
        pubsub = self._pubsub
        assert pubsub is not None
        handler = self._require_handler()
        while True:
            message = await pubsub.get_message(timeout=1.0)
            if message is None:
                continue
            kind = message["type"]
            name = _text(message["channel"])
            if kind in ("message", "smessage"):
                if name == self._control_name:
                    handler.on_control(message["data"])
                    continue
                channel = self._channel_of(name)
                if channel is not None:
                    self._dispatch(handler, channel, message["data"])
            elif kind in ("subscribe", "ssubscribe"):
                future = self._confirm.pop(name, None)
                if future is not None and not future.done():
                    future.set_result(None)

    def _dispatch(self, handler: BrokerHandler, channel: str, data: bytes) -> None:
        kind = data[:1]
        try:
            if kind == b"p":
                offset_text, epoch_text, body = data[1:].split(b":", 2)
                pub = Publication(b"", None, int(offset_text), body=body)
                handler.on_publication(channel, pub, epoch_text.decode())
            elif kind == b"j":
                handler.on_join(channel, _decode_info(data[1:]))
            elif kind == b"l":
                handler.on_leave(channel, _decode_info(data[1:]))
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError):
            log.warning("ignored a malformed message on %s", channel)

    # --- publishing ---------------------------------------------------------------

    async def publish(
        self, channel: str, pub: Publication, history: HistoryOptions
    ) -> StreamPosition:
        body = publication_body(pub)
        if not history.enabled:
            await self._execute(self._publish_cmd, self._ps_name(channel), b"p0::" + body)
            return StreamPosition(0, "")
        stream, meta = self._stream_keys(channel)
        offset, epoch = await self._script(
            PUBLISH,
            [stream, meta],
            [
                body,
                history.size,
                int(history.ttl_s * 1000),
                self._ps_name(channel),
                META_TTL_S * 1000,
                new_epoch(),
                self._publish_cmd,
            ],
        )
        return StreamPosition(int(offset), _text(epoch))

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        await self._execute(self._publish_cmd, self._ps_name(channel), b"j" + _encode_info(info))

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        await self._execute(self._publish_cmd, self._ps_name(channel), b"l" + _encode_info(info))

    async def publish_control(self, message: bytes) -> None:
        await self._execute("PUBLISH", self._control_name, message)

    # --- history --------------------------------------------------------------------

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
        stream, meta = self._stream_keys(channel)
        top, epoch_raw, entries = await self._script(
            HISTORY,
            [stream, meta],
            [
                new_epoch(),
                META_TTL_S * 1000,
                "" if since is None else str(since.offset),
                -1 if limit < 0 else limit,
                "1" if reverse else "0",
            ],
        )
        epoch = _text(epoch_raw)
        if since is not None and since.epoch != epoch:
            raise UnrecoverablePosition(channel)
        pubs = [
            Publication(b"", None, int(_text(entry_id).split("-", 1)[0]), body=_field(fields, b"d"))
            for entry_id, fields in entries
        ]
        return HistoryPage(pubs, StreamPosition(int(top), epoch))

    async def positions(self, channels: Sequence[str]) -> dict[str, StreamPosition]:
        """Stream tops of ``channels`` (one pipelined round trip); channels
        without a stream are left out."""
        metas = [self._stream_keys(c)[1] for c in channels]
        results = await asyncio.gather(*(self._script(POSITIONS, [m], []) for m in metas))
        out: dict[str, StreamPosition] = {}
        for channel, (offset, epoch) in zip(channels, results, strict=True):
            if epoch is not None:
                out[channel] = StreamPosition(int(offset or 0), _text(epoch))
        return out

    # --- presence ---------------------------------------------------------------------

    async def add_presence(self, channel: str, info: ClientInfo, ttl_s: float) -> None:
        keys = list(self._presence_keys(channel))
        args = [info.client, _encode_info(info), f"{time.time() + ttl_s:.3f}", int(ttl_s * 1000)]
        await self._script(PRESENCE_ADD, keys, args)

    async def remove_presence(self, channel: str, client_id: str) -> None:
        await self._script(PRESENCE_REMOVE, list(self._presence_keys(channel)), [client_id])

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = list(self._presence_keys(channel))
        raw = await self._script(PRESENCE_GET, keys, [f"{time.time():.3f}"])
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        return {_text(client): _decode_info(info) for client, info in pairs}

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        clients = await self.presence(channel)
        return len(clients), len({info.user for info in clients.values()})

    # --- plumbing ------------------------------------------------------------------------

    async def _execute(self, *args: Any) -> Any:
        try:
            return await self.executor.execute(*args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def _script(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self.executor.run_script(script, keys, args)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        except RedisError as exc:
            # A Redis-side script error is a bug or a broken Redis: temporary
            # for the client, loud in the log.
            log.error("redis script failed: %s", exc)
            raise BrokerUnavailable(str(exc)) from exc

    def _require_handler(self) -> BrokerHandler:
        if self._handler is None:
            raise RuntimeError("broker used before bind()")
        return self._handler


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(fields: Any, name: bytes) -> bytes:
    if isinstance(fields, dict):
        value = fields.get(name, fields.get(name.decode(), b""))
    else:
        pairs = dict(zip(fields[::2], fields[1::2], strict=True))
        value = pairs.get(name, pairs.get(name.decode(), b""))
    return value if isinstance(value, bytes) else str(value).encode()


def _encode_info(info: ClientInfo) -> bytes:
    out: dict[str, Any] = {"user": info.user, "client": info.client}
    if info.conn_info is not None:
        out["conn_info"] = orjson.Fragment(info.conn_info)
    if info.chan_info is not None:
        out["chan_info"] = orjson.Fragment(info.chan_info)
    return orjson.dumps(out)


def _decode_info(raw: bytes) -> ClientInfo:
    obj = orjson.loads(raw)
    conn_info = obj.get("conn_info")
    chan_info = obj.get("chan_info")
    return ClientInfo(
        str(obj["user"]),
        str(obj["client"]),
        None if conn_info is None else orjson.dumps(conn_info),
        None if chan_info is None else orjson.dumps(chan_info),
    )
