"""digis-signal on a 3-node Redis Cluster: sharded pub/sub, hash-tagged keys."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from redis.cluster import key_slot
from websockets.asyncio.client import ClientConnection, connect

from signaling.broker import redis_exec
from signaling.broker.base import BrokerUnavailable, HistoryOptions
from signaling.broker.redis import RedisBroker
from signaling.protocol import ClientInfo, Publication
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
        return await self.push("pub")

    async def push(self, *kinds: str) -> dict[str, Any]:
        """The first push of one of ``kinds``."""
        while True:
            for msg in self.inbox:
                if "push" in msg and any(kind in msg["push"] for kind in kinds):
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


async def two_instances(
    server_factory: Any, cluster: RedisCluster, **extra_env: str
) -> tuple[ServerProcess, ServerProcess]:
    """Two instances on the cluster, each given a different node to start from."""
    env = {
        "REDIS_URL": cluster.url,
        "SIGNAL_REDIS_CLUSTER": "1",
        "SIGNAL_COMMANDS_PER_SECOND": "0",
        **extra_env,
    }
    a = await server_factory(env, name="a")
    b = await server_factory({**env, "REDIS_URL": cluster.nodes[1].url}, name="b")
    return a, b


async def test_two_instances_on_a_cluster(server_factory: Any, redis_cluster: RedisCluster) -> None:
    a, b = await two_instances(server_factory, redis_cluster)
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


async def publish(writer: Client, channel: str, n: int) -> None:
    body = {"channel": channel, "data": {"type": "message", "text": f"{channel} {n}"}}
    assert "publish" in await writer.call("publish", body)


async def delivered_or_recovered(reader: Client, channel: str, offset: int, epoch: str) -> None:
    """Publication ``offset`` reaches ``reader``: pushed, or, when it was
    published while the reader's instance had no subscription on the node
    serving the channel, recovered after the instance's position check made
    the client resubscribe (unsubscribe push, code 2500)."""
    push = await reader.push("pub", "unsubscribe")
    if "pub" in push:
        assert push["pub"]["offset"] == offset, push
        return
    assert push["unsubscribe"]["code"] >= 2500, push
    body = {"channel": channel, "recover": True, "offset": offset - 1, "epoch": epoch}
    reply = await reader.call("subscribe", body)
    result = reply.get("subscribe") or pytest.fail(f"{reply}")
    assert result["recovered"] is True, result
    assert [p["offset"] for p in result["publications"]] == [offset]


async def wait_for_shard_subscriber(node: Any, name: str, timeout: float = 10.0) -> None:
    client = aioredis.Redis(host=node.host, port=node.port)
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            _, count = await client.execute_command("PUBSUB", "SHARDNUMSUB", name)
            if count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"nobody subscribed {name}"
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def test_deliveries_follow_a_channel_whose_slot_moves(
    server_factory: Any, redis_cluster: RedisCluster
) -> None:
    """Resharding: Redis unsubscribes a moved slot's shard channels on the
    old primary. The instance subscribes them on the new one, and a
    publication made in between reaches the subscriber, pushed or recovered."""
    a, b = await two_instances(server_factory, redis_cluster)
    channel = channels_on_every_node(redis_cluster)[0]
    source, target = redis_cluster.nodes[0], redis_cluster.nodes[2]
    reader = await open_client(a, "reader")
    writer = await open_client(b, "writer")
    epoch = (await reader.call("subscribe", {"channel": channel}))["subscribe"]["epoch"]
    await publish(writer, channel, 1)
    assert (await reader.pub())["pub"]["offset"] == 1

    redis_cluster.move_slot(key_slot(f"{{{channel}}}".encode()), source, target)
    await publish(writer, channel, 2)
    await delivered_or_recovered(reader, channel, 2, epoch)

    await wait_for_shard_subscriber(target, f"sig:ch:{{{channel}}}")
    await publish(writer, channel, 3)
    assert (await reader.pub())["pub"]["offset"] == 3
    _, ready = await a.aget("/readyz")
    assert ready == b"ready\n"
    await reader.ws.close()
    await writer.ws.close()


class PublicationRecorder:
    """A broker handler that needs ``wanted`` and keeps what it is given."""

    def __init__(self, wanted: list[str]) -> None:
        self.wanted = wanted
        self.got: dict[str, list[int]] = {}
        self.arrived = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.got.setdefault(channel, []).append(pub.offset)
        self.arrived.set()

    def on_join(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_control(self, message: bytes) -> None:
        pass

    def on_broker_reconnected(self) -> None:
        pass

    def channels(self) -> list[str]:
        return list(self.wanted)

    def has_channel(self, channel: str) -> bool:
        return channel in self.wanted


async def test_channels_of_several_slots_on_a_node_subscribe_at_once(
    redis_cluster: RedisCluster,
) -> None:
    """Subscribes issued together go out together, but SSUBSCRIBE takes one
    slot per command: a node's channels of several slots, subscribed in one
    loop iteration, all get their publications (no CROSSSLOT refusal)."""
    per_node = 16384 // len(redis_cluster.nodes)
    channels: list[str] = []
    slots: set[int] = set()
    for i in range(10000):
        channel = f"room:s{i}"
        slot = key_slot(f"{{{channel}}}".encode())
        if slot < per_node and slot not in slots:  # all on the first node
            slots.add(slot)
            channels.append(channel)
            if len(channels) == 5:
                break
    broker = RedisBroker(redis_cluster.url, cluster=True, prefix="slots:")
    handler = PublicationRecorder(channels)
    broker.bind(handler)
    await broker.start()
    try:
        await asyncio.gather(*(broker.subscribe(channel) for channel in channels))
        history = HistoryOptions(size=10, ttl_s=60)
        for channel in channels:
            await broker.publish(channel, Publication(b'{"n":1}'), history)
        async with asyncio.timeout(5):
            while len(handler.got) < len(channels):
                handler.arrived.clear()
                await handler.arrived.wait()
        assert handler.got == {channel: [1] for channel in channels}
        assert broker.reconnects == 0
    finally:
        await broker.close()


async def test_periodic_refresh_and_position_check_group_channels_by_slot(
    redis_cluster: RedisCluster,
) -> None:
    """The presence refresh and the position check batch many channels per
    script call; on a cluster a call holds channels of one slot only (a call
    across slots is refused): every channel of every node is reached."""
    channels = [f"room:g{i}" for i in range(60)]  # about 20 per node, mostly one per slot
    assert len({key_slot(f"{{{c}}}".encode()) for c in channels}) > 3
    broker = RedisBroker(redis_cluster.url, cluster=True, prefix="grouped:")
    broker.bind(PublicationRecorder(channels))
    await broker.start()
    try:
        entries = [(c, ClientInfo(f"u{i}", f"c{i}", None, None)) for i, c in enumerate(channels)]
        await broker.refresh_presence(entries, ttl_s=60)
        for i, channel in enumerate(channels):
            assert sorted(await broker.presence(channel)) == [f"c{i}"], channel
        history = HistoryOptions(size=10, ttl_s=60)
        for i, channel in enumerate(channels):
            for _ in range(i % 3 + 1):
                await broker.publish(channel, Publication(b"{}"), history)
        tops = await broker.positions(channels)
        assert {c: top.offset for c, top in tops.items()} == {
            c: i % 3 + 1 for i, c in enumerate(channels)
        }
    finally:
        await broker.close()


@pytest.fixture
def redis_cluster_with_replicas(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster", size=6, replicas=1).start()
    yield cluster
    cluster.stop()


async def publish_until_acknowledged(writer: Client, channel: str, n: int) -> None:
    """Right after a failover a command may fail (error 100, temporary)."""
    body = {"channel": channel, "data": {"type": "message", "text": f"{channel} {n}"}}
    for _ in range(50):
        reply = await writer.call("publish", body)
        if "publish" in reply:
            return
        assert reply["error"]["temporary"], reply
        await asyncio.sleep(0.2)
    raise AssertionError(f"publication {n} never acknowledged")


async def test_deliveries_follow_a_failover(
    server_factory: Any, redis_cluster_with_replicas: RedisCluster
) -> None:
    """A primary dies and its replica takes over its slots: the instances
    subscribe the channels there, nothing published is lost (pushed or
    recovered), and they are ready again."""
    cluster = redis_cluster_with_replicas
    a, b = await two_instances(server_factory, cluster)
    starts = {cluster.nodes[0].port, cluster.nodes[1].port}
    for i in range(10000):  # a channel whose primary is not where either instance started
        channel = f"room:f{i}"
        slot = key_slot(f"{{{channel}}}".encode())
        doomed = cluster.primary_of(slot)
        if doomed.port not in starts:
            break
    reader = await open_client(a, "reader")
    writer = await open_client(b, "writer")
    epoch = (await reader.call("subscribe", {"channel": channel}))["subscribe"]["epoch"]
    await publish(writer, channel, 1)
    assert (await reader.pub())["pub"]["offset"] == 1

    doomed.kill()
    async with asyncio.timeout(30):
        while (successor := cluster.primary_of(slot)) is doomed:
            await asyncio.sleep(0.2)
    await publish_until_acknowledged(writer, channel, 2)
    await delivered_or_recovered(reader, channel, 2, epoch)

    await wait_for_shard_subscriber(successor, f"sig:ch:{{{channel}}}")
    await publish(writer, channel, 3)
    assert (await reader.pub())["pub"]["offset"] == 3
    async with asyncio.timeout(10):
        while (await a.aget("/readyz"))[0] != 200:
            await asyncio.sleep(0.2)
    await reader.ws.close()
    await writer.ws.close()


async def test_bans_still_reach_connections_after_the_control_node_fails(
    server_factory: Any, redis_cluster_with_replicas: RedisCluster
) -> None:
    """The node that carried the instance's control subscription dies: the
    control channel moves to another shard, so a ban made after the failover
    still removes the banned fan (a node hears its own control messages
    through Redis, so one instance shows it)."""
    cluster = redis_cluster_with_replicas
    env = {"REDIS_URL": cluster.url, "SIGNAL_REDIS_CLUSTER": "1"}
    a = await server_factory({**env, "SIGNAL_COMMANDS_PER_SECOND": "0"}, name="a")
    carriers = []
    for node in cluster.nodes:
        client = aioredis.Redis(host=node.host, port=node.port)
        _, count = await client.execute_command("PUBSUB", "NUMSUB", "sig:control")
        await client.aclose()
        if count:
            carriers.append(node)
    assert len(carriers) == 1, carriers
    doomed = carriers[0]
    slots = {cluster.primary_of(slot) for slot in (0, 8000, 16000)}
    assert doomed in slots  # a primary: it has a replica to take over
    creator = await open_client(a, "cre")
    fan = await open_client(a, "fan")
    assert "subscribe" in await fan.call("subscribe", {"channel": "room:cre"})

    doomed.kill()
    async with asyncio.timeout(30):
        while doomed in {cluster.primary_of(slot) for slot in (0, 8000, 16000)}:
            await asyncio.sleep(0.2)
        while (await a.aget("/readyz"))[0] != 200:
            await asyncio.sleep(0.2)
    body = {"method": "room.ban", "data": {"channel": "room:cre", "user": "fan"}}
    for _ in range(50):  # right after a failover a command may fail (temporary)
        reply = await creator.call("rpc", body)
        if "rpc" in reply:
            break
        assert reply["error"]["temporary"], reply
        await asyncio.sleep(0.2)
    push = await fan.push("unsubscribe")
    assert push["channel"] == "room:cre" and push["unsubscribe"]["code"] < 2500, push
    await creator.ws.close()
    await fan.ws.close()


async def test_deliveries_follow_a_slot_moved_to_a_node_that_joined(
    server_factory: Any, redis_cluster: RedisCluster, tmp_path: Path
) -> None:
    """Scaling out: a new node joins and a slot moves to it. The instances had
    no connection to it; the moved slot's channel is subscribed there."""
    a, b = await two_instances(server_factory, redis_cluster)
    channel = channels_on_every_node(redis_cluster)[0]
    slot = key_slot(f"{{{channel}}}".encode())
    source = redis_cluster.primary_of(slot)
    reader = await open_client(a, "reader")
    writer = await open_client(b, "writer")
    epoch = (await reader.call("subscribe", {"channel": channel}))["subscribe"]["epoch"]
    await publish(writer, channel, 1)
    assert (await reader.pub())["pub"]["offset"] == 1

    newcomer = redis_cluster.add_node(tmp_path / "newcomer")
    redis_cluster.move_slot(slot, source, newcomer)
    await wait_for_shard_subscriber(newcomer, f"sig:ch:{{{channel}}}")
    await publish(writer, channel, 2)
    await delivered_or_recovered(reader, channel, 2, epoch)
    await publish(writer, channel, 3)
    assert (await reader.pub())["pub"]["offset"] == 3
    await reader.ws.close()
    await writer.ws.close()


async def test_command_connections_reset_publish_nothing_twice(
    server_factory: Any, redis_cluster: RedisCluster
) -> None:
    """The cluster nodes keep resetting the instance's command connections
    for 1.5 s under publish load: a publish caught by a reset answers 100
    (temporary) and is not sent again by the client library (the script may
    have run: a second run is a second publication), and every publish
    acknowledged is in the channel's history once."""
    # History long enough for every publication of the run.
    a, _ = await two_instances(server_factory, redis_cluster, SIGNAL_HISTORY_SIZE="100000")
    channels = channels_on_every_node(redis_cluster)
    acked: dict[str, list[str]] = {c: [] for c in channels}
    refused = 0
    stop = asyncio.Event()

    async def writer(index: int) -> None:
        nonlocal refused
        client = await open_client(a, f"writer{index}")
        n = 0
        while not stop.is_set():
            channel = channels[n % len(channels)]
            text = f"w{index}-{n}"
            n += 1
            reply = await client.call(
                "publish", {"channel": channel, "data": {"type": "message", "text": text}}
            )
            if "publish" in reply:
                acked[channel].append(text)
            else:
                assert reply["error"]["code"] == 100, reply
                refused += 1
        await client.ws.close()

    writers = [asyncio.create_task(writer(i)) for i in range(6)]
    await asyncio.sleep(0.3)
    admins = [aioredis.Redis(host=n.host, port=n.port) for n in redis_cluster.nodes]
    killed = 0
    try:
        end = asyncio.get_running_loop().time() + 1.5
        while asyncio.get_running_loop().time() < end:
            for admin in admins:
                killed += int(await admin.execute_command("CLIENT", "KILL", "TYPE", "normal"))
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*writers)
        for admin in admins:
            await admin.aclose()
    assert killed > 20, killed
    reader = await open_client(a, "auditor")
    for channel in channels:
        hist = await reader.call("history", {"channel": channel, "limit": -1})
        texts = [p["data"]["text"] for p in hist["history"]["publications"]]
        assert len(texts) == len(set(texts)), (channel, len(texts) - len(set(texts)))
        assert set(acked[channel]) <= set(texts), channel
    print(f"\nkilled {killed} connections, {refused} publishes refused")
    await reader.ws.close()


async def test_a_command_to_a_node_that_stops_answering_fails_within_the_reply_timeout(
    redis_cluster: RedisCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A primary gone without a TCP reset (here: stopped) must not hold a
    publish, and the client waiting for its reply, until TCP keepalive gives
    up: past the reply timeout it fails as temporary (100 to the client), and
    commands work again once the node answers."""
    monkeypatch.setattr(redis_exec, "CLUSTER_REPLY_TIMEOUT_S", 0.5)
    per_node = 16384 // len(redis_cluster.nodes)
    names = (f"room:f{i}" for i in range(10000))
    channel = next(c for c in names if key_slot(f"{{{c}}}".encode()) < per_node)
    broker = RedisBroker(redis_cluster.url, cluster=True, prefix="frozen:")
    broker.bind(PublicationRecorder([channel]))
    await broker.start()
    history = HistoryOptions(size=10, ttl_s=60)
    loop = asyncio.get_running_loop()
    node = redis_cluster.nodes[0]
    try:
        await broker.publish(channel, Publication(b"{}"), history)  # a connection to the node
        os.kill(node.pid, signal.SIGSTOP)
        try:
            started = loop.time()
            with pytest.raises(BrokerUnavailable):
                async with asyncio.timeout(5):
                    await broker.publish(channel, Publication(b"{}"), history)
            assert loop.time() - started < 3
        finally:
            os.kill(node.pid, signal.SIGCONT)
        for _ in range(50):
            try:
                position = await broker.publish(channel, Publication(b"{}"), history)
                break
            except BrokerUnavailable:
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("publishing never worked again")
        # The stopped node may have run the timed-out script once resumed:
        # the caller was told "temporary", not "published", either way.
        assert position.offset in (2, 3)
    finally:
        await broker.close()
