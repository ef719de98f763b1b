"""``connect``: a connection storm, then (when the tool controls the server) a restart
that every client survives by reconnecting and recovering its room.

Setup is the storm: every client connects and subscribes as fast as the server accepts
(``--connect-concurrency`` in flight per worker). In the measured phase the coordinator
restarts the server; each client closed by it reconnects with full-jitter backoff (as
the SDKs do) and resubscribes with ``recover: true`` from its last offset. With
``--rate`` a publisher keeps publishing into the rooms throughout, so lost deliveries
across the restart are counted like in every other scenario.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Iterable
from typing import Any

from loadtest.client import BaselineClient, CentrifugeClient, Client
from loadtest.scenarios.base import Scenario, failure_reason
from loadtest.stats import Histogram

__all__ = ["Connect"]


class Connect(Scenario):
    name = "connect"
    baseline_ok = True

    def build(self) -> None:
        s = self.s
        self.rooms = max(1, -(-s.connections // max(1, s.room_size)))
        self.publisher: Client | None = None
        if s.rate > 0 and self.plan.index == 0:
            gid = s.connections
            self.publisher = self.new_client(gid, self.user_id("p", gid))
            self.clients.append(self.publisher)
        for gid in range(s.connections):
            if self.mine(gid):
                client = self.new_client(gid, self.user_id("c", gid))
                self.clients.append(client)
                self.subscribers.append(client)
        self.reconnect_latency = Histogram()
        self.reconnect_failures: dict[str, int] = {}
        self.recovered = 0
        self.not_recovered = 0
        self.still_out = 0
        self.owed_to_still_out = 0
        self.attempts = 0
        self.first_closed_at: float | None = None
        self.last_recovered_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def room_of(self, gid: int) -> int:
        return gid // max(1, self.s.room_size)

    def room_name(self, index: int) -> str:
        return f"{self.s.run_id}conn{index}"

    async def open_client(self, client: Client) -> None:
        timeout = self.s.connect_timeout_s
        if isinstance(client, BaselineClient):
            if client is self.publisher:
                await client.open_baseline(self.opener, timeout, "pub", self.room_name(0))
            else:
                room = self.room_name(self.room_of(client.gid))
                await client.open_baseline(self.opener, timeout, "sub", room)
        elif isinstance(client, CentrifugeClient):
            if client is self.publisher:
                await client.open(self.opener, timeout)
                return
            channel = f"room:{self.room_name(self.room_of(client.gid))}"
            result = await client.open(self.opener, timeout, subscribe=channel)
            if client.reconnects and result is not None:
                if result.get("recovered"):
                    self.recovered += 1
                else:
                    self.not_recovered += 1

    def missing(
        self, acked: dict[int, bytes], clients: Iterable[Client] | None = None
    ) -> tuple[int, int]:
        """As in every scenario, but a client still reconnecting when the run ends
        is left out: it could not have received anything yet, and would recover it
        on its way back. Its share is reported apart (``still_out_at_end``)."""
        if clients is not None:
            return super().missing(acked, clients)
        out = [c for c in self.subscribers if c.ready and not c.connected]
        self.still_out = len(out)
        self.owed_to_still_out = super().missing(acked, out)[1] if out else 0
        back = [c for c in self.subscribers if not c.ready or c.connected]
        return super().missing(acked, back)

    def expected_streams(self, client: Client) -> Iterable[int]:
        if self.s.rate <= 0:
            return ()
        return (self.room_of(client.gid),)

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        publisher = self.publisher
        if publisher is None:
            await super().run(deadline, stop)
            return
        prefix = "" if self.baseline else "room:"
        channels = [(k, f"{prefix}{self.room_name(k)}") for k in range(self.rooms)]
        turn = itertools.cycle(channels)

        def send_one() -> None:
            stream, channel = next(turn)
            self.publish(publisher, stream, channel)

        await self.pace(self.s.rate, deadline, stop, send_one)

    # --- reconnecting ----------------------------------------------------------------

    def on_closed(self, client: Client, code: int, expected: bool) -> None:
        super().on_closed(client, code, expected)
        if expected or self.stopping or not self.s.reconnect:
            return
        if self.first_closed_at is None:
            self.first_closed_at = time.time()
        self._schedule(client, 0)

    def _backoff(self, attempt: int) -> float:
        # Full jitter (PROTOCOL-NOTES §1.6): min + random(0, min(max, min * 2^attempt)).
        s = self.s
        cap = min(s.reconnect_max_s, s.reconnect_min_s * (2**attempt))
        return s.reconnect_min_s + random.uniform(0, cap)

    def _schedule(self, client: Client, attempt: int) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(self._backoff(attempt), self._start_reconnect, client, attempt)

    def _start_reconnect(self, client: Client, attempt: int) -> None:
        if self.stopping:
            return
        task = asyncio.create_task(self._reconnect(client, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconnect(self, client: Client, attempt: int) -> None:
        self.attempts += 1
        client.reconnects += 1
        started = time.perf_counter()
        try:
            await self.open_client(client)
        except Exception as exc:
            reason = failure_reason(exc)
            self.reconnect_failures[reason] = self.reconnect_failures.get(reason, 0) + 1
            client.reconnects -= 1
            if client.ws is not None:
                # Ours to close: its on_closed must not schedule a second reconnect loop.
                client.closing = True
                client.ws.abort()
            if not self.stopping:
                self._schedule(client, attempt + 1)
            return
        self.reconnect_latency.add(int((time.perf_counter() - started) * 1e6))
        self.last_recovered_at = time.time()

    def progress(self) -> dict[str, Any]:
        back = sum(1 for c in self.subscribers if c.reconnects and c.connected)
        return {"reconnected": back, "subscribers": len(self.subscribers)}

    def result(self) -> dict[str, Any]:
        return {
            "rooms": self.rooms,
            "reconnected_clients": sum(1 for c in self.subscribers if c.reconnects and c.connected),
            "reconnect_attempts": self.attempts,
            "reconnect_failures": self.reconnect_failures,
            "recovered": self.recovered,
            "not_recovered": self.not_recovered,
            "still_out_at_end": self.still_out,
            "deliveries_owed_to_still_out": self.owed_to_still_out,
            "first_closed_at": self.first_closed_at,
            "last_recovered_at": self.last_recovered_at,
            "reconnect_latency": self.reconnect_latency.to_wire(),
        }
