"""A broker handler for tests that drive a broker directly."""

from __future__ import annotations

import asyncio

from signaling.protocol import ClientInfo, Publication


class LeaveRecorder:
    """Drops publications, joins and control messages; keeps the leaves it is
    given (``left`` is set at each)."""

    def __init__(self) -> None:
        self.leaves: list[tuple[str, ClientInfo]] = []
        self.left = asyncio.Event()

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        pass

    def on_join(self, channel: str, info: ClientInfo) -> None:
        pass

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self.leaves.append((channel, info))
        self.left.set()

    def on_control(self, message: bytes) -> None:
        pass

    def on_broker_reconnected(self) -> None:
        pass

    def channels(self) -> list[str]:
        return []

    def has_channel(self, channel: str) -> bool:
        return False
