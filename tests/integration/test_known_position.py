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
