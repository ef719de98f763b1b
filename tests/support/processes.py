"""Real processes for integration tests: the signaling server and redis-server.

Nothing here is mocked. Each helper starts a real OS process on a free loopback
port, waits until it answers, and kills it (by PID) when told to or at teardown.
An ``atexit`` hook kills whatever is still running if a test session dies early.
The machine's own Redis on 6379 is never used.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import jwt

__all__ = [
    "REPO_ROOT",
    "ProcessStartError",
    "RedisProcess",
    "ServerProcess",
    "free_port",
]

REPO_ROOT = Path(__file__).resolve().parents[2]

# Ports that belong to services the machine runs; never handed out.
_RESERVED_PORTS = frozenset({5432, 3306, 6379, 5672, 1883, 4222})
_handed_out: set[int] = set()
_live: dict[int, subprocess.Popen[bytes]] = {}


def _kill_leftovers() -> None:
    """Last resort at interpreter exit: kill (by PID) every process we started."""
    for proc in list(_live.values()):
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    _live.clear()


atexit.register(_kill_leftovers)


class ProcessStartError(RuntimeError):
    """A process died or did not become ready during start-up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host``, not handed out before in this session."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out and port not in _RESERVED_PORTS:
            _handed_out.add(port)
            return port
    raise RuntimeError("could not find a free port")


def _unique_path(directory: Path, stem: str, suffix: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{stem}{suffix}"
    n = 1
    while path.exists():
        n += 1
        path = directory / f"{stem}-{n}{suffix}"
    return path


def _tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


class _ManagedProcess:
    """A child process with its stdout+stderr in a log file, stopped by PID."""

    name: str
    log_path: Path

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self.returncode: int | None = None

    # -- lifecycle -----------------------------------------------------------
    def _spawn(self, argv: Sequence[str], env: Mapping[str, str] | None, cwd: Path) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self._close_log()
        self.returncode = None
        # Append: a restart keeps the earlier output in the same file.
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed when reaped
        header = f"=== {time.strftime('%H:%M:%S')} start: {' '.join(argv)}\n"
        self._log_file.write(header.encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd),
        )
        _live[self.proc.pid] = self.proc

    def _reap(self, rc: int) -> int:
        self.returncode = rc
        if self.proc is not None:
            _live.pop(self.proc.pid, None)
        self._close_log()
        return rc

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.returncode is None and self.proc.poll() is None

    def poll(self) -> int | None:
        """Exit code if the process has ended (and reap it), else None."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is not None and self.returncode is None:
            self._reap(rc)
        return rc

    def signal(self, sig: int) -> None:
        if self.running:
            os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait (blocking) for the process to end; TimeoutError with the log tail if not."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{self.name} (pid {self.pid}) still running after {timeout}s\n"
                f"--- log tail ---\n{self.log_tail()}"
            ) from None
        return self._reap(rc)

    async def await_exit(self, timeout: float) -> int:
        """Wait without blocking the event loop; TimeoutError with the log tail if not."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                return rc
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self.name} (pid {self.pid}) still running after {timeout}s\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s (blocking), return the exit code."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        if self.returncode is not None:
            return self.returncode
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    async def aterminate(self, timeout: float = 15.0) -> int:
        """SIGTERM, wait up to ``timeout`` s without blocking the loop, return the exit code."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        if self.returncode is not None:
            return self.returncode
        self.signal(signal.SIGTERM)
        return await self.await_exit(timeout)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit code (negative signal number)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was never started")
        if self.returncode is not None:
            return self.returncode
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        return self.wait(10)

    def stop(self, grace: float = 10.0) -> int | None:
        """Teardown: SIGTERM, then SIGKILL after ``grace`` s. Never raises."""
        if self.proc is None:
            return None
        if self.returncode is not None:
            return self.returncode
        with contextlib.suppress(OSError):
            self.signal(signal.SIGTERM)
        try:
            return self._reap(self.proc.wait(grace))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(OSError):
                self.proc.kill()
            return self._reap(self.proc.wait(10))

    # -- logs ----------------------------------------------------------------
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return _tail(self.log_path, lines)


_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServerProcess(_ManagedProcess):
    """``python -m signaling serve`` on a free loopback port.

    The environment is a copy of ``os.environ`` without ``REDIS_URL`` and any
    ``SIGNAL_*`` variable, plus a random ``SIGNAL_JWT_SECRET`` (or ``secret``),
    plus ``env`` (a value of ``None`` removes the variable).
    """

    def __init__(
        self,
        log_dir: Path,
        env: Mapping[str, str | int | float | None] | None = None,
        *,
        name: str = "server",
        secret: str | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        argv_prefix: Sequence[str] | None = None,
        cwd: Path = REPO_ROOT,
    ) -> None:
        super().__init__()
        self.name = name
        self.host = host
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.secret = secret if secret is not None else secrets.token_hex(32)
        self.overrides = dict(env or {})
        self.argv_prefix = list(argv_prefix) if argv_prefix else [sys.executable, "-m", "signaling"]
        self.cwd = cwd
        self.log_path = _unique_path(Path(log_dir), name, ".log")

    # -- addresses -----------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/connection/websocket"

    @property
    def argv(self) -> list[str]:
        return [*self.argv_prefix, "serve", "--host", self.host, "--port", str(self.port)]

    def build_env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if k != "REDIS_URL" and not k.startswith("SIGNAL_")
        }
        env["SIGNAL_JWT_SECRET"] = self.secret
        env["PYTHONUNBUFFERED"] = "1"
        for key, value in self.overrides.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    # -- tokens --------------------------------------------------------------
    def token(self, user: str, *, ttl_s: int = 3600, **claims: Any) -> str:
        """HS256 connection JWT for ``user`` signed with this server's secret, for
        the audience the server requires, if any."""
        now = int(time.time())
        payload: dict[str, Any] = {"sub": user, "iat": now, "exp": now + ttl_s}
        if audience := self.overrides.get("SIGNAL_JWT_AUDIENCE"):
            payload["aud"] = audience
        payload.update(claims)
        return jwt.encode(payload, self.secret, algorithm="HS256")

    # -- HTTP ----------------------------------------------------------------
    def get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        """Plain HTTP GET on the server (no proxy); returns (status, body)."""
        try:
            with _NO_PROXY_OPENER.open(self.url + path, timeout=timeout) as resp:
                return int(resp.status), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return int(err.code), err.read()

    async def aget(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        return await asyncio.to_thread(self.get, path, timeout)

    def _ready_once(self) -> bool:
        try:
            status, _ = self.get("/readyz", timeout=0.5)
        except (OSError, ValueError):
            return False
        return status == 200

    # -- start ---------------------------------------------------------------
    def _died_on_port_clash(self) -> bool:
        text = self.log_text().lower()
        return "address already in use" in text or "errno 98" in text

    def _start_failed(self, why: str) -> ProcessStartError:
        return ProcessStartError(
            f"{self.name} {why} (pid {self.pid}, port {self.port}, log {self.log_path})\n"
            f"--- log tail ---\n{self.log_tail()}"
        )

    def start(self, timeout: float = 15.0) -> ServerProcess:
        """Start and wait (blocking) until ``GET /readyz`` answers 200."""
        for attempt in range(3):
            self._spawn(self.argv, self.build_env(), self.cwd)
            deadline = time.monotonic() + timeout
            while True:
                rc = self.poll()
                if rc is not None:
                    if attempt < 2 and not self._fixed_port and self._died_on_port_clash():
                        self.port = free_port(self.host)
                        break
                    raise self._start_failed(f"exited with code {rc} during start-up")
                if self._ready_once():
                    return self
                if time.monotonic() >= deadline:
                    self.kill()
                    raise self._start_failed(f"not ready after {timeout}s")
                time.sleep(0.05)
        raise AssertionError("unreachable")

    async def astart(self, timeout: float = 15.0) -> ServerProcess:
        """Start and wait until ``GET /readyz`` answers 200 without blocking the loop."""
        for attempt in range(3):
            self._spawn(self.argv, self.build_env(), self.cwd)
            deadline = time.monotonic() + timeout
            while True:
                rc = self.poll()
                if rc is not None:
                    if attempt < 2 and not self._fixed_port and self._died_on_port_clash():
                        self.port = free_port(self.host)
                        break
                    raise self._start_failed(f"exited with code {rc} during start-up")
                if await asyncio.to_thread(self._ready_once):
                    return self
                if time.monotonic() >= deadline:
                    self.kill()
                    raise self._start_failed(f"not ready after {timeout}s")
                await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<ServerProcess {self.name} {self.url} {state}>"


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(
            "redis-server is not on PATH: install Debian's package redis-server "
            "(.ci/run does this) - the tests start their own instances"
        )
    return path


class RedisProcess(_ManagedProcess):
    """A private ``redis-server`` on a free loopback port, nothing persisted."""

    def __init__(self, data_dir: Path, *, port: int | None = None, name: str = "redis") -> None:
        super().__init__()
        self.name = name
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(self.host)
        if self.port == 6379:
            raise ValueError("refusing to use the machine's Redis port 6379")
        self.dir = _unique_path(Path(data_dir), name, "")
        self.dir.mkdir(parents=True)
        self.log_path = self.dir / "redis.log"
        self.binary = redis_server_binary()

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def argv(self) -> list[str]:
        return [
            self.binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--daemonize", "no",
            "--logfile", "",
        ]  # fmt: skip

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 10.0) -> RedisProcess:
        self._spawn(self.argv, None, self.dir)
        deadline = time.monotonic() + timeout
        while True:
            rc = self.poll()
            if rc is not None:
                raise ProcessStartError(
                    f"{self.name} exited with code {rc} during start-up (port {self.port})\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            if self.ping():
                return self
            if time.monotonic() >= deadline:
                self.kill()
                raise ProcessStartError(
                    f"{self.name} did not answer PING after {timeout}s (port {self.port})\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.02)

    def restart(self, timeout: float = 10.0) -> RedisProcess:
        """Kill (if running) and start again on the same port, empty."""
        if self.running:
            self.kill()
        return self.start(timeout)

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.returncode}"
        return f"<RedisProcess {self.url} {state}>"
