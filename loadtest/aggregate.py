"""Turns the workers' final reports and the /proc samples into one run report (a
JSON-ready dict: the shape documented in the README, § JSON report)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from loadtest.procstat import Interpreter, ProcSample
from loadtest.profile import ProfileSummary
from loadtest.slowmoments import SlowMoments
from loadtest.speed import SpeedProbe
from loadtest.stats import Histogram

__all__ = [
    "RunFacts",
    "build_report",
    "latency_client_bound",
    "reading_ms_per_publication",
    "thin_tail_note",
]

# The latency tail is called the client's when at least this share of its p99 is
# the busiest worker's CPU time per publication (see reading_ms_per_publication).
CLIENT_BOUND_SHARE = 0.5
# A publication with at least this many deliveries is a fan-out (thin_tail_note),
# and a p99 resting on fewer publications than this is thin.
THIN_TAIL_FANOUT = 100
THIN_TAIL_PUBLICATIONS = 10


@dataclass
class RunFacts:
    """What the coordinator observed itself during one run."""

    scenario: str
    target: str
    protocol: str
    backend: str
    urls: tuple[str, ...]
    settings: dict[str, Any]
    workers: int
    server_pids: list[int]
    t_start: float = 0.0  # wall time the measured phase started
    t_stop: float = 0.0  # wall time publishing stopped
    t_end: float = 0.0  # wall time all deliveries were drained
    server_before: ProcSample | None = None  # before any client connected
    server_ready: ProcSample | None = None  # all clients set up
    server_start: ProcSample | None = None  # measured phase starts
    server_end: ProcSample | None = None  # measured phase and drain over
    # What the server processes run, each distinct one once (read before the run).
    server_interpreters: list[Interpreter] = field(default_factory=list)
    client_cpu_s: float = 0.0
    # Each worker's CPU seconds in the measured phase (sampled once a second), by PID.
    client_worker_cpu_s: dict[int, float] = field(default_factory=dict)
    client_wakeups: int = 0  # the workers' voluntary context switches, measured phase
    client_saturated_s: int = 0
    client_seconds: int = 0
    client_max_cpu_percent: float = 0.0
    client_max_lag_ms: float = 0.0
    client_cpus: tuple[int, ...] | None = None
    server_cpus: tuple[int, ...] | None = None
    setups: list[dict[str, Any]] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    restart: dict[str, Any] = field(default_factory=dict)
    server_core_busy: list[float] = field(default_factory=list)  # per second, pinned CPUs
    server_core_saturated_s: int = 0
    helpers_cpu_s: float = 0.0  # processes the tool started besides the server (redis)
    other_cpu_s: float = 0.0  # everything else on the machine during the window
    steal_s: float = 0.0  # CPU time the hypervisor gave to other guests meanwhile
    speed: SpeedProbe | None = None  # the reference work's time before the run
    slow_moments: SlowMoments | None = None  # the same work timed during the run
    profile: ProfileSummary | None = None  # --profile: py-spy's busy samples, summed
    notes: list[str] = field(default_factory=list)


def _merge_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))


def _hist(parts: Iterable[Any]) -> Histogram:
    return Histogram.merged(Histogram.from_wire(p) for p in parts)


def _per(value: float, count: int, scale: float = 1e6) -> float | None:
    return round(value / count * scale, 2) if count else None


def reading_ms_per_publication(
    worker_cpu_s: Mapping[int, float], publications: int
) -> float | None:
    """The busiest client worker's CPU milliseconds per publication in the measured phase.

    A worker reads a publication's deliveries to its clients one after another. In a
    fan-out, where each publication goes to many of one worker's clients, the last of
    them waits for about this much of the worker's own work: a floor under the latency
    tail that no server can lower. None without publications."""
    if not worker_cpu_s:
        return None
    return _per(max(worker_cpu_s.values()), publications, 1e3)


def latency_client_bound(p99_ms: float | None, reading_ms: float | None) -> bool:
    """True when at least half of the p99 latency is a client worker's own reading of a
    publication's deliveries: comparing such p99s mostly compares the clients."""
    if not p99_ms or reading_ms is None:
        return False
    return reading_ms >= CLIENT_BOUND_SHARE * p99_ms


def thin_tail_note(acked: int, deliveries: int) -> str | None:
    """A note when the p99 rests on few publications. In a fan-out one
    publication's deliveries are read one after another, so they are late
    together: the slowest 1 % of deliveries is the slowest 1 % of publications,
    and a run of 300 publications puts its p99 on about three of them."""
    if acked <= 0 or deliveries < THIN_TAIL_FANOUT * acked:
        return None
    behind = acked * 0.01
    if behind >= THIN_TAIL_PUBLICATIONS:
        return None
    return (
        f"the latency p99 rests on about {max(1, round(behind))} publications (1 % of "
        f"{acked:,}, each with {deliveries // acked:,} deliveries): run longer (-d) or "
        "--repeat for a steadier tail"
    )


def over_helpers(server_us: float | None, helpers_us: float | None) -> float | None:
    """The server's CPU per publication over the helpers' (Redis's). At one load both
    do a fixed amount of work per publication, so when the machine's speed moves the
    two figures move together and the ratio moves least. None without a helper or a
    figure."""
    if server_us is None or not helpers_us:
        return None
    return round(server_us / helpers_us, 2)


def kernel_percent(start: ProcSample, end: ProcSample) -> float | None:
    """The share of the CPU used between two samples that was the kernel's work
    for the processes (stime: system calls, and on loopback the receiver's TCP
    work too), in percent. What is left is their own code; None when no CPU was
    used."""
    used = end.cpu_s - start.cpu_s
    if used <= 0:
        return None
    return round((end.system_s - start.system_s) / used * 100, 1)


def build_report(facts: RunFacts, finals: list[dict[str, Any]]) -> dict[str, Any]:
    measured_s = max(1e-9, facts.t_stop - facts.t_start)
    window_s = max(1e-9, facts.t_end - facts.t_start)

    series: dict[int, Histogram] = {}
    for final in finals:
        for second, wire in final["series"].items():
            hist = series.setdefault(int(second), Histogram())
            hist.merge(Histogram.from_wire(wire))
    latency = Histogram.merged(series.values())
    arrival = _hist(f.get("arrival_latency", ({}, 0, 0, 0)) for f in finals)
    arrival_shared = sum(f.get("arrival_shared", 0) for f in finals)
    deliveries = sum(f["deliveries"] for f in finals)
    acked = sum(f["pub_acked"] for f in finals)
    sent = sum(f["pub_sent"] for f in finals)
    expected = sum(f["extra"].get("expected", 0) for f in finals)
    lost = sum(f["extra"].get("lost", 0) for f in finals)

    connected = sum(s.get("connected", 0) for s in facts.setups)
    clients = sum(s.get("clients", 0) for s in facts.setups)
    started_at = min((s["started_at"] for s in facts.setups if s.get("started_at")), default=0)
    last_at = max((s["last_at"] for s in facts.setups if s.get("last_at")), default=0)
    storm_s = last_at - started_at if last_at and started_at else 0.0
    client_rss = sum(
        (s.get("rss_after_kib") or 0) - (s.get("rss_before_kib") or 0) for s in facts.setups
    )
    latency_summary = latency.summary_ms()
    reading = reading_ms_per_publication(facts.client_worker_cpu_s, acked)
    server = _server_section(facts, deliveries, acked, connected, window_s)
    helpers_us = _per(facts.helpers_cpu_s, acked)
    server_over_helpers = over_helpers(server.get("cpu_us_per_publication"), helpers_us)

    report: dict[str, Any] = {
        "scenario": facts.scenario,
        "target": facts.target,
        "protocol": facts.protocol,
        "backend": facts.backend,
        "urls": list(facts.urls),
        "settings": facts.settings,
        "started_at": facts.t_start,
        "duration_s": round(measured_s, 3),
        "window_s": round(window_s, 3),
        "connections": {
            "target": clients,
            "connected": connected,
            "failed": _merge_counts(f["connect_failures"] for f in finals),
            "setup_s": round(storm_s, 3),
            "connect_rate_per_s": round(connected / storm_s, 1) if storm_s > 0 else None,
            "connect_latency_ms": _hist(f["connect_latency"] for f in finals).summary_ms(),
        },
        "publications": {
            "sent": sent,
            "acked": acked,
            "failed": sum(f["pub_failed"] for f in finals),
            "skipped": sum(f["pub_skipped"] for f in finals),
            "pacer_dropped": sum(f["extra"].get("pacer_dropped", 0) for f in finals),
            "rate_per_s": round(acked / measured_s, 1),
            "ack_latency_ms": _hist(f["ack_latency"] for f in finals).summary_ms(),
        },
        "deliveries": {
            "count": deliveries,
            "rate_per_s": round(deliveries / measured_s, 1),
            "expected": expected,
            "lost": lost,
            "duplicated": sum(f["duplicates"] for f in finals),
            "foreign": sum(f["foreign"] for f in finals),
        },
        "latency_ms": latency_summary,
        # With arrival stamps: the deliveries to stamped clients up to their arrival in
        # the client's kernel, before the client's own queue (loadtest/wsclient.py);
        # how many stamps were a later frame's arrival (an upper bound), and the share
        # that were their own.
        "arrival_latency_ms": arrival.summary_ms() if arrival.count else None,
        "arrival_shared": arrival_shared,
        "arrival_exact_share": (
            round(1 - arrival_shared / arrival.count, 4) if arrival.count else None
        ),
        "errors": _merge_counts(f["errors"] for f in finals),
        "disconnects": _merge_counts(f["disconnects"] for f in finals),
        "pings_answered": sum(f.get("pings", 0) for f in finals),
        "machine": {
            "helpers_cpu_s": round(facts.helpers_cpu_s, 3),
            "helpers_cpu_us_per_publication": helpers_us,
            "server_cpu_over_helpers": server_over_helpers,
            "other_processes_cpu_s": round(facts.other_cpu_s, 3),
            "other_processes_cpu_percent": round(facts.other_cpu_s / window_s * 100, 1),
            "steal_cpu_s": round(facts.steal_s, 3),
            "speed_probe": facts.speed.to_json() if facts.speed is not None else None,
            "slow_moments": (
                facts.slow_moments.to_json() if facts.slow_moments is not None else None
            ),
        },
        "server": server,
        "profile": facts.profile.to_json() if facts.profile is not None else None,
        "client": {
            "workers": facts.workers,
            "cpus": list(facts.client_cpus) if facts.client_cpus else None,
            "cpu_s": round(facts.client_cpu_s, 3),
            "max_worker_cpu_percent": round(facts.client_max_cpu_percent, 1),
            "saturated": facts.client_saturated_s > 0,
            "saturated_seconds": facts.client_saturated_s,
            "measured_seconds": facts.client_seconds,
            "max_loop_lag_ms": facts.client_max_lag_ms,
            "wakeups_per_s": round(facts.client_wakeups / measured_s, 1),
            "wakeups_per_1000_deliveries": (
                round(facts.client_wakeups / deliveries * 1000, 2) if deliveries else None
            ),
            "rss_per_connection_kib": round(client_rss / connected, 2) if connected else None,
            "reading_ms_per_publication": reading,
            "latency_client_bound": latency_client_bound(latency_summary["p99"], reading),
        },
        "scenario_results": _scenario_section(facts, finals),
        "timeline": [{"t": second, **_timeline_point(series[second])} for second in sorted(series)],
        "histogram_us": latency.rows(),
        "fatal": facts.fatal,
        "notes": [*facts.notes, *filter(None, [thin_tail_note(acked, deliveries)])],
    }
    return report


def _timeline_point(hist: Histogram) -> dict[str, Any]:
    summary = hist.summary_ms()
    return {k: summary[k] for k in ("count", "p50", "p99", "max")}


def _server_cpu_s(facts: RunFacts) -> float | None:
    """The server's CPU seconds over the measured phase and drain; None if
    the server was not measured, or if one of its processes had ended by then
    (its CPU time went with it: the difference would be too low, even negative)."""
    start, end = facts.server_start, facts.server_end
    if not facts.server_pids or start is None or end is None:
        return None
    if min(start.alive, end.alive) < len(facts.server_pids):
        return None
    return end.cpu_s - start.cpu_s


def _server_section(
    facts: RunFacts, deliveries: int, acked: int, connected: int, window_s: float
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "pids": facts.server_pids,
        "cpus": list(facts.server_cpus) if facts.server_cpus else None,
        "interpreters": [
            {"exe": i.exe, "libpython": i.libpython} for i in facts.server_interpreters
        ],
    }
    if facts.server_core_busy:
        # The pinned core's whole load, softirq included (loopback TCP work that is
        # billed to no process): the server is saturated when this is, not its CPU %.
        busy = facts.server_core_busy
        out["core_busy_percent_mean"] = round(sum(busy) / len(busy) * 100, 1)
        out["core_busy_percent_max"] = round(max(busy) * 100, 1)
        out["core_saturated_seconds"] = facts.server_core_saturated_s
    cpu_s, end = _server_cpu_s(facts), facts.server_end
    if cpu_s is None or end is None:
        out["measured"] = False
        return out
    out.update(
        measured=True,
        cpu_s=round(cpu_s, 3),
        cpu_percent_of_core=round(cpu_s / window_s * 100, 1),
        kernel_cpu_percent=(
            kernel_percent(facts.server_start, end) if facts.server_start is not None else None
        ),
        cpu_us_per_delivery=_per(cpu_s, deliveries),
        cpu_us_per_publication=_per(cpu_s, acked),
    )
    before, ready = facts.server_before, facts.server_ready
    if before is not None and ready is not None:
        out.update(
            rss_before_kib=before.rss_kib,
            rss_connected_kib=ready.rss_kib,
            rss_end_kib=end.rss_kib,
            rss_per_connection_kib=(
                round((ready.rss_kib - before.rss_kib) / connected, 2) if connected else None
            ),
            setup_cpu_s=round(ready.cpu_s - before.cpu_s, 3),
            setup_cpu_us_per_connection=_per(ready.cpu_s - before.cpu_s, connected),
        )
    return out


def _scenario_section(facts: RunFacts, finals: list[dict[str, Any]]) -> dict[str, Any]:
    parts = [f["extra"].get("scenario", {}) for f in finals]
    if facts.scenario == "calls":
        ring = _hist(p["ring"] for p in parts)
        setup = _hist(p["setup"] for p in parts)
        completed = sum(p["calls_completed"] for p in parts)
        measured_s = max(1e-9, facts.t_stop - facts.t_start)
        server_cpu_s = _server_cpu_s(facts)
        return {
            "pairs": sum(p["pairs"] for p in parts),
            "calls_started": sum(p["calls_started"] for p in parts),
            "calls_completed": completed,
            "calls_failed": sum(p["calls_failed"] for p in parts),
            "no_idle_pair": sum(p["no_idle_pair"] for p in parts),
            "calls_per_s": round(completed / measured_s, 1),
            "invite_to_ring_ms": ring.summary_ms(),
            "invite_to_tokens_ms": setup.summary_ms(),
            # Everything a set-up costs the server (both sides' commands, the
            # pushes, the tokens, the hang-up): the headroom at a given rate.
            "server_cpu_us_per_call": (
                None if server_cpu_s is None else _per(server_cpu_s, completed)
            ),
        }
    if facts.scenario == "connect":
        out: dict[str, Any] = {
            "rooms": parts[0].get("rooms") if parts else 0,
            "reconnected_clients": sum(p["reconnected_clients"] for p in parts),
            "reconnect_attempts": sum(p["reconnect_attempts"] for p in parts),
            "reconnect_failures": _merge_counts(p["reconnect_failures"] for p in parts),
            "recovered": sum(p["recovered"] for p in parts),
            "not_recovered": sum(p["not_recovered"] for p in parts),
            "still_out_at_end": sum(p.get("still_out_at_end", 0) for p in parts),
            "deliveries_owed_to_still_out": sum(
                p.get("deliveries_owed_to_still_out", 0) for p in parts
            ),
            "reconnect_latency_ms": _hist(p["reconnect_latency"] for p in parts).summary_ms(),
            "restart": facts.restart,
        }
        last = [p["last_recovered_at"] for p in parts if p.get("last_recovered_at")]
        ready_at = facts.restart.get("ready_at")
        sigterm_at = facts.restart.get("sigterm_at")
        if last and ready_at:
            out["all_recovered_after_ready_s"] = round(max(last) - ready_at, 3)
        if last and sigterm_at:
            out["all_recovered_after_sigterm_s"] = round(max(last) - sigterm_at, 3)
        return out
    if facts.scenario == "chat":
        return parts[0] if parts else {}
    return {}
