"""Runs one server process: wires config, broker, node, handlers and
transport, serves until SIGTERM/SIGINT, then drains.

Draining (graceful shutdown): ``/readyz`` answers 503, upgrades are refused,
and every connection is closed with 3001 (shutdown, reconnect) spread over
``drain_s`` so that the clients' reconnects do not stampede the remaining
instances; then stop listening and exit 0. With ``handover`` (a successor
process already listens on the same port, SO_REUSEPORT) the listener closes
first instead, so that every reconnect reaches the successor.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import random
import resource
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType

from signaling.auth import TokenVerifier
from signaling.broker.base import Broker, PresenceStore
from signaling.broker.memory import MemoryBroker
from signaling.broker.redis import RedisBroker
from signaling.channels import ChannelPolicy
from signaling.config import Settings, describe
from signaling.errors import DISCONNECT_SHUTDOWN
from signaling.logs import Throttle
from signaling.metrics import CONTENT_TYPE, Metrics, watch_loop_lag
from signaling.node import ClaimedPublisher, Node
from signaling.session import ClientSession
from signaling.state.base import StateStore
from signaling.state.memory import MemoryStateStore
from signaling.transport import (
    ConnectionHandler,
    HttpResponse,
    Transport,
    TransportOptions,
    WebSocketConnection,
    encode_text_frame,
    start_transport,
)

__all__ = ["App", "build_node", "raise_file_limit", "run_server"]

log = logging.getLogger("signaling.server")
# Container allocations between two young-generation collections (default 700).
GC_YOUNG_THRESHOLD = 50_000
# One line per burst of refusals, not one per refused upgrade.
_overload_log = Throttle(log, burst=1, window_s=10.0)

DEFAULT_APP = "handlers.app"
# Drain in steps of this many seconds.
DRAIN_STEP_S = 0.05


class App:
    """The transport's view of the server: HTTP endpoints and sessions."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def handle_http(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> HttpResponse | None:
        route = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return HttpResponse(405, b"method not allowed\n")
        if route == "/healthz":
            return HttpResponse(200, b"ok\n")
        if route == "/readyz":
            if self.node.is_ready():
                return HttpResponse(200, b"ready\n")
            reason = b"draining\n" if self.node.draining else b"broker unavailable\n"
            return HttpResponse(503, reason)
        if route == "/metrics":
            self.node.metrics.broker_ready.set(1 if self.node.broker.is_ready() else 0)
            return HttpResponse(200, self.node.metrics.render(), CONTENT_TYPE)
        return None

    def websocket_allowed(self) -> HttpResponse | None:
        node = self.node
        if node.draining:
            return HttpResponse(503, b"shutting down\n")
        refusal = node.admission.refusal()
        if refusal is not None:
            # Admission control (signaling.admission): a cheap 503 sends the
            # client to its backoff; the connects admitted finish in time.
            node.metrics.limit_refusals.labels(refusal).inc()
            _overload_log.log(
                logging.WARNING,
                "%d connects in progress, recent ones took %.1f s "
                "(SIGNAL_MAX_CONNECTING, SIGNAL_MAX_CONNECT_WAIT_S): refusing upgrades with 503",
                node.admission.connecting,
                node.admission.latency_s,
            )
            return HttpResponse(503, b"too many connects in progress, retry later\n")
        return None

    def websocket_opened(self, conn: WebSocketConnection) -> ConnectionHandler:
        return ClientSession(self.node, conn)


def load_app(module_name: str) -> ModuleType:
    """The domain module that provides ``channel_policy(settings)`` and
    ``install(node)``; loaded by name so the core never imports handlers."""
    module = importlib.import_module(module_name)
    for attr in ("channel_policy", "install"):
        if not callable(getattr(module, attr, None)):
            raise RuntimeError(f"app module {module_name!r} has no {attr}()")
    return module


@dataclass(frozen=True, slots=True)
class Engine:
    """What the node runs on: the broker, presence, the state store, and the
    broker's one-step claimed publish when it has one (Redis)."""

    broker: Broker
    presence: PresenceStore
    store: StateStore
    publish_claimed: ClaimedPublisher | None = None


def build_engine(settings: Settings, metrics: Metrics) -> Engine:
    """The embedded broker, or Redis when ``REDIS_URL`` is set."""
    if settings.redis_url is None:
        memory = MemoryBroker()
        memory_store = MemoryStateStore()
        memory.on_sweep(memory_store.sweep)
        return Engine(memory, memory, memory_store)
    redis = RedisBroker(
        settings.redis_url,
        cluster=settings.redis_cluster,
        pool_size=settings.redis_pool_size,
        prefix=settings.redis_prefix,
    )
    # Standalone: one pipelined command connection; cluster: the client pool.
    pool = settings.redis_pool_size if settings.redis_cluster else 1
    metrics.watch_redis(redis.executor, pool)
    return Engine(redis, redis, redis.state_store(), redis.publish_claimed)


def build_node(settings: Settings, app_module: ModuleType, metrics: Metrics) -> Node:
    engine = build_engine(settings, metrics)
    policy: ChannelPolicy = app_module.channel_policy(settings)
    node = Node(
        settings,
        broker=engine.broker,
        presence=engine.presence,
        store=engine.store,
        policy=policy,
        verifier=TokenVerifier(settings),
        metrics=metrics,
        frame_encoder=encode_text_frame,
        publish_claimed=engine.publish_claimed,
    )
    app_module.install(node)
    return node


def raise_file_limit() -> int:
    """Raise the soft open-file limit to the hard one: every connection is a
    file descriptor. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def run_server(
    settings: Settings,
    app_module_name: str = DEFAULT_APP,
    *,
    reuse_port: bool = False,
    on_listening: Callable[[int], None] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code."""
    files = raise_file_limit()
    metrics = Metrics()
    node = build_node(settings, load_app(app_module_name), metrics)
    await node.start()
    options = TransportOptions(
        max_message_bytes=settings.max_frame_bytes,
        allowed_origins=settings.allowed_origins,
        compression=settings.compression,
        send_buffer_max_bytes=settings.send_buffer_max_bytes,
        on_slow_client=metrics.slow_clients.inc,
    )
    try:
        transport = await start_transport(
            App(node),
            settings.host,
            settings.port,
            options,
            reuse_port=reuse_port or settings.handover,
        )
    except OSError as exc:
        # A port taken or not allowed, an address not on this machine: a
        # setting to fix, said in one line (HOST, PORT).
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror or exc)
        await node.close()
        return 1
    tune_gc()
    lag_watch = asyncio.create_task(watch_loop_lag(metrics), name="loop-lag")
    log.info(
        "digis-signal node %s listening on http://%s:%d (websocket /connection/websocket, "
        "open files %d)",
        node.name,
        settings.host,
        transport.port,
        files,
    )
    log.info("settings: %s", " ".join(f"{k}={v}" for k, v in describe(settings).items()))
    if on_listening is not None:
        on_listening(transport.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    # Still handled during the drain: a platform that signals every process of
    # the dyno (Heroku) and our own supervisor both send SIGTERM to a worker,
    # and the default action of the second one would end it at once, dropping
    # every connection with no close frame.
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, _already_draining, signum)

    await drain(node, transport, settings.drain_s, handover=settings.handover)
    lag_watch.cancel()
    # Handled until the end: the node's close writes the leaves and offline
    # records a second signal's default action would lose. Bounded, since
    # the signals no longer end the process: a broker close that hangs (a
    # Redis gone without a reset) must not keep it alive.
    try:
        await asyncio.wait_for(node.close(), NODE_CLOSE_TIMEOUT_S)
    except TimeoutError:
        log.error("node close did not finish in %.0f s; exiting anyway", NODE_CLOSE_TIMEOUT_S)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(signum)
    # The counts buffered since the last update (metrics.BufferedCounter) reach
    # the multiprocess files that outlive a worker.
    metrics.update_gauges()
    log.info("stopped")
    return 0


# The node's close at the end of a drain: its pending work gets 2 s, the
# broker's close and the key fetcher a few more.
NODE_CLOSE_TIMEOUT_S = 10.0


def _already_draining(signum: int) -> None:
    log.info("%s received while draining: the drain goes on", signal.Signals(signum).name)


def tune_gc() -> None:
    """Fit CPython's cyclic garbage collector to a server's heap.

    Most of the heap is long-lived: sessions, transports, subscriptions. With
    the default thresholds (700, 10, 10) the collector runs every 700 new
    container objects and walks the older generations again and again:
    profiles showed it as 7 % of connection set-up and 40 % of a drain (10,000
    connections). Objects alive once the server is set up are frozen (never
    examined again), and young collections wait for far more garbage. Cycles
    are rare here (most objects die by reference counting), so memory hardly
    moves. Measured at 10,000 connections on Redis (docs/benchmarks.md): idle
    CPU 6.5 % -> 3.7 % of a core, set-up 762 -> 697 µs per connection.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)


async def drain(
    node: Node, transport: Transport, drain_s: float, *, handover: bool = False
) -> None:
    """Close every connection with 3001, spread evenly over ``drain_s``
    seconds in a random order, then stop listening.

    The listener stays open during the window so that health checks see
    ``/readyz`` answer 503 (and take the instance out of rotation); new
    WebSocket upgrades are answered 503 meanwhile. With ``handover`` it
    closes first: a successor shares the port, and the kernel would
    otherwise give this process its share of the reconnects, only to refuse
    them."""
    node.draining = True
    if handover:
        transport.stop_accepting()
    sessions = list(node.sessions)
    random.shuffle(sessions)
    log.info("draining %d connections over %.1f s", len(sessions), drain_s)
    steps = max(1, int(drain_s / DRAIN_STEP_S))
    per_step = -(-len(sessions) // steps)  # ceiling division
    loop = asyncio.get_running_loop()
    begun = loop.time()
    for step, start in enumerate(range(0, len(sessions), per_step or 1)):
        for session in sessions[start : start + per_step]:
            session.disconnect(DISCONNECT_SHUTDOWN)
        if start + per_step < len(sessions):
            # On a schedule from the start: the time closing a batch takes
            # is not added to each step's (the window would overrun drain_s).
            await asyncio.sleep(max(0.0, begun + (step + 1) * DRAIN_STEP_S - loop.time()))
    transport.stop_accepting()
    # Connections opened meanwhile (handshakes in flight) go too.
    for session in list(node.sessions):
        session.disconnect(DISCONNECT_SHUTDOWN)
    await transport.wait_closed(timeout=5.0)
