"""RedisBroker.publish_claimed on a real Redis: guards, the claim and the publish
are one script, so what it refuses leaves nothing behind and what it publishes
holds its claim."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from signaling.broker.base import BrokerUnavailable, Claim, ClaimResult, HistoryOptions
from signaling.broker.redis import RedisBroker
from signaling.protocol import Publication
from signaling.state.redis import RedisStateStore
from support.processes import RedisProcess

HISTORY = HistoryOptions(size=10, ttl_s=60)
CHANNEL = "room:claims"


@pytest.fixture
async def broker(redis_server: RedisProcess) -> AsyncIterator[RedisBroker]:
    broker = RedisBroker(redis_server.url, prefix="claims:")
    yield broker
    await broker.close()


def pub(text: str) -> Publication:
    return Publication(f'"{text}"'.encode(), None, 0, None, 0)


async def top(broker: RedisBroker) -> int:
    page = await broker.history(CHANNEL, since=None, limit=0, reverse=False, history=HISTORY)
    return page.top.offset


async def test_publishes_and_holds_the_claim_with_its_ttl(broker: RedisBroker) -> None:
    store: RedisStateStore = broker.state_store()
    claim = Claim(f"dedupe:{{{CHANNEL}}}:m1", "token-1", 30)
    result = await broker.publish_claimed(CHANNEL, pub("one"), HISTORY, claim)
    assert result.position is not None and result.position.offset == 1
    assert result.guard is None
    assert await store.get(claim.key) == "token-1"
    # The claim's TTL is the one asked for (in ms, give or take the round trip).
    ttl_ms = await broker.executor.execute("PTTL", "claims:" + claim.key)
    assert 29_000 < int(ttl_ms) <= 30_000
    page = await broker.history(CHANNEL, since=None, limit=-1, reverse=False, history=HISTORY)
    assert len(page.publications) == 1
    assert page.top == result.position


async def test_a_taken_claim_publishes_nothing(broker: RedisBroker) -> None:
    claim = Claim(f"dedupe:{{{CHANNEL}}}:m1", "first", 30)
    first = await broker.publish_claimed(CHANNEL, pub("one"), HISTORY, claim)
    assert first.position is not None and first.position.offset == 1
    retry = Claim(claim.key, "second", 30)
    assert await broker.publish_claimed(CHANNEL, pub("again"), HISTORY, retry) == ClaimResult(None)
    assert await top(broker) == 1
    assert await broker.state_store().get(claim.key) == "first"


async def test_the_first_guard_found_stops_it_and_nothing_is_claimed(broker: RedisBroker) -> None:
    store = broker.state_store()
    ban, timeout, slow = (f"{kind}:{{{CHANNEL}}}:fan" for kind in ("ban", "timeout", "slow"))
    await store.set(timeout, "1")
    await store.set(slow, "5")
    claim = Claim(f"dedupe:{{{CHANNEL}}}:m2", "token", 30, guards=(ban, timeout, slow))
    result = await broker.publish_claimed(CHANNEL, pub("stopped"), HISTORY, claim)
    assert result == ClaimResult(None, timeout)
    assert await store.get(claim.key) is None
    assert await top(broker) == 0
    # Guards gone: the same claim goes through.
    await store.delete(timeout)
    await store.delete(slow)
    result = await broker.publish_claimed(CHANNEL, pub("now"), HISTORY, claim)
    assert result.position is not None and result.position.offset == 1


async def test_a_channel_without_history_is_refused(broker: RedisBroker) -> None:
    claim = Claim(f"dedupe:{{{CHANNEL}}}:m3", "token", 30)
    with pytest.raises(ValueError):
        await broker.publish_claimed(CHANNEL, pub("x"), HistoryOptions(), claim)


async def test_the_brokers_store_loads_its_scripts_again_and_refusals_are_unavailable(
    broker: RedisBroker, redis_server: RedisProcess
) -> None:
    """The state store the broker hands out (through its StoreExecutor): a
    batch of scripts Redis no longer knows (a restart, a failover, SCRIPT
    FLUSH) is loaded again, not failed; a write Redis refuses (NOREPLICAS
    here; MISCONF, OOM, READONLY in production) is BrokerUnavailable, the
    temporary failure every caller handles."""
    store = broker.state_store()
    keys = [f"presence:{{u{i}}}" for i in range(3)]
    await store.zadd_many(keys, "m", 1.0, 60)
    admin = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        await admin.script_flush()
        await store.zadd_many(keys, "m", 2.0, 60)
        assert await store.zrange_by_score(keys[0], 0, 10) == [("m", 2.0)]
        await admin.config_set("min-replicas-to-write", 1)
        try:
            with pytest.raises(BrokerUnavailable, match="NOREPLICAS"):
                await store.incr("counter", 10.0)
        finally:
            await admin.config_set("min-replicas-to-write", 0)
        assert await store.incr("counter", 10.0) == 1
    finally:
        await admin.aclose()
