"""Self-tests of the process helpers (real redis-server and server processes)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from support.processes import ProcessStartError, RedisProcess, ServerProcess, free_port


def _redis_command(port: int, *parts: bytes) -> bytes:
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(payload)
        return sock.recv(1024)


def test_free_port_is_bindable_and_never_6379() -> None:
    ports = {free_port() for _ in range(20)}
    assert 6379 not in ports
    assert len(ports) == 20
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports.pop()))


def test_redis_process_kill_and_restart_on_same_port(redis_server: RedisProcess) -> None:
    assert redis_server.port != 6379
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert _redis_command(redis_server.port, b"SET", b"k", b"v") == b"+OK\r\n"
    assert _redis_command(redis_server.port, b"GET", b"k") == b"$1\r\nv\r\n"
    pid = redis_server.pid

    assert redis_server.kill() == -9
    assert not redis_server.running
    assert not redis_server.ping()

    redis_server.restart()
    assert redis_server.running
    assert redis_server.pid != pid
    # Same port, and nothing persisted.
    assert _redis_command(redis_server.port, b"GET", b"k") == b"$-1\r\n"


async def test_server_fixture_is_ready(server: ServerProcess) -> None:
    assert server.running
    status, _ = await server.aget("/readyz")
    assert status == 200
    assert server.ws_url == f"ws://127.0.0.1:{server.port}/connection/websocket"


def test_server_env_drops_redis_and_signal_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/0")
    monkeypatch.setenv("SIGNAL_HISTORY_SIZE", "7")
    monkeypatch.setenv("SIGNAL_JWT_SECRET", "from-the-environment")
    proc = ServerProcess(tmp_path, {"SIGNAL_DRAIN_S": 2, "HOME": None})
    env = proc.build_env()
    assert "REDIS_URL" not in env
    assert "SIGNAL_HISTORY_SIZE" not in env
    assert "HOME" not in env
    assert env["SIGNAL_DRAIN_S"] == "2"
    assert env["SIGNAL_JWT_SECRET"] == proc.secret != "from-the-environment"


def test_server_dying_at_start_up_raises_with_log_tail(tmp_path: Path) -> None:
    proc = ServerProcess(
        tmp_path,
        argv_prefix=[sys.executable, "-c", "import sys; print('boom at start'); sys.exit(3)"],
    )
    with pytest.raises(ProcessStartError) as err:
        proc.start(timeout=10)
    assert "exited with code 3" in str(err.value)
    assert "boom at start" in str(err.value)
    assert not proc.running
