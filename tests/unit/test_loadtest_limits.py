"""The load tool warns when a spawned server process would hold about as many
connections as it may open files (a worker at the limit resets new ones)."""

from __future__ import annotations

import argparse
import resource

import pytest

from loadtest.cli import _file_limit_warning


def options(connections: int, *env: str, instances: int = 1) -> argparse.Namespace:
    return argparse.Namespace(
        server_env=list(env),
        connections=connections,
        instances=instances,
        scenario="connect",
        handover=False,
    )


def test_warns_near_the_limit_and_not_with_enough_workers() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no open-file limit on this machine: nothing to warn about")
    near = 2 * hard
    warning = _file_limit_warning("digis-signal", options(near, "WEB_CONCURRENCY=2"))
    assert warning is not None and "WEB_CONCURRENCY" in warning
    assert _file_limit_warning("digis-signal", options(near, "WEB_CONCURRENCY=3")) is None
    # Instances share the load as workers do.
    assert _file_limit_warning("digis-signal", options(near, instances=3)) is None
    assert _file_limit_warning("digis-signal", options(hard)) is not None
    # The baseline is one process that the tool never spreads.
    assert _file_limit_warning("baseline", options(near)) is None
