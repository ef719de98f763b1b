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
        # Every publish, subscribe and history request asks: the options of
        # each namespace are built once per policy and shared.
        shared = _namespace_options(self.history_size, self.history_ttl_s)
        if channel.startswith("room:"):
            return shared.room if _valid_id(channel[len("room:") :]) else None
        if channel.startswith("dm:#"):
            return shared.dm if _dm_members(channel) is not None else None
        if channel.startswith("user:#"):
            return shared.personal if _valid_id(channel[len("user:#") :]) else None
        if channel.startswith("private:"):
            return shared.private if _valid_id(channel[len("private:") :]) else None
        if channel.startswith("status:"):
            return shared.status if _valid_id(channel[len("status:") :]) else None
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


@dataclass(frozen=True, slots=True)
class _NamespaceOptions:
    room: ChannelOptions
    dm: ChannelOptions
    personal: ChannelOptions
    private: ChannelOptions
    status: ChannelOptions


@functools.lru_cache(maxsize=16)
def _namespace_options(history_size: int, history_ttl_s: float) -> _NamespaceOptions:
    history = HistoryOptions(history_size, history_ttl_s)
    return _NamespaceOptions(
        room=ChannelOptions(history=history, presence=True, join_leave=True),
        dm=ChannelOptions(history=history, presence=True, join_leave=True),
        personal=ChannelOptions(history=history, client_publish=False),
        private=ChannelOptions(history=history, presence=True, token_required=True),
        # One publication kept: the latest state, for recovery after a
        # reconnect; anything older is stale by definition.
        status=ChannelOptions(
            history=HistoryOptions(min(1, history_size), history_ttl_s), client_publish=False
        ),
    )
