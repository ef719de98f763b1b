"""The state store on Redis: every instance sees the same state.

Written against :class:`RedisExecutor`, a two-method seam (one command, one
script) that the Redis broker implements with auto-pipelining over redis-py
(standalone or cluster). This module never imports redis-py.

Key layout and cluster safety:

* Every key is ``prefix + key``. Callers put hash tags (``{call:42}``) in their
  keys so that related keys share a cluster slot; prepending the prefix keeps
  the tag, so the prefix itself must not contain ``{`` or ``}``.
* A method that reads or writes several keys in one command (``get_many``,
  ``claim_unless``, ``set_and_get``, ``get_many_live``) needs them to share a
  hash tag; every script declares its keys in ``KEYS``. ``get_groups`` sends
  one command per group (a group's keys share a tag, groups need not), and
  ``zadd_many`` takes keys of any slots: one script call per slot when the
  store is given ``slot_of`` (Redis Cluster), up to 100 keys per call. So
  all of it runs unchanged on Redis Cluster, where a call whose keys span
  slots fails instead of running on one node with another node's keys (Redis
  answers CROSSSLOT to the MGET; redis-py's cluster client refuses a script's
  keys before sending).

Semantics follow :class:`~signaling.state.memory.MemoryStateStore` (the
reference), with these Redis facts the memory store does not share:

* One key holds one type. Using the same key as a string and as a hash makes
  Redis answer WRONGTYPE (the executor raises); the memory store would keep
  both. Give each structure its own key.
* TTLs are whole milliseconds (``PX``/``PEXPIRE``): ``ttl_s`` is rounded, and a
  TTL below 1 ms (or <= 0) becomes 1 ms, i.e. "expires at once".
* ``xadd`` trims approximately (``MAXLEN ~``): Redis only drops whole stream
  nodes (``stream-node-max-entries``, 100 by default), so a stream can hold up
  to about ``maxlen + 100`` entries. Streams must have at least one field.
* Where a write and its expiry must not be separated (``incr``, ``hcas``, and
  ``hset``/``zadd`` with a TTL) a Lua script does both, so a key never
  outlives a lost connection without its TTL.

Errors: whatever the executor raises passes through unchanged. The broker's
executor (``RedisBroker.state_store``, through ``StoreExecutor``) raises
:class:`~signaling.broker.base.BrokerUnavailable` for connection failures and
for error replies alike (NOSCRIPT aside, which the batched scripts answer by
loading themselves). A bad argument raises :class:`ValueError` or
:class:`TypeError` before anything is sent.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from redis.exceptions import NoScriptError

from signaling.state.base import KeyWrite

__all__ = [
    "CLAIM_UNLESS",
    "DELETE_IF_EQUALS",
    "HCAS",
    "HSET_EXPIRE",
    "INCR_WINDOW",
    "SCRIPTS",
    "SCRIPT_ITEMS_MAX",
    "SET_AND_GET",
    "ZADD_EXPIRE",
    "ZPOP_DUE",
    "ZREM_SCORED",
    "LuaScript",
    "RedisArg",
    "RedisExecutor",
    "RedisStateStore",
    "SlotOf",
    "in_batches",
    "run_script_many",
    "run_script_per_item",
    "ttl_ms",
]

RedisArg = str | bytes | int | float
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class LuaScript:
    """A Lua script and its SHA1. Executors run it with EVALSHA and fall back
    to EVAL on NOSCRIPT (empty script cache after a restart or failover, or a
    cluster node that never saw the script)."""

    source: str
    sha1: str = field(init=False)

    def __post_init__(self) -> None:
        # Frozen dataclass: the derived field is set through object.__setattr__.
        object.__setattr__(self, "sha1", hashlib.sha1(self.source.encode()).hexdigest())


class RedisExecutor(Protocol):
    """Runs Redis commands; implemented by the Redis broker.

    Results are whatever the client returns (bytes or str, lists or dicts,
    RESP2 or RESP3 shapes); :class:`RedisStateStore` normalises them.
    """

    async def execute(self, *args: RedisArg) -> Any:
        """One command, e.g. ``execute("SET", key, value, "PX", 1000)``."""

    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[RedisArg]
    ) -> Any:
        """EVALSHA ``script`` with ``keys``/``args``, EVAL on NOSCRIPT."""

    async def execute_many(self, commands: Sequence[Sequence[RedisArg]]) -> list[Any]:
        """Several commands in one batch, without a task per command; each
        result is the reply or the exception the command failed with."""


async def run_script_many(
    executor: RedisExecutor,
    script: LuaScript,
    calls: Sequence[tuple[Sequence[str], Sequence[RedisArg]]],
) -> list[Any]:
    """``script`` once per (keys, args) in one batch (periodic refreshes of
    thousands of entries); raises the first failure."""
    results = await executor.execute_many(
        [("EVALSHA", script.sha1, len(keys), *keys, *args) for keys, args in calls]
    )
    missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
    if missing:
        retried = await executor.execute_many(
            [("EVAL", script.source, len(calls[i][0]), *calls[i][0], *calls[i][1]) for i in missing]
        )
        for i, result in zip(missing, retried, strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


# Items per call of a per-item script: a few hundred Redis commands, a fraction of
# a millisecond of Redis's single thread.
SCRIPT_ITEMS_MAX = 100

SlotOf = Callable[[str], int]
"""A key's Redis Cluster hash slot (its hash tag decides)."""


def in_batches(
    values: Sequence[T],
    size: int,
    slot_of: Callable[[T], int] | None = None,
    weight: Callable[[T], int] | None = None,
) -> list[list[T]]:
    """``values`` in lists of at most ``size``, in their order; with
    ``slot_of`` (Redis Cluster), each list holds values of one slot only.
    With ``weight``, ``size`` bounds the sum of a list's weights instead of
    its length (a value heavier than ``size`` gets a list of its own)."""
    groups: Iterable[Sequence[T]] = [values]
    if slot_of is not None:
        by_slot: dict[int, list[T]] = {}
        for value in values:
            by_slot.setdefault(slot_of(value), []).append(value)
        groups = by_slot.values()
    batches: list[list[T]] = []
    for group in groups:
        batch: list[T] = []
        total = 0
        for value in group:
            heft = 1 if weight is None else weight(value)
            if batch and total + heft > size:
                batches.append(batch)
                batch, total = [], 0
            batch.append(value)
            total += heft
        if batch:
            batches.append(batch)
    return batches


async def run_script_per_item(
    executor: RedisExecutor,
    script: LuaScript,
    items: Sequence[tuple[Sequence[str], Sequence[RedisArg]]],
    shared: Sequence[RedisArg] = (),
    *,
    slot_of: SlotOf | None = None,
    max_items: int = SCRIPT_ITEMS_MAX,
    item_weight: Callable[[int], int] | None = None,
) -> list[Any]:
    """``script`` over many (keys, args) items in few calls, one batch.

    Each call's KEYS are its items' keys one item after another, its ARGV
    ``shared`` then its items' args the same way; the script loops over its
    items and returns a table of one value per item. Returns those values in
    the order of ``items``. For periodic refreshes of thousands of entries:
    per item, this costs a few arguments where a call of its own costs a
    command, a reply and a future (and Redis a script invocation).

    A call holds at most ``max_items`` items, or with ``item_weight`` (of
    an item's index) items weighing at most ``max_items`` together: items
    that each stand for many entries keep a call as short for Redis's one
    thread as ``max_items`` small ones.

    Every key of one item must share a slot (a hash tag). On Redis Cluster,
    pass ``slot_of``: a call then holds items of one slot only, because
    Redis refuses a call whose keys span slots. Raises the first failure.
    """
    item_slot = None if slot_of is None else (lambda index: slot_of(items[index][0][0]))
    groups = in_batches(range(len(items)), max_items, item_slot, item_weight)
    calls: list[tuple[Sequence[str], Sequence[RedisArg]]] = []
    for group in groups:
        keys = [key for index in group for key in items[index][0]]
        args = [*shared, *(arg for index in group for arg in items[index][1])]
        calls.append((keys, args))
    replies = await run_script_many(executor, script, calls)
    out: list[Any] = [None] * len(items)
    for group, reply in zip(groups, replies, strict=True):
        for index, value in zip(group, reply, strict=True):
            out[index] = value
    return out


# --- scripts ------------------------------------------------------------------------------
# Each touches KEYS[1] only, except CLAIM_UNLESS and SET_AND_GET (their keys share a
# hash tag) and ZADD_EXPIRE given several items (run_script_per_item groups them by
# slot). A Lua ``false`` return is a nil reply.

DELETE_IF_EQUALS = LuaScript(
    """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
)
"""ARGV: value. Delete the string key only while it holds ``value``; 1 or 0."""

CLAIM_UNLESS = LuaScript(
    """
local values = {}
if #KEYS > 1 then
  values = redis.call('MGET', unpack(KEYS, 2))
end
local claimed = 0
local guarded = false
for i = 1, tonumber(ARGV[3]) do
  if values[i] then
    guarded = true
    break
  end
end
if not guarded then
  local ttl = tonumber(ARGV[2])
  local set
  if ttl > 0 then
    set = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ttl)
  else
    set = redis.call('SET', KEYS[1], ARGV[1], 'NX')
  end
  if set then
    claimed = 1
  end
end
table.insert(values, 1, claimed)
return values
"""
)
"""KEYS: the claim, then n guards, then the keys only read. ARGV: value, ttl_ms
(0 = none), n. MGET the guards and reads; unless a guard exists, SET the claim
NX (PX). Returns {1 or 0 (claimed), value or nil per guard and read}."""

SET_AND_GET = LuaScript(
    """
local n = 1
local mode = ARGV[1]
if string.sub(mode, 2) == 'g' then
  mode = string.sub(mode, 1, 1)
  n = 3
  if redis.call('GET', KEYS[2]) ~= ARGV[4] then
    mode = 'x'
  end
end
if mode == '1' then
  local ttl = tonumber(ARGV[3])
  if ttl > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ttl)
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
elseif mode == '0' then
  redis.call('DEL', KEYS[1])
elseif mode == '3' then
  if redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
  end
end
if mode ~= '2' and n == 1 then
  n = 2
end
local live = 0
if ARGV[5] ~= '' then
  live = #redis.call('ZRANGEBYSCORE', KEYS[n], ARGV[5], '+inf', 'LIMIT', 0, 1)
  n = n + 1
end
local values = {}
if #KEYS >= n then
  values = redis.call('MGET', unpack(KEYS, n))
end
return {values, live}
"""
)
"""KEYS: the key written (unless ARGV[1] is 2), the guard key (if ARGV[1] ends
in "g"), the sorted set looked at (if ARGV[5] is not empty), then the keys
read. ARGV: 1 (set), 0 (delete), 3 (delete if it holds the value) or 2 (no
write), with "g" appended when guarded; value, ttl_ms (0 = none), the value
the guard key must hold for the write to happen, the lowest live score or "".
Returns {the values read (nil when absent or not a string), 1 if the set holds
a member scored that or more, else 0}: ``set_and_get`` and ``get_many_live``."""

INCR_WINDOW = LuaScript(
    """
local n = redis.call('INCR', KEYS[1])
if n == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return n
"""
)
"""ARGV: ttl_ms. INCR; the window's expiry is set when the counter is created."""

HCAS = LuaScript(
    """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return false
end
local n = tonumber(ARGV[3])
local matched = false
for i = 4, 3 + n do
  if ARGV[i] == current then
    matched = true
    break
  end
end
if not matched then
  return false
end
for i = 4 + n, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
local ttl = tonumber(ARGV[2])
if ttl > 0 then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return redis.call('HGETALL', KEYS[1])
"""
)
"""ARGV: field, ttl_ms (0 = keep the expiry), n, n expected values, then
field/value pairs. If the hash's ``field`` holds an expected value: set the
pairs, apply the TTL, return HGETALL (flat); otherwise nil and no change."""

HSET_EXPIRE = LuaScript(
    """
for i = 2, #ARGV, 2 do
  redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('PEXPIRE', KEYS[1], ARGV[1])
"""
)
"""ARGV: ttl_ms, then field/value pairs. HSET and PEXPIRE together."""

ZADD_EXPIRE = LuaScript(
    """
local out = {}
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], ARGV[2], ARGV[3])
  out[i] = redis.call('PEXPIRE', KEYS[i], ARGV[1])
end
return out
"""
)
"""ZADD and PEXPIRE together, on one key or on many per call
(:func:`run_script_per_item`), the same member and score in each. KEYS: one
per item. ARGV: ttl_ms, score, member."""

ZPOP_DUE = LuaScript(
    """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1],
                       'WITHSCORES', 'LIMIT', 0, ARGV[2])
for i = 1, #due, 2 do
  if ARGV[3] then
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], due[i])
  else
    redis.call('ZREM', KEYS[1], due[i])
  end
end
return due
"""
)
"""ARGV: max_score, limit[, lease]. Remove and return (flat member, score, ...)
the lowest ``limit`` members with score <= max_score: one claimer gets each.
With a lease score, re-score them to it instead of removing them."""

ZREM_SCORED = LuaScript(
    """
local removed = 0
for i = 1, #ARGV, 2 do
  local current = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if current and tonumber(current) == tonumber(ARGV[i + 1]) then
    redis.call('ZREM', KEYS[1], ARGV[i])
    removed = removed + 1
  end
end
return removed
"""
)
"""ARGV: member, score, ... Remove each member whose score is still the one
given (both sides parse the same shortest decimal text to the same double);
returns how many were removed."""

SCRIPTS: tuple[LuaScript, ...] = (
    CLAIM_UNLESS,
    DELETE_IF_EQUALS,
    INCR_WINDOW,
    HCAS,
    HSET_EXPIRE,
    SET_AND_GET,
    ZADD_EXPIRE,
    ZPOP_DUE,
    ZREM_SCORED,
)
"""Every script this module runs (for SCRIPT LOAD at start-up, optional)."""


# --- argument and reply conversion -------------------------------------------------------


def ttl_ms(ttl_s: float) -> int:
    """A TTL in whole milliseconds, at least 1 (PX 0 is an error)."""
    return max(1, round(ttl_s * 1000))


def _score(score: float) -> str:
    """A score as Redis parses it; infinities are "+inf"/"-inf"."""
    value = float(score)
    if math.isnan(value):
        raise ValueError("a score cannot be NaN")
    if math.isinf(value):
        return "+inf" if value > 0 else "-inf"
    return repr(value)


def _text(raw: Any) -> str:
    if isinstance(raw, bytes):
        return raw.decode()
    if isinstance(raw, str):
        return raw
    raise TypeError(f"unexpected Redis reply {raw!r}")


def _hash(raw: Any) -> dict[str, str]:
    """HGETALL reply: a dict (client callback, RESP3) or a flat list (script)."""
    if not raw:
        return {}
    if isinstance(raw, dict):
        return {_text(k): _text(v) for k, v in raw.items()}
    items = list(raw)
    try:
        # The common reply (RESP2 bytes), decoded without a call per item.
        pairs = iter(items)
        return {k.decode(): v.decode() for k, v in zip(pairs, pairs, strict=True)}
    except AttributeError:
        return {_text(k): _text(v) for k, v in zip(items[::2], items[1::2], strict=True)}


def _scored(raw: Any) -> list[tuple[str, float]]:
    """WITHSCORES reply: flat [member, score, ...] (RESP2, scripts) or pairs (RESP3)."""
    if not raw:
        return []
    items = list(raw)
    if isinstance(items[0], list | tuple):
        return [(_text(member), _float(score)) for member, score in items]
    return [(_text(m), _float(s)) for m, s in zip(items[::2], items[1::2], strict=True)]


def _float(raw: Any) -> float:
    """A score: bytes/str ("1.5", "inf") on RESP2, a double on RESP3."""
    return float(raw) if isinstance(raw, float | int) else float(_text(raw))


def _pairs(values: Mapping[str, str]) -> list[RedisArg]:
    out: list[RedisArg] = []
    for name, value in values.items():
        out += (name, value)
    return out


class RedisStateStore:
    """:class:`~signaling.state.base.StateStore` on Redis through ``executor``.

    Args:
        executor: runs the commands and scripts (auto-pipelined by the broker).
        prefix: prepended to every key and stream name; must not contain a hash
            tag brace, since the callers' tags decide the cluster slot.
        slot_of: on Redis Cluster, a key's hash slot (calls that batch many
            keys group them by slot); None on a standalone Redis.

    Raises:
        ValueError: ``prefix`` contains ``{`` or ``}``.
    """

    def __init__(
        self, executor: RedisExecutor, prefix: str = "sig:", *, slot_of: SlotOf | None = None
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r} must not contain '{{' or '}}'")
        self._exec = executor
        self._prefix = prefix
        self._slot_of = slot_of

    @property
    def prefix(self) -> str:
        return self._prefix

    def key(self, key: str) -> str:
        """The Redis key for ``key`` (e.g. for consumers reading a stream)."""
        return self._prefix + key

    # --- strings ------------------------------------------------------------------------

    async def get(self, key: str) -> str | None:
        raw = await self._exec.execute("GET", self.key(key))
        return None if raw is None else _text(raw)

    async def set(self, key: str, value: str, ttl_s: float | None = None) -> None:
        # A plain SET drops an old expiry, which is what ttl_s=None means.
        if ttl_s is None:
            await self._exec.execute("SET", self.key(key), value)
        else:
            await self._exec.execute("SET", self.key(key), value, "PX", ttl_ms(ttl_s))

    async def set_if_absent(self, key: str, value: str, ttl_s: float | None = None) -> bool:
        args: list[RedisArg] = ["SET", self.key(key), value, "NX"]
        if ttl_s is not None:
            args += ("PX", ttl_ms(ttl_s))
        raw = await self._exec.execute(*args)
        # "OK" on the wire, True through redis-py's SET callback; nil when the key exists.
        return raw is not None and raw is not False

    async def delete(self, key: str) -> bool:
        return int(await self._exec.execute("DEL", self.key(key))) > 0

    async def delete_if_equals(self, key: str, value: str) -> bool:
        raw = await self._exec.run_script(DELETE_IF_EQUALS, [self.key(key)], [value])
        return int(raw) > 0

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:  # MGET needs a key
            return []
        prefix = self._prefix
        raw = await self._exec.execute("MGET", *[prefix + key for key in keys])
        return [None if value is None else _text(value) for value in raw]

    async def get_groups(self, groups: Sequence[Sequence[str]]) -> list[list[str | None]]:
        prefix = self._prefix
        commands = [("MGET", *[prefix + key for key in keys]) for keys in groups if keys]
        replies = iter(await self._exec.execute_many(commands)) if commands else iter(())
        values: list[list[str | None]] = []
        for keys in groups:
            if not keys:  # MGET needs a key
                values.append([])
                continue
            raw = next(replies)
            if isinstance(raw, BaseException):
                raise raw
            values.append([None if value is None else _text(value) for value in raw])
        return values

    async def claim_unless(
        self,
        key: str,
        value: str,
        ttl_s: float | None,
        *,
        guards: Sequence[str],
        reads: Sequence[str] = (),
    ) -> tuple[list[str | None], bool]:
        prefix = self._prefix
        keys = [prefix + key, *[prefix + k for k in guards], *[prefix + k for k in reads]]
        px = 0 if ttl_s is None else ttl_ms(ttl_s)
        raw = await self._exec.run_script(CLAIM_UNLESS, keys, [value, px, len(guards)])
        claimed, *values = raw
        return [None if found is None else _text(found) for found in values], int(claimed) == 1

    async def set_and_get(self, write: KeyWrite, reads: Sequence[str]) -> list[str | None]:
        values, _ = await self._set_and_get(write, reads, None, None)
        return values

    async def get_many_live(
        self,
        reads: Sequence[str],
        live_key: str,
        live_from: float,
        *,
        write: KeyWrite | None = None,
    ) -> tuple[list[str | None], bool]:
        return await self._set_and_get(write, reads, live_key, live_from)

    async def _set_and_get(
        self,
        write: KeyWrite | None,
        reads: Sequence[str],
        live_key: str | None,
        live_from: float | None,
    ) -> tuple[list[str | None], bool]:
        prefix = self._prefix
        keys: list[str] = []
        mode, value_arg, ttl_arg, guard_value = "2", "", 0, ""
        if write is not None:
            key, value, ttl_s, only_if, guard = write
            keys.append(prefix + key)
            if value is not None:
                mode, value_arg, ttl_arg = "1", value, 0 if ttl_s is None else ttl_ms(ttl_s)
            elif only_if is None:
                mode = "0"
            else:
                mode, value_arg = "3", only_if
            if guard is not None:
                keys.append(prefix + guard[0])
                mode += "g"
                guard_value = guard[1]
        args: list[RedisArg] = [mode, value_arg, ttl_arg, guard_value]
        if live_key is None or live_from is None:
            args.append("")
        else:
            keys.append(prefix + live_key)
            args.append(_score(live_from))
        keys += [prefix + k for k in reads]
        values, live = await self._exec.run_script(SET_AND_GET, keys, args)
        return [None if found is None else _text(found) for found in values], int(live) > 0

    async def incr(self, key: str, ttl_s: float) -> int:
        return int(await self._exec.run_script(INCR_WINDOW, [self.key(key)], [ttl_ms(ttl_s)]))

    # --- hashes -----------------------------------------------------------------------------

    async def hgetall(self, key: str) -> dict[str, str]:
        return _hash(await self._exec.execute("HGETALL", self.key(key)))

    async def hset(self, key: str, values: Mapping[str, str], ttl_s: float | None = None) -> None:
        if ttl_s is not None:
            await self._exec.run_script(
                HSET_EXPIRE, [self.key(key)], [ttl_ms(ttl_s), *_pairs(values)]
            )
        elif values:  # HSET needs at least one pair
            await self._exec.execute("HSET", self.key(key), *_pairs(values))

    async def hcas(
        self,
        key: str,
        field: str,
        expected: Collection[str],
        values: Mapping[str, str],
        ttl_s: float | None = None,
    ) -> dict[str, str] | None:
        """Compare-and-set on one hash field (see the protocol).

        Raises:
            TypeError: ``expected`` is a str (a str is a Collection[str] of its
                characters; pass a tuple).
        """
        if isinstance(expected, str):
            raise TypeError("hcas expected must be a collection of values, not a str")
        wanted = list(expected)
        px = 0 if ttl_s is None else ttl_ms(ttl_s)
        args: list[RedisArg] = [field, px, len(wanted), *wanted, *_pairs(values)]
        raw = await self._exec.run_script(HCAS, [self.key(key)], args)
        return None if raw is None else _hash(raw)

    # --- sorted sets -----------------------------------------------------------------------

    async def zadd(self, key: str, member: str, score: float, ttl_s: float | None = None) -> None:
        if ttl_s is None:
            await self._exec.execute("ZADD", self.key(key), _score(score), member)
        else:
            await self._exec.run_script(
                ZADD_EXPIRE, [self.key(key)], [ttl_ms(ttl_s), _score(score), member]
            )

    async def zadd_many(self, keys: Sequence[str], member: str, score: float, ttl_s: float) -> None:
        await run_script_per_item(
            self._exec,
            ZADD_EXPIRE,
            [([self.key(k)], ()) for k in keys],
            [ttl_ms(ttl_s), _score(score), member],
            slot_of=self._slot_of,
        )

    async def zrem(self, key: str, member: str) -> bool:
        return int(await self._exec.execute("ZREM", self.key(key), member)) > 0

    async def zadd_members(self, key: str, members: Sequence[tuple[str, float]]) -> None:
        if members:
            pairs: list[RedisArg] = []
            for member, score in members:
                pairs += (_score(score), member)
            await self._exec.execute("ZADD", self.key(key), *pairs)

    async def zrem_members(self, key: str, members: Sequence[str]) -> int:
        if not members:
            return 0
        return int(await self._exec.execute("ZREM", self.key(key), *members))

    async def zrem_scored(self, key: str, members: Sequence[tuple[str, float]]) -> int:
        if not members:
            return 0
        args: list[RedisArg] = []
        for member, score in members:
            args += (member, _score(score))
        return int(await self._exec.run_script(ZREM_SCORED, [self.key(key)], args))

    async def zrange_by_score(
        self, key: str, min_score: float, max_score: float, limit: int = 100
    ) -> list[tuple[str, float]]:
        # LIMIT 0 -1 would mean "all"; the memory store returns nothing for limit <= 0.
        raw = await self._exec.execute(
            "ZRANGEBYSCORE",
            self.key(key),
            _score(min_score),
            _score(max_score),
            "WITHSCORES",
            "LIMIT",
            0,
            max(0, limit),
        )
        return _scored(raw)

    async def zcount(self, key: str, min_score: float, max_score: float) -> int:
        raw = await self._exec.execute(
            "ZCOUNT", self.key(key), _score(min_score), _score(max_score)
        )
        return int(raw)

    async def zpop_due(
        self, key: str, max_score: float, limit: int = 100, *, lease: float | None = None
    ) -> list[tuple[str, float]]:
        if limit <= 0:
            return []
        args: list[RedisArg] = [_score(max_score), limit]
        if lease is not None:
            args.append(_score(lease))
        raw = await self._exec.run_script(ZPOP_DUE, [self.key(key)], args)
        return _scored(raw)

    # --- streams -----------------------------------------------------------------------------

    async def xadd(self, stream: str, fields: Mapping[str, str], maxlen: int) -> str:
        """Append to the stream ``prefix + stream`` (approximately trimmed).

        Raises:
            ValueError: ``fields`` is empty (Redis streams need one field).
        """
        if not fields:
            raise ValueError("a stream entry needs at least one field")
        raw = await self._exec.execute(
            "XADD", self.key(stream), "MAXLEN", "~", max(0, maxlen), "*", *_pairs(fields)
        )
        return _text(raw)
