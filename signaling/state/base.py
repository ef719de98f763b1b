"""The state-store interface: a few atomic primitives over keys.

Handlers keep shared state through it (call state machines, busy flags,
bans, rate windows, scheduled timers) and it is implemented twice: in memory
(:mod:`signaling.state.memory`, one process) and on Redis
(:mod:`signaling.state.redis`, every instance). Every method is atomic on its
own. Most touch **one key**; those that read several (:meth:`get_many`,
:meth:`claim_unless`, :meth:`set_and_get`) need all the keys of one call in one Redis Cluster slot,
i.e. sharing one hash tag (``chat:ban:{room:1}:u``, ``chat:slow:{room:1}``), so
the Redis implementation also works on a Redis Cluster. Handlers compose other
multi-key work from single-key claims and undo on failure.

Values are strings; hashes map strings to strings. ``ttl_s`` None means the
key never expires; a positive value (re)sets its expiry.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple, Protocol

__all__ = ["KeyWrite", "StateStore"]


class KeyWrite(NamedTuple):
    """One key written before the reads of the same command."""

    key: str
    value: str | None  # None deletes the key
    ttl_s: float | None = None
    # With ``value`` None: delete only while the key holds this (a flag owned
    # by one thing, a call say, that a late clean-up must not take from the next).
    only_if: str | None = None
    # (key, value): write only while that key, which shares this one's hash
    # tag, holds that value (a mark of a call's, written only while the call
    # still holds the user's busy flag, cannot land after the call's end).
    guard: tuple[str, str] | None = None


class StateStore(Protocol):
    # --- strings ------------------------------------------------------------

    async def get(self, key: str) -> str | None: ...

    async def set(self, key: str, value: str, ttl_s: float | None = None) -> None: ...

    async def set_if_absent(self, key: str, value: str, ttl_s: float | None = None) -> bool:
        """Set only if ``key`` does not exist; True if it was set (a claim)."""

    async def delete(self, key: str) -> bool:
        """True if the key existed."""

    async def delete_if_equals(self, key: str, value: str) -> bool:
        """Delete ``key`` only while it still holds ``value`` (release a claim
        without releasing someone else's)."""

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        """The values of ``keys`` in order (None: absent), read at one instant,
        in one command. All keys must share a hash tag (one cluster slot)."""

    async def get_groups(self, groups: Sequence[Sequence[str]]) -> list[list[str | None]]:
        """:meth:`get_many` for each group of keys, in one batch (one command
        per group: groups may lie in different cluster slots)."""

    async def claim_unless(
        self,
        key: str,
        value: str,
        ttl_s: float | None,
        *,
        guards: Sequence[str],
        reads: Sequence[str] = (),
    ) -> tuple[list[str | None], bool]:
        """Read ``guards`` then ``reads`` and, only if no guard exists, claim
        ``key`` as :meth:`set_if_absent` would, atomically: a claim is never
        taken for a request that a guard refuses (nothing to undo). Returns
        (the values of guards then reads, True if ``key`` was set). All keys,
        ``key`` included, must share a hash tag (one cluster slot)."""

    async def set_and_get(self, write: KeyWrite, reads: Sequence[str]) -> list[str | None]:
        """Write ``write.key`` as :meth:`set` would (``value`` None: delete it,
        or with ``only_if`` as :meth:`delete_if_equals` would), then read
        ``reads`` as :meth:`get_many` would, atomically, in one command (a
        write and the reads that follow it in one round trip). All keys, the
        written one included, must share a hash tag (one cluster slot)."""

    async def get_many_live(
        self,
        reads: Sequence[str],
        live_key: str,
        live_from: float,
        *,
        write: KeyWrite | None = None,
    ) -> tuple[list[str | None], bool]:
        """``reads`` as :meth:`get_many` would, and whether the sorted set
        ``live_key`` holds a member scored ``live_from`` or more; with
        ``write``, that key written first as :meth:`set_and_get` would.
        Atomic, in one command: a user's own keys and their presence read in
        one round trip. All keys must share a hash tag (one cluster slot)."""

    async def incr(self, key: str, ttl_s: float) -> int:
        """Increment a counter; its expiry is set when it is created, so
        ``incr`` counts events in a fixed window of ``ttl_s``."""

    # --- hashes -----------------------------------------------------------------

    async def hgetall(self, key: str) -> dict[str, str]:
        """The hash, or {} if the key does not exist."""

    async def hset(
        self, key: str, values: Mapping[str, str], ttl_s: float | None = None
    ) -> None: ...

    async def hcas(
        self,
        key: str,
        field: str,
        expected: Collection[str],
        values: Mapping[str, str],
        ttl_s: float | None = None,
    ) -> dict[str, str] | None:
        """Compare and set: if the hash exists and ``field`` holds one of
        ``expected``, set ``values`` and return the whole updated hash;
        otherwise change nothing and return None. Exactly one of two racing
        transitions from the same state wins."""

    # --- sorted sets (timers, membership) --------------------------------------

    async def zadd(
        self, key: str, member: str, score: float, ttl_s: float | None = None
    ) -> None: ...

    async def zadd_many(self, keys: Sequence[str], member: str, score: float, ttl_s: float) -> None:
        """``zadd(key, member, score, ttl_s)`` for each of ``keys``, in one
        batch: a node's periodic refresh of its records of many users."""

    async def zrem(self, key: str, member: str) -> bool: ...

    async def zadd_members(self, key: str, members: Sequence[tuple[str, float]]) -> None:
        """Add or re-score many (member, score) pairs of one sorted set, in
        one command (the key's expiry is left as it is)."""

    async def zrem_members(self, key: str, members: Sequence[str]) -> int:
        """Remove many members of one sorted set in one command; how many were there."""

    async def zrem_scored(self, key: str, members: Sequence[tuple[str, float]]) -> int:
        """Remove each (member, score) whose member still has that score, in
        one step; how many were removed. The end of a leased claim (see
        :meth:`zpop_due`): a member re-scored since (scheduled anew) is kept."""

    async def zrange_by_score(
        self, key: str, min_score: float, max_score: float, limit: int = 100
    ) -> list[tuple[str, float]]:
        """Members with min_score <= score <= max_score, lowest first."""

    async def zcount(self, key: str, min_score: float, max_score: float) -> int:
        """How many members have min_score <= score <= max_score."""

    async def zpop_due(
        self, key: str, max_score: float, limit: int = 100, *, lease: float | None = None
    ) -> list[tuple[str, float]]:
        """Remove and return members with score <= max_score, lowest first:
        an atomic claim, so each due timer is taken by one instance only.

        With ``lease``, the members are re-scored to it instead of removed, in
        the same step: a claim that comes due again if its claimer never
        finishes (dies, or loses the reply) rather than being lost."""

    # --- event log ---------------------------------------------------------------

    async def xadd(self, stream: str, fields: Mapping[str, str], maxlen: int) -> str:
        """Append an entry to a stream (approximately bounded to ``maxlen``);
        returns its id. Consumers read the stream with their own client."""
