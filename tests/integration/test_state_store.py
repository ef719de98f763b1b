"""StateStore contract: the same tests against the memory store and real Redis.

Backends:

* ``memory`` - :class:`MemoryStateStore` on a fake clock (time is advanced, not slept).
* ``redis`` - :class:`RedisStateStore` on a private ``redis-server``, RESP2, bytes replies.
* ``redis-resp3`` - the same over RESP3 with ``decode_responses=True``: an executor
  may use either, and the reply shapes differ (dicts, nested pairs, doubles, str).
* ``redis-autopipeline`` - through the production executor
  (:class:`signaling.broker.redis_exec.AutoPipeline`), where concurrent calls share
  one pipeline and connection failures become ``BrokerUnavailable``.

Redis TTLs are real and short (hundreds of ms), so every test stays under a second.
Each test gets its own key prefix and, for Redis, its own server process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import ClusterCrossSlotError, NoScriptError, RedisClusterException
from redis.exceptions import ConnectionError as RedisConnectionError

from signaling.broker.base import BrokerUnavailable
from signaling.broker.redis_exec import AutoPipeline, connect_client
from signaling.state.base import KeyWrite, StateStore
from signaling.state.memory import MemoryStateStore, StreamEntry
from signaling.state.redis import (
    INCR_WINDOW,
    SCRIPT_ITEMS_MAX,
    LuaScript,
    RedisArg,
    RedisExecutor,
    RedisStateStore,
)
from support.cluster import RedisCluster
from support.processes import RedisProcess

# Real-time unit for the Redis backend; TTLs are multiples of it.
TTL_S = 0.2
# Waiting this long after a write expires a TTL_S key (with margin for Redis's ms clock).
PAST_TTL_S = TTL_S * 1.5

REDIS_BACKENDS = ["redis", "redis-resp3", "redis-autopipeline"]
BACKENDS = ["memory", *REDIS_BACKENDS]


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class DirectExecutor:
    """A RedisExecutor without pipelining: one client call per command."""

    def __init__(self, client: Redis) -> None:
        self.client = client

    async def execute(self, *args: RedisArg) -> object:
        return await self.client.execute_command(*args)  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[RedisArg]
    ) -> object:
        n = len(keys)
        try:
            return await self.execute("EVALSHA", script.sha1, n, *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", script.source, n, *keys, *args)

    async def execute_many(self, commands: Sequence[Sequence[RedisArg]]) -> list[object]:
        results: list[object] = []
        for args in commands:
            try:
                results.append(await self.execute(*args))
            except Exception as exc:  # the protocol returns failures as values
                results.append(exc)
        return results


@dataclass
class RedisHarness:
    """A RedisStateStore on a private server, plus a raw client (bytes) to inspect it."""

    store: RedisStateStore
    executor: RedisExecutor
    raw: Redis
    server: RedisProcess
    # What a call raises while Redis is down, through this executor.
    down_error: type[Exception]

    def key(self, key: str) -> str:
        return self.store.prefix + key

    async def stream(self, name: str) -> list[StreamEntry]:
        entries = await self.raw.xrange(self.key(name)) or []
        return [(_s(i), {_s(k): _s(v) for k, v in (f or {}).items()}) for i, f in entries]


@dataclass
class Harness:
    """One backend: the store, a way to let time pass, the stream's entries."""

    store: StateStore
    clock: FakeClock | None = None  # memory
    redis: RedisHarness | None = None

    async def elapse(self, seconds: float) -> None:
        if self.clock is not None:
            self.clock.advance(seconds)
        else:
            await asyncio.sleep(seconds)

    async def stream(self, name: str) -> list[StreamEntry]:
        if self.redis is not None:
            return await self.redis.stream(name)
        assert isinstance(self.store, MemoryStateStore)
        return self.store.read_stream(name)


def _s(value: bytes | str | None) -> str:
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value


@asynccontextmanager
async def _redis_harness(server: RedisProcess, backend: str) -> AsyncIterator[RedisHarness]:
    executor: DirectExecutor | AutoPipeline
    if backend == "redis-autopipeline":
        executor = AutoPipeline(connect_client(server.url, cluster=False, pool_size=4))
        down_error: type[Exception] = BrokerUnavailable
    else:
        resp3 = backend == "redis-resp3"
        client = Redis.from_url(
            server.url,
            protocol=3 if resp3 else 2,
            decode_responses=resp3,
            retry=Retry(NoBackoff(), 0),  # a dead server fails the call at once
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
        )
        executor = DirectExecutor(client)
        down_error = RedisConnectionError
    raw = Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    store = RedisStateStore(executor, prefix=f"t{uuid.uuid4().hex[:8]}:")
    try:
        yield RedisHarness(store, executor, raw, server, down_error)
    finally:
        if isinstance(executor, AutoPipeline):
            await executor.close()
            # close() leaves an explicitly passed pool open (redis-py only auto-closes
            # pools it created), so its connections would leak: close it here.
            assert isinstance(executor.client, Redis)
            await executor.client.connection_pool.disconnect()
        else:
            await executor.client.aclose()
        await raw.aclose()


@pytest.fixture(params=BACKENDS)
async def h(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    """Each backend in turn."""
    if request.param == "memory":
        clock = FakeClock()
        yield Harness(MemoryStateStore(clock=clock), clock=clock)
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    async with _redis_harness(server, request.param) as r:
        yield Harness(r.store, redis=r)


@pytest.fixture(params=REDIS_BACKENDS)
async def rh(
    request: pytest.FixtureRequest, redis_server: RedisProcess
) -> AsyncIterator[RedisHarness]:
    """The Redis backends only."""
    async with _redis_harness(redis_server, request.param) as r:
        yield r


# --- strings ----------------------------------------------------------------------------


async def test_get_set_overwrite(h: Harness) -> None:
    assert await h.store.get("k") is None
    await h.store.set("k", "v1")
    assert await h.store.get("k") == "v1"
    await h.store.set("k", "v2")
    assert await h.store.get("k") == "v2"


async def test_set_ttl_expires(h: Harness) -> None:
    await h.store.set("k", "v", ttl_s=TTL_S)
    await h.elapse(TTL_S / 4)
    assert await h.store.get("k") == "v"
    await h.elapse(PAST_TTL_S)
    assert await h.store.get("k") is None


async def test_set_without_ttl_clears_old_expiry(h: Harness) -> None:
    await h.store.set("k", "v1", ttl_s=TTL_S)
    await h.store.set("k", "v2")
    await h.elapse(PAST_TTL_S)
    assert await h.store.get("k") == "v2"


async def test_set_with_new_ttl_replaces_expiry(h: Harness) -> None:
    await h.store.set("k", "v1")
    await h.store.set("k", "v2", ttl_s=TTL_S)
    await h.elapse(PAST_TTL_S)
    assert await h.store.get("k") is None


async def test_set_if_absent_claims_once(h: Harness) -> None:
    assert await h.store.set_if_absent("k", "a") is True
    assert await h.store.set_if_absent("k", "b") is False
    assert await h.store.get("k") == "a"
    assert await h.store.delete("k") is True
    assert await h.store.set_if_absent("k", "c") is True
    assert await h.store.get("k") == "c"


async def test_set_if_absent_after_expiry_succeeds(h: Harness) -> None:
    assert await h.store.set_if_absent("k", "a", ttl_s=TTL_S) is True
    assert await h.store.set_if_absent("k", "b", ttl_s=TTL_S) is False
    await h.elapse(PAST_TTL_S)
    assert await h.store.set_if_absent("k", "c") is True
    assert await h.store.get("k") == "c"


async def test_set_if_absent_race_has_one_winner(h: Harness) -> None:
    results = await asyncio.gather(
        *(h.store.set_if_absent("{room:1}:busy", f"owner-{i}", ttl_s=5) for i in range(20))
    )
    assert results.count(True) == 1
    winner = results.index(True)
    assert await h.store.get("{room:1}:busy") == f"owner-{winner}"


async def test_delete_reports_existence_for_every_type(h: Harness) -> None:
    assert await h.store.delete("s") is False
    await h.store.set("s", "v")
    await h.store.hset("h", {"f": "v"})
    await h.store.zadd("z", "m", 1.0)
    assert [await h.store.delete(k) for k in ("s", "h", "z")] == [True, True, True]
    assert await h.store.get("s") is None
    assert await h.store.hgetall("h") == {}
    assert await h.store.zrange_by_score("z", float("-inf"), float("inf")) == []


async def test_delete_if_equals_only_deletes_own_value(h: Harness) -> None:
    await h.store.set("lock", "mine")
    assert await h.store.delete_if_equals("lock", "theirs") is False
    assert await h.store.get("lock") == "mine"
    assert await h.store.delete_if_equals("lock", "mine") is True
    assert await h.store.get("lock") is None
    assert await h.store.delete_if_equals("lock", "mine") is False


async def test_delete_if_equals_after_someone_else_reclaimed(h: Harness) -> None:
    await h.store.set_if_absent("lock", "A", ttl_s=TTL_S)
    await h.elapse(PAST_TTL_S)  # A's claim lapses; B claims
    assert await h.store.set_if_absent("lock", "B") is True
    assert await h.store.delete_if_equals("lock", "A") is False
    assert await h.store.get("lock") == "B"


# --- several keys of one hash tag ---------------------------------------------------------
# Keys read together share a tag ({room:1}): on Redis Cluster they must be in one slot.

ROOM_KEYS = ("ban:{room:1}:u", "timeout:{room:1}:u", "slow:{room:1}")


async def test_get_many_reads_in_order_absent_expired_and_non_strings(h: Harness) -> None:
    ban, timeout, slow = ROOM_KEYS
    await h.store.set(ban, "b")
    await h.store.set(timeout, "t", ttl_s=TTL_S)
    await h.store.hset("hash:{room:1}", {"f": "v"})
    assert await h.store.get_many([slow, ban, timeout, "hash:{room:1}", ban]) == [
        None,
        "b",
        "t",
        None,  # not a string: absent, as MGET answers
        "b",
    ]
    await h.elapse(PAST_TTL_S)
    assert await h.store.get_many(ROOM_KEYS) == ["b", None, None]
    assert await h.store.get_many([]) == []


async def test_claim_unless_claims_when_no_guard_exists(h: Harness) -> None:
    ban, timeout, slow = ROOM_KEYS
    await h.store.set(slow, "30")  # read, never a guard
    values, claimed = await h.store.claim_unless(
        "dedupe:{room:1}:m", "a", TTL_S, guards=(ban, timeout), reads=(slow,)
    )
    assert (values, claimed) == ([None, None, "30"], True)
    assert await h.store.get("dedupe:{room:1}:m") == "a"
    # Taken: a second claim fails and changes nothing, whatever its value.
    values, claimed = await h.store.claim_unless(
        "dedupe:{room:1}:m", "b", TTL_S, guards=(ban, timeout), reads=(slow,)
    )
    assert (values, claimed) == ([None, None, "30"], False)
    assert await h.store.get("dedupe:{room:1}:m") == "a"
    # The claim lives for its TTL, like set_if_absent's.
    await h.elapse(PAST_TTL_S)
    assert await h.store.get("dedupe:{room:1}:m") is None
    _, claimed = await h.store.claim_unless("dedupe:{room:1}:m", "c", None, guards=(ban,))
    assert claimed is True
    await h.elapse(PAST_TTL_S)
    assert await h.store.get("dedupe:{room:1}:m") == "c"  # no TTL: kept


@pytest.mark.parametrize("guard", [0, 1])
async def test_claim_unless_takes_no_claim_while_a_guard_exists(h: Harness, guard: int) -> None:
    guards = ROOM_KEYS[:2]
    await h.store.set(guards[guard], "until")
    values, claimed = await h.store.claim_unless("dedupe:{room:1}:m", "a", 60, guards=guards)
    expected: list[str | None] = [None, None]
    expected[guard] = "until"
    assert (values, claimed) == (expected, False)
    # Nothing was taken: once the guard is gone the same claim succeeds.
    assert await h.store.get("dedupe:{room:1}:m") is None
    await h.store.delete(guards[guard])
    values, claimed = await h.store.claim_unless("dedupe:{room:1}:m", "a", 60, guards=guards)
    assert (values, claimed) == ([None, None], True)


async def test_claim_unless_without_keys_to_read_is_set_if_absent(h: Harness) -> None:
    assert await h.store.claim_unless("k{x}", "a", None, guards=()) == ([], True)
    assert await h.store.claim_unless("k{x}", "b", None, guards=()) == ([], False)
    assert await h.store.get("k{x}") == "a"


async def test_claim_unless_race_has_one_winner(h: Harness) -> None:
    results = await asyncio.gather(
        *(
            h.store.claim_unless("dedupe:{room:1}:m", f"v{i}", 5, guards=ROOM_KEYS[:2])
            for i in range(20)
        )
    )
    claimed = [ok for _, ok in results]
    assert claimed.count(True) == 1
    assert await h.store.get("dedupe:{room:1}:m") == f"v{claimed.index(True)}"


async def test_get_many_live_reads_keys_and_whether_a_member_is_live(h: Harness) -> None:
    live, own, seen = "online:{user:1}", "status:{user:1}", "seen:{user:1}"
    await h.store.set(seen, "123.5")
    # No set yet, then only a member scored below the threshold: not live.
    assert await h.store.get_many_live([own, seen], live, 50.0) == ([None, "123.5"], False)
    await h.store.zadd(live, "node-a", 40.0)
    assert await h.store.get_many_live([own, seen], live, 50.0) == ([None, "123.5"], False)
    # A member scored exactly the threshold or more: live.
    await h.store.zadd(live, "node-b", 50.0)
    assert await h.store.get_many_live([seen], live, 50.0) == (["123.5"], True)
    assert await h.store.get_many_live([], live, 50.5) == ([], False)
    # With a write first: the reads see it (and it keeps its TTL).
    written = "in-call:{user:1}"
    assert await h.store.get_many_live(
        [written, own], live, 45.0, write=KeyWrite(written, "1", TTL_S)
    ) == (
        ["1", None],
        True,
    )
    await h.elapse(PAST_TTL_S)
    assert await h.store.get(written) is None
    # Without a TTL; then a delete.
    assert await h.store.get_many_live([written], live, 99.0, write=KeyWrite(written, "2")) == (
        ["2"],
        False,
    )
    assert await h.store.get_many_live([written], live, 0.0, write=KeyWrite(written, None)) == (
        [None],
        True,
    )
    assert await h.store.get(written) is None


# --- counters ----------------------------------------------------------------------------


async def test_set_and_get_writes_then_reads(h: Harness) -> None:
    written, other, absent = "w:{user:1}", "o:{user:1}", "a:{user:1}"
    await h.store.set(other, "x")
    # Set with a TTL: the reads that follow see the new value.
    assert await h.store.set_and_get(KeyWrite(written, "1", TTL_S), [other, written, absent]) == [
        "x",
        "1",
        None,
    ]
    await h.elapse(PAST_TTL_S)
    assert await h.store.get(written) is None
    # Set without a TTL clears an old expiry, as set() does.
    await h.store.set(written, "old", ttl_s=TTL_S)
    assert await h.store.set_and_get(KeyWrite(written, "2"), [written]) == ["2"]
    await h.elapse(PAST_TTL_S)
    assert await h.store.get(written) == "2"
    # Delete (value None); nothing to read is fine.
    assert await h.store.set_and_get(KeyWrite(written, None), [written, other]) == [None, "x"]
    assert await h.store.set_and_get(KeyWrite(written, None), []) == []
    assert await h.store.get(written) is None
    # A delete only while the key holds a value: a flag left to its owner.
    await h.store.set(written, "call-2")
    assert await h.store.set_and_get(KeyWrite(written, None, only_if="call-1"), [written]) == [
        "call-2"
    ]
    assert await h.store.set_and_get(KeyWrite(written, None, only_if="call-2"), [written]) == [None]
    live = "online:{user:1}"
    await h.store.set(written, "call-3")
    write = KeyWrite(written, None, only_if="call-3")
    assert await h.store.get_many_live([written], live, 0.0, write=write) == ([None], False)


async def test_a_guarded_write_happens_only_while_the_guard_key_holds_its_value(
    h: Harness,
) -> None:
    written, flag, other, live = "w:{user:1}", "busy:{user:1}", "o:{user:1}", "online:{user:1}"
    await h.store.set(other, "x")
    guarded = KeyWrite(written, "call-1", TTL_S, guard=(flag, "call-1"))
    # The guard key absent, then holding another value: nothing written, the
    # reads still answered.
    assert await h.store.set_and_get(guarded, [written, other]) == [None, "x"]
    await h.store.set(flag, "call-0")
    assert await h.store.set_and_get(guarded, [written, flag]) == [None, "call-0"]
    # Holding the value: written (with its TTL).
    await h.store.set(flag, "call-1")
    assert await h.store.set_and_get(guarded, [written]) == ["call-1"]
    await h.elapse(PAST_TTL_S)
    assert await h.store.get(written) is None
    # The same through get_many_live, and for a guarded delete.
    await h.store.zadd(live, "node-a", 50.0)
    assert await h.store.get_many_live([written], live, 10.0, write=guarded) == (
        ["call-1"],
        True,
    )
    delete = KeyWrite(written, None, only_if="call-1", guard=(flag, "call-2"))
    assert await h.store.get_many_live([written], live, 60.0, write=delete) == (
        ["call-1"],
        False,
    )
    await h.store.set(flag, "call-2")
    assert await h.store.set_and_get(delete, [written, other]) == [None, "x"]


async def test_incr_counts_in_a_fixed_window(h: Harness) -> None:
    assert [await h.store.incr("rate", TTL_S) for _ in range(3)] == [1, 2, 3]
    await h.elapse(PAST_TTL_S)
    assert await h.store.incr("rate", TTL_S) == 1


async def test_incr_does_not_extend_the_window(h: Harness) -> None:
    window = TTL_S * 2
    assert await h.store.incr("rate", window) == 1
    await h.elapse(window * 0.6)
    assert await h.store.incr("rate", window) == 2
    await h.elapse(window * 0.6)  # 1.2 windows after creation, 0.6 after the last incr
    assert await h.store.incr("rate", window) == 1


async def test_incr_concurrent_counts_every_event(h: Harness) -> None:
    results = await asyncio.gather(*(h.store.incr("rate", 5) for _ in range(20)))
    assert sorted(results) == list(range(1, 21))


# --- hashes ---------------------------------------------------------------------------------


async def test_hset_merges_and_hgetall(h: Harness) -> None:
    assert await h.store.hgetall("call") == {}
    await h.store.hset("call", {"state": "ringing", "from": "u1"})
    await h.store.hset("call", {"state": "accepted", "to": "u2"})
    await h.store.hset("call", {})  # no-op
    assert await h.store.hgetall("call") == {"state": "accepted", "from": "u1", "to": "u2"}


async def test_hset_ttl_expires_and_hset_without_ttl_keeps_it(h: Harness) -> None:
    await h.store.hset("call", {"state": "ringing"}, ttl_s=TTL_S)
    await h.store.hset("call", {"extra": "x"})  # does not clear the expiry
    assert await h.store.hgetall("call") == {"state": "ringing", "extra": "x"}
    await h.elapse(PAST_TTL_S)
    assert await h.store.hgetall("call") == {}


async def test_hcas_missing_key_returns_none_and_creates_nothing(h: Harness) -> None:
    assert await h.store.hcas("call", "state", ("ringing",), {"state": "accepted"}) is None
    assert await h.store.hgetall("call") == {}


async def test_hcas_transitions_only_from_expected(h: Harness) -> None:
    await h.store.hset("call", {"state": "ringing", "from": "u1"})
    assert await h.store.hcas("call", "state", ("accepted",), {"state": "ended"}) is None
    assert await h.store.hcas("call", "missing", ("x",), {"state": "ended"}) is None
    assert await h.store.hcas("call", "state", (), {"state": "ended"}) is None
    assert await h.store.hgetall("call") == {"state": "ringing", "from": "u1"}

    updated = await h.store.hcas(
        "call", "state", ("ringing", "accepted"), {"state": "accepted", "to": "u2"}
    )
    assert updated == {"state": "accepted", "from": "u1", "to": "u2"}
    assert await h.store.hcas("call", "state", {"ringing"}, {"state": "ended"}) is None
    assert await h.store.hcas("call", "state", ["accepted"], {}) == updated


async def test_hcas_race_has_one_winner(h: Harness) -> None:
    await h.store.hset("{call:7}", {"state": "ringing"})
    results = await asyncio.gather(
        *(
            h.store.hcas("{call:7}", "state", ("ringing",), {"state": "accepted", "by": f"u{i}"})
            for i in range(20)
        )
    )
    winners = [r for r in results if r is not None]
    assert len(winners) == 1
    assert results.count(None) == 19
    assert await h.store.hgetall("{call:7}") == winners[0]
    assert winners[0]["state"] == "accepted"


async def test_hcas_sets_ttl(h: Harness) -> None:
    await h.store.hset("call", {"state": "ringing"})
    assert await h.store.hcas("call", "state", ("ringing",), {"state": "accepted"}, ttl_s=TTL_S)
    await h.elapse(TTL_S / 4)
    assert await h.store.hgetall("call") == {"state": "accepted"}
    await h.elapse(PAST_TTL_S)
    assert await h.store.hgetall("call") == {}


async def test_hcas_on_expired_hash_returns_none(h: Harness) -> None:
    await h.store.hset("call", {"state": "ringing"}, ttl_s=TTL_S)
    await h.elapse(PAST_TTL_S)
    assert await h.store.hcas("call", "state", ("ringing",), {"state": "accepted"}) is None


# --- sorted sets ------------------------------------------------------------------------------

INF = float("inf")


async def test_zset_orders_by_score_and_updates(h: Harness) -> None:
    for member, score in [("c", 3.0), ("a", 1.0), ("b", 2.5), ("big", 1.7e12), ("tiny", 1e-3)]:
        await h.store.zadd("z", member, score)
    assert await h.store.zrange_by_score("z", -INF, INF) == [
        ("tiny", 1e-3),
        ("a", 1.0),
        ("b", 2.5),
        ("c", 3.0),
        ("big", 1.7e12),
    ]
    await h.store.zadd("z", "a", 4.0)  # re-adding moves the member
    assert await h.store.zrange_by_score("z", 1.0, 4.0) == [("b", 2.5), ("c", 3.0), ("a", 4.0)]
    assert await h.store.zrange_by_score("z", 2.5, 3.0) == [("b", 2.5), ("c", 3.0)]  # inclusive
    assert await h.store.zrange_by_score("z", -INF, INF, limit=2) == [("tiny", 1e-3), ("b", 2.5)]
    assert await h.store.zrange_by_score("z", -INF, INF, limit=0) == []
    assert await h.store.zrange_by_score("z", 5.0, 4.0) == []
    assert await h.store.zrange_by_score("missing", -INF, INF) == []


async def test_zrange_infinite_bounds_and_scores(h: Harness) -> None:
    await h.store.zadd("z", "low", -INF)
    await h.store.zadd("z", "neg", -5.0)
    await h.store.zadd("z", "pos", 5.0)
    await h.store.zadd("z", "high", INF)
    everything = [("low", -INF), ("neg", -5.0), ("pos", 5.0), ("high", INF)]
    assert await h.store.zrange_by_score("z", -INF, INF) == everything
    assert await h.store.zrange_by_score("z", -INF, 0.0) == everything[:2]
    assert await h.store.zrange_by_score("z", 0.0, INF) == everything[2:]


async def test_zrem(h: Harness) -> None:
    await h.store.zadd("z", "a", 1.0)
    await h.store.zadd("z", "b", 2.0)
    assert await h.store.zrem("z", "a") is True
    assert await h.store.zrem("z", "a") is False
    assert await h.store.zrem("missing", "a") is False
    assert await h.store.zrange_by_score("z", -INF, INF) == [("b", 2.0)]
    assert await h.store.zrem("z", "b") is True
    assert await h.store.delete("z") is False  # the empty set is gone


async def test_zadd_ttl_expires(h: Harness) -> None:
    await h.store.zadd("z", "a", 1.0, ttl_s=TTL_S)
    await h.store.zadd("z", "b", 2.0)  # keeps the expiry
    assert len(await h.store.zrange_by_score("z", -INF, INF)) == 2
    await h.elapse(PAST_TTL_S)
    assert await h.store.zrange_by_score("z", -INF, INF) == []


async def test_zpop_due_takes_due_members_lowest_first(h: Harness) -> None:
    for i in range(6):
        await h.store.zadd("timers", f"t{i}", 100.0 + i)
    assert await h.store.zpop_due("timers", 99.0) == []
    assert await h.store.zpop_due("timers", 103.0, limit=2) == [("t0", 100.0), ("t1", 101.0)]
    assert await h.store.zpop_due("timers", 103.0, limit=0) == []
    assert await h.store.zpop_due("timers", 103.0) == [("t2", 102.0), ("t3", 103.0)]
    assert await h.store.zpop_due("timers", 103.0) == []
    assert await h.store.zrange_by_score("timers", -INF, INF) == [("t4", 104.0), ("t5", 105.0)]
    assert await h.store.zpop_due("timers", INF) == [("t4", 104.0), ("t5", 105.0)]
    assert await h.store.zpop_due("missing", INF) == []


async def test_zpop_due_with_a_lease_rescores_instead_of_removing(h: Harness) -> None:
    for i in range(4):
        await h.store.zadd("timers", f"t{i}", 100.0 + i)
    claimed = await h.store.zpop_due("timers", 102.0, limit=2, lease=500.0)
    assert claimed == [("t0", 100.0), ("t1", 101.0)]
    # Leased members are not due again before their lease...
    assert await h.store.zpop_due("timers", 102.0, lease=500.0) == [("t2", 102.0)]
    assert await h.store.zpop_due("timers", 499.0, lease=900.0) == [("t3", 103.0)]
    assert await h.store.zrange_by_score("timers", -INF, INF) == [
        ("t0", 500.0),
        ("t1", 500.0),
        ("t2", 500.0),
        ("t3", 900.0),
    ]
    # ...and are after it, as if their claimer had died: none was lost.
    assert await h.store.zpop_due("timers", 500.0) == [
        ("t0", 500.0),
        ("t1", 500.0),
        ("t2", 500.0),
    ]
    assert await h.store.zpop_due("missing", INF, lease=1.0) == []
    assert await h.store.zrange_by_score("missing", -INF, INF) == []


async def test_zrem_scored_keeps_members_scored_anew(h: Harness) -> None:
    now = 1764262000.1234567  # a wall-clock score, as the leases use
    await h.store.zadd_members("due", [("a", now), ("b", now), ("c", now + 0.5)])
    claimed = await h.store.zpop_due("due", now + 1, lease=now + 30)
    assert [m for m, _ in claimed] == ["a", "b", "c"]
    await h.store.zadd("due", "b", now + 10)  # scheduled anew meanwhile
    done = [(m, now + 30) for m, _ in claimed]
    assert await h.store.zrem_scored("due", [*done, ("missing", now + 30)]) == 2
    assert await h.store.zrange_by_score("due", -INF, INF) == [("b", now + 10)]
    assert await h.store.zrem_scored("due", [("b", now + 10.000001)]) == 0
    assert await h.store.zrem_scored("due", []) == 0
    assert await h.store.zrem_scored("nothing-here", [("b", 1.0)]) == 0


@pytest.mark.parametrize("lease", [None, 1000.0], ids=["pop", "lease"])
async def test_zpop_due_concurrent_claimers_take_each_member_once(
    h: Harness, lease: float | None
) -> None:
    for i in range(60):
        await h.store.zadd("{timers}", f"t{i}", float(i))

    async def claimer() -> list[str]:
        taken: list[str] = []
        while batch := await h.store.zpop_due("{timers}", 49.0, limit=3, lease=lease):
            taken += (member for member, _ in batch)
            await asyncio.sleep(0)
        return taken

    claimed = await asyncio.gather(*(claimer() for _ in range(10)))
    flat = [member for batch in claimed for member in batch]
    assert len(flat) == len(set(flat)) == 50
    assert set(flat) == {f"t{i}" for i in range(50)}
    remaining = await h.store.zrange_by_score("{timers}", -INF, INF)
    leased = [] if lease is None else [(f"t{i}", lease) for i in range(50)]
    assert sorted(remaining) == sorted([*[(f"t{i}", float(i)) for i in range(50, 60)], *leased])


# --- streams ---------------------------------------------------------------------------------


def _id(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


async def test_xadd_ids_increase_and_entries_are_kept(h: Harness) -> None:
    ids = [await h.store.xadd("log", {"n": str(i), "kind": "call"}, maxlen=100) for i in range(5)]
    assert [_id(i) for i in ids] == sorted({_id(i) for i in ids})
    assert await h.stream("log") == [(i, {"n": str(n), "kind": "call"}) for n, i in enumerate(ids)]


async def test_xadd_maxlen_bounds_the_stream(h: Harness) -> None:
    added = 250
    maxlen = 10
    ids = [await h.store.xadd("log", {"n": str(i)}, maxlen) for i in range(added)]
    entries = await h.stream("log")
    assert entries[-1] == (max(ids, key=_id), {"n": str(added - 1)})
    if h.redis is None:
        assert len(entries) == maxlen
    else:
        # MAXLEN ~ trims whole stream nodes (stream-node-max-entries = 100).
        assert maxlen <= len(entries) <= maxlen + 100


# --- Redis specifics ----------------------------------------------------------------------------


async def test_redis_keys_are_prefixed_and_keep_hash_tags(rh: RedisHarness) -> None:
    await rh.store.set("{call:9}:state", "v")
    await rh.store.xadd("{call:9}:log", {"a": "b"}, 10)
    assert rh.key("{call:9}:state") == rh.store.prefix + "{call:9}:state"
    assert await rh.raw.get(rh.key("{call:9}:state")) == b"v"
    assert await rh.raw.xlen(rh.key("{call:9}:log")) == 1
    # The caller's tag still decides the cluster slot.
    assert key_slot(rh.key("{call:9}:state").encode()) == key_slot(b"call:9")
    with pytest.raises(ValueError):
        RedisStateStore(rh.executor, prefix="sig{x}:")


async def test_redis_ttls_are_set_on_the_key(rh: RedisHarness) -> None:
    await rh.store.set("k", "v", ttl_s=TTL_S)
    assert 0 < await rh.raw.pttl(rh.key("k")) <= TTL_S * 1000
    await rh.store.set("k", "v")
    assert await rh.raw.pttl(rh.key("k")) == -1
    await rh.store.incr("n", 5)
    await rh.store.hset("h", {"a": "b"}, ttl_s=5)
    await rh.store.zadd("z", "m", 1.0, ttl_s=5)
    await rh.store.hset("h2", {"state": "ringing"})
    await rh.store.hcas("h2", "state", ("ringing",), {"state": "accepted"}, ttl_s=5)
    for key in ("n", "h", "z", "h2"):
        assert 4000 < await rh.raw.pttl(rh.key(key)) <= 5000, key


async def test_redis_claim_unless_prefixes_every_key(rh: RedisHarness) -> None:
    await rh.raw.set(rh.key("ban:{room:1}:u"), "x")
    assert await rh.raw.get(rh.key("dedupe:{room:1}:m")) is None
    values, claimed = await rh.store.claim_unless(
        "dedupe:{room:1}:m", "a", 5, guards=("ban:{room:1}:u",)
    )
    assert (values, claimed) == (["x"], False)
    await rh.raw.delete(rh.key("ban:{room:1}:u"))
    assert (await rh.store.claim_unless("dedupe:{room:1}:m", "a", 5, guards=("ban:{room:1}:u",)))[1]
    assert await rh.raw.get(rh.key("dedupe:{room:1}:m")) == b"a"
    assert 4000 < await rh.raw.pttl(rh.key("dedupe:{room:1}:m")) <= 5000
    assert await rh.raw.get("dedupe:{room:1}:m") is None  # only under the prefix


async def test_redis_prefixes_isolate_stores(rh: RedisHarness) -> None:
    other = RedisStateStore(rh.executor, prefix=rh.store.prefix + "other:")
    await rh.store.set("k", "mine")
    assert await other.get("k") is None
    assert await other.set_if_absent("k", "theirs") is True
    assert await rh.store.get("k") == "mine"


async def test_redis_rejects_bad_arguments_before_sending(rh: RedisHarness) -> None:
    with pytest.raises(TypeError):  # a str is a Collection[str] of its characters
        await rh.store.hcas("call", "state", "ringing", {"state": "accepted"})
    with pytest.raises(ValueError):  # Redis streams need a field
        await rh.store.xadd("log", {}, 10)
    with pytest.raises(ValueError):
        await rh.store.zadd("z", "m", float("nan"))


async def test_redis_down_raises_then_recovers(rh: RedisHarness) -> None:
    """A dead Redis fails every call, commands and scripts alike. Through a plain
    redis-py client that is redis.exceptions.ConnectionError ("Connection closed
    by server." on the pooled connection, then "Error 111 connecting ..."), which
    is not an OSError; the AutoPipeline maps it to BrokerUnavailable. After a
    restart the same client reconnects, and the scripts run again through the
    NOSCRIPT fallback (a restarted Redis has an empty script cache)."""
    assert await rh.store.incr("n", 5) == 1  # the script is now cached on the server
    rh.server.kill()
    with pytest.raises(rh.down_error):
        await rh.store.get("k")
    with pytest.raises(rh.down_error):
        await rh.store.incr("n", 5)
    with pytest.raises(rh.down_error):
        await rh.store.set_if_absent("k", "v")

    rh.server.restart()
    assert await rh.store.get("n") is None  # a restarted Redis is empty
    assert await rh.raw.script_exists(INCR_WINDOW.sha1) == [False]
    assert await rh.store.incr("n", 5) == 1
    assert await rh.raw.script_exists(INCR_WINDOW.sha1) == [True]  # loaded by EVAL


async def test_zcount(h: Harness) -> None:
    for i in range(5):
        await h.store.zadd("z", f"m{i}", float(i))
    assert await h.store.zcount("z", 1.0, 3.0) == 3
    assert await h.store.zcount("z", -INF, INF) == 5
    assert await h.store.zcount("z", 10.0, 20.0) == 0
    assert await h.store.zcount("missing", 0.0, 1.0) == 0


async def test_zadd_many_sets_the_member_in_each_set(h: Harness) -> None:
    await h.store.zadd("a{x}", "n0", 0.5)
    await h.store.zadd_many(["a{x}", "b{x}"], "n1", 1.0, 60.0)
    assert await h.store.zrange_by_score("a{x}", -INF, INF) == [("n0", 0.5), ("n1", 1.0)]
    assert await h.store.zrange_by_score("b{x}", -INF, INF) == [("n1", 1.0)]
    await h.store.zadd_many(["b{x}"], "n1", 2.0, 60.0)  # re-scored, not added twice
    assert await h.store.zrange_by_score("b{x}", -INF, INF) == [("n1", 2.0)]


async def test_zadd_many_reaches_every_item_of_a_large_refresh(h: Harness) -> None:
    # More keys than one Redis call takes (SCRIPT_ITEMS_MAX), each under its own
    # tag as the users' presence keys are, and the TTL on every key.
    keys = [f"online:{{u{i}}}" for i in range(SCRIPT_ITEMS_MAX * 2 + 7)]
    await h.store.zadd_many(keys, "node-a", 5.0, TTL_S)
    for key in keys:
        assert await h.store.zrange_by_score(key, -INF, INF) == [("node-a", 5.0)], key
    await h.elapse(PAST_TTL_S)
    for key in keys[:: SCRIPT_ITEMS_MAX // 2]:
        assert await h.store.zrange_by_score(key, -INF, INF) == [], key


async def test_get_groups_reads_each_group_in_order(h: Harness) -> None:
    await h.store.set("a:{u1}", "1")
    await h.store.set("c:{u2}", "3")
    await h.store.hset("h:{u2}", {"f": "v"})
    groups = [("a:{u1}", "b:{u1}"), (), ("c:{u2}", "h:{u2}", "c:{u2}")]
    assert await h.store.get_groups(groups) == [["1", None], [], ["3", None, "3"]]
    assert await h.store.get_groups([]) == []


async def test_zadd_members_and_zrem_members_in_one_call(h: Harness) -> None:
    await h.store.zadd("z", "a", 1.0, ttl_s=TTL_S)
    await h.store.zadd_members("z", [("b", 2.0), ("a", 3.0), ("c", 0.5)])
    assert await h.store.zrange_by_score("z", -INF, INF) == [("c", 0.5), ("b", 2.0), ("a", 3.0)]
    assert await h.store.zrem_members("z", ["a", "missing", "c"]) == 2
    assert await h.store.zrange_by_score("z", -INF, INF) == [("b", 2.0)]
    await h.store.zadd_members("z", [])
    assert await h.store.zrem_members("z", []) == 0
    # The key's expiry is left as it was.
    await h.elapse(PAST_TTL_S)
    assert await h.store.zrange_by_score("z", -INF, INF) == []


# --- Redis Cluster ------------------------------------------------------------------------------


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    cluster = RedisCluster(tmp_path / "cluster").start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def cluster_store(redis_cluster: RedisCluster) -> AsyncIterator[RedisStateStore]:
    """The production cluster executor (redis-py's cluster client, auto-pipelined)."""
    executor = AutoPipeline(connect_client(redis_cluster.url, cluster=True, pool_size=4))
    try:
        yield RedisStateStore(executor, prefix=f"t{uuid.uuid4().hex[:8]}:", slot_of=_slot_of)
    finally:
        await executor.close()


def _slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


def _tags_on_every_node(cluster: RedisCluster) -> list[str]:
    """One hash tag per cluster node (redis-cli --cluster create splits the slots
    in equal ranges, in order)."""
    per_node = 16384 // len(cluster.nodes)
    found: dict[int, str] = {}
    for i in range(10000):
        tag = f"room:c{i}"
        found.setdefault(min(key_slot(tag.encode()) // per_node, len(cluster.nodes) - 1), tag)
        if len(found) == len(cluster.nodes):
            return [found[n] for n in sorted(found)]
    raise AssertionError("no tag for some node")


class TestRedisCluster:
    """Multi-key calls on a 3-node Redis Cluster. A class, not test_ functions:
    tests/integration/test_resp.py re-runs this module's test_ functions through
    the standalone RespClient, which has no cluster."""

    async def test_get_many_and_claim_unless_on_every_node(
        self, redis_cluster: RedisCluster, cluster_store: RedisStateStore
    ) -> None:
        store = cluster_store
        for tag in _tags_on_every_node(redis_cluster):
            ban, timeout, slow = (f"ban:{{{tag}}}:u", f"timeout:{{{tag}}}:u", f"slow:{{{tag}}}")
            await store.set(slow, "5")
            assert await store.get_many([ban, timeout, slow]) == [None, None, "5"]
            claim = f"dedupe:{{{tag}}}:m:u"
            assert await store.claim_unless(
                claim, "a", 60, guards=(ban, timeout), reads=(slow,)
            ) == ([None, None, "5"], True)
            await store.set(timeout, "until", ttl_s=60)
            await store.delete(claim)
            assert await store.claim_unless(
                claim, "a", 60, guards=(ban, timeout), reads=(slow,)
            ) == ([None, "until", "5"], False)
            assert await store.get(claim) is None

    async def test_set_and_get_on_every_node(
        self, redis_cluster: RedisCluster, cluster_store: RedisStateStore
    ) -> None:
        for tag in _tags_on_every_node(redis_cluster):
            written, read = f"in-call:{{{tag}}}", f"status:{{{tag}}}"
            await cluster_store.set(read, "away")
            assert await cluster_store.set_and_get(KeyWrite(written, "1", 60), [read, written]) == [
                "away",
                "1",
            ]
            assert await cluster_store.set_and_get(KeyWrite(written, None), [written]) == [None]

    async def test_get_many_live_on_every_node(
        self, redis_cluster: RedisCluster, cluster_store: RedisStateStore
    ) -> None:
        for tag in _tags_on_every_node(redis_cluster):
            live, written, read = f"online:{{{tag}}}", f"in-call:{{{tag}}}", f"seen:{{{tag}}}"
            await cluster_store.set(read, "7")
            await cluster_store.zadd(live, "node", 100.0)
            assert await cluster_store.get_many_live(
                [read, written], live, 99.0, write=KeyWrite(written, "1", 60)
            ) == (["7", "1"], True)
            assert await cluster_store.get_many_live([read], live, 101.0) == (["7"], False)

    async def test_get_groups_reads_groups_on_different_nodes(
        self, redis_cluster: RedisCluster, cluster_store: RedisStateStore
    ) -> None:
        tags = _tags_on_every_node(redis_cluster)
        for i, tag in enumerate(tags):
            await cluster_store.set(f"k:{{{tag}}}", str(i))
        groups = [(f"k:{{{tag}}}", f"none:{{{tag}}}") for tag in tags]
        assert await cluster_store.get_groups(groups) == [[str(i), None] for i in range(len(tags))]

    async def test_zadd_many_groups_its_items_by_slot(
        self, redis_cluster: RedisCluster, cluster_store: RedisStateStore
    ) -> None:
        tags = _tags_on_every_node(redis_cluster)
        # Keys of every node, interleaved, and more of one slot than one call takes.
        keys = [f"online:{{{tag}}}:{i}" for i in range(3) for tag in tags]
        one_slot = f"online:{{{tags[0]}}}"
        keys += [f"{one_slot}:x{i}" for i in range(SCRIPT_ITEMS_MAX + 1)]
        await cluster_store.zadd_many(keys, "node-a", 1.0, 60)
        for key in keys:
            assert await cluster_store.zrange_by_score(key, -INF, INF) == [("node-a", 1.0)], key

        # Without slot_of the items of several slots would go in one call, which
        # the cluster client refuses: hence the parameter.
        executor = AutoPipeline(connect_client(redis_cluster.url, cluster=True, pool_size=2))
        try:
            unsharded = RedisStateStore(executor, prefix=cluster_store.prefix)
            with pytest.raises(RedisClusterException):
                await asyncio.wait_for(unsharded.zadd_many(keys, "node-a", 1.0, 60), 5)
        finally:
            await executor.close()

    async def test_keys_of_different_slots_are_refused(
        self, redis_cluster: RedisCluster, cluster_store: RedisStateStore
    ) -> None:
        """What a key layout without a shared tag would meet: an error (CROSSSLOT),
        not a read of another node's keys. (A script's keys across slots make
        redis-py's cluster client raise RedisClusterException before sending.)"""
        first, second = _tags_on_every_node(redis_cluster)[:2]
        with pytest.raises(ClusterCrossSlotError):
            await cluster_store.get_many([f"a:{{{first}}}", f"b:{{{second}}}"])
        # A script refused before it is sent fails its caller, and does not hang.
        with pytest.raises(RedisClusterException):
            await asyncio.wait_for(
                cluster_store.claim_unless(f"a:{{{first}}}", "v", 5, guards=[f"b:{{{second}}}"]),
                5,
            )
        assert await cluster_store.get_many([f"a:{{{first}}}"]) == [None]
