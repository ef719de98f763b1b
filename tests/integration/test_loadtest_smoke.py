"""Smoke runs of the load-testing tool (``python -m loadtest``), tiny and fast.

Each run is the real CLI in a subprocess, against a real server started by
``server_factory`` or against the baseline the tool spawns itself; the JSON
report is read back. Asserts correctness only (every acknowledged publication
delivered exactly once, every client connected, the report complete), never
speed: these machines are shared and small.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.cli import EXIT_ABORTED, EXIT_FATAL
from loadtest.profile import read_raw, summarize
from loadtest.scenarios.fanout import PROBE_EVERY
from support.processes import REPO_ROOT, ServerProcess

# Keys every run report carries (loadtest/README.md § JSON report).
RUN_KEYS = {
    "scenario",
    "target",
    "settings",
    "duration_s",
    "connections",
    "publications",
    "deliveries",
    "latency_ms",
    "errors",
    "disconnects",
    "server",
    "client",
    "machine",
    "timeline",
    "histogram_us",
    "scenario_results",
    "fatal",
}
LATENCY_KEYS = {"count", "p50", "p95", "p99", "max"}
TOOL_TIMEOUT_S = 60.0

# Small, fast settings shared by every smoke run.
COMMON = ["--no-pin", "--settle", "0.2", "--drain-timeout", "5", "--quiet"]
SMOKE_RUNS: dict[str, list[str]] = {
    "fanout": ["fanout", "-n", "20", "-r", "50", "-d", "2"],
    "idle": ["idle", "-n", "50", "-d", "2"],
    "connect": ["connect", "-n", "50", "-d", "0.5", "--no-restart"],
}


async def run_tool(
    args: list[str], json_path: Path, env: dict[str, str], *, exit_code: int = 0
) -> dict[str, Any]:
    """Run ``python -m loadtest`` with ``args``; return its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "loadtest",
        *args,
        *COMMON,
        "--json",
        str(json_path),
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = output.decode(errors="replace")
    assert proc.returncode == exit_code, (
        f"loadtest {' '.join(args)} exited {proc.returncode}:\n{text}"
    )
    document: dict[str, Any] = json.loads(json_path.read_text())
    for run in document["runs"]:
        for one in run["server"].get("interpreters", ()):
            assert f"server runs {one['exe']} (" in text, text
    return document


def check_report(document: dict[str, Any], scenario: str, target: str) -> dict[str, Any]:
    assert {"tool", "machine", "runs", "comparisons"} <= document.keys()
    runs: list[dict[str, Any]] = document["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run.keys() >= RUN_KEYS, RUN_KEYS - run.keys()
    assert run["scenario"] == scenario
    assert run["target"] == target
    assert not run["fatal"]
    conns = run["connections"]
    assert conns["connected"] == conns["target"], conns
    assert conns["failed"] == {}
    assert run["latency_ms"].keys() >= LATENCY_KEYS
    assert run["connections"]["connect_latency_ms"].keys() >= LATENCY_KEYS
    for key in ("cpu_us_per_delivery", "cpu_us_per_publication", "rss_per_connection_kib"):
        assert key in run["server"], run["server"]
    # The server (or baseline) runs the interpreter running the tests.
    assert [i["exe"] for i in run["server"]["interpreters"]] == [os.path.realpath(sys.executable)]
    kernel = run["server"]["kernel_cpu_percent"]
    # None only when the server used less than a clock tick while measured.
    assert kernel is None or 0 <= kernel <= 100, run["server"]
    client = run["client"]
    assert {"saturated", "cpu_s", "workers", "wakeups_per_s"} <= client.keys()
    assert {"reading_ms_per_publication", "latency_client_bound"} <= client.keys()
    assert isinstance(client["latency_client_bound"], bool)
    assert client["wakeups_per_s"] > 0, client  # a worker waits for the server at times
    machine = run["machine"]
    assert {"helpers_cpu_s", "other_processes_cpu_s", "steal_cpu_s"} <= machine.keys()
    assert "server_cpu_over_helpers" in machine
    assert machine["steal_cpu_s"] >= 0, machine
    probe = machine["speed_probe"]
    assert 0 < probe["best_us"] <= probe["median_us"], probe
    pieces = probe["pieces"]
    assert 0 < pieces["median_us"] <= pieces["p999_us"] <= pieces["max_us"], probe
    # Timed during the measured phase too (at idle priority, a piece per 20 ms).
    slow = machine["slow_moments"]
    assert slow["pieces"] > 0 and 0 <= slow["slow_share"] <= 1, slow
    assert 0 < slow["median_us"] <= slow["p99_us"] <= slow["max_us"], slow
    deliveries = run["deliveries"]
    assert deliveries["lost"] == 0, deliveries
    assert deliveries["duplicated"] == 0, deliveries
    assert run["errors"] == {}
    return run


def check_fanout(run: dict[str, Any]) -> None:
    subscribers = run["settings"]["connections"]
    acked = run["publications"]["acked"]
    assert acked > 0
    assert run["publications"]["failed"] == 0
    # Every acknowledged publication reached every subscriber exactly once.
    assert run["deliveries"]["expected"] == acked * subscribers
    assert run["deliveries"]["count"] == acked * subscribers
    assert run["latency_ms"]["count"] == run["deliveries"]["count"]
    assert run["timeline"] and run["histogram_us"]
    # The busiest worker's reading per publication, a share of all the client CPU
    # (which also counts the set-up) spread over the publications.
    reading = run["client"]["reading_ms_per_publication"]
    assert 0 < reading <= run["client"]["cpu_s"] / acked * 1000, run["client"]
    arrival = run["arrival_latency_ms"]
    if not run["settings"]["arrival_stamps"]:
        assert arrival is None
        return
    # Every delivery to a probe stamped: its own stamp, or a later frame's, counted
    # (that each stamp precedes its handling: tests/unit/test_loadtest_arrival_stamps.py).
    probes = len(range(0, subscribers, PROBE_EVERY))
    assert run["client"]["workers"] > 1  # else every subscriber is stamped
    assert arrival["count"] == acked * probes, arrival
    assert 0 <= run["arrival_shared"] <= arrival["count"]
    assert run["arrival_exact_share"] == round(1 - run["arrival_shared"] / arrival["count"], 4)
    assert 0 < arrival["p50"] <= arrival["p95"] <= arrival["p99"] <= arrival["max"], arrival
    assert arrival["max"] < TOOL_TIMEOUT_S * 1000, arrival


def tool_env(secret: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_")}
    if secret is not None:
        env["SIGNAL_JWT_SECRET"] = secret  # read by the tool, not on its command line
    return env


@pytest.fixture
async def load_server(server_factory: Any) -> ServerProcess:
    server: ServerProcess = await server_factory({"SIGNAL_COMMANDS_PER_SECOND": "0"})
    return server


async def test_smoke_against_server(load_server: ServerProcess, tmp_path: Path) -> None:
    env = tool_env(load_server.secret)
    target = ["--url", load_server.ws_url, "--server-pid", str(load_server.pid)]
    names = list(SMOKE_RUNS)
    documents = await asyncio.gather(
        *(run_tool([*SMOKE_RUNS[n], *target], tmp_path / f"{n}.json", env) for n in names)
    )
    for name, document in zip(names, documents, strict=True):
        run = check_report(document, name, "external")
        assert run["server"]["measured"] is True
    check_fanout(check_report(documents[0], "fanout", "external"))


async def test_a_server_that_dies_mid_run_makes_the_run_fatal(
    load_server: ServerProcess, tmp_path: Path
) -> None:
    """The server killed while measured: the tool says which process exited,
    stops with its fatal exit code, and gives no server CPU figures (the dead
    process took its CPU time with it: they came out negative before)."""
    env = tool_env(load_server.secret)
    args = ["fanout", "-n", "20", "-r", "20", "-d", "6"]
    target = ["--url", load_server.ws_url, "--server-pid", str(load_server.pid)]
    tool = asyncio.create_task(
        run_tool([*args, *target], tmp_path / "died.json", env, exit_code=EXIT_FATAL)
    )
    # The room's publications start with the measured phase (the users' status
    # publications of the set-up reach nobody): kill the server once some arrived.
    for _ in range(300):
        if tool.done():
            break
        _, body = await load_server.aget("/metrics")
        if _metric(body, "signal_deliveries_total") >= 100:
            load_server.kill()
            break
        await asyncio.sleep(0.1)
    document = await tool
    [run] = document["runs"]
    assert run["fatal"] == [
        f"server process(es) {load_server.pid} exited during the run: "
        "the figures are the survivors' only"
    ], run["fatal"]
    assert run["server"]["measured"] is False, run["server"]
    assert "cpu_us_per_delivery" not in run["server"]


def _metric(body: bytes, name: str) -> float:
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


async def test_smoke_against_baseline(tmp_path: Path) -> None:
    env = tool_env()
    names = list(SMOKE_RUNS)
    documents = await asyncio.gather(
        *(
            run_tool([*SMOKE_RUNS[n], "--spawn-baseline"], tmp_path / f"{n}.json", env)
            for n in names
        )
    )
    for name, document in zip(names, documents, strict=True):
        run = check_report(document, name, "baseline")
        assert run["protocol"] == "baseline"
    check_fanout(check_report(documents[0], "fanout", "baseline"))


async def test_chat_through_redis_beside_the_baseline_through_redis(tmp_path: Path) -> None:
    """``chat --spawn-baseline`` with Redis and two instances: the baseline has
    ours' shape (two instances sharing a Redis of their own, a conversation
    spread over both), every acknowledged publication reaches every member of
    its conversation once on both, and the ratio is made."""
    args = ["chat", "-n", "40", "-r", "5", "-d", "2", "--spawn-server", "--spawn-baseline"]
    args += ["--spawn-redis", "--instances", "2"]
    document = await run_tool(args, tmp_path / "chat.json", tool_env())
    runs = {run["target"]: run for run in document["runs"]}
    assert runs.keys() == {"digis-signal redis x2", "baseline redis x2"}
    for run in runs.values():
        assert len(run["settings"]["urls"]) == 2
        assert run["publications"]["acked"] > 0 and run["publications"]["failed"] == 0
        assert run["deliveries"]["lost"] == 0 and run["deliveries"]["duplicated"] == 0
        assert run["deliveries"]["count"] == run["deliveries"]["expected"] > 0
        # Redis (the tool's, one per target) counted as the run's helper.
        assert run["machine"]["helpers_cpu_s"] > 0, run["machine"]
    (comparison,) = document["comparisons"]
    assert comparison["target"] == "digis-signal redis x2"
    assert comparison["ratios"]["server CPU per publication"] > 0


async def test_connect_restart_by_hand_over(tmp_path: Path) -> None:
    """``connect --handover``: the tool starts the successor on the same port,
    then stops the old server; every client comes back and recovers from Redis,
    nothing published meanwhile is lost."""
    args = [
        "connect",
        "--spawn-server",
        "--spawn-redis",
        "--handover",
        "-n", "40",
        "-r", "20",
        "-d", "20",
        "--server-env", "SIGNAL_DRAIN_S=0.5",
        "--reconnect-min", "0.1",
        "--reconnect-max", "0.5",
    ]  # fmt: skip
    document = await run_tool(args, tmp_path / "handover.json", tool_env())
    run = check_report(document, "connect", "digis-signal redis x1")
    results = run["scenario_results"]
    assert results["restart"]["handover"] is True, results["restart"]
    assert results["reconnected_clients"] == 40
    assert results["recovered"] == 40 and results["not_recovered"] == 0
    assert results["still_out_at_end"] == 0
    assert run["deliveries"]["lost"] == 0 and run["deliveries"]["duplicated"] == 0
    # Redis was spawned by the tool: its CPU per publication, and ours over it.
    machine, server = run["machine"], run["server"]
    assert machine["helpers_cpu_us_per_publication"] > 0, machine
    assert machine["server_cpu_over_helpers"] == pytest.approx(
        server["cpu_us_per_publication"] / machine["helpers_cpu_us_per_publication"], abs=0.01
    ), (machine, server)


async def test_calls_storm_completes_calls_and_prices_them(tmp_path: Path) -> None:
    """``calls`` against a spawned server (embedded broker, throwaway Agora
    credentials): every started call completes (invite, ring, accept, two
    tokens, end), the report gives the server's CPU per call set-up, and the
    invite-to-ring latency is the run's latency: table, timeline, histogram
    and the two plots."""
    plot = tmp_path / "calls"
    args = ["calls", "--spawn-server", "-n", "20", "-r", "10", "-d", "2", "--plot", str(plot)]
    document = await run_tool(args, tmp_path / "calls.json", tool_env())
    run = check_report(document, "calls", "digis-signal")
    results = run["scenario_results"]
    assert results["calls_completed"] > 0 and results["calls_failed"] == 0, results
    ring = results["invite_to_ring_ms"]
    assert ring["count"] >= results["calls_completed"], results
    assert run["latency_ms"] == ring, (run["latency_ms"], ring)
    assert sum(point["count"] for point in run["timeline"]) == ring["count"], run["timeline"]
    assert sum(n for _, _, n in run["histogram_us"]) == ring["count"]
    for name in ("latency-time", "latency-hist"):
        png = tmp_path / f"calls-{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    expected = run["server"]["cpu_s"] / results["calls_completed"] * 1e6
    assert results["server_cpu_us_per_call"] == pytest.approx(expected, rel=0.05), results


async def test_client_poll_delivers_everything(tmp_path: Path) -> None:
    """``--client-poll-us``: workers that sleep between loop iterations instead
    of waiting in epoll still get every publication, and the report says the
    run was polled (the poller itself: tests/unit/test_loadtest_poller.py)."""
    args = [*SMOKE_RUNS["fanout"], "--spawn-server", "--client-poll-us", "500"]
    document = await run_tool(args, tmp_path / "poll.json", tool_env())
    run = check_report(document, "fanout", "digis-signal")
    check_fanout(run)
    assert run["settings"]["client_poll_us"] == 500


async def test_arrival_stamps_time_every_delivery_before_the_clients_queue(
    tmp_path: Path,
) -> None:
    """``--arrival-stamps``: each delivery's latency is also taken at its arrival
    in the client's kernel, for digis-signal and the baseline alike, and the
    comparison carries those ratios (the reading: tests/unit/test_loadtest_arrival_stamps.py)."""
    args = [*SMOKE_RUNS["fanout"], "--spawn-server", "--spawn-baseline", "--arrival-stamps"]
    document = await run_tool(args, tmp_path / "stamps.json", tool_env())
    for run in document["runs"]:
        assert run["settings"]["arrival_stamps"] is True
        check_fanout(run)
    (comparison,) = document["comparisons"]
    assert comparison["ratios"]["arrival latency p99"] > 0, comparison


async def test_profile_sums_the_servers_busy_stacks(tmp_path: Path) -> None:
    """``--profile``: py-spy samples the spawned server during the measured
    phase; the report keeps its busy samples (the loop's waits apart) summed by
    innermost frame, loop callback and function of ours, and says the run's
    figures are disturbed (the summing itself: tests/unit/test_loadtest_profile.py)."""
    args = ["chat", "--spawn-server", "-n", "40", "-r", "20", "-d", "3", "--profile"]
    document = await run_tool(args, tmp_path / "profile.json", tool_env())
    run = check_report(document, "chat", "digis-signal")
    profile = run["profile"]
    assert profile["errors"] == [], profile
    assert profile["pids"] == run["server"]["pids"]
    assert profile["busy_samples"] > 0, profile
    assert profile["samples"] == profile["busy_samples"] + profile["waiting_samples"]
    # 800 publications/s for 3 s: the server's busy time is mostly its commands and
    # socket reads, entered from the loop through our code.
    callbacks = dict(profile["callbacks"])
    assert any(label.endswith("(signaling/session.py)") for label in callbacks), callbacks
    assert any("(signaling/" in label for label, _ in profile["own_self"]), profile
    shares = [share for _, share in profile["innermost"]]
    # Each share rounded to 0.1 %: the sum may pass 100 by half a tenth per row.
    assert shares == sorted(shares, reverse=True), shares
    assert 0 < sum(shares) <= 100 + 0.05 * len(shares), shares
    raw = Path(profile["raw_dir"])
    files = list(raw.glob("stacks-*.txt"))
    assert [p.name for p in files] == [f"stacks-{profile['pids'][0]}.txt"]
    # The report is the sum of the stacks it kept.
    with files[0].open() as f:
        again = summarize([read_raw(f)], profile["rate_hz"], profile["pids"]).to_json()
    for key in ("samples", "waiting_samples", "busy_samples", "innermost", "callbacks"):
        assert again[key] == profile[key], key
    assert any("py-spy paused the server" in note for note in run["notes"]), run["notes"]
    shutil.rmtree(raw)  # kept for the user by the tool; ours to remove here


async def test_arrival_stamps_need_the_raw_client() -> None:
    args = [*SMOKE_RUNS["fanout"], "--spawn-server", "--backend", "websockets", "--arrival-stamps"]
    output = await refused_usage(args)
    assert b"--arrival-stamps needs the raw backend" in output, output


async def test_repeated_runs_pair_each_repetition_and_report_medians(tmp_path: Path) -> None:
    """``--repeat 2`` with the baseline: both targets run twice, interleaved;
    each comparison pairs runs of one repetition, and medians cover both."""
    args = [*SMOKE_RUNS["fanout"], "--spawn-server", "--spawn-baseline", "--repeat", "2"]
    document = await run_tool(args, tmp_path / "repeat.json", tool_env())
    runs = document["runs"]
    assert [(r["target"], r["repetition"]) for r in runs] == [
        ("digis-signal", 1),
        ("baseline", 1),
        ("digis-signal", 2),
        ("baseline", 2),
    ]
    for run in runs:
        check_fanout(run)
    comps = document["comparisons"]
    assert [c["repetition"] for c in comps] == [1, 2]
    for comp in comps:
        pair = [r for r in runs if r["repetition"] == comp["repetition"]]
        bound = [r["client"]["latency_client_bound"] for r in pair]
        assert comp["latency_client_bound"] is any(bound)
    label = "server CPU per delivery"
    ours = [r["server"]["cpu_us_per_delivery"] for r in runs if r["target"] == "digis-signal"]
    figures = {g["target"]: g for g in document["medians"]["figures"]}
    assert figures.keys() == {"digis-signal", "baseline"}
    assert figures["digis-signal"]["repetitions"] == 2
    assert figures["digis-signal"]["figures"][label] == pytest.approx(sum(ours) / 2, abs=1e-3)
    (ratios,) = document["medians"]["ratios"]
    assert ratios["repetitions"] == 2
    expected = sum(c["ratios"][label] for c in comps) / 2
    assert ratios["ratios"][label] == pytest.approx(expected, abs=1e-3)


async def test_repeat_is_bounded() -> None:
    output = await refused_usage(["fanout", "--spawn-baseline", "--repeat", "21"])
    assert b"--repeat must be 1..20" in output


async def refused_usage(args: list[str]) -> bytes:
    """Run the tool with ``args`` it must refuse (exit 2, a usage error); its output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", *args,
        cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(proc.communicate(), TOOL_TIMEOUT_S)
    assert proc.returncode == 2, output
    return output


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.append(int(entry))
    return kids


async def test_a_hang_up_stops_the_run_and_the_servers_it_started() -> None:
    """The spawned servers live in sessions of their own (a Ctrl-C reaches the
    tool only): a SIGHUP (the terminal closed) must then end the run as Ctrl-C
    does, the tool stopping what it started, not leave them running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest", *SMOKE_RUNS["idle"][:3], "-d", "60",
        "--spawn-baseline", "--no-pin", "--quiet",
        cwd=REPO_ROOT, env=tool_env(),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    try:
        line = b""
        while b"baseline up at" not in line:
            line = await asyncio.wait_for(proc.stderr.readline(), TOOL_TIMEOUT_S)
            assert line, "the tool ended before its baseline was up"
        spawned = _children(proc.pid)
        assert spawned, "no server process found"
        proc.send_signal(signal.SIGHUP)
        assert await asyncio.wait_for(proc.wait(), TOOL_TIMEOUT_S) == EXIT_ABORTED
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    for pid in spawned:
        assert not _alive(pid), f"spawned process {pid} outlived the tool"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
