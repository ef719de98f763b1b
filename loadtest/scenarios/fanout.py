"""``fanout``: one room, N subscribers, publishers at R publications/s in total.

With several workers the publishers get worker 0 to themselves, so their pacing does
not queue behind the subscribers' deliveries; the subscribers' workers also step back
in the CPU scheduler (``nice`` +10): on a client CPU that their reading saturates, a
publisher stamped its send time and then waited for a time slice before writing, and
that wait went into every delivery's latency, for every server alike.

With ``--arrival-stamps`` every 20th subscriber is a probe: it lives in the
publishers' worker, which the scheduler favors, and only probes are stamped. A stamp
is exact only while the client reads each frame before the next one arrives (the
kernel merges waiting segments and keeps the later arrival); the bulk's workers,
saturated at these rates, fall behind by more than a publication's interval, the
probes do not. A server writes a publication to its subscribers in the order they
subscribed, so the set-up is then paced by subscriber number across all workers
(``PACED_SETUP_PER_S``): the probes subscribe among the others, in every part of
that order, and their latencies sample the room's.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Iterable

from loadtest.client import BaselineClient, CentrifugeClient, Client, opener_for
from loadtest.scenarios.base import Scenario

__all__ = ["Fanout"]

# How far a subscribers-only worker steps back for the publishers (module docstring).
SUBSCRIBER_NICE = 10
# With arrival stamps, one subscriber in this many is a probe (module docstring).
PROBE_EVERY = 20
# ... and subscriber g opens at g / PACED_SETUP_PER_S s after the set-up starts.
PACED_SETUP_PER_S = 1000.0


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
        # Probes only where a worker of their own can favor them; else all are stamped.
        self.probes = (
            set(range(0, s.connections, PROBE_EVERY)) if s.arrival_stamps and workers > 1 else set()
        )
        self.bulk_opener = opener_for(s.backend)
        for gid in range(s.connections):
            owner = 1 + gid % (workers - 1) if workers > 1 else 0
            if gid in self.probes:
                owner = publisher_worker
            if owner == self.plan.index:
                client = self.new_client(gid, self.user_id("s", gid))
                self.subscribers.append(client)
                self.clients.append(client)
        if self.plan.index != publisher_worker:
            with contextlib.suppress(OSError):
                os.nice(SUBSCRIBER_NICE)

    async def open_client(self, client: Client) -> None:
        timeout = self.s.connect_timeout_s
        publisher = client in self.publishers
        stamped = not self.probes or client.gid in self.probes
        opener = self.opener if stamped and not publisher else self.bulk_opener
        if isinstance(client, BaselineClient):
            await client.open_baseline(opener, timeout, "pub" if publisher else "sub", self.room)
        elif isinstance(client, CentrifugeClient):
            if publisher:
                await client.open(opener, timeout)
                client.channel = self.channel
            else:
                await client.open(opener, timeout, subscribe=self.channel)

    async def open_many(self, clients: list[Client]) -> None:
        if not self.probes:
            await super().open_many(clients)
            return
        # Every worker starts its set-up within milliseconds of the others (the
        # coordinator's message): by subscriber number, the probes interleave.
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def open_on_time(client: Client) -> None:
            await asyncio.sleep(max(0.0, start + client.gid / PACED_SETUP_PER_S - loop.time()))
            if not self.stopping:
                await self.open_timed(client)

        await asyncio.gather(*(open_on_time(client) for client in clients))

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
