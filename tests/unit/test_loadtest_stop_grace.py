"""The load tool waits for a spawned server to stop by itself before SIGKILL:
as long as the server's own shutdown budget (drain window plus the
supervisor's grace for its workers) and a margin, so a server draining under a
reconnect storm is not killed mid-drain."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from loadtest.servers import (
    MIN_STOP_GRACE_S,
    SERVER_DEFAULT_DRAIN_S,
    SERVER_EXIT_GRACE_S,
    STOP_MARGIN_S,
    RedisServer,
    ServerGroup,
    SpawnedServer,
)
from signaling.config import Settings
from signaling.workers import EXIT_GRACE_S


def server(kind: str, **env: str) -> SpawnedServer:
    return SpawnedServer(kind, "s", 1, env, Path("/nonexistent"), None)


def test_the_tool_knows_the_servers_shutdown_budget() -> None:
    # The tool does not import the server (it also targets external ones): its
    # copies of the two figures must follow the server's.
    assert Settings(dev=True).drain_s == SERVER_DEFAULT_DRAIN_S
    assert SERVER_EXIT_GRACE_S == EXIT_GRACE_S


def test_grace_covers_the_drain_window_and_the_workers_grace() -> None:
    drained = server("digis-signal", SIGNAL_DRAIN_S="20")
    assert drained.stop_grace_s == 20 + EXIT_GRACE_S + STOP_MARGIN_S
    long = server("digis-signal", SIGNAL_DRAIN_S="120")
    assert long.stop_grace_s == 120 + EXIT_GRACE_S + STOP_MARGIN_S
    # Short drains (the default's 5 s) keep the floor.
    assert server("digis-signal").stop_grace_s == MIN_STOP_GRACE_S
    assert server("digis-signal", SIGNAL_DRAIN_S="junk").stop_grace_s == MIN_STOP_GRACE_S
    assert server("baseline", SIGNAL_DRAIN_S="120").stop_grace_s == MIN_STOP_GRACE_S


def test_spawned_processes_are_out_of_the_tools_process_group(tmp_path: Path) -> None:
    """A Ctrl-C at the terminal signals the foreground process group: the tool
    (which stops what it started, one SIGTERM each), not its servers and Redis,
    which would otherwise get the SIGINT and the tool's SIGTERM both."""
    with contextlib.ExitStack() as started:
        group = ServerGroup.spawn("baseline")
        started.callback(group.stop)
        redis = RedisServer(None).start()
        started.callback(redis.stop)
        ours = os.getpgid(0)
        for pid in (*group.pids, redis.pid):
            assert os.getpgid(pid) != ours
            assert os.getsid(pid) == pid  # a session (and group) of its own


def test_a_redis_interrupted_while_starting_is_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the tool waits for its Redis's PONG: in a session of its own
    the redis-server gets no SIGINT, so the start must stop it itself."""
    redis = RedisServer(None)

    def interrupted(timeout: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(redis, "_wait_for_pong", interrupted)
    with pytest.raises(KeyboardInterrupt):
        redis.start()
    assert redis.proc is not None and redis.proc.poll() is not None
