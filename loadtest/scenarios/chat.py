"""``chat``: N users in 2-member DMs and small group rooms, each publishing r msg/s
into its own conversation (and subscribed to it, so it also receives its own).

Against the baseline each conversation is a room of its (``/sub/<room>``: every
member publishes into it and reads it), shared through Redis when the baseline
runs with it (``loadtest/baseline.py``)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

from loadtest.client import BaselineClient, CentrifugeClient, Client
from loadtest.scenarios.base import Scenario

__all__ = ["Chat", "conversations"]


def conversations(n: int, dm_fraction: float, room_size: int) -> tuple[list[list[int]], ...]:
    """(DM pairs, group rooms) as lists of member indices: ``dm_fraction`` of the
    users in pairs, the rest in rooms of ``room_size`` (a lone leftover user joins
    the last room)."""
    n_dm = int(n * dm_fraction) // 2 * 2
    dms = [[k, k + 1] for k in range(0, n_dm, 2)]
    size = max(2, room_size)
    rooms = [list(range(k, min(k + size, n))) for k in range(n_dm, n, size)]
    if len(rooms) > 1 and len(rooms[-1]) == 1:
        rooms[-2].extend(rooms.pop())
    return dms, rooms


class Chat(Scenario):
    name = "chat"
    baseline_ok = True

    def build(self) -> None:
        s = self.s
        users = [self.user_id("u", gid) for gid in range(s.connections)]
        self.channel_of: dict[int, str] = {}
        self.members_of: dict[int, list[int]] = {}
        self.dms, self.rooms = conversations(s.connections, s.dm_fraction, s.room_size)
        for members in self.dms:
            first, second = sorted(users[m] for m in members)
            self._place(members, f"dm:#{first},{second}")
        for members in self.rooms:
            self._place(members, f"room:{users[members[0]]}")
        for gid in range(s.connections):
            if self.mine(gid):
                client = self.new_client(gid, users[gid])
                self.clients.append(client)
                self.subscribers.append(client)

    def _place(self, members: list[int], channel: str) -> None:
        for gid in members:
            self.channel_of[gid] = channel
            self.members_of[gid] = members

    async def open_client(self, client: Client) -> None:
        channel = self.channel_of[client.gid]
        timeout = self.s.connect_timeout_s
        if isinstance(client, BaselineClient):
            # A room name that fits in a URL path ("dm:#a,b" would not).
            room = channel.replace(":#", "-").replace(":", "-").replace(",", "-")
            await client.open_baseline(self.opener, timeout, "sub", room)
        else:
            assert isinstance(client, CentrifugeClient)
            await client.open(self.opener, timeout, subscribe=channel)

    def expected_streams(self, client: Client) -> Iterable[int]:
        return self.members_of[client.gid]

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        local = [c for c in self.clients if c.connected]
        turn = itertools.cycle(local or [None])

        def send_one() -> None:
            client = next(turn)
            if client is not None:
                self.publish(client, client.gid)

        await self.pace(self.s.rate * len(local), deadline, stop, send_one)

    def result(self) -> dict[str, object]:
        return {"dms": len(self.dms), "rooms": len(self.rooms)}
