"""``python -m loadtest SCENARIO [options]``: parse, pick targets, run, report."""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import math
import os
import resource
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loadtest.config import SCENARIOS, RunSettings
from loadtest.coordinator import RunAborted, Target, discover_pids, run_scenario, worker_count
from loadtest.plots import plot_runs, plotting_available
from loadtest.procstat import machine_busy_seconds
from loadtest.profile import find_py_spy
from loadtest.progress import ProgressLine
from loadtest.report import print_summary, write_json
from loadtest.servers import RedisServer, ServerGroup, split_cpus
from loadtest.wsclient import split_url

__all__ = ["main"]

EXIT_OK, EXIT_ABORTED, EXIT_USAGE, EXIT_FATAL = 0, 1, 2, 3
MAX_CONNECTIONS = 100_000
MAX_DURATION_S = 3600.0
# Every run is bounded; so is their number.
MAX_REPEAT = 20

# Per-scenario defaults: connections, rate, duration, room size.
_DEFAULTS: dict[str, tuple[int, float, float, int]] = {
    "fanout": (1000, 100.0, 20.0, 100),
    "chat": (1000, 1.0, 20.0, 4),
    "calls": (400, 50.0, 20.0, 100),
    "connect": (5000, 0.0, 60.0, 100),
    "idle": (5000, 0.0, 30.0, 100),
}

_EPILOG = """\
examples (one command reproduces a benchmark, server and baseline side by side):
  python -m loadtest fanout --spawn-server --spawn-baseline -n 1000 -r 20,100 -d 20
  python -m loadtest idle --spawn-server --spawn-baseline -n 10000 -d 40
  python -m loadtest chat --spawn-server --spawn-redis --instances 2 --spawn-baseline -n 2000
  python -m loadtest connect --spawn-server -n 5000
  python -m loadtest chat --url ws://127.0.0.1:8000/connection/websocket -n 2000 -r 1
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Load tests for digis-signal (Centrifuge JSON protocol) and a baseline.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=SCENARIOS)
    t = p.add_argument_group("targets")
    t.add_argument("--url", action="append", default=[], help="instance URL (repeatable)")
    t.add_argument(
        "--server-pid",
        action="append",
        type=int,
        default=[],
        help="server PID to measure (repeatable; default: found by port)",
    )
    t.add_argument(
        "--protocol",
        choices=("centrifuge", "baseline"),
        default="centrifuge",
        help="protocol of --url targets",
    )
    t.add_argument(
        "--spawn-server",
        action="store_true",
        help="start digis-signal (pinned to one core), run, stop it",
    )
    t.add_argument("--redis-url", help="with --spawn-server: REDIS_URL for the instances")
    t.add_argument(
        "--spawn-redis",
        action="store_true",
        help="with --spawn-server: start a private redis-server (on the clients' CPUs)",
    )
    t.add_argument(
        "--instances",
        type=int,
        default=1,
        help="with --spawn-server: instances (more than 1 needs --redis-url)",
    )
    t.add_argument(
        "--spawn-baseline",
        action="store_true",
        help="also run the same scenario against loadtest/baseline.py (for chat, with "
        "the same --instances and, with --spawn-redis, a Redis of its own)",
    )
    t.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="K=V",
        help="extra environment for spawned servers (repeatable)",
    )
    t.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin spawned servers and clients to separate CPUs",
    )
    t.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow non-loopback targets (never on shared machines)",
    )
    a = p.add_argument_group("auth")
    a.add_argument("--secret", help="HS256 secret to mint tokens (default $SIGNAL_JWT_SECRET)")
    a.add_argument("--token-file", type=Path, help="connection tokens, one per line")
    load = p.add_argument_group("load")
    load.add_argument("-n", "--connections", type=int, help="clients (calls: 2 per pair)")
    load.add_argument(
        "-r",
        "--rate",
        help="fanout: publications/s; chat: per user; "
        "calls: calls/s; connect: publications/s into the rooms (comma list "
        "runs each rate)",
    )
    load.add_argument("-d", "--duration", type=float, help="seconds of measured load")
    load.add_argument("--publishers", type=int, default=1, help="fanout publishers")
    load.add_argument(
        "--payload-bytes", type=int, default=100, help="publication data size (JSON bytes)"
    )
    load.add_argument("--room-size", type=int, help="clients per room (chat: group size)")
    load.add_argument("--dm-fraction", type=float, default=0.5, help="chat: users in DMs")
    load.add_argument(
        "--max-inflight",
        type=int,
        default=1000,
        help="publications awaiting their ack per connection",
    )
    load.add_argument(
        "--no-restart", action="store_true", help="connect: skip the server restart phase"
    )
    load.add_argument(
        "--handover",
        action="store_true",
        help="connect: restart by hand-over (SIGNAL_HANDOVER: the new server listens on "
        "the port before the old one gets SIGTERM); the baseline restarts as usual",
    )
    load.add_argument(
        "--reconnect-min",
        type=float,
        default=0.5,
        help="connect: backoff floor, s (centrifuge-js's default: 0.5)",
    )
    load.add_argument(
        "--reconnect-max",
        type=float,
        default=20.0,
        help="connect: backoff cap, s (centrifuge-js's default: 20)",
    )
    c = p.add_argument_group("clients")
    c.add_argument("--workers", type=int, help="client processes (default: by CPUs and load)")
    c.add_argument(
        "--backend",
        choices=("raw", "websockets"),
        default="raw",
        help="WebSocket client: lean raw protocol (default) or websockets' asyncio",
    )
    c.add_argument(
        "--source-addresses",
        type=int,
        default=4,
        help="spread connections over 127.0.0.2..127.0.0.(N+1)",
    )
    c.add_argument(
        "--connect-concurrency",
        type=int,
        default=100,
        help="connection attempts in flight per worker",
    )
    c.add_argument("--connect-timeout", type=float, default=15.0)
    c.add_argument(
        "--client-poll-us",
        type=int,
        default=0,
        metavar="US",
        help="measured phase: workers sleep US µs between loop iterations instead of "
        "being woken by each write (the server then pays no client wake-ups; "
        "latency gains up to US µs)",
    )
    c.add_argument(
        "--arrival-stamps",
        action="store_true",
        help="also measure each delivery's latency to its arrival in the client's kernel "
        "(SO_TIMESTAMPNS; raw backend): the latency before the clients' own queue",
    )
    c.add_argument(
        "--drain-timeout",
        type=float,
        default=10.0,
        help="wait this long at most for in-flight deliveries after the run",
    )
    c.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds between setup and the measured phase (RSS is sampled then)",
    )
    c.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run, wait up to S seconds for the machine to be idle "
        "(other processes under 10%% of a CPU): for shared machines",
    )
    c.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run everything N times, interleaved (each repetition every rate and "
        "target in turn), and report medians: this kind of machine's speed moves "
        "10-25 %% within minutes",
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--profile",
        action="store_true",
        help="sample the server's processes with py-spy --native during the measured "
        "phase and report where their busy time goes (disturbs the run's figures)",
    )
    o.add_argument("--json", type=Path, help="write the full report as JSON")
    o.add_argument(
        "--plot",
        type=Path,
        metavar="PREFIX",
        help="write PREFIX-latency-time.png and PREFIX-latency-hist.png",
    )
    o.add_argument("--quiet", action="store_true", help="no progress line")
    return p


class UsageError(Exception):
    pass


def _rates(text: str | None, default: float) -> list[float]:
    if text is None:
        return [default]
    try:
        rates = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--rate: expected numbers, got {text!r}") from None
    if not rates or any(r < 0 for r in rates):
        raise UsageError("--rate: expected non-negative numbers")
    return rates


def _check_loopback(url: str, allow_remote: bool) -> None:
    host, _, _ = split_url(url)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback and not allow_remote:
        raise UsageError(f"{url}: only loopback targets unless --allow-remote")


def _sources(args: argparse.Namespace) -> tuple[str | None, ...]:
    urls = args.url or ["ws://127.0.0.1/"]
    hosts = {split_url(u)[0] for u in urls}
    if args.source_addresses <= 0 or not all(h.startswith("127.") for h in hosts):
        return (None,)  # the kernel picks the source address
    return tuple(f"127.0.0.{2 + i}" for i in range(min(args.source_addresses, 250)))


def _env_pairs(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"--server-env expects K=V, got {item!r}")
        env[key] = value
    return env


def _spawn_env(kind: str, args: argparse.Namespace) -> dict[str, str]:
    env: dict[str, str] = {}
    if kind == "digis-signal" and args.scenario == "calls":
        # call.join needs Agora credentials to build tokens (never sent to Agora here),
        # and the per-caller invite limit (3/min) would cap a storm at a trickle.
        env.update(
            AGORA_APP_ID=secrets.token_hex(16),
            AGORA_APP_CERTIFICATE=secrets.token_hex(16),
            SIGNAL_CALL_INVITES_PER_MINUTE="1000000",
        )
    if kind == "digis-signal" and args.handover:
        env["SIGNAL_HANDOVER"] = "1"
    env.update(_env_pairs(args.server_env))
    return env


def _file_limit_warning(kind: str, args: argparse.Namespace, hard: int | None = None) -> str | None:
    """Say so when each spawned process would hold close to its open-file limit
    (``hard``, by default this process's hard limit, which the server raises
    its soft one to): SO_REUSEPORT spreads connections unevenly, and a worker
    at the limit resets new ones."""
    if kind != "digis-signal":
        return None
    workers = int(_spawn_env(kind, args).get("WEB_CONCURRENCY", "1") or "1")
    per_process = args.connections / max(1, workers * args.instances)
    if hard is None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or per_process < 0.9 * hard:
        return None
    return (
        f"≈ {per_process:,.0f} connections per server process against an open-file limit "
        f"of {hard:,}: expect resets; use more workers (--server-env WEB_CONCURRENCY=N)"
    )


@contextmanager
def _spawned(
    kind: str,
    args: argparse.Namespace,
    cpus: tuple[int, ...] | None,
    client_cpus: tuple[int, ...] | None,
) -> Iterator[Target]:
    out = sys.stderr
    redis: RedisServer | None = None
    # The baseline is the in-memory room server, except in chat: there it has
    # ours' shape (its instances share a Redis of their own), as the budget's
    # chat figure is a publication through Redis.
    shaped = kind == "digis-signal" or args.scenario == "chat"
    redis_url = args.redis_url if shaped else None
    group: ServerGroup | None = None
    try:
        if shaped and args.spawn_redis:
            # Redis shares the clients' CPUs: the server's core stays the server's.
            redis = RedisServer(client_cpus).start()
            redis_url = redis.url
            out.write(f"redis-server up at {redis_url}\n")
        pinned = f" pinned to CPU {list(cpus)}" if cpus else ""
        out.write(f"starting {kind}{pinned}...\n")
        if warning := _file_limit_warning(kind, args):
            out.write(f"WARNING: {warning}\n")
        group = ServerGroup.spawn(
            kind,
            instances=args.instances if shaped else 1,
            redis_url=redis_url,
            cpus=cpus,
            extra_env=_spawn_env(kind, args),
        )
        group.handover = bool(args.handover) and kind == "digis-signal"
        out.write(f"{kind} up at {', '.join(group.urls)} (logs in {group.log_dir})\n")
        protocol = "baseline" if kind == "baseline" else "centrifuge"
        label = kind if redis_url is None else f"{kind} redis x{args.instances}"
        helpers = [redis.pid] if redis is not None else []
        yield Target(label, protocol, group.urls, group.pids, group, group.secret, helpers)
    finally:
        if group is not None:
            group.stop()
        if redis is not None:
            redis.stop()


@contextmanager
def _external(args: argparse.Namespace) -> Iterator[Target]:
    urls = tuple(args.url)
    yield Target("external", args.protocol, urls, list(args.server_pid) or discover_pids(urls))


def _settings(
    args: argparse.Namespace, target: Target, rate: float, tokens: tuple[str, ...]
) -> RunSettings:
    connections, _, duration, room_size = _DEFAULTS[args.scenario]
    connections = args.connections if args.connections is not None else connections
    duration = args.duration if args.duration is not None else duration
    secret = target.secret or args.secret or os.environ.get("SIGNAL_JWT_SECRET")
    if target.protocol == "centrifuge" and not secret and not tokens:
        raise UsageError("no --secret, $SIGNAL_JWT_SECRET or --token-file to authenticate")
    budget = args.connect_timeout + 30 + connections / 250 + duration + args.drain_timeout + 120
    return RunSettings(
        scenario=args.scenario,
        urls=target.urls,
        connections=connections,
        duration_s=duration,
        rate=rate,
        protocol=target.protocol,
        backend=args.backend,
        payload_bytes=args.payload_bytes,
        secret=secret,
        tokens=tokens,
        source_addresses=_sources(args),
        connect_concurrency=args.connect_concurrency,
        connect_timeout_s=args.connect_timeout,
        client_poll_us=max(0, args.client_poll_us),
        arrival_stamps=args.arrival_stamps,
        profile=args.profile,
        publishers=args.publishers,
        room_size=args.room_size or room_size,
        dm_fraction=args.dm_fraction,
        max_inflight=args.max_inflight,
        reconnect=args.scenario == "connect" and not args.no_restart,
        reconnect_min_s=args.reconnect_min,
        reconnect_max_s=args.reconnect_max,
        drain_timeout_s=args.drain_timeout,
        settle_s=max(0.0, args.settle),
        run_id=f"lt{secrets.token_hex(3)}",
        hard_deadline=time.time() + budget,
    )


def _wait_quiet(limit_s: float, progress: ProgressLine) -> None:
    """Wait until the machine's busy CPU over 2 s is under 10 % of one CPU (nothing
    of ours runs between runs, so that is other people's work), or ``limit_s``."""
    deadline = time.monotonic() + limit_s
    while True:
        before = machine_busy_seconds()
        time.sleep(2.0)
        busy = (machine_busy_seconds() - before) / 2.0
        if busy < 0.10:
            return
        if time.monotonic() >= deadline:
            progress.message(f"machine still busy ({busy * 100:.0f}% of a CPU): running anyway")
            return
        progress.message(f"waiting for a quiet machine (others use {busy * 100:.0f}% of a CPU)")


def _validate(args: argparse.Namespace) -> None:
    if not (args.url or args.spawn_server or args.spawn_baseline):
        raise UsageError("give a target: --url, --spawn-server and/or --spawn-baseline")
    for url in args.url:
        _check_loopback(url, args.allow_remote)
    if args.connections is not None and not 1 <= args.connections <= MAX_CONNECTIONS:
        raise UsageError(f"--connections must be 1..{MAX_CONNECTIONS}")
    if args.duration is not None and not 0 < args.duration <= MAX_DURATION_S:
        raise UsageError(f"--duration must be in (0, {MAX_DURATION_S:.0f}] seconds")
    if args.instances > 1 and not (args.redis_url or args.spawn_redis):
        raise UsageError("--instances > 1 needs --redis-url or --spawn-redis (a shared broker)")
    if args.scenario == "calls" and (
        args.spawn_baseline or (args.url and args.protocol == "baseline")
    ):
        raise UsageError("the baseline speaks no RPCs: calls can't run against it")
    if not 1 <= args.repeat <= MAX_REPEAT:
        raise UsageError(f"--repeat must be 1..{MAX_REPEAT}")
    if args.arrival_stamps and args.backend != "raw":
        raise UsageError("--arrival-stamps needs the raw backend (--backend raw)")
    if args.profile and find_py_spy() is None:
        raise UsageError("--profile needs py-spy: pip install 'digis-signal[profile]'")
    if args.plot and not plotting_available():
        raise UsageError("--plot needs matplotlib: pip install 'digis-signal[plot]'")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _validate(args)
        tokens: tuple[str, ...] = ()
        if args.token_file:
            tokens = tuple(
                line.strip() for line in args.token_file.read_text().splitlines() if line.strip()
            )
        _, default_rate, _, _ = _DEFAULTS[args.scenario]
        rates = _rates(args.rate, default_rate)
    except (UsageError, OSError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return EXIT_USAGE

    server_cpus, client_cpus = (None, None) if args.no_pin else split_cpus()
    if client_cpus:
        # The coordinator is a client-side process too.
        os.sched_setaffinity(0, client_cpus)
    factories: list[Callable[[], Any]] = []
    if args.url:
        factories.append(lambda: _external(args))
    if args.spawn_server:
        factories.append(lambda: _spawned("digis-signal", args, server_cpus, client_cpus))
    if args.spawn_baseline:
        factories.append(lambda: _spawned("baseline", args, server_cpus, client_cpus))

    # SIGTERM and SIGHUP (the terminal closed) end a run like Ctrl-C does: the
    # finally blocks stop the servers we started and the client processes, by PID
    # (the servers, in sessions of their own, get no signal of the terminal's).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGHUP, signal.default_int_handler)
    progress = ProgressLine(enabled=not args.quiet)
    runs: list[dict[str, Any]] = []
    code = EXIT_OK
    try:
        # Rate by rate, every target in turn: digis-signal and the baseline are then
        # measured minutes apart at most, not one after all the other's rates (this
        # machine's speed was seen to move 10-25 % within minutes).
        for repetition, rate in itertools.product(range(1, args.repeat + 1), rates):
            for factory in factories:
                # A fresh server per run: RSS per connection and CPU are then this run's
                # alone, not what an earlier run left behind.
                if args.wait_quiet > 0:
                    _wait_quiet(args.wait_quiet, progress)
                with factory() as target:
                    settings = _settings(args, target, rate, tokens)
                    workers = worker_count(settings, client_cpus, args.workers)
                    if settings.connections > workers * 19000:
                        raise UsageError(
                            f"{settings.connections} connections need more workers "
                            f"(a process holds at most ~19,000): --workers "
                            f"{math.ceil(settings.connections / 15000)}"
                        )
                    report = run_scenario(
                        settings,
                        target,
                        workers=workers,
                        client_cpus=client_cpus,
                        server_cpus=server_cpus if target.group is not None else None,
                        restart=settings.reconnect and target.group is not None,
                        progress=progress,
                    )
                    report["repetition"] = repetition
                    runs.append(report)
                if report["fatal"]:
                    code = EXIT_FATAL
                    break
            if code == EXIT_FATAL:
                break
    except UsageError as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except RunAborted as exc:
        print(f"loadtest: run aborted: {exc}", file=sys.stderr)
        code = EXIT_ABORTED
    except KeyboardInterrupt:
        print("loadtest: interrupted", file=sys.stderr)
        code = EXIT_ABORTED
    finally:
        progress.done()

    print_summary(runs)
    if args.json and runs:
        write_json(args.json, runs, sys.argv if argv is None else ["loadtest", *argv])
        print(f"\nJSON report: {args.json}")
    if args.plot and runs:
        for path in plot_runs(runs, args.plot):
            print(f"plot: {path}")
    for run in runs:
        for text in run["fatal"]:
            print(f"\nloadtest: {run['scenario']} against {run['target']}: {text}", file=sys.stderr)
    return code
