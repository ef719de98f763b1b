"""What one worker counts while it runs, and its picklable summary for the coordinator."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from loadtest.stats import Histogram, bitmap_set

__all__ = ["Recorder"]


class Recorder:
    """Counters and histograms of one worker process.

    Delivery latencies (or, in a scenario without deliveries of its own, the latency it
    times: :meth:`latency`) go into one histogram per wall-clock second since the start
    of the run (the latency-over-time plot); the overall histogram is their merge, so
    each delivery costs one histogram update.
    """

    def __init__(self) -> None:
        self.t0 = time.time()
        self.series: dict[int, Histogram] = {}
        # The same deliveries' latency to their arrival in the kernel (arrival stamps),
        # and how many of those stamps were a later frame's (an upper bound).
        self.arrival = Histogram()
        self.arrival_shared = 0
        self.deliveries = 0
        self.duplicates = 0
        self.foreign = 0  # publications not made by this tool (no client_msg_id of ours)
        self.pings = 0  # server pings answered
        self.pub_sent = 0
        self.pub_acked = 0
        self.pub_failed = 0
        self.pub_skipped = 0  # not sent: connection down or too many awaiting their ack
        self.ack_latency = Histogram()
        self.acked: dict[int, bytearray] = {}  # stream → bitmap of acknowledged seqs
        self.connect_latency = Histogram()
        self.errors: Counter[str] = Counter()
        self.disconnects: Counter[str] = Counter()
        self.connect_failures: Counter[str] = Counter()
        self.extra: dict[str, Any] = {}

    def start(self, t0: float) -> None:
        """Start of the measured phase: seconds in the latency series count from here."""
        self.t0 = t0

    # --- hot path --------------------------------------------------------------------

    def delivery(
        self,
        received: dict[int, bytearray],
        data: dict[str, Any],
        arrived_ns: int = 0,
        stamp_shared: bool = False,
    ) -> None:
        """One publication made by this tool: ``client_msg_id`` is
        ``<stream>-<seq>-<send time, unix µs>`` (see Scenario.publish).
        ``arrived_ns``: its arrival in the kernel (unix ns), 0 if not stamped;
        ``stamp_shared``: that stamp is a later frame's, an upper bound."""
        now_us = time.time_ns() // 1000
        tag = data.get("client_msg_id")
        try:
            stream, seq, sent_us = map(int, tag.split("-"))  # type: ignore[union-attr]
        except (AttributeError, ValueError):
            self.foreign += 1
            return
        self.deliveries += 1
        self._timed(now_us, now_us - sent_us)
        if arrived_ns:
            self.arrival.add(arrived_ns // 1000 - sent_us)
            if stamp_shared:
                self.arrival_shared += 1
        bitmap = received.get(stream)
        if bitmap is None:
            bitmap = received[stream] = bytearray()
        if bitmap_set(bitmap, seq):
            self.duplicates += 1

    def latency(self, latency_us: int) -> None:
        """A latency the scenario measures itself rather than a delivery's (calls:
        invite sent → ``call.incoming`` at the callee): it is the run's latency,
        in the table, the timeline and the plots."""
        self._timed(time.time_ns() // 1000, latency_us)

    def _timed(self, now_us: int, latency_us: int) -> None:
        second = int(now_us / 1e6 - self.t0)
        hist = self.series.get(second)
        if hist is None:
            hist = self.series[second] = Histogram()
        hist.add(latency_us)

    def ack(self, stream: int, seq: int, sent_at: float) -> None:
        self.pub_acked += 1
        self.ack_latency.add(int((time.perf_counter() - sent_at) * 1e6))
        bitmap = self.acked.get(stream)
        if bitmap is None:
            bitmap = self.acked[stream] = bytearray()
        bitmap_set(bitmap, seq)

    # --- summaries ---------------------------------------------------------------------

    def last_second(self) -> Histogram | None:
        """The latest complete second's latencies, for the progress line."""
        second = int(time.time() - self.t0) - 1
        return self.series.get(second)

    def progress(self) -> dict[str, Any]:
        recent = self.last_second()
        return {
            "deliveries": self.deliveries,
            "pub_acked": self.pub_acked,
            "pub_sent": self.pub_sent,
            "errors": sum(self.errors.values()) + self.pub_failed,
            "disconnects": sum(self.disconnects.values()),
            "p99_ms": recent.percentile_us(0.99) / 1000 if recent else None,
        }

    def to_wire(self) -> dict[str, Any]:
        return {
            "t0": self.t0,
            "series": {s: h.to_wire() for s, h in self.series.items()},
            "deliveries": self.deliveries,
            "duplicates": self.duplicates,
            "foreign": self.foreign,
            "pings": self.pings,
            "pub_sent": self.pub_sent,
            "pub_acked": self.pub_acked,
            "pub_failed": self.pub_failed,
            "pub_skipped": self.pub_skipped,
            "ack_latency": self.ack_latency.to_wire(),
            "arrival_latency": self.arrival.to_wire(),
            "arrival_shared": self.arrival_shared,
            "connect_latency": self.connect_latency.to_wire(),
            "errors": dict(self.errors),
            "disconnects": dict(self.disconnects),
            "connect_failures": dict(self.connect_failures),
            "extra": self.extra,
        }
