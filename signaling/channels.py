"""What the core asks about channels: the policy interface.

The policy itself (which namespaces exist, who may do what) is domain logic
and lives in ``handlers/``; the app hands it to the node. The core enforces
what the policy answers and never hard-codes a namespace.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from signaling.broker.base import HistoryOptions

__all__ = ["ChannelOptions", "ChannelPolicy"]


@dataclass(frozen=True, slots=True)
class ChannelOptions:
    """How a channel behaves; returned by the policy for a channel name."""

    # History kept by the broker (size 0: none, no offsets, no recovery).
    history: HistoryOptions = field(default_factory=HistoryOptions)
    # Presence kept (presence, presence_stats) for subscribers.
    presence: bool = False
    # Join/leave pushes sent to subscribers that ask for them.
    join_leave: bool = False
    # Clients may publish (subject to can_publish); False: server only.
    client_publish: bool = True
    # Subscribing needs a subscription token (channel_token_auth).
    token_required: bool = False

    @property
    def recoverable(self) -> bool:
        return self.history.enabled


class ChannelPolicy(Protocol):
    def options(self, channel: str) -> ChannelOptions | None:
        """Options of a channel, or None if no such channel may exist (102)."""

    def can_subscribe(self, user: str, channel: str) -> bool:
        """May ``user`` subscribe, and read presence and history (else 103)?
        A valid subscription token grants this regardless."""

    def can_publish(self, user: str, channel: str) -> bool:
        """May ``user`` publish (checked after ``client_publish``)?"""

    def personal_channel(self, user: str) -> str | None:
        """The channel every connection of ``user`` is subscribed to by the
        server at connect, or None."""
