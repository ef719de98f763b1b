"""The Redis Cluster pub/sub shard (redis-py's PubSub, SSUBSCRIBE) on its own:
an open waits for its subscriptions' confirmations before the shard reports
itself ready; a node that stops answering is noticed; (un)subscribes go out in
the order they were issued."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis

from signaling.broker import redis_pubsub
from signaling.broker.redis_exec import node_client
from signaling.broker.redis_pubsub import PubSubShard, cluster_slot
from support.cluster import RedisCluster, RedisClusterNode


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


def names_on(node: RedisClusterNode, count: int) -> list[str]:
    """``count`` channel names whose slots ``node`` serves, of several slots."""
    with redis.Redis(host=node.host, port=node.port) as client:
        ranges = [
            (start, end)
            for start, end, primary, *_ in client.execute_command("CLUSTER", "SLOTS")
            if int(primary[1]) == node.port
        ]
    names = []
    for i in range(100000):
        name = f"shard:n{i}"
        slot = cluster_slot(name)
        if any(start <= slot <= end for start, end in ranges):
            names.append(name)
            if len(names) == count:
                return names
    raise AssertionError(f"too few names on {node.name}")


def node_shard(node: RedisClusterNode, cluster: RedisCluster, **kwargs: Any) -> PubSubShard:
    defaults: dict[str, Any] = {
        "label": node.name,
        "sharded": True,
        "control": None,
        "wanted": list,
        "on_message": lambda name, data: None,
        "on_reconnected": lambda: None,
    }
    return PubSubShard(node_client(cluster.url, node.host, node.port), **{**defaults, **kwargs})


async def wait_for(condition: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def test_an_open_has_every_subscription_confirmed_before_positions_are_checked(
    redis_cluster: RedisCluster,
) -> None:
    """The position check that follows an open (here: a shard taking over
    slots) reads the streams; a publication after that read must reach the
    shard, so every SSUBSCRIBE must have taken effect by then: its
    confirmation has been read when on_reconnected is called."""
    node = redis_cluster.nodes[0]
    wanted = names_on(node, 600)  # more than a SUBSCRIBE_BATCH
    confirmed: list[str] = []
    at_check: list[tuple[list[str], int]] = []

    def on_reconnected() -> None:
        # Blocking on purpose: nothing else runs until the check is recorded.
        with redis.Redis(host=node.host, port=node.port) as client:
            counts = client.execute_command("PUBSUB", "SHARDNUMSUB", wanted[-1])
        at_check.append((list(confirmed), int(counts[1])))

    shard = node_shard(
        node, redis_cluster, wanted=lambda: list(wanted), on_reconnected=on_reconnected,
        takes_over=True,
    )  # fmt: skip
    original = shard._confirmed

    def spy(name: str) -> None:
        confirmed.append(name)
        original(name)

    shard._confirmed = spy  # type: ignore[method-assign]
    shard.start()
    try:
        await wait_for(lambda: at_check, 10)
        confirmed_then, subscribers = at_check[0]
        assert sorted(confirmed_then) == sorted(wanted)
        assert subscribers == 1
    finally:
        await shard.close()


async def test_a_node_that_stops_answering_is_noticed(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary gone without a TCP reset (here: stopped) leaves the reader
    waiting; a PING after HEALTH_CHECK_S of silence that gets no PONG within
    PING_TIMEOUT_S makes the shard drop the connection, reconnect once the node
    answers again, and report the reconnect (positions are checked)."""
    monkeypatch.setattr(redis_pubsub, "HEALTH_CHECK_S", 0.3)
    monkeypatch.setattr(redis_pubsub, "PING_TIMEOUT_S", 0.3)
    node = redis_cluster.nodes[0]
    wanted = names_on(node, 1)
    lost = asyncio.Event()
    reconnected = asyncio.Event()
    shard = node_shard(
        node, redis_cluster, wanted=lambda: list(wanted),
        on_lost=lost.set, on_reconnected=reconnected.set,
    )  # fmt: skip
    shard.start()
    try:
        await wait_for(lambda: shard.ready, 10)
        os.kill(node.pid, signal.SIGSTOP)
        try:
            # HEALTH_CHECK_S + PING_TIMEOUT_S, and a margin for a loaded machine.
            await asyncio.wait_for(lost.wait(), 0.6 + 1.0)
            assert not shard.ready
        finally:
            os.kill(node.pid, signal.SIGCONT)
        await asyncio.wait_for(reconnected.wait(), 10)
        assert shard.ready
        assert shard.reconnects == 1
    finally:
        await shard.close()


class GatedPubSub:
    """A stand-in for redis-py's PubSub: records the commands in the order
    they went out and answers them; an SUNSUBSCRIBE goes out only once
    ``gate`` is set (a send that suspends)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[str, ...]]] = []
        self.gate = asyncio.Event()
        self._replies: deque[dict[str, Any]] = deque()
        self._arrived = asyncio.Event()

    def _reply(self, kind: str, channel: str | None, data: Any) -> None:
        self._replies.append({"type": kind, "pattern": None, "channel": channel, "data": data})
        self._arrived.set()

    async def ssubscribe(self, *names: str) -> None:
        self.sent.append(("SSUBSCRIBE", names))
        for name in names:
            self._reply("ssubscribe", name, 1)

    async def sunsubscribe(self, *names: str) -> None:
        await self.gate.wait()
        self.sent.append(("SUNSUBSCRIBE", names))
        for name in names:
            self._reply("sunsubscribe", name, 0)

    async def ping(self, message: str | None = None) -> None:
        self._reply("pong", None, (message or "").encode())

    async def get_message(self, timeout: float | None = 0.0) -> dict[str, Any] | None:
        if not self._replies:
            self._arrived.clear()
            try:
                # Not wait_for: Python 3.11's can swallow a cancellation (close).
                async with asyncio.timeout(timeout):
                    await self._arrived.wait()
            except TimeoutError:
                return None
        return self._replies.popleft()

    async def aclose(self) -> None:
        pass


class GatedClient:
    def __init__(self) -> None:
        self.pubsub_ = GatedPubSub()

    def pubsub(self) -> GatedPubSub:
        return self.pubsub_

    async def aclose(self) -> None:
        pass


async def test_a_subscribe_after_an_unsubscribe_goes_out_after_it() -> None:
    """An UNSUBSCRIBE of y whose send suspends, then a SUBSCRIBE of y issued
    in a later loop iteration: the SUBSCRIBE must not overtake it (Redis would
    run them the other way round and leave y unsubscribed)."""
    client = GatedClient()
    shard = PubSubShard(
        cast(Any, client),
        label="fake",
        sharded=True,
        control=None,
        wanted=list,
        on_message=lambda name, data: None,
        on_reconnected=lambda: None,
    )
    shard.start()
    try:
        await wait_for(lambda: shard.ready, 5)
        shard.unsubscribe("y")
        await asyncio.sleep(0.05)  # flushed; its send is waiting at the gate
        subscribed = asyncio.ensure_future(shard.subscribe("y"))
        await asyncio.sleep(0.05)  # flushed too
        client.pubsub_.gate.set()
        await asyncio.wait_for(subscribed, 5)
        assert client.pubsub_.sent == [("SUNSUBSCRIBE", ("y",)), ("SSUBSCRIBE", ("y",))]
    finally:
        await shard.close()
