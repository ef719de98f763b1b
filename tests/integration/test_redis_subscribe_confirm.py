"""Each SUBSCRIBE a pub/sub shard sends waits for its own confirmation.

A subscribe issued after an unsubscribe of the same channel, while the first
SUBSCRIBE is still unconfirmed, must send a SUBSCRIBE of its own: the first
one's confirmation comes before Redis runs the UNSUBSCRIBE, so whoever took it
for theirs believes in a subscription Redis has dropped (the node's channel
lock lets exactly this through when a first subscriber's connection closes
while it waits)."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from signaling.broker.redis_pubsub import PubSubShard, RespPubSubShard
from signaling.broker.resp import RespClient, parse_redis_url
from support.processes import RedisProcess


class Received:
    """What a shard delivered, and a wait for the next of it."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._arrived = asyncio.Event()

    def on_message(self, name: str, data: bytes) -> None:
        self.messages.append((name, data))
        self._arrived.set()

    async def wait(self, timeout: float) -> None:
        await asyncio.wait_for(self._arrived.wait(), timeout)


Shard = PubSubShard | RespPubSubShard


def resp_shard(url: str, received: Received) -> Shard:
    return RespPubSubShard(
        parse_redis_url(url),
        label="redis",
        control=None,
        wanted=list,
        on_message=received.on_message,
        on_reconnected=lambda: None,
    )


def redis_py_shard(url: str, received: Received) -> Shard:
    # The cluster's shard, with classic SUBSCRIBE (the confirmations are
    # matched the same way for SSUBSCRIBE).
    return PubSubShard(
        aioredis.Redis.from_url(url),
        label="redis",
        sharded=False,
        control=None,
        wanted=list,
        on_message=received.on_message,
        on_reconnected=lambda: None,
    )


@pytest.fixture(params=[resp_shard, redis_py_shard], ids=["resp", "redis-py"])
async def shard_of(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[str, Received], Shard]]:
    started: list[Shard] = []

    def start(url: str, received: Received) -> Shard:
        shard: Shard = request.param(url, received)
        shard.start()
        started.append(shard)
        return shard

    yield start
    for shard in started:
        await shard.close()


async def wait_ready(shard: Shard) -> None:
    for _ in range(200):
        if shard.ready:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the shard did not connect")


async def test_a_subscribe_after_an_unsubscribe_waits_for_its_own_confirmation(
    redis_server: RedisProcess, shard_of: Callable[[str, Received], Shard]
) -> None:
    received = Received()
    shard = shard_of(redis_server.url, received)
    await wait_ready(shard)
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # nothing is confirmed meanwhile
    try:
        # The first subscriber's SUBSCRIBE goes out; it gives up before the
        # confirmation (its connection closed) and unsubscribes; the next
        # subscriber subscribes again, all before Redis answers anything.
        first = asyncio.ensure_future(shard.subscribe("room:x"))
        await asyncio.sleep(0.05)
        first.cancel()
        shard.unsubscribe("room:x")
        second = asyncio.ensure_future(shard.subscribe("room:x"))
        await asyncio.sleep(0.05)
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    await asyncio.wait_for(second, 5)
    publisher = RespClient(redis_server.url)
    try:
        receivers = await publisher.execute("PUBLISH", "room:x", "after")
        assert receivers == 1, "Redis has no subscriber of room:x"
        await received.wait(5)
    finally:
        await publisher.close()
    assert received.messages == [("room:x", b"after")]
