"""Presence counts on a real Redis: counted in Redis (a Lua script), they must agree
with the entries themselves, expired ones left out."""

from __future__ import annotations

import asyncio

from signaling.broker.redis import RedisBroker
from signaling.protocol import ClientInfo
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
