"""``idle``: N connections, each subscribed to its personal channel (by the server at
connect) and one room, held with heartbeats answered: memory and idle CPU."""

from __future__ import annotations

from loadtest.client import BaselineClient, CentrifugeClient, Client
from loadtest.scenarios.base import Scenario

__all__ = ["Idle"]


class Idle(Scenario):
    name = "idle"
    baseline_ok = True

    def build(self) -> None:
        for gid in range(self.s.connections):
            if self.mine(gid):
                client = self.new_client(gid, self.user_id("i", gid))
                self.clients.append(client)

    def room(self, gid: int) -> str:
        return f"{self.s.run_id}idle{gid // max(1, self.s.room_size)}"

    async def open_client(self, client: Client) -> None:
        timeout = self.s.connect_timeout_s
        if isinstance(client, BaselineClient):
            await client.open_baseline(self.opener, timeout, "sub", self.room(client.gid))
        elif isinstance(client, CentrifugeClient):
            await client.open(self.opener, timeout, subscribe=f"room:{self.room(client.gid)}")
