"""The parent process: starts the worker processes, moves them through the phases
together, samples the server and the workers from ``/proc``, shows progress, and
builds the report. Synchronous on purpose: it only waits on pipes and reads /proc.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

from loadtest.aggregate import RunFacts, build_report
from loadtest.config import RunSettings, WorkerPlan
from loadtest.procstat import (
    alive,
    cpu_seconds,
    cpu_ticks,
    discover_listeners,
    interpreters,
    machine_busy_seconds,
    machine_steal_seconds,
    sample,
    with_descendants,
)
from loadtest.profile import ServerProfiler, find_py_spy
from loadtest.progress import ProgressLine
from loadtest.servers import ServerGroup
from loadtest.slowmoments import SlowMomentWatch, slow_moment_notes
from loadtest.speed import probe_speed
from loadtest.stats import bitmap_or
from loadtest.worker import worker_main
from loadtest.wsclient import split_url

__all__ = ["RunAborted", "Target", "run_scenario", "worker_count"]

# Connections one worker process holds at most: the per-process open-file limit on
# this kind of machine is 20,000, and a few descriptors are the process's own.
MAX_CONNECTIONS_PER_WORKER = 15000
# A worker at this share of one core (or all workers at this share of their CPUs)
# counts as saturated: latencies then measure the client's queue, not the server.
SATURATED = 0.90
# Other processes using more than this share of a CPU during a run make it noisy.
NOISY = 0.10
_RESTART_AFTER_S = 1.0


class RunAborted(Exception):
    """A worker failed or the run could not finish in time."""


@dataclass
class Target:
    """What a run is aimed at."""

    label: str  # "digis-signal", "baseline" or "external"
    protocol: str
    urls: tuple[str, ...]
    pids: list[int]
    group: ServerGroup | None = None
    secret: str | None = None
    helper_pids: list[int] = dataclasses.field(default_factory=list)  # e.g. our redis


def worker_count(
    settings: RunSettings, client_cpus: tuple[int, ...] | None, requested: int | None
) -> int:
    if requested:
        return requested
    cpus = len(client_cpus) if client_cpus else 1
    needed = max(cpus, math.ceil(settings.connections / MAX_CONNECTIONS_PER_WORKER))
    # fanout keeps its publishers in a worker of their own.
    return needed + 1 if settings.scenario == "fanout" else needed


def server_exit_text(gone: list[int], group: ServerGroup | None) -> str:
    """Which server processes exited during a run, with the exit codes and
    logs of those the tool started."""
    text = f"server process(es) {', '.join(map(str, gone))} exited during the run"
    if group is None:
        return text + ": the figures are the survivors' only"
    codes = group.exit_codes(gone)
    if codes:
        text += " (" + ", ".join(f"{name}: exit code {code}" for name, code in codes) + ")"
    return f"{text}; logs in {group.log_dir}"


def discover_pids(urls: tuple[str, ...]) -> list[int]:
    pids: set[int] = set()
    for url in urls:
        _, port, _ = split_url(url)
        pids.update(discover_listeners(port))
    return sorted(pids)


def run_scenario(
    settings: RunSettings,
    target: Target,
    *,
    workers: int,
    client_cpus: tuple[int, ...] | None,
    server_cpus: tuple[int, ...] | None,
    restart: bool,
    progress: ProgressLine,
) -> dict[str, Any]:
    """One run against one target; returns the report dict (see aggregate.py)."""
    run = _Run(settings, target, workers, client_cpus, server_cpus, restart, progress)
    try:
        return run.execute()
    finally:
        run.shutdown()


class _Run:
    def __init__(
        self,
        settings: RunSettings,
        target: Target,
        workers: int,
        client_cpus: tuple[int, ...] | None,
        server_cpus: tuple[int, ...] | None,
        restart: bool,
        progress: ProgressLine,
    ) -> None:
        self.s = settings
        self.target = target
        self.restart = restart
        self.progress = progress
        self.facts = RunFacts(
            scenario=settings.scenario,
            target=target.label,
            protocol=settings.protocol,
            backend=settings.backend,
            urls=settings.urls,
            settings=_public_settings(settings),
            workers=workers,
            server_pids=with_descendants(target.pids or discover_pids(settings.urls)),
            client_cpus=client_cpus,
            server_cpus=server_cpus,
        )
        if not self.facts.server_pids:
            self.facts.notes.append(
                "server processes not found (pass --server-pid): no server CPU or RSS figures"
            )
        self.procs: list[mp.process.BaseProcess] = []
        self.conns: list[Connection] = []
        self.latest: list[dict[str, Any]] = [{} for _ in range(workers)]
        self._cpu_last: dict[int, float] = {}
        self._server_cpu_last: tuple[float, int] | None = None  # (CPU s, processes)
        self._core_ticks: dict[str, tuple[int, int]] = {}
        self._last_tick = time.monotonic()
        self._measuring = False
        self._restart_thread: threading.Thread | None = None
        self._watch: SlowMomentWatch | None = None
        self._profiler: ServerProfiler | None = None
        self._profiler_cpu_s = 0.0

    # --- the phases -------------------------------------------------------------------

    def execute(self) -> dict[str, Any]:
        facts = self.facts
        pids = facts.server_pids
        # Before any client exists: the core's speed, on the server's CPUs.
        facts.speed = probe_speed(facts.server_cpus)
        # Started now so that its start-up is over before the measured phase.
        self._watch = watch = SlowMomentWatch(facts.server_cpus)
        watch.start()
        facts.server_before = sample(pids)
        facts.server_interpreters = interpreters(pids)
        self._start_workers()
        setup_budget = self.s.connect_timeout_s + 30.0 + self.s.connections / 250.0
        facts.setups = [m[1] for m in self._gather("ready", setup_budget)]
        # Let deferred work (presence, cleanup tasks) finish before sampling RSS.
        time.sleep(self.s.settle_s)
        facts.server_ready = sample(pids)

        watch.begin()
        facts.t_start = time.time()
        facts.server_start = sample(pids)
        self._start_profiler()
        own_start = self._own_cpu()
        deadline = facts.t_start + self.s.duration_s
        self._measuring = True
        self._broadcast("start", facts.t_start, deadline)
        if self.restart and self.target.group is not None:
            self._restart_thread = threading.Thread(target=self._restart_servers, daemon=True)
            self._restart_thread.start()
        stopped = self._gather("stopped", self.s.duration_s + 30.0, on_tick=self._maybe_stop)
        facts.t_stop = time.time()
        self._measuring = False
        self._finish_profiler()
        facts.slow_moments = watch.stop()
        facts.notes += slow_moment_notes(self.s.scenario, facts.speed.pieces, facts.slow_moments)
        if watch.unavailable is not None:
            facts.notes.append(f"the core's slow moments were not watched: {watch.unavailable}")
        if self._restart_thread is not None:
            self._restart_thread.join(60.0)

        acked: dict[int, bytearray] = {}
        for _, part in stopped:
            for stream, bitmap in part.items():
                bitmap_or(acked.setdefault(stream, bytearray()), bitmap)
        self._broadcast("expect", {k: bytes(v).rstrip(b"\0") for k, v in acked.items()})
        finals = [m[1] for m in self._gather("final", self.s.drain_timeout_s + 30.0)]
        facts.t_end = time.time()
        facts.server_end = sample(facts.server_pids)
        self._check_server_exits()
        self._account_noise(own_start)
        facts.client_cpu_s = sum(f["extra"].get("cpu_s", 0.0) for f in finals)
        facts.client_wakeups = sum(f["extra"].get("wakeups", 0) for f in finals)
        self._broadcast("close")
        self.progress.done()
        return build_report(facts, finals)

    def _check_server_exits(self) -> None:
        """A server process that died during the run (a crash, the OOM killer,
        someone's signal) makes the run fatal: what it measured is the survivors'
        work only, and the clients' losses are the crash's, not the server's
        behaviour under load. A restart's old processes are not counted: the
        successors are measured from the hand-over on, and a failed restart
        reports itself."""
        if self.restart and (self.facts.restart is None or "error" in self.facts.restart):
            return
        running = set(alive(self.facts.server_pids))
        gone = [pid for pid in self.facts.server_pids if pid not in running]
        if gone:
            self.facts.fatal.append(server_exit_text(gone, self.target.group))

    def _start_profiler(self) -> None:
        if not self.s.profile or not self.facts.server_pids:
            return
        executable = find_py_spy()
        if executable is None:
            self.facts.notes.append("--profile: py-spy not found, no profile taken")
            return
        self._profiler = ServerProfiler(executable, self.facts.server_pids)
        self._profiler.start()

    def _finish_profiler(self) -> None:
        profiler, self._profiler = self._profiler, None
        if profiler is None:
            return
        summary = self.facts.profile = profiler.finish()
        self._profiler_cpu_s = profiler.cpu_s
        self.facts.notes.append(
            "profiled: py-spy paused the server for each sample, so this run's CPU and "
            "latency figures are disturbed; read the profile's shares"
        )
        self.facts.notes += [f"profile: {text}" for text in summary.errors]
        if self.restart:
            self.facts.notes.append(
                "profile: the processes that served when the run started (not their successors)"
            )

    def _own_cpu(self) -> tuple[float, float, float, float, float]:
        """(machine busy, workers + this process, helpers, server, stolen by the
        hypervisor) CPU seconds now."""
        workers = sum(cpu_seconds(p.pid) or 0.0 for p in self.procs if p.pid is not None)
        me = os.times()
        return (
            machine_busy_seconds(),
            workers + me.user + me.system,
            sample(self.target.helper_pids).cpu_s,
            sample(self.facts.server_pids).cpu_s,
            machine_steal_seconds(),
        )

    def _account_noise(self, start: tuple[float, float, float, float, float]) -> None:
        """CPU that other processes used during the run (others' test suites...),
        and CPU time the hypervisor took away."""
        end = self._own_cpu()
        busy, clients, helpers, server, steal = (b - a for a, b in zip(start, end, strict=True))
        if self.restart:
            server = 0.0  # the restarted server's PIDs changed: not comparable
        window = max(1e-9, self.facts.t_end - self.facts.t_start)
        # The slow-moment watcher's and py-spy's CPU are the tool's own, not the
        # machine's noise.
        watcher = self._watch.cpu_s if self._watch is not None else 0.0
        other = max(0.0, busy - clients - watcher - self._profiler_cpu_s - helpers - server)
        self.facts.helpers_cpu_s = helpers
        self.facts.other_cpu_s = other
        self.facts.steal_s = steal
        if steal / window > NOISY:
            self.facts.notes.append(
                f"the hypervisor took {steal / window * 100:.0f}% of a CPU (steal) during the "
                "run: figures may be disturbed, re-run when the host is quieter"
            )
        if not self.restart and other > 0.2 and other / window > NOISY:
            self.facts.notes.append(
                f"other processes used {other / window * 100:.0f}% of a CPU during the run: "
                "figures may be disturbed, re-run on a quiet machine"
            )

    def _start_workers(self) -> None:
        ctx = mp.get_context("spawn")
        count = self.facts.workers
        for index in range(count):
            parent, child = ctx.Pipe()
            plan = WorkerPlan(index, count, self.s, self.facts.client_cpus)
            proc = ctx.Process(
                target=worker_main, args=(plan, child), name=f"loadtest-worker-{index}"
            )
            proc.daemon = True
            proc.start()
            child.close()
            self.procs.append(proc)
            self.conns.append(parent)

    def _broadcast(self, *message: Any) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(message)

    def _gather(
        self, kind: str, timeout: float, on_tick: Callable[[], None] | None = None
    ) -> list[tuple[Any, ...]]:
        """Wait until every worker sent ``kind``; show progress meanwhile."""
        got: dict[int, tuple[Any, ...]] = {}
        deadline = time.monotonic() + timeout
        index_of = {id(c): i for i, c in enumerate(self.conns)}
        while len(got) < len(self.conns):
            if time.monotonic() > deadline:
                raise RunAborted(f"workers did not report {kind!r} within {timeout:.0f}s")
            for conn in wait(self.conns, timeout=0.2):
                assert isinstance(conn, Connection)
                index = index_of[id(conn)]
                try:
                    message = conn.recv()
                except (EOFError, OSError):
                    if index not in got:
                        proc = self.procs[index]
                        proc.join(1.0)
                        raise RunAborted(
                            f"worker {index} exited unexpectedly (exit code {proc.exitcode}) "
                            f"while the coordinator waited for {kind!r}"
                        ) from None
                    continue
                self._handle(index, kind, message, got)
            self._tick()
            if on_tick is not None:
                on_tick()
        return [got[i] for i in range(len(self.conns))]

    def _handle(
        self, index: int, kind: str, message: tuple[Any, ...], got: dict[int, tuple[Any, ...]]
    ) -> None:
        what = message[0]
        if what == "progress":
            self.latest[index] = message[1]
        elif what == "fatal":
            text = str(message[1])
            if text not in self.facts.fatal:
                self.facts.fatal.append(text)
            if "crashed" in text:
                raise RunAborted(text)
            # A scenario that cannot go on (calls without call RPCs): everyone stops.
            self._broadcast("stop")
        elif what == kind:
            got[index] = message

    # --- every 200 ms: progress line, CPU sampling ------------------------------------------

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._last_tick < 1.0:
            return
        elapsed = now - self._last_tick
        self._last_tick = now
        worker_cpu: list[float] = []
        for proc in self.procs:
            pid = proc.pid
            cpu = cpu_seconds(pid) if pid is not None else None
            if pid is None or cpu is None:
                continue
            before = self._cpu_last.get(pid)
            self._cpu_last[pid] = cpu
            if before is not None:
                worker_cpu.append((cpu - before) / elapsed)
                if self._measuring:
                    spent = self.facts.client_worker_cpu_s
                    spent[pid] = spent.get(pid, 0.0) + cpu - before
        server_cpu = None
        if self.facts.server_pids:
            now_sample = sample(self.facts.server_pids)
            last = self._server_cpu_last
            # A process gone since the last tick takes its CPU time with it:
            # no figure rather than a negative one.
            if last is not None and now_sample.alive == last[1]:
                server_cpu = (now_sample.cpu_s - last[0]) / elapsed
            self._server_cpu_last = (now_sample.cpu_s, now_sample.alive)
        client_core = self._core_busy("client", self.facts.client_cpus)
        server_core = self._core_busy("server", self.facts.server_cpus)
        saturated = self._saturated(worker_cpu) or (client_core or 0.0) >= SATURATED
        server_saturated = (server_core or 0.0) >= SATURATED
        lag = max((w.get("lag_ms", 0.0) for w in self.latest), default=0.0)
        if self._measuring and worker_cpu:
            facts = self.facts
            facts.client_seconds += 1
            facts.client_saturated_s += int(saturated)
            facts.client_max_cpu_percent = max(facts.client_max_cpu_percent, max(worker_cpu) * 100)
            facts.client_max_lag_ms = max(facts.client_max_lag_ms, lag)
            if server_core is not None:
                facts.server_core_busy.append(server_core)
                facts.server_core_saturated_s += int(server_saturated)
        self.progress.show(
            self.s,
            self.target.label,
            self.latest,
            client_cpu=sum(worker_cpu),
            server_cpu=server_cpu,
            server_core=server_core,
            saturated=saturated,
            measuring=self._measuring,
            elapsed=time.time() - self.facts.t_start if self._measuring else None,
        )

    def _core_busy(self, name: str, cpus: tuple[int, ...] | None) -> float | None:
        """Busy share (incl. softirq) of the pinned CPUs since the last tick."""
        if not cpus:
            return None
        busy, total = cpu_ticks(cpus)
        last = self._core_ticks.get(name)
        self._core_ticks[name] = (busy, total)
        if last is None or total <= last[1]:
            return None
        return (busy - last[0]) / (total - last[1])

    def _saturated(self, worker_cpu: list[float]) -> bool:
        if not worker_cpu:
            return False
        cpus = len(self.facts.client_cpus) if self.facts.client_cpus else None
        if max(worker_cpu) >= SATURATED:
            return True
        return cpus is not None and sum(worker_cpu) >= SATURATED * cpus

    # --- connect: restart the server, stop once everyone is back -----------------------------

    def _restart_servers(self) -> None:
        group = self.target.group
        assert group is not None
        time.sleep(_RESTART_AFTER_S)
        if not self._measuring:
            self.facts.restart = {"error": "the run ended before the restart (longer -d)"}
            return

        def measure_new_servers() -> None:
            # The restarted servers are new processes: measure those from now on.
            self.facts.server_pids = with_descendants(group.pids)
            self.facts.server_start = sample(self.facts.server_pids)
            self._server_cpu_last = None

        try:
            sigterm_at, ready_at = group.restart(on_successors=measure_new_servers)
        except Exception as exc:  # reported, and the run ends at its deadline
            self.facts.restart = {"error": str(exc)}
            return
        self.facts.restart = {
            "sigterm_at": sigterm_at,
            "ready_at": ready_at,
            "down_s": round(ready_at - sigterm_at, 3),
        }
        if group.handover:
            self.facts.restart["handover"] = True
            self.facts.notes.append(
                "server restarted by hand-over: the new processes listened before the old "
                "ones got SIGTERM; server CPU covers the new processes only (from before "
                "the SIGTERM, so the old ones' drain on the same CPU is not in it)"
            )
        else:
            self.facts.notes.append("server restarted: server CPU covers the new processes only")

    def _maybe_stop(self) -> None:
        if not self.restart or "ready_at" not in self.facts.restart:
            return
        total = sum(w.get("subscribers", 0) for w in self.latest)
        back = sum(w.get("reconnected", 0) for w in self.latest)
        if total and back >= total and not self.facts.restart.get("all_back_at"):
            self.facts.restart["all_back_at"] = time.time()
            self._broadcast("stop")

    # --- teardown --------------------------------------------------------------------------

    def shutdown(self) -> None:
        """End every worker this run started: politely, then by PID."""
        self._broadcast("abort")
        if self._watch is not None and self._watch.running:
            self._watch.stop()  # a run that ended early
        if self._profiler is not None:
            self._profiler.abort()
            self._profiler = None
        deadline = time.monotonic() + 8.0
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
        for conn in self.conns:
            conn.close()
        self.progress.done()


def _public_settings(settings: RunSettings) -> dict[str, Any]:
    out = dataclasses.asdict(settings)
    out.pop("secret", None)
    out["tokens"] = len(settings.tokens)
    out.pop("hard_deadline", None)
    return out
