"""The channel policy: which channels exist and who may do what in them.

Namespaces (README § Channels):

* ``room:<creator_id>`` — a creator's live-room chat. Any authenticated user
  may subscribe and publish. History, presence, join/leave.
* ``dm:#<a>,<b>`` — a direct conversation, user-limited: only the listed
  users may subscribe or publish. History, presence.
* ``user:#<id>`` — a user's personal channel. Only that user subscribes (the
  server does it at connect); clients never publish, the server pushes (call
  events). History, so pushes missed while offline are recovered.
* ``private:<name>`` — subscribers need a subscription token from the
  platform's backend (e.g. paid content). History, presence.
* ``status:<user_id>`` — a user's online state and availability
  (handlers/presence.py). Any authenticated user may subscribe; clients never
  publish. History of one publication (the latest state), no presence.

The chat handlers (handlers/chat/) add, on top of this policy, a schema for
what is published to ``room:`` and ``dm:`` and live-room moderation (bans
refuse subscribing and publishing).

Any other channel is unknown (error 102).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from signaling.broker.base import HistoryOptions
from signaling.channels import ChannelOptions

__all__ = [
    "PlatformChannelPolicy",
    "dm_channel",
    "dm_members",
    "personal_channel",
    "room_owner",
    "status_channel",
]

MAX_ID_LENGTH = 64
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.@")


def personal_channel(user: str) -> str:
    return f"user:#{user}"


def dm_channel(a: str, b: str) -> str:
    """The canonical DM channel of two users (sorted, so both agree)."""
    first, second = sorted((a, b))
    return f"dm:#{first},{second}"


def status_channel(user: str) -> str:
    return f"status:{user}"


def _valid_id(value: str) -> bool:
    # issuperset walks the string in C: a tenth of a generator's cost.
    return 0 < len(value) <= MAX_ID_LENGTH and _ID_CHARS.issuperset(value)


def room_owner(channel: str) -> str | None:
    """The creator who owns a ``room:`` channel, or None if not one."""
    if not channel.startswith("room:"):
        return None
    owner = channel[len("room:") :]
    return owner if _valid_id(owner) else None


def dm_members(channel: str) -> tuple[str, str] | None:
    """The two members of a ``dm:`` channel, or None if not a valid one."""
    if not channel.startswith("dm:#"):
        return None
    return _dm_members(channel)


# Asked on every DM publish (policy options, publish right, chat kind).
# Bounded: channels come and go.
@functools.lru_cache(maxsize=4096)
def _dm_members(channel: str) -> tuple[str, str] | None:
    members = channel[len("dm:#") :].split(",")
    # One conversation, one channel: members must be in sorted order.
    if len(members) != 2 or not all(_valid_id(m) for m in members) or members[0] >= members[1]:
        return None
    return members[0], members[1]


@dataclass(frozen=True, slots=True)
class PlatformChannelPolicy:
    history_size: int
    history_ttl_s: float

    def options(self, channel: str) -> ChannelOptions | None:
        return _cached_options(self, channel)

    def _options(self, channel: str) -> ChannelOptions | None:
        history = HistoryOptions(self.history_size, self.history_ttl_s)
        if channel.startswith("room:"):
            if not _valid_id(channel[len("room:") :]):
                return None
            return ChannelOptions(history=history, presence=True, join_leave=True)
        if channel.startswith("dm:#"):
            if _dm_members(channel) is None:
                return None
            return ChannelOptions(history=history, presence=True, join_leave=True)
        if channel.startswith("user:#"):
            if not _valid_id(channel[len("user:#") :]):
                return None
            return ChannelOptions(history=history, client_publish=False)
        if channel.startswith("private:"):
            if not _valid_id(channel[len("private:") :]):
                return None
            return ChannelOptions(history=history, presence=True, token_required=True)
        if channel.startswith("status:"):
            if not _valid_id(channel[len("status:") :]):
                return None
            # One publication kept: the latest state, for recovery after a
            # reconnect; anything older is stale by definition.
            latest = HistoryOptions(min(1, self.history_size), self.history_ttl_s)
            return ChannelOptions(history=latest, client_publish=False)
        return None

    def can_subscribe(self, user: str, channel: str) -> bool:
        if channel.startswith("room:"):
            return True
        if channel.startswith("dm:#"):
            members = _dm_members(channel)
            return members is not None and user in members
        if channel.startswith("user:#"):
            return channel == personal_channel(user)
        if channel.startswith("status:"):
            # Any authenticated user: a fan's app follows a creator's status.
            return bool(user)
        return False

    def can_publish(self, user: str, channel: str) -> bool:
        if channel.startswith("room:"):
            return True
        if channel.startswith("dm:#"):
            members = _dm_members(channel)
            return members is not None and user in members
        # user: and status: are server-only; private: is read-only for clients.
        return False

    def personal_channel(self, user: str) -> str | None:
        return personal_channel(user) if _valid_id(user) else None


# Options depend only on the policy's settings and the name, and every publish,
# subscribe and history request asks (two dataclasses and a name check each).
# Bounded: channels come and go.
@functools.lru_cache(maxsize=8192)
def _cached_options(policy: PlatformChannelPolicy, channel: str) -> ChannelOptions | None:
    return policy._options(channel)
