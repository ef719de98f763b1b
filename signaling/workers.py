"""Several worker processes on one port (``serve --workers N``).

Each worker is a whole server process bound with SO_REUSEPORT, so the kernel
spreads connections over them; they share the Redis broker (several workers
on the embedded broker are refused by the configuration). The supervisor
(this module, in the parent) restarts a worker that dies (with a delay that
doubles while it keeps dying at start-up, giving up after a few: exit 1),
forwards SIGTERM and SIGINT once to every worker so each drains, starts none
after that, and exits 0 once they are gone.

Metrics: the workers run prometheus-client in multiprocess mode over a
directory the supervisor creates, so ``/metrics`` on any worker reports the
whole server (``websocket_active_connections`` as a live sum).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from multiprocessing.process import BaseProcess
from types import FrameType

from signaling.config import Settings

__all__ = ["run_workers"]

log = logging.getLogger("signaling.workers")

# A worker that dies is restarted after this, doubled at each death in a row
# within QUICK_EXIT_S of its start (it fails at start-up: a port it cannot
# bind, an app that fails to install), up to RESTART_DELAY_MAX_S; after
# MAX_QUICK_EXITS such deaths in a row the supervisor stops and exits 1.
RESTART_DELAY_S = 0.5
RESTART_DELAY_MAX_S = 30.0
QUICK_EXIT_S = 10.0
MAX_QUICK_EXITS = 5
# Extra time, beyond the drain window, that workers get to exit on SIGTERM.
EXIT_GRACE_S = 15.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _worker_main(settings: Settings, app: str, index: int, supervisor: int) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter)."""
    _drain_when_orphaned(supervisor)
    from signaling.cli import run_single  # after the metrics directory is in the env

    os.environ["SIGNAL_WORKER_INDEX"] = str(index)
    raise SystemExit(run_single(settings, app, reuse_port=True))


def run_workers(settings: Settings, app: str) -> int:
    """Run ``settings.workers`` worker processes until SIGTERM/SIGINT; 0 once
    they are all gone, 1 if one kept failing at start-up."""
    count = settings.workers
    metrics_dir = tempfile.mkdtemp(prefix="digis-signal-metrics-")
    # Inherited by the spawned workers: set before any of them imports
    # prometheus_client.
    os.environ[MULTIPROC_ENV] = metrics_dir
    context = multiprocessing.get_context("spawn")
    workers: dict[int, BaseProcess] = {}
    started_at: dict[int, float] = {}
    quick_exits: dict[int, int] = {}
    restart_at: dict[int, float] = {}
    signalled: set[int] = set()
    stopping = False
    exit_code = 0

    def start(index: int) -> None:
        proc = context.Process(
            target=_worker_main, args=(settings, app, index, os.getpid()), name=f"worker-{index}"
        )
        proc.start()
        workers[index] = proc
        started_at[index] = time.monotonic()
        log.info("worker %d started (pid %s)", index, proc.pid)

    def terminate_all() -> None:
        """SIGTERM each live worker, once: a second one would cut its drain."""
        for proc in workers.values():
            if proc.pid is not None and proc.pid not in signalled and proc.is_alive():
                signalled.add(proc.pid)
                os.kill(proc.pid, signal.SIGTERM)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers", len(workers))
        stopping = True
        restart_at.clear()
        terminate_all()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d workers on %s:%d", count, settings.host, settings.port)
    for index in range(count):
        if stopping:
            break
        start(index)

    deadline: float | None = None
    while workers or (restart_at and not stopping):
        time.sleep(0.2)
        now = time.monotonic()
        if stopping:
            # Workers started as the signal came (between a check and a
            # start) get theirs too.
            terminate_all()
            if deadline is None:
                deadline = now + settings.drain_s + EXIT_GRACE_S
        for index, proc in list(workers.items()):
            if proc.is_alive():
                continue
            proc.join()
            _mark_dead(proc.pid)
            del workers[index]
            if stopping:
                continue
            quick = quick_exits.get(index, 0) + 1 if now - started_at[index] < QUICK_EXIT_S else 0
            quick_exits[index] = quick
            if quick >= MAX_QUICK_EXITS:
                log.critical(
                    "worker %d exited %d times in a row within %.0f s of its start (last: %s);"
                    " giving up",
                    index,
                    quick,
                    QUICK_EXIT_S,
                    proc.exitcode,
                )
                exit_code = 1
                stop(signal.SIGTERM, None)
                continue
            delay = min(RESTART_DELAY_MAX_S, RESTART_DELAY_S * 2 ** max(0, quick - 1))
            log.error(
                "worker %d (pid %s) exited with %s; restarting in %.1f s",
                index,
                proc.pid,
                proc.exitcode,
                delay,
            )
            restart_at[index] = now + delay
        if not stopping:
            for index, due in list(restart_at.items()):
                # pop, not del: a signal handled meanwhile may have cleared it.
                if due <= now and restart_at.pop(index, None) is not None and not stopping:
                    start(index)
        if deadline is not None and time.monotonic() > deadline:
            for proc in workers.values():
                log.error("worker pid %s did not exit in time; killing it", proc.pid)
                proc.kill()
            deadline = None
    shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped")
    return exit_code


def _drain_when_orphaned(supervisor: int) -> None:
    """Have the kernel send this worker SIGTERM when the supervisor dies
    (Linux's parent-death signal): it drains and exits instead of living
    on, unsupervised, on a SO_REUSEPORT port a new server would share with
    it. Elsewhere, nothing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # no libc prctl: not Linux
        return
    if os.getppid() != supervisor:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges from the shared metrics."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream
