"""Subscriptions answered from the position an instance already follows.

When an instance serves a channel already (live subscribers, publications
seen), a new subscription, or a recovery from exactly that position, is
answered from the instance's own position instead of reading the stream in
Redis: a reconnect storm into a few rooms then costs one stream read per room
and instance, not one per client. These tests run a real server on a real
redis-server and watch Redis with MONITOR to see which stream reads happen,
and check that nothing falls between the position given and the live stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from test_raw_protocol import QUIET, Raw, connected, msg

from signaling.broker.redis_scripts import HISTORY
from support.loadcheck import cut_pubsub, redis_call
from support.processes import RedisProcess, ServerProcess

TIMEOUT = 5.0


class Monitor:
    """Redis MONITOR on its own connection: every command Redis runs, one line each."""

    def __init__(
        self, port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._port = port
        self.lines: list[str] = []
        self._task = asyncio.create_task(self._read(reader))

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, redis: RedisProcess) -> AsyncIterator[Monitor]:
        reader, writer = await asyncio.open_connection("127.0.0.1", redis.port)
        writer.write(b"MONITOR\r\n")
        assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"+OK\r\n"
        monitor = cls(redis.port, reader, writer)
        try:
            yield monitor
        finally:
            monitor._task.cancel()
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append(line.decode(errors="replace"))

    async def settle(self) -> None:
        """Wait until Redis has reported what was sent before this call: a
        marker command on the monitor's own view of the server."""
        marker = f"marker-{len(self.lines)}-{id(self)}"
        reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
        writer.write(b"ECHO %s\r\n" % marker.encode())
        await asyncio.wait_for(reader.readline(), TIMEOUT)
        writer.close()
        async with asyncio.timeout(TIMEOUT):
            while not any(marker in line for line in self.lines):
                await asyncio.sleep(0.01)

    def stream_reads(self, channel: str) -> int:
        """HISTORY script runs on ``channel``'s stream (stream top or recovery)."""
        return sum(1 for line in self.lines if HISTORY.sha1 in line and f"{{{channel}}}" in line)


@pytest.fixture
async def server_on_redis(server_factory: Any, redis_server: RedisProcess) -> ServerProcess:
    env = {
        "REDIS_URL": redis_server.url,
        "SIGNAL_COMMANDS_PER_SECOND": "1000",
        "SIGNAL_COMMAND_BURST": "1000",
        **QUIET,
    }
    srv: ServerProcess = await server_factory(env, name="known-position")
    return srv


async def _receive_offsets(client: Raw, count: int) -> list[int]:
    return [(await client.push())["pub"].get("offset", 0) for _ in range(count)]


async def test_subscriptions_to_a_followed_channel_read_no_stream(
    server_on_redis: ServerProcess, redis_server: RedisProcess
) -> None:
    srv = server_on_redis
    async with Monitor.open(redis_server) as monitor:
        watcher = await connected(srv, "watcher")
        first = (await watcher.call("subscribe", {"channel": "room:k"}))["subscribe"]
        writer = await connected(srv, "writer")
        for i in range(3):
            await writer.call("publish", {"channel": "room:k", "data": msg(str(i))})
        assert await _receive_offsets(watcher, 3) == [1, 2, 3]

        fresh = await connected(srv, "fresh")
        result = (await fresh.call("subscribe", {"channel": "room:k"}))["subscribe"]
        assert (result["offset"], result["epoch"]) == (3, first["epoch"])

        back = await connected(srv, "back")
        body = {"channel": "room:k", "recover": True, "offset": 3, "epoch": first["epoch"]}
        result = (await back.call("subscribe", body))["subscribe"]
        assert result["recovered"] is True and result["was_recovering"] is True
        assert result["offset"] == 3 and not result.get("publications")

        await writer.call("publish", {"channel": "room:k", "data": msg("after")})
        for client in (watcher, fresh, back):
            assert await _receive_offsets(client, 1) == [4]
        await monitor.settle()
        # Only the first subscriber read the stream's top.
        assert monitor.stream_reads("room:k") == 1, monitor.lines

        # Behind the instance's position: the stream is read for what was missed.
        behind = await connected(srv, "behind")
        body = {"channel": "room:k", "recover": True, "offset": 2, "epoch": first["epoch"]}
        result = (await behind.call("subscribe", body))["subscribe"]
        assert result["recovered"] is True
        assert [p["offset"] for p in result["publications"]] == [3, 4]
        await monitor.settle()
        assert monitor.stream_reads("room:k") == 2
        for client in (watcher, writer, fresh, back, behind):
            await client.close()


async def test_subscribing_while_publications_are_in_flight_misses_nothing(
    server_on_redis: ServerProcess,
) -> None:
    """Subscriptions answered from the instance's position while a publisher
    keeps publishing: each then receives every offset after the one it was
    given, once and in order."""
    srv = server_on_redis
    watcher = await connected(srv, "watcher")
    await watcher.call("subscribe", {"channel": "room:f"})
    writer = await connected(srv, "writer")
    total = 200

    async def publish_all() -> None:
        for i in range(total):
            reply = await writer.call("publish", {"channel": "room:f", "data": msg(str(i))})
            assert "error" not in reply, reply

    publishing = asyncio.create_task(publish_all())
    joined: list[tuple[Raw, int]] = []
    while not publishing.done() and len(joined) < 10:
        client = await connected(srv, f"joiner{len(joined)}")
        result = (await client.call("subscribe", {"channel": "room:f"}))["subscribe"]
        joined.append((client, result.get("offset", 0)))
        await asyncio.sleep(0.005)
    await publishing
    assert await _receive_offsets(watcher, total) == list(range(1, total + 1))
    assert len(joined) >= 2
    for client, start in joined:
        assert await _receive_offsets(client, total - start) == list(range(start + 1, total + 1))
        await client.close()
    await watcher.close()
    await writer.close()


async def _follow(
    client: Raw, channel: str, start: int, epoch: str, top: int
) -> tuple[list[int], int]:
    """Read ``channel``'s publications from offset ``start`` until ``top``;
    when told to recover (unsubscribe push 2500, a gap), subscribe again from
    the last offset received, as the SDKs do. Returns the offsets received,
    live or recovered, and how many recoveries it took."""
    got: list[int] = []
    last, recoveries = start, 0
    while last < top:
        pushes = [m for m in client.inbox if m.get("push", {}).get("channel") == channel]
        if not pushes:
            await client._fill()
            continue
        for message in pushes:
            client.inbox.remove(message)
            push = message["push"]
            if "pub" in push:
                got.append(push["pub"].get("offset", 0))
            elif "unsubscribe" in push:
                assert push["unsubscribe"]["code"] == 2500, push
                recoveries += 1
                body = {"channel": channel, "recover": True, "offset": last, "epoch": epoch}
                result = (await client.call("subscribe", body))["subscribe"]
                assert result["recovered"] is True, result
                got += [p["offset"] for p in result.get("publications", [])]
            last = got[-1] if got else last
    return got, recoveries


async def test_a_subscription_answered_during_a_pubsub_outage_recovers_what_the_instance_missed(
    server_on_redis: ServerProcess, redis_server: RedisProcess
) -> None:
    """The instance's pub/sub connection is cut while publications go on: its
    position goes stale. A subscription answered from that position is then
    made to recover along with the instance's other subscribers, and gets
    every publication after the offset it was given, once."""
    srv = server_on_redis
    watcher = await connected(srv, "watcher")
    first = (await watcher.call("subscribe", {"channel": "room:c"}))["subscribe"]
    writer = await connected(srv, "writer")
    await writer.call("publish", {"channel": "room:c", "data": msg("first")})
    assert await _receive_offsets(watcher, 1) == [1]

    async def publish_many() -> None:
        for i in range(80):
            reply = await writer.call("publish", {"channel": "room:c", "data": msg(str(i))})
            assert "error" not in reply, reply
            await asyncio.sleep(0.01)

    # Connected before the cut: its connect subscribes its personal channel,
    # which needs pub/sub; the room, followed already, does not.
    joiner = await connected(srv, "joiner")
    publishing = asyncio.create_task(publish_many())
    cutting = asyncio.create_task(cut_pubsub(redis_server.port, 0.6))
    await asyncio.sleep(0.15)
    # Answered from the instance's position if the instance has not noticed
    # the cut yet; once it has, its position is unknown and a subscribe gets
    # the temporary 100 until pub/sub is back: retried, as the SDKs do.
    while True:
        reply = await joiner.call("subscribe", {"channel": "room:c"})
        if "subscribe" in reply:
            break
        assert reply["error"]["code"] == 100 and reply["error"]["temporary"], reply
        await asyncio.sleep(0.05)
    joined = reply["subscribe"]
    during_cut = not cutting.done()
    assert joined["epoch"] == first["epoch"]
    await publishing
    killed = await cutting
    top = (await writer.call("history", {"channel": "room:c", "limit": 0}))["history"]
    top_offset = top.get("offset", 0)
    assert top_offset == 81 and killed > 0

    start = joined.get("offset", 0)
    got, joiner_recoveries = await _follow(joiner, "room:c", start, first["epoch"], top_offset)
    assert got == list(range(start + 1, top_offset + 1))
    got, watcher_recoveries = await _follow(watcher, "room:c", 1, first["epoch"], top_offset)
    assert got == list(range(2, top_offset + 1))
    print(
        f"\npub/sub connections killed: {killed}; joined at {start}; recoveries: "
        f"joiner {joiner_recoveries}, watcher {watcher_recoveries}"
    )
    # The cut made the instance miss publications: its subscribers were told
    # to recover (the joiner too, if subscribed while publications were being
    # missed).
    assert watcher_recoveries > 0
    assert joiner_recoveries > 0 or not during_cut
    for client in (watcher, writer, joiner):
        await client.close()


async def test_a_stream_that_went_back_makes_its_subscribers_recover(
    server_on_redis: ServerProcess, redis_server: RedisProcess
) -> None:
    """Redis comes back with an older copy of a channel (a restore from a
    snapshot, a failover to a replica behind): same epoch, a lower top. The
    next offsets are ones the instance saw already; without a check it would
    drop them as seen. Its position check (here after its pub/sub
    reconnects) makes the subscribers recover, and they are told they could
    not (their position is past the stream's)."""
    srv = server_on_redis
    watcher = await connected(srv, "watcher")
    epoch = (await watcher.call("subscribe", {"channel": "room:b"}))["subscribe"]["epoch"]
    writer = await connected(srv, "writer")
    for i in range(5):
        await writer.call("publish", {"channel": "room:b", "data": msg(str(i))})
    assert await _receive_offsets(watcher, 5) == [1, 2, 3, 4, 5]
    # The older copy: offsets 4 and 5 never happened.
    stream, meta = "sig:stream:{room:b}", "sig:meta:{room:b}"
    for entry in (b"4-0", b"5-0"):
        assert await redis_call(redis_server.port, "XDEL", stream, entry.decode()) == b":1\r\n"
    # As the snapshot had them: the stream's last id and the top, both at 3.
    assert await redis_call(redis_server.port, "XSETID", stream, "3-0") == b"+OK\r\n"
    await redis_call(redis_server.port, "HSET", meta, "s", "3")
    await cut_pubsub(redis_server.port, 0.2)
    push = await watcher.push("unsubscribe")
    assert push["channel"] == "room:b" and push["unsubscribe"]["code"] >= 2500, push
    body = {"channel": "room:b", "recover": True, "offset": 5, "epoch": epoch}
    for _ in range(50):  # as an SDK does: a temporary error while pub/sub reconnects
        reply = await watcher.call("subscribe", body)
        if reply.get("error", {}).get("code") != 100:
            break
        await asyncio.sleep(0.1)
    assert "subscribe" in reply, (push, reply)
    result = reply["subscribe"]
    assert not result.get("recovered") and result["offset"] == 3, result
    # Offset 4 of the new history reaches the subscriber.
    published = await writer.call("publish", {"channel": "room:b", "data": msg("after")})
    assert "publish" in published, published
    try:
        assert await _receive_offsets(watcher, 1) == [4]
    except TimeoutError:
        raise AssertionError(watcher.inbox) from None
    for client in (watcher, writer):
        await client.close()
