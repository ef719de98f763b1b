"""Redis commands with automatic pipelining.

For a small-room publish the Redis round trip through redis-py costs far more
than Redis itself (PERFORMANCE-NOTES), so every command issued during one
event-loop iteration is sent in one pipeline: callers ``await execute(...)``
as if alone, and the executor batches them on ``call_soon``. A bounded number
of pipelines run at once; commands arriving meanwhile wait for the next batch
instead of failing (redis-py's asyncio pool raises once its connection cap is
reached, which crashed naive servers under a chat burst).

Connection failures surface as :class:`~signaling.broker.base.BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from signaling.broker.base import BrokerUnavailable
from signaling.state.redis import LuaScript, RedisArg

__all__ = [
    "CLUSTER_REPLY_TIMEOUT_S",
    "AutoPipeline",
    "RedisClient",
    "connect_client",
    "node_client",
]

log = logging.getLogger("signaling.redis")

RedisClient = aioredis.Redis | RedisCluster

# Longest wait for a command's reply on the cluster client (the standalone
# RESP client has its own: resp.REPLY_TIMEOUT_S). A primary gone without a TCP
# reset (a frozen host, a network partition) would otherwise hold its commands,
# and the clients waiting on them, until TCP keepalive gives up, minutes later.
CLUSTER_REPLY_TIMEOUT_S = 10.0

# Largest batch in one pipeline; more waits for the next.
MAX_BATCH = 1000


def connect_client(url: str, *, cluster: bool, pool_size: int) -> RedisClient:
    """A redis-py asyncio client (no I/O until first use).

    The pool blocks (waits) when all connections are busy rather than
    raising. TCP keepalive is on, and a connect timeout, so that a dead Redis
    is noticed quickly; the cluster client also times out a reply after
    ``CLUSTER_REPLY_TIMEOUT_S``.
    """
    if cluster:
        # No retries here either (redis-py's cluster client retries a command
        # whose reply was lost, publishing twice); MOVED and ASK are still
        # followed, in a loop of their own. A read timeout is safe here: this
        # client sends no blocking command, and pub/sub has its own connections
        # (node_client) with their own liveness check.
        return RedisCluster.from_url(
            url,
            max_connections=pool_size,
            **_OPTIONS,
            retry=_NO_RETRY,
            socket_timeout=CLUSTER_REPLY_TIMEOUT_S,
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=pool_size, timeout=None, **_OPTIONS, retry=_NO_RETRY
    )
    # from_pool: closing the client also closes the pool's connections.
    return aioredis.Redis.from_pool(pool)


def node_client(url: str, host: str, port: int) -> aioredis.Redis:
    """A client of one cluster node (its pub/sub connection), with the
    credentials and TLS settings of ``url``."""
    kwargs: dict[str, Any] = dict(parse_url(url))
    kwargs.update(host=host, port=port)
    kwargs.pop("db", None)
    # parse_url names the connection class (TLS or not); Redis() wants a flag.
    kwargs["ssl"] = kwargs.pop("connection_class", None) is aioredis.SSLConnection
    return aioredis.Redis(**kwargs, **_OPTIONS, retry=_NO_RETRY)


# TCP keepalive; no read timeout (it would break blocking pub/sub reads) but
# a connect timeout, so that a dead Redis is noticed quickly.
_OPTIONS: dict[str, Any] = {
    "socket_keepalive": True,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 15,
}
# No silent retries: a retried publish script could publish twice, and a
# pub/sub connection silently re-established would hide lost messages.
_NO_RETRY = Retry(NoBackoff(), 0)


def _unavailable(exc: Exception) -> bool:
    """Whether an error that is not a RedisError means the cluster or the
    connection failed, rather than a command that can never work."""
    if not isinstance(exc, RedisClusterException):
        return True  # the client library's own failure under a reset
    if isinstance(exc, SlotNotCoveredError | ClusterDownError):
        return True
    # "Redis Cluster cannot be connected": raised from the connection error.
    cause = exc.__cause__
    return isinstance(cause, RedisConnectionError | RedisTimeoutError | OSError)


class AutoPipeline:
    """Implements :class:`signaling.state.redis.RedisExecutor`."""

    def __init__(self, client: RedisClient, max_in_flight: int = 4) -> None:
        self.client = client
        self._queue: deque[tuple[tuple[RedisArg, ...], asyncio.Future[Any]]] = deque()
        self._scheduled = False
        self._in_flight = 0
        self._max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()
        # Observability: batches sent and commands in them.
        self.batches = 0
        self.commands = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def execute(self, *args: RedisArg) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await future

    async def execute_many(self, commands: Sequence[Sequence[RedisArg]]) -> list[Any]:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for args in commands:
            future: asyncio.Future[Any] = loop.create_future()
            self._queue.append((tuple(args), future))
            futures.append(future)
        if futures and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[RedisArg]
    ) -> Any:
        try:
            return await self.execute("EVALSHA", script.sha1, len(keys), *keys, *args)
        except NoScriptError:
            # Empty script cache (restart, failover, new cluster node).
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    def _flush(self) -> None:
        self._scheduled = False
        while self._queue and self._in_flight < self._max_in_flight:
            batch = [self._queue.popleft() for _ in range(min(MAX_BATCH, len(self._queue)))]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[tuple[RedisArg, ...], asyncio.Future[Any]]]) -> None:
        self.batches += 1
        self.commands += len(batch)
        try:
            if len(batch) == 1:
                args, future = batch[0]
                results: list[Any] = [await self._single(args)]
            else:
                pipe = self.client.pipeline(transaction=False)
                for args, _ in batch:
                    pipe.execute_command(*args)
                results = await pipe.execute(raise_on_error=False)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            error = BrokerUnavailable(f"redis unavailable: {exc}")
            results = [error] * len(batch)
        except RedisError as exc:
            results = [exc] * len(batch)
        except Exception as exc:
            # Not a RedisError. Every caller of the batch gets it rather than
            # waiting forever on its future: as itself when it is a bug of
            # ours (a script whose keys span slots: RedisClusterException),
            # as temporary when the cluster or the connection is the cause
            # (no node reachable, slots not covered, or redis-py's cluster
            # pipeline tripping over a connection reset under it with an
            # AttributeError), so that clients are answered 100 and retry
            # instead of being disconnected.
            result: Exception = exc
            if _unavailable(exc):
                log.error("redis command batch failed: %r", exc)
                result = BrokerUnavailable(f"redis client failed: {exc!r}")
            results = [result] * len(batch)
        finally:
            self._in_flight -= 1
            if self._queue and not self._scheduled:
                self._scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                if isinstance(result, RedisConnectionError | RedisTimeoutError):
                    result = BrokerUnavailable(f"redis unavailable: {result}")
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _single(self, args: tuple[RedisArg, ...]) -> Any:
        try:
            return await self.client.execute_command(*args)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise
        except RedisError as exc:
            # Command errors (NOSCRIPT, WRONGTYPE) go to their caller only.
            return exc

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.client.aclose()
