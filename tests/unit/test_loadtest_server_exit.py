"""How the load tool names server processes that exited during a run
(loadtest/coordinator.py, loadtest/servers.py); the run itself, with a real
server killed mid-run, is in tests/integration/test_loadtest_smoke.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from loadtest.coordinator import server_exit_text
from loadtest.servers import ServerGroup, SpawnedServer


def _server(name: str, log_dir: Path, code: str) -> SpawnedServer:
    server = SpawnedServer("digis-signal", name, 0, {}, log_dir, None)
    server.proc = subprocess.Popen([sys.executable, "-c", code])
    return server


def test_a_spawned_server_that_ended_is_named_with_its_exit_code_and_logs(
    tmp_path: Path,
) -> None:
    crashed = _server("digis-signal-1", tmp_path, "raise SystemExit(3)")
    running = _server("digis-signal-2", tmp_path, "import time; time.sleep(30)")
    group = ServerGroup("digis-signal", [crashed, running], None)
    assert crashed.proc is not None and running.proc is not None
    try:
        crashed.proc.wait(10)
        pids = [crashed.proc.pid, running.proc.pid]
        # Only servers that ended have a code; a worker PID (not a server of the
        # group) has none to give.
        assert group.exit_codes([*pids, 1]) == [("digis-signal-1", 3)]
        assert server_exit_text([crashed.proc.pid], group) == (
            f"server process(es) {crashed.proc.pid} exited during the run "
            f"(digis-signal-1: exit code 3); logs in {group.log_dir}"
        )
    finally:
        running.proc.kill()
        running.proc.wait()


def test_an_external_servers_exit_says_what_the_figures_are() -> None:
    assert server_exit_text([41, 42], None) == (
        "server process(es) 41, 42 exited during the run: the figures are the survivors' only"
    )
