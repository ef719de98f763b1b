"""One client process: its own uvloop event loop, its share of the clients, and a pipe
to the coordinator.

Phases, each started by the coordinator so that all workers move together:
``setup`` (open clients) → "ready" → ``start`` → the measured run → "stopped" (with
the acknowledged publications) → ``expect`` (everyone's acknowledged publications) →
drain → "final" (counters, histograms) → ``close``. Progress goes up every second.
A worker that loses its coordinator, or passes the run's hard deadline, exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import resource
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from loadtest.config import WorkerPlan
from loadtest.procstat import rss_kib
from loadtest.recorder import Recorder
from loadtest.scenarios import SCENARIO_CLASSES, Scenario

__all__ = ["LoopPoller", "worker_main"]

_PROGRESS_S = 1.0
# Allocations between young collections (the server uses the same).
_GC_YOUNG_THRESHOLD = 50_000


class _Abort(Exception):
    """The coordinator said abort, or went away."""


def raise_nofile() -> int:
    """Soft open-file limit → hard limit: every connection is a file descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def worker_main(plan: WorkerPlan, conn: Connection) -> None:
    """Process entry point (multiprocessing target)."""
    if plan.cpus:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, plan.cpus)
    raise_nofile()
    # Like the server (signaling.server.tune_gc): thousands of long-lived
    # connections made the default thresholds walk the whole heap again and
    # again (3.7 % of a client worker's samples in a 10k storm, py-spy). The set-up's
    # objects are frozen once it is done (_phases).
    gc.set_threshold(_GC_YOUNG_THRESHOLD, 10, 10)
    try:
        import uvloop

        uvloop.run(_main(plan, conn))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(_main(plan, conn))
    except _Abort:
        pass
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("fatal", f"worker {plan.index} crashed:\n{traceback.format_exc()}"))
    finally:
        conn.close()


class _Control:
    """The coordinator's messages as an asyncio queue (the pipe is watched by the loop)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        # The event loop made the pipe non-blocking; a message larger than the pipe's
        # buffer would then fail half-read. Readable means the coordinator is writing a
        # whole message right now: a blocking read of it is short.
        os.set_blocking(self.conn.fileno(), True)
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self._loop.remove_reader(self.conn.fileno())
            message = ("abort", "coordinator gone")
        self.inbox.put_nowait(message)

    def send(self, *message: Any) -> None:
        try:
            self.conn.send(message)
        except (BrokenPipeError, OSError):
            raise _Abort from None

    async def expect(self, kind: str) -> tuple[Any, ...]:
        message = await self.inbox.get()
        while message[0] == "stop":  # a stop that crossed the end of the run: stale
            message = await self.inbox.get()
        if message[0] == "abort":
            raise _Abort
        if message[0] != kind:
            raise RuntimeError(f"expected {kind!r} from the coordinator, got {message[0]!r}")
        return message


async def _main(plan: WorkerPlan, conn: Connection) -> None:
    settings = plan.settings
    loop = asyncio.get_running_loop()
    if settings.hard_deadline:
        # Whatever happens, this process does not outlive the run.
        loop.call_at(loop.time() + settings.hard_deadline - time.time(), os._exit, 3)
    control = _Control(conn)
    recorder = Recorder()
    scenario = SCENARIO_CLASSES[settings.scenario](plan, recorder)
    rss_before = rss_kib(os.getpid())
    scenario.build()
    recorder.extra["rss_before_kib"] = rss_before
    reporter = asyncio.create_task(_report(control, scenario, recorder))
    try:
        await _phases(control, scenario, recorder)
    finally:
        reporter.cancel()
        scenario.stopping = True
        await scenario.close()


async def _phases(control: _Control, scenario: Scenario, recorder: Recorder) -> None:
    settings = scenario.s
    setup = await _or_abort(control, scenario.setup())
    # This process's memory per open connection (the client backends differ here).
    setup["rss_before_kib"] = recorder.extra.pop("rss_before_kib", None)
    setup["rss_after_kib"] = rss_kib(os.getpid())
    gc.freeze()
    control.send("ready", setup)
    _, t0, deadline = await control.expect("start")
    recorder.start(t0)
    for client in scenario.clients:
        if client.ws is not None and client.ws.is_open:
            client.ws.ack_on_read()  # set-up's requests made them "interactive"
    # Sleeps in the measured phase: on one machine each wake-up of a sleeping
    # worker is a cross-CPU wake-up paid by the server's write (the report).
    sleeps_before = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    stop = asyncio.Event()
    listener = asyncio.create_task(_listen_for_stop(control, stop))
    poller = LoopPoller(settings.client_poll_us) if settings.client_poll_us else None
    try:
        await scenario.run(deadline, stop)
    finally:
        listener.cancel()
        if poller is not None:
            poller.stop()
    recorder.extra["wakeups"] = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - sleeps_before
    if scenario.fatal is not None:
        control.send("fatal", scenario.fatal)
    control.send("stopped", {k: bytes(v).rstrip(b"\0") for k, v in recorder.acked.items()})
    _, acked = await control.expect("expect")
    await scenario.drain(acked, settings.drain_timeout_s)
    recorder.extra["scenario"] = scenario.result()
    recorder.extra["setup"] = setup
    recorder.extra["cpu_s"] = time.process_time()
    control.send("final", recorder.to_wire())
    await control.expect("close")


class LoopPoller:
    """Keeps the loop from waiting in epoll: a callback that sleeps ``us`` and
    reschedules itself, so the loop polls without blocking between sleeps.

    On one machine a worker blocked in epoll is woken by the server's write,
    and the server's CPU pays for that cross-CPU wake-up; how often depends on
    whether the worker keeps up with the server, which differs between servers
    (loadtest/README.md). A worker that wakes itself costs the server nothing.
    """

    def __init__(self, us: int) -> None:
        self._seconds = us / 1e6
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._tick)

    def _tick(self) -> None:
        time.sleep(self._seconds)
        self._handle = self._loop.call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def _or_abort(control: _Control, work: Any) -> Any:
    """Run ``work`` unless the coordinator aborts first."""
    task = asyncio.ensure_future(work)
    abort = asyncio.ensure_future(control.inbox.get())
    done, _ = await asyncio.wait({task, abort}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        abort.cancel()
        return task.result()
    task.cancel()
    raise _Abort


async def _listen_for_stop(control: _Control, stop: asyncio.Event) -> None:
    message = await control.inbox.get()
    if message[0] in ("stop", "abort"):
        stop.set()


async def _report(control: _Control, scenario: Scenario, recorder: Recorder) -> None:
    """Progress every second, with this loop's worst lag (a saturated client shows here)."""
    loop = asyncio.get_running_loop()
    while True:
        due = loop.time() + _PROGRESS_S
        worst_lag = 0.0
        # Sleep in short steps so that the lag seen is the loop's, not the step's.
        while loop.time() < due:
            before = loop.time()
            await asyncio.sleep(0.05)
            worst_lag = max(worst_lag, loop.time() - before - 0.05)
        info = recorder.progress()
        info["connected"] = scenario.connected_count()
        info["lag_ms"] = round(worst_lag * 1000, 1)
        info.update(scenario.progress())
        control.send("progress", info)
