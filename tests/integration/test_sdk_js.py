"""The official centrifuge-js SDK (npm ``centrifuge``, Node 20 + ``ws``) against a real server.

``tests/js/sdk_flow.mjs`` runs the whole flow and prints one JSON line per check;
this test starts the server, runs the script as a subprocess and asserts on every line.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from support.processes import REPO_ROOT, ServerProcess

JS_DIR = REPO_ROOT / "tests" / "js"

EXPECTED_CHECKS = [
    "connect",
    "personal_subscription",
    "subscribe_room",
    "publish_receive_own",
    "second_client_join",
    "receive_other_client_publication",
    "rpc_server_info",
    "rpc_unknown_method_104",
    "presence",
    "presence_stats",
    "history",
    "unknown_namespace_102",
    "foreign_personal_channel_103",
    "recovery",
]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH (install Debian's nodejs and npm; .ci/run does)")
    return node


@pytest.fixture(scope="session")
def js_deps() -> Path:
    """tests/js/node_modules from the committed package-lock.json (``npm ci``, once)."""
    _node()
    if not (JS_DIR / "node_modules" / "centrifuge" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not on PATH (install Debian's npm; .ci/run does)")
        proc = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            pytest.fail(f"npm ci failed in {JS_DIR}:\n{proc.stdout}\n{proc.stderr}")
    return JS_DIR


async def run_flow(
    server: ServerProcess, token_a: str, token_b: str, *, timeout_s: float = 40.0
) -> tuple[int, list[dict[str, Any]], str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIGNAL_")}
    env["SIGNAL_FLOW_TIMEOUT_MS"] = "20000"
    proc = await asyncio.create_subprocess_exec(
        _node(),
        "sdk_flow.mjs",
        server.ws_url,
        token_a,
        token_b,
        cwd=JS_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout_b, stderr_b = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    stdout, stderr = stdout_b.decode(errors="replace"), stderr_b.decode(errors="replace")
    results = []
    for line in stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            results.append(json.loads(line))
    assert proc.returncode is not None
    return proc.returncode, results, stdout, stderr


async def test_centrifuge_js_end_to_end(server: ServerProcess, js_deps: Path) -> None:
    rc, results, _stdout, stderr = await run_flow(
        server, server.token("js-alice"), server.token("js-bob")
    )
    checks = {r["check"]: r for r in results if "check" in r}
    failed = [r for r in results if "check" in r and not r["ok"]]
    missing = [name for name in EXPECTED_CHECKS if name not in checks]

    def explain() -> str:
        lines = [json.dumps(r) for r in failed]
        return (
            f"exit code {rc}; failed checks: {[r['check'] for r in failed]}; "
            f"missing: {missing}\n"
            + "\n".join(lines)
            + f"\n--- node stderr ---\n{stderr[-3000:]}"
            + f"\n--- server log tail ---\n{server.log_tail(40)}"
        )

    assert not failed, explain()
    assert not missing, explain()
    assert rc == 0, explain()
    # The server-set publication info: the token's sub, never client data.
    assert checks["publish_receive_own"]["detail"]["info"]["user"] == "js-alice"
    assert checks["recovery"]["detail"]["subscribed"]["recovered"] is True
