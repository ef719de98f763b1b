"""Several worker processes on one port (``serve --workers N``).

Each worker is a whole server process bound with SO_REUSEPORT, so the kernel
spreads connections over them; they share the Redis broker (several workers
on the embedded broker are refused by the configuration). The supervisor
(this module, in the parent) restarts a worker that dies, forwards SIGTERM and
SIGINT so every worker drains, and exits 0 once they are gone.

Metrics: the workers run prometheus-client in multiprocess mode over a
directory the supervisor creates, so ``/metrics`` on any worker reports the
whole server (``websocket_active_connections`` as a live sum).
"""

from __future__ import annotations

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

RESTART_DELAY_S = 1.0
# Extra time, beyond the drain window, that workers get to exit on SIGTERM.
EXIT_GRACE_S = 15.0
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _worker_main(settings: Settings, app: str, index: int) -> None:
    """Entry point of one worker process (spawned: a fresh interpreter)."""
    from signaling.cli import run_single  # after the metrics directory is in the env

    os.environ["SIGNAL_WORKER_INDEX"] = str(index)
    raise SystemExit(run_single(settings, app, reuse_port=True))


def run_workers(settings: Settings, app: str) -> int:
    count = settings.workers
    metrics_dir = tempfile.mkdtemp(prefix="digis-signal-metrics-")
    # Inherited by the spawned workers: set before any of them imports
    # prometheus_client.
    os.environ[MULTIPROC_ENV] = metrics_dir
    context = multiprocessing.get_context("spawn")
    workers: dict[int, BaseProcess] = {}
    stopping = False

    def start(index: int) -> None:
        proc = context.Process(
            target=_worker_main, args=(settings, app, index), name=f"worker-{index}"
        )
        proc.start()
        workers[index] = proc
        log.info("worker %d started (pid %s)", index, proc.pid)

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers", len(workers))
        stopping = True
        for proc in workers.values():
            if proc.is_alive() and proc.pid is not None:
                os.kill(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("supervising %d workers on %s:%d", count, settings.host, settings.port)
    for index in range(count):
        start(index)

    deadline: float | None = None
    while workers:
        time.sleep(0.2)
        if stopping and deadline is None:
            deadline = time.monotonic() + settings.drain_s + EXIT_GRACE_S
        for index, proc in list(workers.items()):
            if proc.is_alive():
                continue
            proc.join()
            _mark_dead(proc.pid)
            del workers[index]
            if not stopping:
                log.error(
                    "worker %d (pid %s) exited with %s; restarting", index, proc.pid, proc.exitcode
                )
                time.sleep(RESTART_DELAY_S)
                start(index)
        if deadline is not None and time.monotonic() > deadline:
            for proc in workers.values():
                log.error("worker pid %s did not exit in time; killing it", proc.pid)
                proc.kill()
            deadline = None
    shutil.rmtree(metrics_dir, ignore_errors=True)
    log.info("all workers stopped")
    return 0


def _mark_dead(pid: int | None) -> None:
    """Drop a dead worker's live gauges from the shared metrics."""
    if pid is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]  # untyped upstream
