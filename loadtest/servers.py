"""Servers the tool starts itself (``--spawn-server``, ``--spawn-baseline``): pinned to
their own CPU with ``taskset``, on free loopback ports, stopped by PID at the end.

Pinning the server to one core and the clients to the others keeps the two from
stealing each other's time slices, so the server's CPU per message is its own.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

from loadtest.procstat import alive, listening_pids, with_descendants

__all__ = [
    "REPO_ROOT",
    "RedisServer",
    "ServerGroup",
    "SpawnedServer",
    "free_port",
    "split_cpus",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
# How long our server may take to stop by itself: its drain window
# (SIGNAL_DRAIN_S, 5 s by default) plus the supervisor's grace for its workers
# (EXIT_GRACE_S in signaling/workers.py, 15 s). stop() waits that long and a
# margin before SIGKILL: a draining server killed early closes its clients
# abruptly and leaves its metrics directory behind (seen in a 40,000-client
# hand-over with a 20-s drain on a slow host).
SERVER_DEFAULT_DRAIN_S = 5.0
SERVER_EXIT_GRACE_S = 15.0
STOP_MARGIN_S = 10.0
MIN_STOP_GRACE_S = 30.0
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def split_cpus(server_cpus: int = 1) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(server CPUs, client CPUs) from this process's affinity; (None, None) when there
    are too few CPUs or no ``taskset`` to pin with."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < server_cpus + 1 or shutil.which("taskset") is None:
        return None, None
    return tuple(cpus[:server_cpus]), tuple(cpus[server_cpus:])


class SpawnedServer:
    """One server process (ours or the baseline) started by the tool."""

    def __init__(
        self,
        kind: str,
        name: str,
        port: int,
        env: Mapping[str, str],
        log_dir: Path,
        cpus: Sequence[int] | None,
        host: str = "127.0.0.1",
    ) -> None:
        self.kind = kind
        self.name = name
        self.host = host
        self.port = port
        self.env = dict(env)
        self.cpus = tuple(cpus) if cpus else None
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._terminated = False
        self._log: IO[bytes] | None = None

    @property
    def argv(self) -> list[str]:
        if self.kind == "baseline":
            module = ["-m", "loadtest.baseline"]
            args = ["--host", self.host, "--port", str(self.port)]
        else:
            module = ["-m", "signaling"]
            args = ["serve", "--host", self.host, "--port", str(self.port)]
        prefix = ["taskset", "-c", ",".join(map(str, self.cpus))] if self.cpus else []
        return [*prefix, sys.executable, *module, *args]

    @property
    def url(self) -> str:
        if self.kind == "baseline":
            return f"ws://{self.host}:{self.port}"
        return f"ws://{self.host}:{self.port}/connection/websocket"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0, *, listeners: int = 0) -> SpawnedServer:
        """Start the process and wait until it is ready: its ``/readyz`` answers
        200 or, with ``listeners`` (a successor on a port another process still
        holds), that many of its processes listen on the port."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log.write(f"=== {time.strftime('%H:%M:%S')} {' '.join(self.argv)}\n".encode())
        self._log.flush()
        # taskset execs the command, so the PID is the server's own.
        self._terminated = False
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=REPO_ROOT,
            # Out of the tool's process group: a Ctrl-C at the terminal stops the
            # tool, which stops its servers itself (one SIGTERM each, then the
            # drain), instead of every server and worker also getting the SIGINT.
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            if listeners:
                family = with_descendants([self.proc.pid])
                if len(listening_pids(self.port, family)) >= listeners:
                    return self
            elif self.ready():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {timeout}s:\n{self.log_tail()}")

    def ready(self) -> bool:
        try:
            url = f"http://{self.host}:{self.port}/readyz"
            with _NO_PROXY.open(url, timeout=0.5) as resp:
                return int(resp.status) == 200
        except (OSError, ValueError, urllib.error.HTTPError):
            return False

    def terminate(self) -> None:
        """SIGTERM (the server drains), without waiting. Sent once per process."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self._terminated = True
            with contextlib.suppress(OSError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """Wait for the process to end; True if it did."""
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    @property
    def stop_grace_s(self) -> float:
        """Seconds :meth:`stop` waits before SIGKILL by default: the server's own
        shutdown budget and a margin (the baseline stops at once)."""
        if self.kind != "digis-signal":
            return MIN_STOP_GRACE_S
        try:
            drain = float(self.env.get("SIGNAL_DRAIN_S", SERVER_DEFAULT_DRAIN_S))
        except ValueError:
            drain = SERVER_DEFAULT_DRAIN_S  # the server refuses it at start-up anyway
        return max(MIN_STOP_GRACE_S, drain + SERVER_EXIT_GRACE_S + STOP_MARGIN_S)

    def stop(self, grace: float | None = None) -> None:
        """SIGTERM, then SIGKILL after ``grace`` seconds (default
        :attr:`stop_grace_s`), by PID: the server and every process it started
        (``--workers N``: a supervisor's workers must not outlive it on the
        SO_REUSEPORT port). Returns once all of them are gone."""
        if grace is None:
            grace = self.stop_grace_s
        if self.proc is not None:
            # Listed before the signal: once the supervisor is gone its workers are
            # re-parented and no longer found as its descendants.
            family = with_descendants([self.proc.pid])
            self.terminate()
            deadline = time.monotonic() + grace
            while alive(family) and time.monotonic() < deadline:
                self.proc.poll()  # reap the supervisor itself
                time.sleep(0.05)
            for pid in alive(family):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(10)
            deadline = time.monotonic() + 10
            while alive(family) and time.monotonic() < deadline:
                time.sleep(0.05)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, lines: int = 30) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class ServerGroup:
    """The instances of one target (1 embedded-broker server, N Redis instances, or the
    baseline), started together and stopped together."""

    def __init__(self, kind: str, servers: list[SpawnedServer], secret: str | None) -> None:
        self.kind = kind
        self.servers = servers
        self.secret = secret
        # Restart by hand-over (the servers run with SIGNAL_HANDOVER); see restart().
        self.handover = False

    @classmethod
    def spawn(
        cls,
        kind: str,
        *,
        instances: int = 1,
        redis_url: str | None = None,
        cpus: Sequence[int] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> ServerGroup:
        log_dir = Path(tempfile.mkdtemp(prefix=f"loadtest-{kind}-"))
        secret = secrets.token_hex(32) if kind == "digis-signal" else None
        env = _server_env(kind, secret, redis_url, extra_env or {})
        servers = [
            SpawnedServer(kind, f"{kind}-{i + 1}", free_port(), env, log_dir, cpus)
            for i in range(instances)
        ]
        group = cls(kind, servers, secret)
        try:
            for server in servers:
                server.start()
        except BaseException:
            group.stop()
            raise
        return group

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(s.url for s in self.servers)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.servers if s.proc is not None]

    def exit_codes(self, pids: Sequence[int]) -> list[tuple[str, int]]:
        """(name, exit code) of those of ``pids`` that are servers of this group
        and have ended (not their worker processes: the supervisor reaps those)."""
        codes = []
        for server in self.servers:
            if server.proc is not None and server.proc.pid in pids:
                code = server.proc.poll()
                if code is not None:
                    codes.append((server.name, code))
        return codes

    @property
    def log_dir(self) -> Path:
        return self.servers[0].log_path.parent

    def restart(self, on_successors: Callable[[], None] | None = None) -> tuple[float, float]:
        """Stop every instance (they drain), start them again on the same ports,
        and call ``on_successors`` once the new ones are up. Returns (wall time
        SIGTERM was sent, wall time all were ready again).

        With ``handover``: start the successors first, on the same ports (the
        servers run with ``SIGNAL_HANDOVER``: SO_REUSEPORT), call ``on_successors``
        once they all listen, then SIGTERM the old ones and wait for them to exit;
        the ready time is then the SIGTERM's."""
        if self.handover:
            return self._hand_over(on_successors)
        sent = time.time()
        for server in self.servers:
            server.terminate()
        for server in self.servers:
            server.stop()
        for server in self.servers:
            # Under a reconnect storm of tens of thousands the new server's /readyz can
            # take longer than start()'s default 20 s; giving up then stopped the server
            # mid-recovery (seen at 40,000 with --workers 2).
            server.start(timeout=120.0)
        ready = time.time()
        if on_successors is not None:
            on_successors()
        return sent, ready

    def _hand_over(self, on_successors: Callable[[], None] | None) -> tuple[float, float]:
        old = self.servers
        new = [
            SpawnedServer(s.kind, s.name, s.port, s.env, s.log_path.parent, s.cpus, s.host)
            for s in old
        ]
        workers = int(old[0].env.get("WEB_CONCURRENCY", "1") or "1")
        try:
            for server in new:
                server.start(timeout=120.0, listeners=workers)
        except BaseException:
            for server in new:
                server.stop()
            raise
        self.servers = new
        if on_successors is not None:
            on_successors()
        sent = time.time()
        for server in old:
            server.terminate()
        for server in old:
            server.stop()
        return sent, sent

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _server_env(
    kind: str, secret: str | None, redis_url: str | None, extra: Mapping[str, str]
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("SIGNAL_")}
    env["PYTHONUNBUFFERED"] = "1"
    if kind == "digis-signal":
        assert secret is not None
        env.update(
            SIGNAL_JWT_SECRET=secret,
            # A load test measures the server's cost, not its abuse limits.
            SIGNAL_COMMANDS_PER_SECOND="0",
            SIGNAL_MAX_CONNECTIONS_PER_USER="0",
            SIGNAL_LOG_LEVEL="WARNING",
        )
    if redis_url:
        env["REDIS_URL"] = redis_url  # the baseline shares its rooms through it too
    env.update(extra)
    return env


class RedisServer:
    """A private, non-persistent ``redis-server`` on a free loopback port (never the
    machine's 6379), for ``--spawn-redis``."""

    def __init__(self, cpus: Sequence[int] | None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("--spawn-redis: redis-server is not on PATH")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="loadtest-redis-"))
        prefix = ["taskset", "-c", ",".join(map(str, cpus))] if cpus else []
        self.argv = [
            *prefix, binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 10.0) -> RedisServer:
        self._terminated = False
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            cwd=self.dir,
            start_new_session=True,  # as the servers: stopped by the tool, not by Ctrl-C
        )
        try:
            self._wait_for_pong(timeout)
        except BaseException:
            # Ctrl-C during start-up included: in a session of its own, a
            # redis-server not stopped here would outlive the tool.
            self.stop()
            raise
        return self

    def _wait_for_pong(self, timeout: float) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited during start-up (see {self.dir})")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
