"""The command line: settings errors, dev mode, token minting, logging."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from typing import Any

import jwt
import orjson
from websockets.asyncio.client import connect

from support.processes import REPO_ROOT, ServerProcess

SECRET = "k" * 40


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    return subprocess.run(
        [sys.executable, "-m", "signaling", *args],
        cwd=REPO_ROOT,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_bad_setting_stops_with_one_line_naming_it() -> None:
    result = run_cli("serve", env={"SIGNAL_JWT_SECRET": SECRET, "PORT": "eighty"})
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "PORT" in lines[0] and "eighty" in lines[0]


def test_flag_overrides_environment() -> None:
    result = run_cli("serve", "--port", "70000", env={"SIGNAL_JWT_SECRET": SECRET, "PORT": "80"})
    assert result.returncode == 2 and "PORT" in result.stderr and "70000" in result.stderr


def test_no_key_refuses_to_start_without_dev() -> None:
    result = run_cli("serve")
    assert result.returncode == 2
    assert "SIGNAL_JWT_SECRET" in result.stderr and "--dev" in result.stderr


def test_secret_values_are_never_echoed() -> None:
    result = run_cli("serve", env={"SIGNAL_JWT_SECRET": "short-secret-value"})
    assert result.returncode == 2
    assert "short-secret-value" not in result.stderr


def test_token_command_mints_a_verifiable_jwt() -> None:
    claims_args = ["--claim", 'info={"name":"Alice"}', "--claim", "tier=gold"]
    result = run_cli(
        "token", "alice", "--ttl", "120", *claims_args, env={"SIGNAL_JWT_SECRET": SECRET}
    )
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["info"] == {"name": "Alice"}
    assert claims["tier"] == "gold" and 100 < claims["exp"] - time.time() <= 120


def test_token_command_needs_the_secret() -> None:
    result = run_cli("token", "alice")
    assert result.returncode == 2 and "SIGNAL_JWT_SECRET" in result.stderr


async def test_dev_mode_announces_itself_and_its_tokens_work(server_factory: Any) -> None:
    server: ServerProcess = await server_factory(
        {"SIGNAL_JWT_SECRET": None, "SIGNAL_DEV": "1"}, name="dev"
    )
    log = server.log_text()
    assert "DEV MODE" in log
    match = re.search(r"SIGNAL_JWT_SECRET=(\S+) digis-signal token alice", log)
    assert match is not None
    token = run_cli("token", "alice", env={"SIGNAL_JWT_SECRET": match.group(1)}).stdout.strip()
    async with connect(server.ws_url) as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": token}}).decode())
        assert "connect" in orjson.loads(await ws.recv())


async def test_json_logs_and_tokens_never_logged(server_factory: Any) -> None:
    server: ServerProcess = await server_factory(
        {"SIGNAL_LOG_JSON": "1", "SIGNAL_LOG_LEVEL": "DEBUG"}, name="jsonlog"
    )
    good = server.token("alice")
    bad = good[:-4] + "AAAA"  # wrong signature
    async with connect(server.ws_url) as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": good}}).decode())
        await ws.recv()
        await ws.send(orjson.dumps({"id": 2, "refresh": {"token": bad}}).decode())
        await ws.wait_closed()
    async with connect(server.ws_url) as ws:
        await ws.send(orjson.dumps({"id": 1, "connect": {"token": bad}}).decode())
        await ws.wait_closed()
    server.terminate()
    text = server.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    assert records and all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    assert any(r["level"] == "debug" for r in records)
    for part in (good, bad, good.split(".")[1], good.split(".")[2], server.secret):
        assert part not in text
