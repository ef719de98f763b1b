"""The summary table on the terminal, the comparisons with the baseline, and the JSON
file."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

import orjson

from loadtest.speed import SLOW_MOMENTS

__all__ = ["comparisons", "machine_info", "medians", "print_summary", "write_json"]

_OURS = "digis-signal"
_BASELINE = "baseline"
# The figures compared with the baseline: (label, path in the report). Lower is better
# for all of them, so a ratio under 1 means digis-signal is cheaper or faster.
_RATIO_FIELDS = (
    ("server CPU per delivery", ("server", "cpu_us_per_delivery")),
    ("server CPU per publication", ("server", "cpu_us_per_publication")),
    ("server RSS per connection", ("server", "rss_per_connection_kib")),
    ("server CPU % (window)", ("server", "cpu_percent_of_core")),
    ("latency p50", ("latency_ms", "p50")),
    ("latency p99", ("latency_ms", "p99")),
    ("arrival latency p50", ("arrival_latency_ms", "p50")),
    ("arrival latency p99", ("arrival_latency_ms", "p99")),
    ("connect setup time", ("connections", "setup_s")),
)
_UNITS = {
    "server CPU per delivery": "µs",
    "server CPU per publication": "µs",
    "server RSS per connection": "KiB",
    "server CPU % (window)": "%",
    "latency p50": "ms",
    "latency p99": "ms",
    "arrival latency p50": "ms",
    "arrival latency p99": "ms",
    "connect setup time": "s",
}


def _get(report: dict[str, Any], path: Sequence[str]) -> Any:
    value: Any = report
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _key(run: dict[str, Any]) -> tuple[str, float, int]:
    return (run["scenario"], run["settings"]["rate"], run["settings"]["connections"])


def comparisons(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """digis-signal ÷ baseline for runs of the same scenario, rate and
    repetition (``--repeat``: each repetition's pair ran minutes apart at most)."""
    out = []
    for ours in runs:
        if not ours["target"].startswith(_OURS):
            continue
        key = _key(ours)
        repetition = ours.get("repetition", 1)
        for base in runs:
            if not base["target"].startswith(_BASELINE) or _key(base) != key:
                continue
            if base.get("repetition", 1) != repetition:
                continue
            ratios: dict[str, float | None] = {}
            for label, path in _RATIO_FIELDS:
                a, b = _get(ours, path), _get(base, path)
                ratios[label] = round(a / b, 3) if a is not None and b else None
            out.append(
                {
                    "target": ours["target"],
                    "scenario": key[0],
                    "rate": key[1],
                    "connections": key[2],
                    "repetition": repetition,
                    "ratios": ratios,
                    # Either p99 mostly the clients' own reading: the latency ratios
                    # then mostly compare the clients, not the servers.
                    "latency_client_bound": _client_bound(ours) or _client_bound(base),
                }
            )
    return out


def _client_bound(run: dict[str, Any]) -> bool:
    return bool(_get(run, ("client", "latency_client_bound")))


def _median_of(values: Iterable[Any]) -> float | None:
    numbers = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(numbers), 3) if numbers else None


def _group_head(target: str, key: tuple[str, float, int], count: int) -> dict[str, Any]:
    return {
        "target": target,
        "scenario": key[0],
        "rate": key[1],
        "connections": key[2],
        "repetitions": count,
    }


def medians(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Medians over the repetitions of each target, scenario and rate, of the
    figures compared with the baseline and of the ratios; empty without
    ``--repeat``."""
    groups: dict[tuple[str, tuple[str, float, int]], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["target"], _key(run)), []).append(run)
    figures = [
        {
            **_group_head(target, key, len(group)),
            "figures": {
                label: _median_of(_get(run, path) for run in group) for label, path in _RATIO_FIELDS
            },
        }
        for (target, key), group in groups.items()
        if len(group) > 1
    ]
    pairs: dict[tuple[str, tuple[str, float, int]], list[dict[str, Any]]] = {}
    for comp in comparisons(runs):
        key = (comp["scenario"], comp["rate"], comp["connections"])
        pairs.setdefault((comp["target"], key), []).append(comp)
    ratios = [
        {
            **_group_head(target, key, len(group)),
            "ratios": {
                label: _median_of(comp["ratios"][label] for comp in group)
                for label, _ in _RATIO_FIELDS
            },
        }
        for (target, key), group in pairs.items()
        if len(group) > 1
    ]
    return {"figures": figures, "ratios": ratios}


def _libpython_part(libpython: str | None) -> str:
    if libpython is None:
        return "no shared libpython loaded"
    # Figures of the same Python differ by about a tenth between the two builds
    # (docs/benchmarks.md, § Fifteenth run): say which one this was.
    return f"shared libpython: {libpython}"


def _kernel_part(percent: float | None) -> str:
    if percent is None:
        return ""
    return f" ({percent} % of it in the kernel: system calls and loopback TCP)"


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


_COLUMNS = (
    ("scenario", lambda r: r["scenario"]),
    ("target", lambda r: r["target"]),
    ("conns", lambda r: _fmt(r["connections"]["connected"])),
    ("rate", lambda r: _fmt(r["settings"]["rate"], 0)),
    ("pub/s", lambda r: _fmt(r["publications"]["rate_per_s"])),
    ("dlv/s", lambda r: _fmt(r["deliveries"]["rate_per_s"], 0)),
    ("p50 ms", lambda r: _fmt(r["latency_ms"]["p50"], 2)),
    ("p95 ms", lambda r: _fmt(r["latency_ms"]["p95"], 2)),
    ("p99 ms", lambda r: _fmt(r["latency_ms"]["p99"], 2)),
    ("max ms", lambda r: _fmt(r["latency_ms"]["max"], 1)),
    ("lost", lambda r: _fmt(r["deliveries"]["lost"])),
    ("dup", lambda r: _fmt(r["deliveries"]["duplicated"])),
    ("srv µs/dlv", lambda r: _fmt(r["server"].get("cpu_us_per_delivery"), 2)),
    ("srv µs/pub", lambda r: _fmt(r["server"].get("cpu_us_per_publication"), 1)),
    ("srv cpu%", lambda r: _fmt(r["server"].get("cpu_percent_of_core"))),
    ("KiB/conn", lambda r: _fmt(r["server"].get("rss_per_connection_kib"), 2)),
    ("core%", lambda r: _fmt(r["server"].get("core_busy_percent_mean"))),
    ("client", lambda r: "SATURATED" if r["client"]["saturated"] else "ok"),
)


def _table(rows: list[list[str]], out: TextIO) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        out.write("  ".join(cell.rjust(widths[i]) for i, cell in enumerate(row)) + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def print_summary(runs: list[dict[str, Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    if not runs:
        return
    out.write("\n")
    repeated = any(r.get("repetition", 1) > 1 for r in runs)
    columns: tuple[tuple[str, Callable[[dict[str, Any]], str]], ...] = _COLUMNS
    if repeated:
        columns = (*_COLUMNS[:2], ("rep", lambda r: _fmt(r.get("repetition", 1))), *_COLUMNS[2:])
    rows = [[name for name, _ in columns]]
    rows += [[get(r) for _, get in columns] for r in runs]
    _table(rows, out)
    for r in runs:
        _details(r, out)
    comps = comparisons(runs)
    if comps:
        out.write("\ndigis-signal ÷ baseline, same scenario and rate (lower is better):\n")
        for comp in comps:
            parts = [f"{k} {v:.2f}x" for k, v in comp["ratios"].items() if v is not None]
            if comp["latency_client_bound"]:
                parts.append("latency client-bound (see the client reading notes)")
            head = f"  {comp['target']}, {comp['scenario']} rate {comp['rate']:g}"
            head += f" (repetition {comp['repetition']}): " if repeated else ": "
            out.write(head + ", ".join(parts) + "\n")
    found = medians(runs)
    if found["figures"]:
        out.write("\nmedians over the repetitions:\n")
        for group in found["figures"]:
            figures = group["figures"].items()
            parts = [f"{k} {v:,.2f} {_UNITS[k]}" for k, v in figures if v is not None]
            head = f"  {group['target']}, {group['scenario']} rate {group['rate']:g}"
            out.write(f"{head} ({group['repetitions']} runs): " + ", ".join(parts) + "\n")
        for group in found["ratios"]:
            parts = [f"{k} {v:.2f}x" for k, v in group["ratios"].items() if v is not None]
            head = f"  {group['target']} ÷ baseline, {group['scenario']} rate {group['rate']:g}"
            out.write(f"{head} ({group['repetitions']} pairs): " + ", ".join(parts) + "\n")


def _details(r: dict[str, Any], out: TextIO) -> None:
    lines = []
    head = f"{r['scenario']} / {r['target']} (rate {r['settings']['rate']:g})"
    conns = r["connections"]
    if conns["failed"]:
        lines.append(f"connect failures: {conns['failed']}")
    if r["scenario"] in ("connect", "idle") or conns["setup_s"]:
        lines.append(
            f"setup: {conns['connected']:,}/{conns['target']:,} in {conns['setup_s']:.2f}s "
            f"({_fmt(conns['connect_rate_per_s'])}/s), connect latency p50 "
            f"{conns['connect_latency_ms']['p50']}ms p99 {conns['connect_latency_ms']['p99']}ms"
        )
    if r["errors"]:
        lines.append(f"errors: {r['errors']}")
    if r["disconnects"]:
        lines.append(f"disconnects by code: {r['disconnects']}")
    pubs = r["publications"]
    if pubs["skipped"] or pubs["pacer_dropped"] or pubs["failed"]:
        lines.append(
            f"publications not sent: {pubs['skipped']} (connection down or "
            f"{r['settings']['max_inflight']} awaiting ack), dropped by a late pacer: "
            f"{pubs['pacer_dropped']}, failed: {pubs['failed']}"
        )
    if pubs["acked"]:
        ack = pubs["ack_latency_ms"]
        lines.append(f"publish ack latency: p50 {ack['p50']}ms p99 {ack['p99']}ms")
    srv = r["server"]
    if srv.get("measured"):
        lines.append(
            f"server: {srv['cpu_s']}s CPU over {r['window_s']}s"
            f"{_kernel_part(srv.get('kernel_cpu_percent'))}; RSS "
            f"{_fmt(srv.get('rss_before_kib'))} → {_fmt(srv.get('rss_connected_kib'))} KiB "
            f"(setup {_fmt(srv.get('setup_cpu_us_per_connection'))} µs CPU per connection)"
        )
    for one in srv.get("interpreters") or ():
        lines.append(f"server runs {one['exe']} ({_libpython_part(one['libpython'])})")
    if srv.get("core_saturated_seconds"):
        lines.append(
            f"WARNING: the server's CPU core was ≥90 % busy (softirq included) "
            f"{srv['core_saturated_seconds']}s of the run: latencies include its queueing"
        )
    probe = r["machine"].get("speed_probe")
    if probe:
        lines.append(
            f"machine speed probe: {probe['median_us']} µs per reference iteration "
            f"(fastest round {probe['best_us']}; lower is faster, loadtest/speed.py)"
        )
        pieces = probe.get("pieces")
        if pieces:
            lines.append(
                f"machine slow moments before the run: pieces of that work took "
                f"{pieces['median_us']} µs (median), {pieces['p99_us']} µs (p99), "
                f"{pieces['p999_us']} µs (p99.9, "
                f"{pieces['p999_over_median']}x the median), {pieces['max_us']} µs (max)"
            )
    ratio = r["machine"].get("server_cpu_over_helpers")
    if ratio is not None:
        lines.append(
            f"helpers (Redis): {r['machine']['helpers_cpu_us_per_publication']} µs of CPU per "
            f"publication; the server's is {ratio}x that (at one load, steadier than either "
            "figure when the machine's speed moves)"
        )
    slow = r["machine"].get("slow_moments")
    if slow:
        lines.append(
            f"machine slow moments during the run: {slow['pieces']:,} pieces timed, median "
            f"{slow['median_us']} µs, p99 {slow['p99_us']} µs, max {slow['max_us']} µs; "
            f"{slow['slow_share'] * 100:.1f} % at {SLOW_MOMENTS:g}x the median or more"
        )
    cl = r["client"]
    lines.append(
        f"client: {cl['workers']} workers, {cl['cpu_s']}s CPU, busiest worker "
        f"{cl['max_worker_cpu_percent']}% of a core, max loop lag {cl['max_loop_lag_ms']}ms, "
        f"{_fmt(cl['rss_per_connection_kib'], 2)} KiB per connection, "
        f"{_fmt(cl.get('wakeups_per_s'))} wake-ups/s"
        + (
            f" ({cl['wakeups_per_1000_deliveries']} per 1,000 deliveries)"
            if cl.get("wakeups_per_1000_deliveries") is not None
            else ""
        )
    )
    if cl.get("reading_ms_per_publication") is not None:
        lines.append(
            f"client reading: the busiest worker spent {cl['reading_ms_per_publication']} ms "
            "of CPU per publication"
        )
    arrival = r.get("arrival_latency_ms")
    if arrival:
        lines.append(
            f"latency to arrival in the client's kernel (before the client's own queue), "
            f"{arrival['count']:,} deliveries to stamped clients, "
            f"{r['arrival_exact_share'] * 100:.1f} % of their stamps their own (the rest a "
            "later frame's arrival: an upper bound): "
            f"p50 {arrival['p50']}ms p95 {arrival['p95']}ms p99 {arrival['p99']}ms "
            f"max {arrival['max']}ms"
        )
    if cl.get("latency_client_bound"):
        lines.append(
            f"NOTE: at least half of the latency p99 ({r['latency_ms']['p99']} ms) is the "
            "clients' own reading: a worker reads a publication's deliveries one after "
            "another, so p99 comparisons here mostly measure the client, not the server"
            + ("" if arrival else " (--arrival-stamps measures before the clients' queue)")
        )
    if cl["saturated"]:
        lines.append(
            f"WARNING: client CPU saturated {cl['saturated_seconds']}/{cl['measured_seconds']}s:"
            " latencies and rates include the client's own queueing"
        )
    if r["pings_answered"]:
        lines.append(f"server pings answered: {r['pings_answered']:,}")
    lines += _scenario_lines(r)
    lines += _profile_lines(r.get("profile"))
    lines += [f"FATAL: {text}" for text in r["fatal"]]
    lines += [f"note: {text}" for text in r["notes"]]
    out.write(f"\n{head}\n" + "".join(f"  {line}\n" for line in lines))


def _profile_lines(profile: dict[str, Any] | None, top: int = 6) -> list[str]:
    """``--profile``: the busy samples' shares (loadtest/profile.py)."""
    if not profile:
        return []

    def row(table: list[list[Any]]) -> str:
        return ", ".join(f"{label} {share} %" for label, share in table[:top]) or "-"

    return [
        f"profile (py-spy --native, {profile['rate_hz']} Hz): {profile['busy_samples']:,} busy "
        f"samples, {profile['waiting_samples']:,} waiting in the event loop's poll left out; "
        f"stacks in {profile['raw_dir']}",
        f"  innermost frame: {row(profile['innermost'])}",
        f"  by loop callback: {row(profile['callbacks'])}",
        f"  own functions, their own time: {row(profile['own_self'])}",
    ]


def _scenario_lines(r: dict[str, Any]) -> list[str]:
    sr = r["scenario_results"]
    if r["scenario"] == "calls" and sr:
        ring, tokens = sr["invite_to_ring_ms"], sr["invite_to_tokens_ms"]
        return [
            f"calls: {sr['pairs']} pairs; {sr['calls_completed']:,} completed, "
            f"{sr['calls_failed']:,} failed of {sr['calls_started']:,} started "
            f"({sr['calls_per_s']}/s); no idle pair {sr['no_idle_pair']:,} times",
            f"invite → ring: p50 {ring['p50']}ms p99 {ring['p99']}ms max {ring['max']}ms; "
            f"invite → both tokens: p50 {tokens['p50']}ms p99 {tokens['p99']}ms; "
            f"server CPU per call {_fmt(sr.get('server_cpu_us_per_call'))} µs",
        ]
    if r["scenario"] == "connect" and sr:
        lines = []
        restart = sr.get("restart") or {}
        if "down_s" in restart:
            out = sr.get("still_out_at_end", 0)
            down = (
                "hand-over (the new server listened before the SIGTERM)"
                if restart.get("handover")
                else f"server down {restart['down_s']}s (SIGTERM → ready)"
            )
            lines.append(
                f"restart: {down}; "
                f"{sr['reconnected_clients']:,} clients back, the last "
                f"{_fmt(sr.get('all_recovered_after_ready_s'), 2)}s after ready "
                f"({_fmt(sr.get('all_recovered_after_sigterm_s'), 2)}s after SIGTERM)"
                + (
                    f"; {out:,} still reconnecting at the end "
                    f"({sr.get('deliveries_owed_to_still_out', 0):,} deliveries owed to them, "
                    "not counted as lost)"
                    if out
                    else ""
                )
            )
            lines.append(
                f"recovery: {sr['recovered']:,} recovered, {sr['not_recovered']:,} not; "
                f"{sr['reconnect_attempts']:,} attempts, failures {sr['reconnect_failures']}"
            )
        elif "error" in restart:
            lines.append(f"restart failed: {restart['error']}")
        return lines
    return [f"{r['scenario']}: " + orjson.dumps(sr).decode()] if sr else []


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
    }
    for package in ("websockets", "uvloop", "orjson"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            info[package] = importlib.metadata.version(package)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        ).stdout.strip()
    return info


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return None


def write_json(path: Path, runs: list[dict[str, Any]], argv: Sequence[str]) -> None:
    document = {
        "tool": "digis-signal-loadtest",
        "command": list(argv),
        "machine": machine_info(),
        "runs": runs,
        "comparisons": comparisons(runs),
        "medians": medians(runs),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
