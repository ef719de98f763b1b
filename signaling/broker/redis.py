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
* **Cluster topology.** On Redis Cluster there is a pub/sub shard per primary.
  When a slot moves (Redis unsubscribes its channels on the old primary) or a
  shard loses its node (a failover), the broker re-reads the slot map, opens
  shards for new primaries, closes those of nodes that serve no slot any more,
  subscribes every channel on the primary that serves it now, and has the node
  check positions, as after a reconnect.

Pub/sub is at-most-once; gaps are found by offsets (inline, and by the node's
periodic position check) and closed from the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from signaling.broker.base import (
    META_TTL_S,
    BrokerHandler,
    BrokerUnavailable,
    Claim,
    ClaimResult,
    HistoryOptions,
    HistoryPage,
    UnrecoverablePosition,
)
from signaling.broker.memory import new_epoch
from signaling.broker.redis_exec import AutoPipeline, connect_client, node_client
from signaling.broker.redis_pubsub import PubSubShard, RespPubSubShard, cluster_slot
from signaling.broker.redis_scripts import (
    HISTORY,
    POSITIONS,
    PRESENCE_ADD,
    PRESENCE_GET,
    PRESENCE_REMOVE,
    PRESENCE_STATS,
    PUBLISH,
    PUBLISH_CLAIMED,
)
from signaling.broker.resp import RespClient, parse_redis_url
from signaling.logs import Throttle
from signaling.protocol import (
    ClientInfo,
    Publication,
    StreamPosition,
    decode_client_info,
    encode_client_info,
    publication_body,
)
from signaling.state.redis import (
    SCRIPT_ITEMS_MAX,
    RedisArg,
    RedisStateStore,
    SlotOf,
    run_script_many,
    run_script_per_item,
    ttl_ms,
)

__all__ = ["RedisBroker", "StoreExecutor"]

log = logging.getLogger("signaling.redis")
_store_errors_log = Throttle(log)

# Channels per batch of position checks: bounds one write and its replies.
POSITIONS_BATCH = 1000
# Client ids per presence removal script call (well under Lua's unpack limit).
_REMOVE_AT_ONCE = 500
# Cluster: how often the slot map is re-read while a shard is down (a failover
# promotes a replica after the cluster's node timeout).
TOPOLOGY_RETRY_S = 1.0


# What a command can fail with: the connection (OSError, and redis-py's
# ConnectionError and TimeoutError, which are RedisErrors) or an error reply.
_FAILURES = (OSError, RedisError)


class StoreExecutor:
    """The broker's executor as the state store sees it: any error Redis answers
    (OOM, MISCONF, READONLY, TRYAGAIN, CLUSTERDOWN, BUSY, or a script's or
    command's error) raises :class:`BrokerUnavailable`, as the broker's own
    commands do. Callers handle that one failure, and clients get the temporary
    error 100 and retry, instead of a disconnect per typing indicator while
    Redis refuses writes."""

    __slots__ = ("_executor",)

    def __init__(self, executor: AutoPipeline | RespClient) -> None:
        self._executor = executor

    async def execute(self, *args: RedisArg) -> Any:
        try:
            return await self._executor.execute(*args)
        except NoScriptError:
            raise  # the store's batched scripts load themselves on it (run_script_many)
        except _FAILURES as exc:
            raise _store_unavailable(exc) from exc

    async def run_script(self, script: Any, keys: Sequence[str], args: Sequence[RedisArg]) -> Any:
        try:
            return await self._executor.run_script(script, keys, args)
        except _FAILURES as exc:
            raise _store_unavailable(exc) from exc

    async def execute_many(self, commands: Sequence[Sequence[RedisArg]]) -> list[Any]:
        try:
            results = await self._executor.execute_many(commands)
        except _FAILURES as exc:
            raise _store_unavailable(exc) from exc
        return [_unavailable_result(r) for r in results]


def _unavailable_result(result: Any) -> Any:
    """One result of a batch: an error as BrokerUnavailable, except NOSCRIPT,
    which run_script_many answers by loading the script."""
    if isinstance(result, NoScriptError) or not isinstance(result, _FAILURES):
        return result
    return _store_unavailable(result)


def _store_unavailable(exc: BaseException) -> BrokerUnavailable:
    if not isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
        # An error reply: Redis refusing writes, or a bug of ours (WRONGTYPE).
        # Throttled: while Redis refuses writes, every command gets one.
        _store_errors_log.log(logging.ERROR, "redis state command failed: %s", exc)
    return BrokerUnavailable(str(exc))


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
        # Standalone Redis: the lean RESP client for commands and pub/sub
        # (signaling.broker.resp); Redis Cluster: redis-py (slots, MOVED/ASK).
        self.client: RedisCluster | None = None
        self.executor: AutoPipeline | RespClient
        if cluster:
            client = connect_client(url, cluster=True, pool_size=pool_size)
            assert isinstance(client, RedisCluster)
            self.client = client
            self.executor = AutoPipeline(client)
        else:
            self.executor = RespClient(url)
        self.prefix = prefix
        self._cluster = cluster
        self._slot_of: SlotOf | None = cluster_slot if cluster else None
        self._publish_cmd = "SPUBLISH" if cluster else "PUBLISH"
        self._control_name = f"{prefix}control"
        self._ps_head = f"{prefix}ch:{{"
        self._handler: BrokerHandler | None = None
        self._url = url
        self._shards: dict[str, PubSubShard | RespPubSubShard] = {}
        self._setup: asyncio.Task[None] | None = None
        self._closing = False
        # Cluster: the shard that carries the control channel, and whether
        # the slot map needs re-reading (a slot moved, a shard lost its node).
        self._control_shard: PubSubShard | None = None
        self._topology_suspect = asyncio.Event()
        self._slot_moved = False

    def state_store(self) -> RedisStateStore:
        """The state store on this broker's Redis and key prefix: the one
        whose keys :meth:`publish_claimed` takes."""
        return RedisStateStore(
            StoreExecutor(self.executor), prefix=self.prefix, slot_of=self._slot_of
        )

    # --- names ------------------------------------------------------------------

    def _ps_name(self, channel: str) -> str:
        # The hash tag puts the pub/sub shard channel in the stream's slot.
        return f"{self._ps_head}{channel}}}"

    def _channel_of(self, name: str) -> str | None:
        # Every pub/sub message asks: the head is built once (__init__).
        head = self._ps_head
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
        """Start the pub/sub readers; returns even if Redis is down
        (``is_ready`` tells, and the readers keep retrying)."""
        if self._cluster:
            self._setup = asyncio.create_task(self._discover_forever(), name="redis-cluster")
        else:
            self._add_resp_shard()
        # Give a reachable Redis a moment so that a healthy start is ready.
        for _ in range(60):
            if self.is_ready():
                break
            await asyncio.sleep(0.05)

    async def _discover_forever(self) -> None:
        """Cluster: learn the primaries, then run one pub/sub shard on each."""
        assert isinstance(self.client, RedisCluster)
        delay = 0.1
        while not self._closing:
            try:
                await self.client.initialize()
                primaries = self.client.get_primaries()
                break
            except Exception as exc:
                log.warning("redis cluster unavailable: %s", exc)
                await asyncio.sleep(random.uniform(0.05, delay))
                delay = min(5.0, delay * 2)
        else:
            return
        for index, node in enumerate(primaries):
            client = node_client(self._url, node.host, int(node.port))
            self._add_shard(node.name, client, control=index == 0)
        await self._follow_topology()

    def _add_shard(
        self, label: str, client: aioredis.Redis, *, control: bool, takes_over: bool = False
    ) -> None:
        def wanted() -> list[str]:
            names = (self._ps_name(c) for c in self._require_handler().channels())
            return [n for n in names if self._shard_for(n) is shard]

        shard = PubSubShard(
            client,
            label=label,
            sharded=self._cluster,
            control=self._control_name if control else None,
            wanted=wanted,
            on_message=self._on_message,
            on_reconnected=self._on_reconnected,
            on_lost=self._topology_suspect.set,
            on_dropped=self._on_dropped,
            takes_over=takes_over,
        )
        if control:
            self._control_shard = shard
        self._shards[label] = shard
        shard.start()

    def _on_dropped(self, name: str) -> None:
        """Redis unsubscribed this node from ``name`` by itself: the channel's
        slot moved to another primary."""
        channel = self._channel_of(name)
        if channel is None or self._closing or not self._require_handler().has_channel(channel):
            return
        log.debug("redis cluster: %s moved away from its primary", name)
        self._slot_moved = True
        self._topology_suspect.set()

    async def _follow_topology(self) -> None:
        """Cluster: re-read the slot map whenever a shard reports a moved slot
        or a lost node; while a shard is down, every TOPOLOGY_RETRY_S (until a
        replica takes over its slots, or the node comes back)."""
        failing = False
        while not self._closing:
            timeout = None if self.is_ready() else TOPOLOGY_RETRY_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._topology_suspect.wait(), timeout)
            self._topology_suspect.clear()
            try:
                await self._follow_slots()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Once per outage at WARNING, not every retry.
                level = logging.DEBUG if failing else logging.WARNING
                log.log(level, "redis cluster: re-reading the slot map failed: %s", exc)
                failing = True
                await asyncio.sleep(TOPOLOGY_RETRY_S)
            else:
                if failing:
                    log.info("redis cluster: slot map read again")
                failing = False

    async def _follow_slots(self) -> None:
        assert isinstance(self.client, RedisCluster)
        await self.client.nodes_manager.initialize()
        primaries = {node.name: node for node in self.client.get_primaries()}
        changed = False
        for label in [label for label in self._shards if label not in primaries]:
            log.info("redis cluster: %s serves no slot now; its channels move", label)
            await self._shards.pop(label).close()
            changed = True
        for label, node in primaries.items():
            if label not in self._shards:
                log.info("redis cluster: new primary %s", label)
                client = node_client(self._url, node.host, int(node.port))
                self._add_shard(label, client, control=False, takes_over=True)
                changed = True
        control = self._control_shard
        if control is None or control not in self._shards.values():
            # Its node is gone: the next shard carries control (bans, remote
            # unsubscribes) from now on.
            shard = next(iter(self._shards.values()), None)
            if isinstance(shard, PubSubShard):
                shard.take_control(self._control_name)
                self._control_shard = shard
        moved, self._slot_moved = self._slot_moved, False
        if changed or moved:
            await self._resubscribe_everywhere()

    async def _resubscribe_everywhere(self) -> None:
        """Every channel this node needs, on the shard that serves it now (an
        SSUBSCRIBE of a channel already subscribed only confirms it); then the
        node checks positions: what was published while a channel had no
        subscription here is in its stream."""
        waits = []
        for channel in self._require_handler().channels():
            name = self._ps_name(channel)
            shard = self._shard_for(name)
            if shard is not None and shard.ready:
                waits.append(shard.subscribe(name))
        results = await asyncio.gather(*waits, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        log.info("redis cluster: slot map changed; %d channels resubscribed", len(waits))
        if failed:
            log.warning("redis cluster: %d resubscribes failed (%s)", len(failed), failed[0])
            self._slot_moved = True  # try again with the next slot map
            self._topology_suspect.set()
        self._on_reconnected()

    def _add_resp_shard(self) -> None:
        def wanted() -> list[str]:
            return [self._ps_name(c) for c in self._require_handler().channels()]

        shard = RespPubSubShard(
            parse_redis_url(self._url),
            label="redis",
            control=self._control_name,
            wanted=wanted,
            on_message=self._on_message,
            on_reconnected=self._on_reconnected,
        )
        self._shards["redis"] = shard
        shard.start()

    def _on_reconnected(self) -> None:
        # The command connection needs no help: RespClient (standalone) sees
        # its connection closed and the next command reconnects; redis-py's
        # cluster client handles its own.
        self._require_handler().on_broker_reconnected()

    def _shard_for(self, name: str) -> PubSubShard | RespPubSubShard | None:
        if not self._cluster:
            return self._shards.get("redis")
        assert isinstance(self.client, RedisCluster)
        try:
            node = self.client.get_node_from_key(name)
        except Exception:
            return None
        return None if node is None else self._shards.get(node.name)

    def is_ready(self) -> bool:
        return bool(self._shards) and all(s.ready for s in self._shards.values())

    @property
    def reconnects(self) -> int:
        return sum(s.reconnects for s in self._shards.values())

    async def close(self) -> None:
        self._closing = True
        if self._setup is not None:
            self._setup.cancel()
        for shard in self._shards.values():
            if shard is not self._shards.get("redis"):
                await shard.close()
        standalone = self._shards.get("redis")
        if standalone is not None:
            await standalone.close()
        await self.executor.close()

    # --- pub/sub ------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        name = self._ps_name(channel)
        shard = self._shard_for(name)
        if shard is None:
            raise BrokerUnavailable("redis pub/sub unavailable")
        await shard.subscribe(name)

    async def unsubscribe(self, channel: str) -> None:
        name = self._ps_name(channel)
        shard = self._shard_for(name)
        if shard is not None:
            shard.unsubscribe(name)

    def _on_message(self, name: str, data: bytes) -> None:
        handler = self._require_handler()
        if name == self._control_name:
            handler.on_control(data)
            return
        channel = self._channel_of(name)
        if channel is not None:
            self._dispatch(handler, channel, data)

    def _dispatch(self, handler: BrokerHandler, channel: str, data: bytes) -> None:
        kind = data[:1]
        try:
            if kind == b"p":
                offset_text, epoch_text, body = data[1:].split(b":", 2)
                pub = Publication(b"", None, int(offset_text), body=body)
                handler.on_publication(channel, pub, epoch_text.decode())
            elif kind == b"j":
                handler.on_join(channel, decode_client_info(data[1:]))
            elif kind == b"l":
                handler.on_leave(channel, decode_client_info(data[1:]))
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
        offset, epoch = await self._script(
            PUBLISH, list(self._stream_keys(channel)), self._publish_args(channel, body, history)
        )
        return StreamPosition(int(offset), _text(epoch))

    def _publish_args(self, channel: str, body: bytes, history: HistoryOptions) -> list[RedisArg]:
        """ARGV of the PUBLISH script (PUBLISH_CLAIMED's first ones)."""
        return [
            body,
            history.size,
            ttl_ms(history.ttl_s),
            self._ps_name(channel),
            META_TTL_S * 1000,
            new_epoch(),
            self._publish_cmd,
        ]

    async def publish_claimed(
        self, channel: str, pub: Publication, history: HistoryOptions, claim: Claim
    ) -> ClaimResult:
        """Take ``claim`` (keys of :meth:`state_store`) and publish, in one
        script and one round trip: see :meth:`signaling.node.Node.publish_claimed`.
        Channels with history only (the script joins the stream's)."""
        if not history.enabled:
            raise ValueError("publish_claimed needs a channel with history")
        prefix = self.prefix
        keys = [*self._stream_keys(channel), prefix + claim.key]
        keys += [prefix + key for key in claim.guards]
        args = self._publish_args(channel, publication_body(pub), history)
        args += [claim.value, ttl_ms(claim.ttl_s)]
        first, second = await self._script(PUBLISH_CLAIMED, keys, args)
        offset = int(first)
        if offset:
            return ClaimResult(StreamPosition(offset, _text(second)))
        guard = int(second)
        return ClaimResult(None, claim.guards[guard - 1] if guard else None)

    async def publish_join(self, channel: str, info: ClientInfo) -> None:
        await self._execute(
            self._publish_cmd, self._ps_name(channel), b"j" + encode_client_info(info)
        )

    async def publish_leave(self, channel: str, info: ClientInfo) -> None:
        await self._execute(
            self._publish_cmd, self._ps_name(channel), b"l" + encode_client_info(info)
        )

    async def publish_leaves(self, leaves: Sequence[tuple[str, ClientInfo]]) -> None:
        if not leaves:
            return
        publish = self._publish_cmd
        commands = [
            (publish, self._ps_name(channel), b"l" + encode_client_info(info))
            for channel, info in leaves
        ]
        try:
            results = await self.executor.execute_many(commands)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BrokerUnavailable(str(exc)) from exc
        for result in results:
            if isinstance(result, BrokerUnavailable):
                raise result
            if isinstance(result, Exception):
                raise BrokerUnavailable(str(result)) from result

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
        # Every channel subscribed on this node, every POSITION_CHECK_S: tens of
        # thousands with personal channels. One batch per chunk, not a task and
        # a future chain per channel (that made the idle CPU come in bursts).
        results: list[Any] = []
        for start in range(0, len(channels), POSITIONS_BATCH):
            items: list[tuple[Sequence[str], Sequence[RedisArg]]] = [
                ([self._stream_keys(c)[1]], []) for c in channels[start : start + POSITIONS_BATCH]
            ]
            results += await self._script_per_item(POSITIONS, items)
        out: dict[str, StreamPosition] = {}
        for channel, (offset, epoch) in zip(channels, results, strict=True):
            if epoch is not None:
                out[channel] = StreamPosition(int(offset or 0), _text(epoch))
        return out

    # --- presence ---------------------------------------------------------------------

    async def add_presence(self, channel: str, info: ClientInfo, ttl_s: float) -> None:
        keys = list(self._presence_keys(channel))
        args = [
            f"{time.time() + ttl_s:.3f}",
            ttl_ms(ttl_s),
            1,
            info.client,
            encode_client_info(info),
        ]
        await self._script(PRESENCE_ADD, keys, args)

    async def refresh_presence(
        self, entries: Sequence[tuple[str, ClientInfo]], ttl_s: float
    ) -> None:
        expires_at = f"{time.time() + ttl_s:.3f}"
        ttl = ttl_ms(ttl_s)
        by_channel: dict[str, list[RedisArg]] = {}
        for channel, info in entries:
            pairs = by_channel.get(channel)
            if pairs is None:
                pairs = by_channel[channel] = []
            pairs += (info.client, encode_client_info(info))
        # One script item per channel (a chunk of it if large): PRESENCE_ADD
        # writes each channel's entries with one command of each kind. A call
        # holds SCRIPT_ITEMS_MAX entries, not channels, so that no call keeps
        # Redis's one thread longer than before they were grouped (0.3 ms
        # against 0.6 ms, measured).
        items: list[tuple[Sequence[str], Sequence[RedisArg]]] = []
        counts: list[int] = []
        for channel, pairs in by_channel.items():
            keys = self._presence_keys(channel)
            for start in range(0, len(pairs), 2 * SCRIPT_ITEMS_MAX):
                chunk = pairs[start : start + 2 * SCRIPT_ITEMS_MAX]
                items.append((keys, [len(chunk) // 2, *chunk]))
                counts.append(len(chunk) // 2)
        await self._script_per_item(
            PRESENCE_ADD, items, [expires_at, ttl], item_weight=counts.__getitem__
        )

    async def remove_presence(self, channel: str, client_id: str) -> None:
        await self._script(PRESENCE_REMOVE, list(self._presence_keys(channel)), [client_id])

    async def remove_presences(self, entries: Sequence[tuple[str, str]]) -> None:
        by_channel: dict[str, list[str]] = {}
        for channel, client_id in entries:
            by_channel.setdefault(channel, []).append(client_id)
        calls: list[tuple[Sequence[str], Sequence[RedisArg]]] = [
            (list(self._presence_keys(channel)), ids[start : start + _REMOVE_AT_ONCE])
            for channel, ids in by_channel.items()
            for start in range(0, len(ids), _REMOVE_AT_ONCE)
        ]
        if calls:
            await self._script_many(PRESENCE_REMOVE, calls)

    async def presence(self, channel: str) -> dict[str, ClientInfo]:
        keys = list(self._presence_keys(channel))
        raw = await self._script(PRESENCE_GET, keys, [f"{time.time():.3f}"])
        pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
        return {_text(client): decode_client_info(info) for client, info in pairs}

    async def presence_stats(self, channel: str) -> tuple[int, int]:
        keys = list(self._presence_keys(channel))
        clients, users = await self._script(PRESENCE_STATS, keys, [f"{time.time():.3f}"])
        return int(clients), int(users)

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

    async def _script_many(
        self, script: Any, calls: Sequence[tuple[Sequence[str], Sequence[RedisArg]]]
    ) -> list[Any]:
        """``script`` once per (keys, args), in one batch."""
        try:
            return await run_script_many(self.executor, script, calls)
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisError) as exc:
            raise BrokerUnavailable(str(exc)) from exc

    async def _script_per_item(
        self,
        script: Any,
        items: Sequence[tuple[Sequence[str], Sequence[RedisArg]]],
        shared: Sequence[RedisArg] = (),
        item_weight: Callable[[int], int] | None = None,
    ) -> list[Any]:
        """``script`` over many items in few calls (grouped by slot on a
        cluster): see :func:`signaling.state.redis.run_script_per_item`."""
        try:
            return await run_script_per_item(
                self.executor,
                script,
                items,
                shared,
                slot_of=self._slot_of,
                item_weight=item_weight,
            )
        except (RedisConnectionError, RedisTimeoutError, OSError, RedisError) as exc:
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
