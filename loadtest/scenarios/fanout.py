"""``fanout``: one room, N subscribers, publishers at R publications/s in total.

With several workers the publishers get worker 0 to themselves, so their pacing does
not queue behind the subscribers' deliveries.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

from loadtest.client import BaselineClient, CentrifugeClient, Client
from loadtest.scenarios.base import Scenario

__all__ = ["Fanout"]


class Fanout(Scenario):
    name = "fanout"
    baseline_ok = True

    def build(self) -> None:
        s = self.s
        workers = self.plan.count
        self.room = f"{s.run_id}fanout"
        self.channel = f"room:{self.room}"
        self.streams = list(range(s.connections, s.connections + s.publishers))
        publisher_worker = 0
        self.publishers: list[Client] = []
        if self.plan.index == publisher_worker:
            for gid in self.streams:
                client = self.new_client(gid, self.user_id("p", gid))
                self.publishers.append(client)
                self.clients.append(client)
        for gid in range(s.connections):
            owner = 1 + gid % (workers - 1) if workers > 1 else 0
            if owner == self.plan.index:
                client = self.new_client(gid, self.user_id("s", gid))
                self.subscribers.append(client)
                self.clients.append(client)

    async def open_client(self, client: Client) -> None:
        timeout = self.s.connect_timeout_s
        publisher = client in self.publishers
        if isinstance(client, BaselineClient):
            await client.open_baseline(
                self.opener, timeout, "pub" if publisher else "sub", self.room
            )
        elif isinstance(client, CentrifugeClient):
            if publisher:
                await client.open(self.opener, timeout)
                client.channel = self.channel
            else:
                await client.open(self.opener, timeout, subscribe=self.channel)

    def expected_streams(self, client: Client) -> Iterable[int]:
        return self.streams

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        local = [p for p in self.publishers if p.connected]
        rate = self.s.rate * len(local) / max(1, self.s.publishers)
        turn = itertools.cycle(local or [None])

        def send_one() -> None:
            publisher = next(turn)
            if publisher is not None:
                self.publish(publisher, publisher.gid)

        await self.pace(rate if local else 0.0, deadline, stop, send_one)
