"""The state store in this process's memory (embedded broker).

Expired keys are dropped lazily when touched and by :meth:`sweep`, run by
the broker's periodic sweep so that memory stays bounded.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import deque
from collections.abc import Callable, Collection, Mapping, Sequence

from signaling.state.base import KeyWrite

__all__ = ["MemoryStateStore", "StreamEntry"]

StreamEntry = tuple[str, dict[str, str]]


class MemoryStateStore:
    """In-process :class:`~signaling.state.base.StateStore`."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._strings: dict[str, str] = {}
        self._hashes: dict[str, dict[str, str]] = {}
        # Sorted sets: member → score, plus a sorted list of (score, member).
        self._zsets: dict[str, tuple[dict[str, float], list[tuple[float, str]]]] = {}
        self._streams: dict[str, deque[StreamEntry]] = {}
        self._stream_seq = 0
        self._expiry: dict[str, float] = {}

    # --- expiry -----------------------------------------------------------------

    def _alive(self, key: str) -> bool:
        deadline = self._expiry.get(key)
        if deadline is not None and deadline <= self._clock():
            self._drop(key)
            return False
        return True

    def _drop(self, key: str) -> None:
        self._expiry.pop(key, None)
        self._strings.pop(key, None)
        self._hashes.pop(key, None)
        self._zsets.pop(key, None)

    def _expire(self, key: str, ttl_s: float | None) -> None:
        if ttl_s is not None:
            self._expiry[key] = self._clock() + ttl_s

    def sweep(self) -> None:
        now = self._clock()
        for key in [k for k, deadline in self._expiry.items() if deadline <= now]:
            self._drop(key)

    # --- strings -------------------------------------------------------------------

    async def get(self, key: str) -> str | None:
        return self._strings.get(key) if self._alive(key) else None

    async def set(self, key: str, value: str, ttl_s: float | None = None) -> None:
        self._alive(key)
        self._strings[key] = value
        if ttl_s is None:
            self._expiry.pop(key, None)
        self._expire(key, ttl_s)

    async def set_if_absent(self, key: str, value: str, ttl_s: float | None = None) -> bool:
        if self._alive(key) and key in self._strings:
            return False
        await self.set(key, value, ttl_s)
        return True

    async def delete(self, key: str) -> bool:
        existed = self._alive(key) and (
            key in self._strings or key in self._hashes or key in self._zsets
        )
        self._drop(key)
        return existed

    async def delete_if_equals(self, key: str, value: str) -> bool:
        if self._alive(key) and self._strings.get(key) == value:
            self._drop(key)
            return True
        return False

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        strings = self._strings
        return [strings.get(key) if self._alive(key) else None for key in keys]

    async def get_groups(self, groups: Sequence[Sequence[str]]) -> list[list[str | None]]:
        return [await self.get_many(keys) for keys in groups]

    async def claim_unless(
        self,
        key: str,
        value: str,
        ttl_s: float | None,
        *,
        guards: Sequence[str],
        reads: Sequence[str] = (),
    ) -> tuple[list[str | None], bool]:
        # Nothing awaits in between: atomic like the Redis script.
        values = await self.get_many([*guards, *reads])
        if any(found is not None for found in values[: len(guards)]):
            return values, False
        return values, await self.set_if_absent(key, value, ttl_s)

    async def set_and_get(self, write: KeyWrite, reads: Sequence[str]) -> list[str | None]:
        # Nothing awaits in between: atomic like the Redis script.
        key, value, ttl_s, only_if, guard = write
        if guard is not None and await self.get(guard[0]) != guard[1]:
            pass  # not written: the guard key does not hold its value
        elif value is not None:
            await self.set(key, value, ttl_s)
        elif only_if is None:
            await self.delete(key)
        else:
            await self.delete_if_equals(key, only_if)
        return await self.get_many(reads)

    async def get_many_live(
        self,
        reads: Sequence[str],
        live_key: str,
        live_from: float,
        *,
        write: KeyWrite | None = None,
    ) -> tuple[list[str | None], bool]:
        # Nothing awaits in between: atomic like the Redis script.
        values = await (self.get_many(reads) if write is None else self.set_and_get(write, reads))
        live = await self.zrange_by_score(live_key, live_from, math.inf, limit=1)
        return values, bool(live)

    async def incr(self, key: str, ttl_s: float) -> int:
        if not self._alive(key) or key not in self._strings:
            self._strings[key] = "0"
            self._expire(key, ttl_s)
        value = int(self._strings[key]) + 1
        self._strings[key] = str(value)
        return value

    # --- hashes ------------------------------------------------------------------------

    async def hgetall(self, key: str) -> dict[str, str]:
        return dict(self._hashes.get(key, {})) if self._alive(key) else {}

    async def hset(self, key: str, values: Mapping[str, str], ttl_s: float | None = None) -> None:
        self._alive(key)
        self._hashes.setdefault(key, {}).update(values)
        self._expire(key, ttl_s)

    async def hcas(
        self,
        key: str,
        field: str,
        expected: Collection[str],
        values: Mapping[str, str],
        ttl_s: float | None = None,
    ) -> dict[str, str] | None:
        if isinstance(expected, str):
            raise TypeError("expected must be a collection of values, not a string")
        if not self._alive(key):
            return None
        current = self._hashes.get(key)
        if current is None or current.get(field) not in expected:
            return None
        current.update(values)
        self._expire(key, ttl_s)
        return dict(current)

    # --- sorted sets -------------------------------------------------------------------------

    def _zset(self, key: str) -> tuple[dict[str, float], list[tuple[float, str]]]:
        self._alive(key)
        return self._zsets.setdefault(key, ({}, []))

    async def zadd(self, key: str, member: str, score: float, ttl_s: float | None = None) -> None:
        scores, ordered = self._zset(key)
        old = scores.get(member)
        if old is not None:
            ordered.remove((old, member))
        scores[member] = score
        bisect.insort(ordered, (score, member))
        self._expire(key, ttl_s)

    async def zadd_many(self, keys: Sequence[str], member: str, score: float, ttl_s: float) -> None:
        for key in keys:
            await self.zadd(key, member, score, ttl_s)

    async def zrem(self, key: str, member: str) -> bool:
        scores, ordered = self._zset(key)
        old = scores.pop(member, None)
        if old is None:
            return False
        ordered.remove((old, member))
        if not scores:
            self._drop(key)
        return True

    async def zadd_members(self, key: str, members: Sequence[tuple[str, float]]) -> None:
        for member, score in members:
            await self.zadd(key, member, score)  # no ttl: the expiry is left as it is

    async def zrem_members(self, key: str, members: Sequence[str]) -> int:
        return sum([await self.zrem(key, member) for member in members])

    async def zrem_scored(self, key: str, members: Sequence[tuple[str, float]]) -> int:
        if not self._alive(key) or key not in self._zsets:
            return 0
        scores, _ = self._zsets[key]
        current = [m for m, score in members if scores.get(m) == score]
        return await self.zrem_members(key, current)

    async def zrange_by_score(
        self, key: str, min_score: float, max_score: float, limit: int = 100
    ) -> list[tuple[str, float]]:
        if not self._alive(key) or key not in self._zsets:
            return []
        _, ordered = self._zsets[key]
        start = bisect.bisect_left(ordered, (min_score, ""))
        out: list[tuple[str, float]] = []
        for score, member in ordered[start:]:
            if score > max_score or len(out) >= limit:
                break
            out.append((member, score))
        return out

    async def zcount(self, key: str, min_score: float, max_score: float) -> int:
        if not self._alive(key) or key not in self._zsets:
            return 0
        _, ordered = self._zsets[key]
        start = bisect.bisect_left(ordered, (min_score, ""))
        end = bisect.bisect_right(ordered, (max_score, "\U0010ffff"))
        return max(0, end - start)

    async def zpop_due(
        self, key: str, max_score: float, limit: int = 100, *, lease: float | None = None
    ) -> list[tuple[str, float]]:
        due = await self.zrange_by_score(key, float("-inf"), max_score, limit)
        for member, _ in due:
            if lease is None:
                await self.zrem(key, member)
            else:
                await self.zadd(key, member, lease)
        return due

    # --- streams ----------------------------------------------------------------------------------

    async def xadd(self, stream: str, fields: Mapping[str, str], maxlen: int) -> str:
        self._stream_seq += 1
        entry_id = f"{int(time.time() * 1000)}-{self._stream_seq}"
        entries = self._streams.setdefault(stream, deque(maxlen=maxlen))
        entries.append((entry_id, dict(fields)))
        return entry_id

    def read_stream(self, stream: str) -> list[StreamEntry]:
        """Everything kept in ``stream`` (the embedded broker's event log)."""
        return list(self._streams.get(stream, ()))
