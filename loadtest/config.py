"""The settings of one run, as handed (pickled) to every worker process."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["PROTOCOLS", "SCENARIOS", "RunSettings", "WorkerPlan"]

SCENARIOS = ("fanout", "chat", "calls", "connect", "idle")
PROTOCOLS = ("centrifuge", "baseline")


@dataclass(frozen=True, slots=True)
class RunSettings:
    """Everything a worker needs to build and drive its clients. Built by the CLI."""

    scenario: str
    urls: tuple[str, ...]
    connections: int
    duration_s: float
    rate: float = 0.0  # fanout: publications/s in total; chat: per user; calls: calls/s
    protocol: str = "centrifuge"
    backend: str = "raw"
    payload_bytes: int = 100
    secret: str | None = None
    tokens: tuple[str, ...] = ()
    source_addresses: tuple[str | None, ...] = (None,)
    connect_concurrency: int = 100
    # >0: in the measured phase workers never wait in epoll; they sleep this long
    # between loop iterations (see loadtest/README.md, "client wake-ups").
    client_poll_us: int = 0
    # Latency also to each frame's arrival in the client's kernel (raw backend):
    # leaves the clients' own queue out (loadtest/wsclient.py, "Arrival stamps").
    arrival_stamps: bool = False
    # py-spy --native on the server's processes during the measured phase
    # (loadtest/profile.py); the coordinator's business, not the workers'.
    profile: bool = False
    connect_timeout_s: float = 15.0
    publishers: int = 1
    room_size: int = 100  # connect/idle: clients per room; chat: members of a group room
    dm_fraction: float = 0.5  # chat: share of users in 2-member DMs
    max_inflight: int = 1000  # publications awaiting their ack per connection
    reconnect: bool = False  # connect: reconnect (and recover) after a server close
    # centrifuge-js's defaults (minReconnectDelay 500 ms, maxReconnectDelay 20 s):
    # the storm real browsers make after a deploy.
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 20.0
    drain_timeout_s: float = 10.0
    settle_s: float = 1.0  # after setup, before RSS is sampled and the run starts
    run_id: str = "lt"
    # Wall-clock deadline after which a worker gives up whatever it is doing.
    hard_deadline: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkerPlan:
    index: int
    count: int
    settings: RunSettings
    cpus: tuple[int, ...] | None = None  # CPU affinity for the worker (None: leave)
