"""Which users are online, across every instance.

Each node records, per user with a connection on it, a member of the sorted
set ``online:{<user>}`` whose score is when that record expires (wall clock,
unix seconds). Nodes refresh their members periodically; a member of a node
that died simply ages out. A user is online while any member is unexpired.
When a user's last connection on a node closes, the node removes its member
and stamps ``seen:{<user>}``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from signaling.state.base import KeyWrite, StateStore

__all__ = ["UserPresence", "UserStatus", "online_key", "seen_key"]

log = logging.getLogger("signaling.users")


# Records refreshed per store batch (one round trip on Redis).
REFRESH_BATCH = 2000


def online_key(user: str) -> str:
    # Hash tag: one user's keys share a Redis Cluster slot.
    return f"online:{{{user}}}"


def seen_key(user: str) -> str:
    return f"seen:{{{user}}}"


@dataclass(frozen=True, slots=True)
class UserStatus:
    online: bool
    # Unix seconds the user was last seen going offline (None: unknown).
    last_seen: float | None


class UserPresence:
    # A backstop only: a node that dies has its users' records removed by the
    # presence handler's node reaping; the TTL bounds what is left otherwise.
    # Refreshing every record each ttl/3 is an idle server's second cost after
    # pings, so the TTL is not short.
    def __init__(self, store: StateStore, node_name: str, ttl_s: float = 60.0) -> None:
        self._store = store
        self._node = node_name
        self.ttl_s = ttl_s

    async def went_online(self, user: str) -> None:
        await self._store.zadd(online_key(user), self._node, time.time() + self.ttl_s, self.ttl_s)

    async def went_offline(self, user: str) -> None:
        await self._store.zrem(online_key(user), self._node)
        await self._store.set(seen_key(user), f"{time.time():.3f}", 30 * 86400)

    async def forget_node(self, user: str, node_name: str) -> None:
        """Drop a dead node's record of ``user`` (it cannot do it itself),
        stamping the user's last-seen time if no other node holds them."""
        await self._store.zrem(online_key(user), node_name)
        if not (await self.status(user)).online:
            await self._store.set(seen_key(user), f"{time.time():.3f}", 30 * 86400)

    async def refresh(self, users: list[str]) -> None:
        """Extend this node's records of ``users`` (call every ttl/3)."""
        expires = time.time() + self.ttl_s
        for start in range(0, len(users), REFRESH_BATCH):
            batch = users[start : start + REFRESH_BATCH]
            await self._store.zadd_many(
                [online_key(u) for u in batch], self._node, expires, self.ttl_s
            )

    async def status(self, user: str) -> UserStatus:
        status, _ = await self.status_and_read(user, ())
        return status

    async def status_and_read(
        self,
        user: str,
        reads: Sequence[str],
        write: KeyWrite | None = None,
    ) -> tuple[UserStatus, list[str | None]]:
        """:meth:`status` and the values of ``reads``, keys of the user's own
        that carry the user's hash tag (``{<user>}``), with ``write`` (key,
        value or None to delete, ttl_s) written first: one store command
        (``StateStore.get_many_live``) where a handler would otherwise send
        its own read beside the presence lookup."""
        values, live = await self._store.get_many_live(
            [*reads, seen_key(user)], online_key(user), time.time(), write=write
        )
        seen = values.pop()
        if live:
            return UserStatus(True, None), values
        return UserStatus(False, float(seen) if seen else None), values

    async def is_online(self, user: str) -> bool:
        return (await self.status(user)).online
