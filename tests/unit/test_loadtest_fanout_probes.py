"""``fanout --arrival-stamps``: every 20th subscriber is a probe, held by the
publishers' worker (the one the scheduler favors) and the only one stamped."""

from __future__ import annotations

from loadtest.config import RunSettings, WorkerPlan
from loadtest.recorder import Recorder
from loadtest.scenarios.fanout import PROBE_EVERY, Fanout


def _publishers_worker(stamps: bool, connections: int = 100, workers: int = 3) -> Fanout:
    settings = RunSettings(
        scenario="fanout",
        urls=("ws://127.0.0.1:1/connection/websocket",),
        connections=connections,
        duration_s=1.0,
        rate=10.0,
        secret="s" * 32,
        arrival_stamps=stamps,
    )
    scenario = Fanout(WorkerPlan(0, workers, settings), Recorder())
    scenario.build()  # worker 0: never steps back in the scheduler
    return scenario


def test_probes_live_with_the_publishers() -> None:
    scenario = _publishers_worker(stamps=True)
    probes = list(range(0, 100, PROBE_EVERY))
    assert [c.gid for c in scenario.subscribers] == probes
    assert scenario.probes == set(probes)
    assert len(scenario.publishers) == 1


def test_without_stamps_the_publishers_worker_holds_no_subscriber() -> None:
    scenario = _publishers_worker(stamps=False)
    assert scenario.subscribers == [] and scenario.probes == set()


def test_a_single_worker_stamps_every_subscriber() -> None:
    scenario = _publishers_worker(stamps=True, connections=30, workers=1)
    assert len(scenario.subscribers) == 30
    assert scenario.probes == set()  # no probes: everyone is stamped
