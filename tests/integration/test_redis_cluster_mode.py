"""digis-signal on a 3-node Redis Cluster: sharded pub/sub, hash-tagged keys."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from redis.cluster import key_slot
from websockets.asyncio.client import ClientConnection, connect

from support.cluster import RedisCluster
from support.processes import ServerProcess


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


def channels_on_every_node(cluster: RedisCluster) -> list[str]:
    """One room channel per node, chosen by the slot of its hash tag."""
    # redis-cli --cluster create splits the slots in equal ranges, in order.
    per_node = 16384 // len(cluster.nodes)
    found: dict[int, str] = {}
    for i in range(10000):
        channel = f"room:c{i}"
        node = min(key_slot(f"{{{channel}}}".encode()) // per_node, len(cluster.nodes) - 1)
        found.setdefault(node, channel)
        if len(found) == len(cluster.nodes):
            return [found[n] for n in sorted(found)]
    raise AssertionError("no channel for some node")


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1
        self.inbox: list[dict[str, Any]] = []

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        cmd_id = self.next_id
        self.next_id += 1
        await self.ws.send(orjson.dumps({"id": cmd_id, method: body}).decode())
        while True:
            for msg in self.inbox:
                if msg.get("id") == cmd_id:
                    self.inbox.remove(msg)
                    return msg
            await self._fill()

    async def pub(self) -> dict[str, Any]:
        while True:
            for msg in self.inbox:
                if "push" in msg and "pub" in msg["push"]:
                    self.inbox.remove(msg)
                    return msg["push"]
            await self._fill()

    async def _fill(self) -> None:
        frame = await asyncio.wait_for(self.ws.recv(), 5)
        self.inbox.extend(orjson.loads(line) for line in str(frame).split("\n"))


async def open_client(server: ServerProcess, user: str) -> Client:
    client = Client(await connect(server.ws_url))
    assert "connect" in await client.call("connect", {"token": server.token(user)})
    return client


async def test_two_instances_on_a_cluster(server_factory: Any, redis_cluster: RedisCluster) -> None:
    env = {
        "REDIS_URL": redis_cluster.url,
        "SIGNAL_REDIS_CLUSTER": "1",
        "SIGNAL_COMMANDS_PER_SECOND": "0",
    }
    a = await server_factory(env, name="a")
    b = await server_factory({**env, "REDIS_URL": redis_cluster.nodes[1].url}, name="b")
    channels = channels_on_every_node(redis_cluster)
    reader = await open_client(a, "reader")
    writer = await open_client(b, "writer")
    epochs = {}
    for channel in channels:
        reply = await reader.call("subscribe", {"channel": channel, "join_leave": True})
        epochs[channel] = reply["subscribe"]["epoch"]
    for n in range(3):
        for channel in channels:
            # With a client_msg_id: the claimed publish script runs in the
            # channel's slot with its dedupe key.
            message = {"type": "message", "text": f"{channel} {n}", "client_msg_id": f"m{n}"}
            body = {"channel": channel, "data": message}
            assert "publish" in await writer.call("publish", body)
    for channel in channels:  # a retry: acknowledged, not published again
        body = {"channel": channel, "data": {"type": "message", "text": "x", "client_msg_id": "m0"}}
        assert "publish" in await writer.call("publish", body)
    got: dict[str, list[int]] = {c: [] for c in channels}
    for _ in range(3 * len(channels)):
        push = await reader.pub()
        got[push["channel"]].append(push["pub"]["offset"])
    assert got == {c: [1, 2, 3] for c in channels}

    # History and recovery read the hash-tagged streams on every node.
    for channel in channels:
        hist = await writer.call("history", {"channel": channel, "limit": 10})
        assert [p["offset"] for p in hist["history"]["publications"]] == [1, 2, 3]
        body = {"channel": channel, "recover": True, "offset": 1, "epoch": epochs[channel]}
        other = await open_client(b, f"late-{channel}")
        result = (await other.call("subscribe", body))["subscribe"]
        assert result["recovered"] is True
        assert [p["offset"] for p in result["publications"]] == [2, 3]
        stats = await other.call("presence_stats", {"channel": channel})
        assert stats["presence_stats"]["num_users"] == 2
        await other.ws.close()
    _, body = await a.aget("/readyz")
    assert body == b"ready\n"
    await reader.ws.close()
    await writer.ws.close()
