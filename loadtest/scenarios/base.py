"""What every scenario does in a worker: build clients, open them, publish at a paced
rate, and after the run check every acknowledged publication against what each
subscriber received (lost, duplicated)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from loadtest.client import (
    BaselineClient,
    CentrifugeClient,
    Client,
    ConnectionClosedError,
    ServerError,
    opener_for,
)
from loadtest.config import RunSettings, WorkerPlan
from loadtest.recorder import Recorder
from loadtest.stats import bitmap_count, bitmap_missing

__all__ = ["Scenario", "failure_reason"]

JSONDict = dict[str, Any]
# Size of a publication's data without its text padding (see :meth:`Scenario.publish`).
_DATA_OVERHEAD = 74
# If the pacer falls this many seconds behind (a saturated client), it drops the
# backlog instead of bursting it: the burst would measure the client, not the server.
_MAX_BEHIND_S = 0.5
# Drain: stop waiting when nothing has arrived for this long.
_DRAIN_IDLE_S = 3.0


def failure_reason(exc: BaseException) -> str:
    """A short, countable label for why a connection attempt failed."""
    if isinstance(exc, ServerError):
        return f"error {exc.code}"
    if isinstance(exc, ConnectionClosedError):
        return f"closed {exc.code}"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno is not None:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


class Scenario:
    """Base class; subclasses set roles in :meth:`build` and load in :meth:`run`."""

    name = "base"
    # Baseline protocol supported (no auth, no channels: fanout, idle, connect only).
    baseline_ok = False

    def __init__(self, plan: WorkerPlan, recorder: Recorder) -> None:
        self.plan = plan
        self.s: RunSettings = plan.settings
        self.rec = recorder
        self.opener = opener_for(self.s.backend, self.s.arrival_stamps)
        self.baseline = self.s.protocol == "baseline"
        if self.baseline and not self.baseline_ok:
            raise ValueError(f"scenario {self.name} needs the centrifuge protocol")
        self.clients: list[Client] = []
        # Clients whose deliveries are checked for loss, with the streams they expect.
        self.subscribers: list[Client] = []
        self.next_seq: dict[int, int] = {}
        # Chat messages need non-blank text (handlers/chat/schema.py).
        self.pad = "x" * max(1, self.s.payload_bytes - _DATA_OVERHEAD)
        self.fatal: str | None = None
        self.stopping = False
        self._tokens = _TokenSource(self.s)

    # --- to override ---------------------------------------------------------------------

    def build(self) -> None:
        """Create this worker's clients (``self.clients``, ``self.subscribers``)."""
        raise NotImplementedError

    async def open_client(self, client: Client) -> None:
        """Connect one client and put it where the scenario wants it."""
        raise NotImplementedError

    def expected_streams(self, client: Client) -> Iterable[int]:
        """The publication streams ``client`` must receive every acked message of."""
        return ()

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        """The measured phase; by default just hold the connections."""
        await _until(deadline, stop)

    def result(self) -> JSONDict:
        """Scenario-specific figures for the report."""
        return {}

    # --- building blocks ---------------------------------------------------------------------

    def new_client(self, gid: int, user: str, *, url_index: int | None = None) -> Client:
        s = self.s
        url = s.urls[(gid if url_index is None else url_index) % len(s.urls)]
        source = s.source_addresses[gid % len(s.source_addresses)]
        cls = BaselineClient if self.baseline else CentrifugeClient
        return cls(gid, user, url, source, self._tokens.token(gid, user), self)

    def user_id(self, role: str, gid: int) -> str:
        return f"{self.s.run_id}{role}{gid}"

    def mine(self, gid: int) -> bool:
        return gid % self.plan.count == self.plan.index

    async def setup(self) -> JSONDict:
        """Open every client, ``connect_concurrency`` at a time."""
        started = time.perf_counter()
        started_at = time.time()
        await self.open_many(self.clients)
        elapsed = time.perf_counter() - started
        connected = sum(1 for c in self.clients if c.connected)
        return {
            "clients": len(self.clients),
            "connected": connected,
            "setup_s": elapsed,
            "started_at": started_at,
            "first_at": self.rec.extra.get("first_connected_at"),
            "last_at": self.rec.extra.get("last_connected_at"),
        }

    async def open_many(self, clients: list[Client]) -> None:
        queue: Iterator[Client] = iter(clients)
        workers = min(self.s.connect_concurrency, len(clients))
        await asyncio.gather(*(self._opener_loop(queue) for _ in range(workers)))

    async def _opener_loop(self, queue: Iterator[Client]) -> None:
        for client in queue:
            if self.stopping:
                return
            await self.open_timed(client)

    async def open_timed(self, client: Client) -> bool:
        """Open ``client``; count a failure by reason, or the time it took."""
        started = time.perf_counter()
        try:
            await self.open_client(client)
        except (OSError, TimeoutError, ServerError, ConnectionClosedError, ValueError) as exc:
            self.rec.connect_failures[failure_reason(exc)] += 1
            if client.ws is not None:
                client.closing = True  # counted here, not again as a disconnect
                client.ws.abort()
            return False
        self.rec.connect_latency.add(int((time.perf_counter() - started) * 1e6))
        client.ready = True
        now = time.time()
        extra = self.rec.extra
        extra.setdefault("first_connected_at", now)
        extra["last_connected_at"] = now
        return True

    def publish(self, client: Client, stream: int, channel: str | None = None) -> None:
        """Send the next publication of ``stream`` from ``client`` to ``channel``
        (default: the client's own channel)."""
        seq = self.next_seq.get(stream, 0)
        self.next_seq[stream] = seq + 1
        if not client.connected or client.inflight >= self.s.max_inflight:
            self.rec.pub_skipped += 1
            return
        # A valid chat message (room: and dm: channels only accept those); the stream,
        # the sequence number and the send time (µs) ride in client_msg_id, whose
        # alphabet allows digits and "-". Unique ids: the server's dedupe never drops one.
        data = {
            "type": "message",
            "text": self.pad,
            "client_msg_id": f"{stream}-{seq}-{time.time_ns() // 1000}",
        }
        client.publish(channel or client.channel, data, stream, seq)
        self.rec.pub_sent += 1

    async def pace(
        self, rate: float, deadline: float, stop: asyncio.Event, send_one: Callable[[], None]
    ) -> None:
        """Call ``send_one`` ``rate`` times per second, evenly, until the deadline."""
        if rate <= 0:
            await _until(deadline, stop)
            return
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + (deadline - time.time())
        # libuv timers have 1 ms resolution: a shorter sleep spins the loop. At high
        # rates several publications go per tick instead.
        tick = 0.005
        max_burst = max(1, int(rate * _MAX_BEHIND_S))
        sent = 0
        behind = 0
        while not stop.is_set():
            now = loop.time()
            if now >= end:
                break
            due = int((now - start) * rate) - sent
            if due > max_burst:
                behind += due - max_burst
                sent += due - max_burst
                due = max_burst
            for _ in range(due):
                send_one()
            sent += due
            await asyncio.sleep(tick)
        self.rec.extra["pacer_dropped"] = self.rec.extra.get("pacer_dropped", 0) + behind

    # --- after the run ------------------------------------------------------------------------

    def missing(
        self, acked: dict[int, bytes], clients: Iterable[Client] | None = None
    ) -> tuple[int, int]:
        """(expected deliveries, deliveries still missing) over the set-up subscribers
        (or over ``clients``)."""
        expected = 0
        missing = 0
        empty = b""
        for client in self.subscribers if clients is None else clients:
            if not client.ready:
                continue  # never set up: nothing was promised to it
            received = client.received or {}
            for stream in self.expected_streams(client):
                want = acked.get(stream)
                if want:
                    expected += bitmap_count(want)
                    missing += bitmap_missing(want, received.get(stream, empty))
        return expected, missing

    async def drain(self, acked: dict[int, bytes], timeout: float) -> None:
        """Wait until every acked publication reached every subscriber, or until
        nothing arrives any more; then record expected, lost and duplicated."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        last_count = self.rec.deliveries
        last_change = loop.time()
        started = loop.time()
        while True:
            expected, missing = self.missing(acked)
            now = loop.time()
            if missing == 0 or now >= end:
                break
            if self.rec.deliveries != last_count:
                last_count, last_change = self.rec.deliveries, now
            elif now - last_change >= _DRAIN_IDLE_S:
                break
            await asyncio.sleep(0.05)
        extra = self.rec.extra
        extra["expected"] = expected
        extra["lost"] = missing
        extra["drain_s"] = round(loop.time() - started, 3)

    async def close(self) -> None:
        self.stopping = True
        for client in self.clients:
            client.close()
        # Let the close frames go out and the servers answer.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and any(c.connected for c in self.clients):
            await asyncio.sleep(0.05)

    def connected_count(self) -> int:
        return sum(1 for c in self.clients if c.connected)

    def progress(self) -> JSONDict:
        return {}

    # --- Sink -------------------------------------------------------------------------------

    def on_pub(self, client: Client, channel: str, pub: JSONDict) -> None:
        data = pub.get("data")
        if isinstance(data, dict):
            received = client.received
            if received is None:
                received = client.received = {}
            ws = client.ws
            if ws is not None:  # its stamp is 0 when not stamped: the recorder skips it
                self.rec.delivery(received, data, ws.arrived_ns, ws.stamp_shared)
            else:
                self.rec.delivery(received, data)
        else:
            self.rec.foreign += 1

    def on_ack(self, client: Client, stream: int, seq: int, sent_at: float) -> None:
        self.rec.ack(stream, seq, sent_at)

    def on_error(self, client: Client, where: str, code: int) -> None:
        self.rec.pub_failed += 1
        self.rec.errors[f"{where} {code}"] += 1

    def on_closed(self, client: Client, code: int, expected: bool) -> None:
        if not expected:
            self.rec.disconnects[str(code)] += 1

    def on_ping(self, client: Client) -> None:
        self.rec.pings += 1


class _TokenSource:
    """Connection tokens: minted with the server's HS256 secret, or read from a file."""

    def __init__(self, settings: RunSettings) -> None:
        self._secret = settings.secret
        self._tokens = settings.tokens
        self._ttl = max(3600.0, settings.duration_s + 600.0)
        self._baseline = settings.protocol == "baseline"
        if not self._baseline and not self._tokens:
            # Imported now, not at the first token: the worker measures its memory per
            # connection from after the scenario is constructed.
            from signaling.auth import mint_token

            self._mint = mint_token

    def token(self, gid: int, user: str) -> str:
        if self._baseline:
            return ""
        if self._tokens:
            return self._tokens[gid % len(self._tokens)]
        if self._secret is None:
            raise ValueError("no --secret (SIGNAL_JWT_SECRET) and no --token-file")
        return self._mint(self._secret, user, ttl_s=self._ttl)


async def _until(deadline: float, stop: asyncio.Event) -> None:
    remaining = deadline - time.time()
    if remaining > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), remaining)
