"""Several worker processes behind one port, sharing Redis."""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support.processes import REPO_ROOT, RedisProcess, ServerProcess, free_port


def sample_value(body: bytes, name: str) -> float:
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} missing")


def active_connections(body: bytes) -> float:
    return sample_value(body, "websocket_active_connections")


async def open_client(server: ServerProcess, user: str) -> ClientConnection:
    ws = await connect(server.ws_url)
    await ws.send(orjson.dumps({"id": 1, "connect": {"token": server.token(user)}}).decode())
    reply = orjson.loads(await ws.recv())
    assert "connect" in reply, reply
    return ws


async def test_workers_share_port_and_report_summed_connections(
    server_factory: Any, redis_server: RedisProcess
) -> None:
    server = await server_factory(
        {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "3", "SIGNAL_DRAIN_S": "0.5"},
        name="workers",
    )
    clients = [await open_client(server, f"u{i}") for i in range(30)]
    # Each scrape lands on some worker; every one must report the whole server.
    for _ in range(6):
        _, body = await server.aget("/metrics")
        assert active_connections(body) == 30
    log = server.log_text()
    assert log.count("worker 0 started") == 1 and "worker 2 started" in log

    # A publication from a client on one worker reaches clients on the others.
    for ws in clients:
        await ws.send(orjson.dumps({"id": 2, "subscribe": {"channel": "room:w"}}).decode())
        assert "subscribe" in orjson.loads(await ws.recv())
    await clients[0].send(
        orjson.dumps(
            {"id": 3, "publish": {"channel": "room:w", "data": {"type": "message", "text": "hi"}}}
        ).decode()
    )
    for ws in clients[1:]:
        while True:
            msg = orjson.loads((await asyncio.wait_for(ws.recv(), 5)).split("\n")[0])
            # Rooms also carry the server's viewer counts: wait for the message.
            if "push" in msg and msg["push"]["pub"]["data"].get("type") == "message":
                assert msg["push"]["pub"]["data"]["text"] == "hi"
                break

    # Counted per delivery in each worker (metrics.BufferedCounter), summed
    # over the workers within a second: 30 subscribers, one publication.
    for _ in range(50):
        _, body = await server.aget("/metrics")
        if sample_value(body, "signal_deliveries_total") == 30:
            break
        await asyncio.sleep(0.1)
    assert sample_value(body, "signal_deliveries_total") == 30

    for ws in clients[:12]:
        await ws.close()
    for _ in range(50):
        _, body = await server.aget("/metrics")
        if active_connections(body) == 18:
            break
        await asyncio.sleep(0.1)
    assert active_connections(body) == 18

    # SIGTERM: every worker drains with 3001 and the supervisor exits 0.
    server.signal(15)
    for ws in clients[12:]:
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed as exc:
            assert exc.rcvd is not None and exc.rcvd.code == 3001
    assert await server.await_exit(30) == 0


def test_workers_refused_on_embedded_broker() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "signaling", "serve", "--workers", "2", "--port", "0"],
        cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "SIGNAL_JWT_SECRET": "s" * 40},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "WEB_CONCURRENCY" in result.stderr and "REDIS_URL" in result.stderr


def supervisor(redis_server: RedisProcess, *args: str) -> subprocess.Popen[str]:
    """``serve --workers 2`` on a free port, the test's support modules
    importable (``--app support.failing_app``)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "SIGNAL_JWT_SECRET": "s" * 40,
        "REDIS_URL": redis_server.url,
        "PYTHONPATH": f"{REPO_ROOT / 'tests'}:{REPO_ROOT}",
        "SIGNAL_DRAIN_S": "0.5",
    }
    argv = [sys.executable, "-m", "signaling", "serve", "--workers", "2"]
    argv += ["--port", str(free_port()), *args]
    return subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_a_worker_failing_at_start_up_is_given_up_on(redis_server: RedisProcess) -> None:
    """Restarted with a delay that doubles, then the supervisor stops and
    exits 1, instead of restarting it every second forever."""
    proc = supervisor(redis_server, "--app", "support.failing_app")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "giving up" in out
    assert "restarting in 0.5 s" in out and "restarting in 1.0 s" in out, out


def test_a_signal_during_restarts_starts_no_worker_after_it(redis_server: RedisProcess) -> None:
    proc = supervisor(redis_server, "--app", "support.failing_app")
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "restarting in" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    text = "".join(lines) + out
    assert proc.returncode == 0, text
    after = text.split("stopping", 1)[1]
    assert " started (pid" not in after, text


def test_an_app_that_does_not_load_is_refused_at_start(redis_server: RedisProcess) -> None:
    proc = supervisor(redis_server, "--app", "support.no_such_app")
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2, out
    assert "cannot load the app 'support.no_such_app'" in out


def test_a_port_taken_is_said_in_one_line(redis_server: RedisProcess) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        port = holder.getsockname()[1]
        argv = [sys.executable, "-m", "signaling", "serve", "--host", "127.0.0.1"]
        result = subprocess.run(
            [*argv, "--port", str(port)],
            cwd=REPO_ROOT,
            env={"PATH": "/usr/bin:/bin", "SIGNAL_JWT_SECRET": "s" * 40},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=30,
        )
    finally:
        holder.close()
    assert result.returncode == 1, result.stdout
    assert f"cannot listen on 127.0.0.1:{port}: " in result.stdout
    assert "address already in use" in result.stdout.lower()
    assert "Traceback" not in result.stdout


def _cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
        return cmdline.read()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for init to reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_workers_do_not_outlive_a_killed_supervisor(
    server_factory: Any, redis_server: RedisProcess
) -> None:
    """SIGKILL to the supervisor: its workers get SIGTERM from the kernel and
    drain, rather than keep the port, unsupervised, beside a new server's."""
    server = await server_factory(
        {"REDIS_URL": redis_server.url, "WEB_CONCURRENCY": "2", "SIGNAL_DRAIN_S": "0.5"},
        name="orphans",
    )
    with open(f"/proc/{server.pid}/task/{server.pid}/children") as children:
        pids = [int(pid) for pid in children.read().split()]
    # Not multiprocessing's resource tracker, a child too.
    workers = [pid for pid in pids if b"resource_tracker" not in _cmdline(pid)]
    assert len(workers) == 2, pids
    client = await open_client(server, "u1")
    server.signal(signal.SIGKILL)
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await asyncio.wait_for(client.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 3001
    for _ in range(100):
        if not any(_running(pid) for pid in workers):
            break
        await asyncio.sleep(0.1)
    assert not any(_running(pid) for pid in workers), workers
