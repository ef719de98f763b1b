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

Any other channel is unknown (error 102).
"""

from __future__ import annotations

from dataclasses import dataclass

from signaling.broker.base import HistoryOptions
from signaling.channels import ChannelOptions

__all__ = ["PlatformChannelPolicy", "dm_channel", "personal_channel"]

MAX_ID_LENGTH = 64
_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.@")


def personal_channel(user: str) -> str:
    return f"user:#{user}"


def dm_channel(a: str, b: str) -> str:
    """The canonical DM channel of two users (sorted, so both agree)."""
    first, second = sorted((a, b))
    return f"dm:#{first},{second}"


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and all(c in _ID_CHARS for c in value)


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
        return None

    def can_subscribe(self, user: str, channel: str) -> bool:
        if channel.startswith("room:"):
            return True
        if channel.startswith("dm:#"):
            members = _dm_members(channel)
            return members is not None and user in members
        if channel.startswith("user:#"):
            return channel == personal_channel(user)
        return False

    def can_publish(self, user: str, channel: str) -> bool:
        if channel.startswith("room:"):
            return True
        if channel.startswith("dm:#"):
            members = _dm_members(channel)
            return members is not None and user in members
        # user: is server-only; private: channels are read-only for clients.
        return False

    def personal_channel(self, user: str) -> str | None:
        return personal_channel(user) if _valid_id(user) else None
