"""Presence counts on a real Redis: counted in Redis (a Lua script), they must agree
with the entries themselves, expired ones left out."""

from __future__ import annotations

import asyncio

from signaling.broker.base import HistoryOptions
from signaling.broker.redis import RedisBroker
from signaling.protocol import ClientInfo, Publication
from signaling.state.redis import SCRIPT_ITEMS_MAX
from support.handlers import LeaveRecorder
from support.processes import RedisProcess


async def test_presence_stats_count_clients_and_distinct_users(redis_server: RedisProcess) -> None:
    broker = RedisBroker(redis_server.url)
    try:
        channel = "room:stats"
        entries = [
            ClientInfo("alice", "c1", b'{"name":"A"}', None),
            ClientInfo("alice", "c2", None, None),  # a second tab of the same user
            ClientInfo("bob", "c3", None, b'{"seat":1}'),
            ClientInfo('we"ird', "c4", None, None),  # JSON escapes in the user id
        ]
        # An entry that expires is neither listed nor counted. (Added first: the
        # keys' own TTL follows the latest entry.)
        await broker.add_presence(channel, ClientInfo("carol", "c5", None, None), ttl_s=0.2)
        for info in entries:
            await broker.add_presence(channel, info, ttl_s=60)
        await asyncio.sleep(0.4)

        listed = await broker.presence(channel)
        assert sorted(listed) == ["c1", "c2", "c3", "c4"]
        assert await broker.presence_stats(channel) == (4, 3)
        assert await broker.presence_stats("room:nobody") == (0, 0)

        await broker.remove_presence(channel, "c1")
        assert await broker.presence_stats(channel) == (3, 3)
        await broker.remove_presence(channel, "c2")
        assert await broker.presence_stats(channel) == (2, 2)
    finally:
        await broker.close()


async def test_closed_connections_presence_is_removed_and_leaves_published_in_batches(
    redis_server: RedisProcess,
) -> None:
    broker = RedisBroker(redis_server.url)
    handler = LeaveRecorder()
    broker.bind(handler)
    await broker.start()
    try:
        rooms = ["room:a", "room:b"]
        # More clients in one room than one removal script call takes.
        clients = [ClientInfo(f"u{i}", f"c{i}", None, None) for i in range(1200)]
        for info in clients:
            await broker.add_presence(rooms[0], info, ttl_s=60)
        await broker.add_presence(rooms[1], clients[0], ttl_s=60)
        gone = [(rooms[0], info.client) for info in clients[:1100]] + [(rooms[1], "c0")]
        await broker.remove_presences(gone)
        assert sorted(await broker.presence(rooms[0])) == sorted(f"c{i}" for i in range(1100, 1200))
        assert await broker.presence(rooms[1]) == {}

        for room in rooms:
            await broker.subscribe(room)
        await broker.publish_leaves([(rooms[0], clients[1]), (rooms[1], clients[0])])
        async with asyncio.timeout(5):
            while len(handler.leaves) < 2:
                handler.left.clear()
                await handler.left.wait()
        assert sorted(handler.leaves) == [(rooms[0], clients[1]), (rooms[1], clients[0])]
    finally:
        await broker.close()


async def test_a_refresh_writes_each_channels_entries_together_whatever_their_order(
    redis_server: RedisProcess,
) -> None:
    """A refresh groups its entries by channel (one write per channel, a busy
    channel's in chunks of SCRIPT_ITEMS_MAX): entries in any order, a channel
    with more entries than a chunk, and an entry whose info changed all end
    up exactly as given, with the new expiry."""
    broker = RedisBroker(redis_server.url, prefix="grouped-refresh:")
    try:
        busy, quiet = "room:busy", "room:quiet"
        busy_infos = [
            ClientInfo(f"u{i}", f"b{i}", f'{{"n":{i}}}'.encode(), None)
            for i in range(SCRIPT_ITEMS_MAX * 2 + 3)
        ]
        quiet_infos = [ClientInfo("q", f"q{i}", None, b'{"seat":2}') for i in range(3)]
        # The quiet room's entries interleaved with the busy room's.
        entries = [(busy, info) for info in busy_infos]
        for k, info in enumerate(quiet_infos):
            entries.insert(k * 50, (quiet, info))
        await broker.add_presence(busy, ClientInfo("old", "b0", None, None), ttl_s=0.3)
        await broker.refresh_presence(entries, ttl_s=0.3)
        await broker.refresh_presence(entries[1:], ttl_s=60)  # all but the first entry
        await asyncio.sleep(0.5)

        assert await broker.presence(busy) == {info.client: info for info in busy_infos}
        assert await broker.presence(quiet) == {info.client: info for info in quiet_infos[1:]}
        assert await broker.presence_stats(busy) == (len(busy_infos), len(busy_infos))
    finally:
        await broker.close()


async def test_a_large_presence_refresh_and_position_check_reach_every_channel(
    redis_server: RedisProcess,
) -> None:
    """The periodic refresh and position check take many channels per Redis call
    (run_script_per_item): every channel's entry is refreshed and every
    channel's own top read, across more channels than one call takes."""
    broker = RedisBroker(redis_server.url, prefix="many:")
    try:
        channels = [f"room:m{i}" for i in range(SCRIPT_ITEMS_MAX * 2 + 5)]
        entries = [(c, ClientInfo(f"u{i}", f"c{i}", None, None)) for i, c in enumerate(channels)]
        await broker.refresh_presence(entries, ttl_s=0.3)
        await broker.refresh_presence(entries[::2], ttl_s=60)  # extends half of them
        await asyncio.sleep(0.5)
        for i, channel in enumerate(channels):
            expected = [f"c{i}"] if i % 2 == 0 else []
            assert sorted(await broker.presence(channel)) == expected, channel

        history = HistoryOptions(size=10, ttl_s=60)
        for i, channel in enumerate(channels[:-1]):  # the last one has no stream
            for _ in range(i % 4 + 1):
                top = await broker.publish(channel, Publication(b"{}"), history)
            assert top.offset == i % 4 + 1
        tops = await broker.positions(channels)
        assert sorted(tops) == sorted(channels[:-1])
        for i, channel in enumerate(channels[:-1]):
            assert tops[channel].offset == i % 4 + 1, channel
        assert len({top.epoch for top in tops.values()}) == len(tops)  # each its own stream
    finally:
        await broker.close()
