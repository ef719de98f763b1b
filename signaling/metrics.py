"""Prometheus metrics of the server, in one registry per process.

Names are what the operators' dashboards use; ``websocket_active_connections``
keeps its historical name. Label values are bounded sets (method names,
result codes, limit names), never user input.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import time
from collections.abc import Callable
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["CONTENT_TYPE", "BufferedCounter", "BufferedHistogram", "Metrics", "watch_loop_lag"]

CONTENT_TYPE = CONTENT_TYPE_LATEST


class PipelineStats(Protocol):
    @property
    def in_flight(self) -> int: ...

    batches: int
    commands: int


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class BufferedCounter:
    """A counter for the hot paths: counts in a plain int, handed to its
    Prometheus counter when the gauges are updated (every half second by
    :func:`watch_loop_lag`, and before every scrape).

    prometheus-client's ``inc`` takes a lock and four Python calls; a chat
    publication counted five of them (deliveries on two instances, the
    publication, the command), ≈ 8 % of the Python calls it made.
    """

    __slots__ = ("_counter", "pending")

    def __init__(self, counter: Counter) -> None:
        self._counter = counter
        self.pending = 0

    def inc(self, amount: int = 1) -> None:
        self.pending += amount

    def flush(self) -> None:
        if self.pending:
            self._counter.inc(self.pending)
            self.pending = 0


class BufferedHistogram:
    """A histogram (or a label child) for the hot paths, buffered as
    :class:`BufferedCounter` is: an observation is a bisect and two
    additions; the bucket counts and the sum go to prometheus-client at the
    next flush. Every command is timed: ``observe`` itself takes a lock per
    bucket and sum and five Python calls.

    The flush adds to the child's bucket and sum values, which
    prometheus-client's own ``observe`` adds to (``_buckets``, ``_sum``; the
    exposition is checked against direct observation in the unit tests).
    """

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Histogram) -> None:
        self._child = child
        # Upper bounds, +Inf last: an observation counts in the first bucket
        # whose bound it does not exceed (as Histogram.observe does).
        self._bounds: list[float] = list(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._sum += amount
        self._counts[bisect.bisect_left(self._bounds, amount)] += 1

    def flush(self) -> None:
        counts = self._counts
        if not any(counts):
            return
        child = self._child
        child._sum.inc(self._sum)
        for bucket, count in zip(child._buckets, counts, strict=True):
            if count:
                bucket.inc(count)
        self._counts = [0] * len(counts)
        self._sum = 0.0


# How long a worker reuses the whole server's merged metrics (seconds).
WORKERS_RENDER_CACHE_S = 1.0


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # Worker mode: the whole server's output, merged from every worker's
        # files, and when (monotonic s); reused for WORKERS_RENDER_CACHE_S.
        self._merged: tuple[float, bytes] | None = None
        r = self.registry
        self.active_connections = Gauge(
            "websocket_active_connections",
            "Open WebSocket connections.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connection_attempts = Counter(
            "signal_connection_attempts",
            "Connect commands by result (ok, or why refused).",
            ["result"],
            registry=r,
        )
        self.commands = Counter(
            "signal_commands",
            "Commands by method and result (ok or the error code).",
            ["method", "result"],
            registry=r,
        )
        self.command_duration = Histogram(
            "signal_command_duration_seconds",
            "Time to handle a command, by method.",
            ["method"],
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        # Counted once per publication or delivery: buffered (BufferedCounter).
        self._buffered: list[BufferedCounter | BufferedHistogram] = []
        self.publications = self.buffered(
            Counter("signal_publications", "Publications accepted by the broker.", registry=r)
        )
        self.deliveries = self.buffered(
            Counter("signal_deliveries", "Pushes written to local connections.", registry=r)
        )
        self.disconnects = Counter(
            "signal_disconnects",
            "Connections closed by the server, by close code.",
            ["code"],
            registry=r,
        )
        self.slow_clients = Counter(
            "signal_slow_client_disconnects",
            "Connections closed because their send buffer overflowed (3008).",
            registry=r,
        )
        self.rate_limited = Counter(
            "signal_rate_limit_disconnects",
            "Connections closed for sending too many commands (3013).",
            registry=r,
        )
        self.limit_refusals = Counter(
            "signal_limit_refusals",
            "Requests refused by a configured limit, by limit.",
            ["limit"],
            registry=r,
        )
        self.loop_lag = Histogram(
            "signal_event_loop_lag_seconds",
            "How late the event loop ran a timer (time it was blocked).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=r,
        )
        self.broker_reconnects = Counter(
            "signal_broker_reconnects",
            "Broker connections re-established (deliveries may have been lost).",
            registry=r,
        )
        self.broker_ready = Gauge(
            "signal_broker_ready",
            "1 while the broker is reachable (the lowest of all workers).",
            registry=r,
            multiprocess_mode="livemin",
        )
        # Refreshed by watch_loop_lag: multiprocess mode has no callbacks.
        self._gauge_updates: list[Callable[[], None]] = []
        # Label children of the per-command metrics: labels() costs a lock and
        # a tuple per call, and every command asks. Bounded by the label
        # values (methods, error codes).
        self._command_children: dict[
            tuple[str, str], tuple[BufferedCounter, BufferedHistogram]
        ] = {}
        # One buffered duration per method, shared by its results.
        self._durations: dict[str, BufferedHistogram] = {}

    def buffered(self, counter: Counter) -> BufferedCounter:
        """``counter`` (or a label child of it) counted through a
        :class:`BufferedCounter` this object flushes."""
        found = BufferedCounter(counter)
        self._buffered.append(found)
        return found

    def buffered_histogram(self, histogram: Histogram) -> BufferedHistogram:
        """``histogram`` (or a label child of it) observed through a
        :class:`BufferedHistogram` this object flushes."""
        found = BufferedHistogram(histogram)
        self._buffered.append(found)
        return found

    def watch_redis(self, executor: PipelineStats, pool_size: int) -> None:
        """Expose the Redis connection pool and pipelining."""
        r = self.registry
        Gauge(
            "signal_redis_pool_size",
            "Redis connections allowed (summed over workers).",
            registry=r,
            multiprocess_mode="livesum",
        ).set(pool_size)
        in_flight = Gauge(
            "signal_redis_pipelines_in_flight",
            "Redis pipelines awaiting their replies.",
            registry=r,
            multiprocess_mode="livesum",
        )
        batches = Counter("signal_redis_round_trips", "Redis pipelines sent.", registry=r)
        commands = Counter("signal_redis_commands", "Redis commands sent.", registry=r)
        last = [0, 0]

        def update() -> None:
            in_flight.set(executor.in_flight)
            batches.inc(executor.batches - last[0])
            commands.inc(executor.commands - last[1])
            last[:] = [executor.batches, executor.commands]

        self._gauge_updates.append(update)

    def command_done(self, method: str, result: str, seconds: float) -> None:
        """Count a command by method and result and time it."""
        children = self._command_children.get((method, result))
        if children is None:
            duration = self._durations.get(method)
            if duration is None:
                duration = self.buffered_histogram(self.command_duration.labels(method))
                self._durations[method] = duration
            children = (self.buffered(self.commands.labels(method, result)), duration)
            self._command_children[method, result] = children
        children[0].inc()
        children[1].observe(seconds)

    def update_gauges(self) -> None:
        for counter in self._buffered:
            counter.flush()
        for update in self._gauge_updates:
            update()

    def render(self) -> bytes:
        self.update_gauges()
        if MULTIPROC_ENV in os.environ:
            # Workers: report the whole server from every worker's files. The
            # merge reads them all on the event loop: at most once a second,
            # however often /metrics is asked (it needs no credentials).
            now = time.monotonic()
            if self._merged is not None and now - self._merged[0] < WORKERS_RENDER_CACHE_S:
                return self._merged[1]
            registry = CollectorRegistry()
            MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped upstream
            output = generate_latest(registry)
            self._merged = (time.monotonic(), output)
            return output
        return generate_latest(self.registry)


async def watch_loop_lag(metrics: Metrics, interval_s: float = 0.5) -> None:
    """Measure how late a sleeping task wakes: the time the loop was blocked."""
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval_s)
        metrics.loop_lag.observe(max(0.0, loop.time() - start - interval_s))
        metrics.update_gauges()
