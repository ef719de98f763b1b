"""The load tool warns when a spawned server process would hold about as many
connections as it may open files (a worker at the limit resets new ones)."""

from __future__ import annotations

import argparse
import resource

from loadtest.cli import _file_limit_warning


def options(connections: int, *env: str, instances: int = 1) -> argparse.Namespace:
    return argparse.Namespace(
        server_env=list(env),
        connections=connections,
        instances=instances,
        scenario="connect",
        handover=False,
    )


# The open-file limit of this machine kind; passed explicitly, so the test
# does not depend on the machine running it.
LIMIT = 20_000


def warning(kind: str, args: argparse.Namespace, hard: int = LIMIT) -> str | None:
    return _file_limit_warning(kind, args, hard)


def test_warns_near_the_limit_and_not_with_enough_workers() -> None:
    near = 2 * LIMIT
    found = warning("digis-signal", options(near, "WEB_CONCURRENCY=2"))
    assert found is not None and "WEB_CONCURRENCY" in found
    assert warning("digis-signal", options(near, "WEB_CONCURRENCY=3")) is None
    # Instances share the load as workers do.
    assert warning("digis-signal", options(near, instances=3)) is None
    assert warning("digis-signal", options(LIMIT)) is not None
    # The baseline is one process that the tool never spreads.
    assert warning("baseline", options(near)) is None
    # No limit at all: nothing to warn about.
    assert warning("digis-signal", options(near), resource.RLIM_INFINITY) is None


def test_defaults_to_this_process_hard_limit() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    args = options(10**9)
    expected = hard != resource.RLIM_INFINITY
    assert (_file_limit_warning("digis-signal", args) is not None) == expected
