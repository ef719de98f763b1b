"""Shared fixtures: real signaling server processes and real redis-server processes.

* ``server_factory`` - ``await server_factory(env={...}, name=..., secret=...)`` starts a
  ``python -m signaling serve`` on a free loopback port and waits for ``/readyz``;
  every server it started is stopped at teardown (SIGTERM, then SIGKILL, by PID).
* ``server`` - one default server (embedded broker, short ping interval).
* ``redis_factory`` / ``redis_server`` - private ``redis-server`` processes on free
  ports (never the machine's 6379), killed at teardown.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

from support.processes import RedisProcess, ServerProcess  # noqa: E402

# Environment of the default ``server``: pings often, so that ping/pong is exercised
# by every test that keeps a connection for a few seconds.
DEFAULT_SERVER_ENV: dict[str, str] = {
    "SIGNAL_PING_INTERVAL_S": "2",
    "SIGNAL_PONG_TIMEOUT_S": "1",
    "SIGNAL_LOG_LEVEL": "INFO",
}


class ServerFactory(Protocol):
    def __call__(
        self,
        env: Mapping[str, str | int | float | None] | None = ...,
        *,
        name: str = ...,
        secret: str | None = ...,
        port: int | None = ...,
        ready_timeout: float = ...,
    ) -> Awaitable[ServerProcess]: ...


@pytest.fixture
async def server_factory(tmp_path: Path) -> AsyncIterator[ServerFactory]:
    started: list[ServerProcess] = []

    async def start(
        env: Mapping[str, str | int | float | None] | None = None,
        *,
        name: str = "server",
        secret: str | None = None,
        port: int | None = None,
        ready_timeout: float = 15.0,
    ) -> ServerProcess:
        # Rooms carry periodic viewer counts (handlers/chat); tests that want
        # them set the interval, the others get only what they publish.
        env = {"SIGNAL_VIEWER_COUNT_INTERVAL_S": "3600", **(env or {})}
        proc = ServerProcess(tmp_path / "logs", env, name=name, secret=secret, port=port)
        started.append(proc)
        return await proc.astart(ready_timeout)

    yield start

    for proc in reversed(started):
        proc.stop()


@pytest.fixture
async def server(server_factory: ServerFactory) -> ServerProcess:
    return await server_factory(DEFAULT_SERVER_ENV, name="server")


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    started: list[RedisProcess] = []

    def start(**kwargs: Any) -> RedisProcess:
        proc = RedisProcess(tmp_path / "redis", **kwargs)
        started.append(proc)
        return proc.start()

    yield start

    for proc in reversed(started):
        proc.stop(grace=5.0)


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisProcess]) -> RedisProcess:
    return redis_factory()
