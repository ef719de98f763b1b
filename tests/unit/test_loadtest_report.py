"""The load tool's judgment of a client-bound or thin latency tail
(loadtest/aggregate.py) and how comparisons carry it (loadtest/report.py)."""

from __future__ import annotations

from typing import Any

import pytest

from loadtest.aggregate import (
    latency_client_bound,
    over_helpers,
    reading_ms_per_publication,
    thin_tail_note,
)
from loadtest.report import comparisons


def test_reading_time_is_the_busiest_workers_cpu_per_publication() -> None:
    # Worker 2 read 1,000 deliveries per publication at 14 µs each: 14 ms per publication.
    spent = {101: 0.3, 102: 10.5}
    assert reading_ms_per_publication(spent, 750) == pytest.approx(14.0)
    assert reading_ms_per_publication(spent, 0) is None
    assert reading_ms_per_publication({}, 750) is None


@pytest.mark.parametrize(
    ("p99_ms", "reading_ms", "bound"),
    [
        (15.7, 14.0, True),  # the fanout p99s of the eleventh run: the clients' reading
        (20.0, 10.0, True),  # exactly half
        (20.0, 9.9, False),
        (2.7, 0.09, False),  # chat: three deliveries per publication
        (0.0, 1.0, False),  # no deliveries
        (15.7, None, False),  # no publications
    ],
)
def test_client_bound_when_reading_is_half_the_p99(
    p99_ms: float, reading_ms: float | None, bound: bool
) -> None:
    assert latency_client_bound(p99_ms, reading_ms) is bound


def _run(target: str, p99_ms: float, client_bound: bool) -> dict[str, Any]:
    return {
        "scenario": "fanout",
        "target": target,
        "settings": {"rate": 50.0, "connections": 1000},
        "server": {"cpu_us_per_delivery": 7.0 if target != "baseline" else 11.0},
        "latency_ms": {"p50": 7.0, "p99": p99_ms},
        "client": {"latency_client_bound": client_bound},
    }


@pytest.mark.parametrize(
    ("ours_bound", "base_bound", "flagged"),
    [(False, False, False), (True, False, True), (False, True, True), (True, True, True)],
)
def test_comparisons_flag_a_client_bound_latency_on_either_side(
    ours_bound: bool, base_bound: bool, flagged: bool
) -> None:
    runs = [_run("digis-signal", 15.7, ours_bound), _run("baseline", 14.8, base_bound)]
    (comp,) = comparisons(runs)
    assert comp["latency_client_bound"] is flagged
    assert comp["ratios"]["latency p99"] == pytest.approx(15.7 / 14.8, abs=1e-3)
    assert comp["ratios"]["server CPU per delivery"] == pytest.approx(7.0 / 11.0, abs=1e-3)


@pytest.mark.parametrize(
    ("acked", "deliveries", "behind"),
    [
        (300, 300_000, 3),  # fanout, 20 msg/s for 15 s: three publications
        (750, 750_000, 8),  # 50 msg/s for 15 s
        (999, 999_000, 10),  # just under ten: rounds to ten, still thin
    ],
)
def test_a_fan_out_p99_on_few_publications_gets_a_note(
    acked: int, deliveries: int, behind: int
) -> None:
    note = thin_tail_note(acked, deliveries)
    assert note is not None
    assert f"about {behind} publications" in note
    assert f"1 % of {acked:,}" in note


@pytest.mark.parametrize(
    ("acked", "deliveries"),
    [
        (1_200, 1_200_000),  # 20 msg/s for 60 s: twelve publications
        (30_000, 90_000),  # chat: three deliveries per publication
        (300, 29_999),  # under a hundred deliveries per publication
        (0, 0),  # nothing published
    ],
)
def test_no_note_for_enough_publications_or_no_fan_out(acked: int, deliveries: int) -> None:
    assert thin_tail_note(acked, deliveries) is None


def test_server_cpu_over_redis_is_the_ratio_of_the_per_publication_figures() -> None:
    assert over_helpers(156.6, 48.7) == pytest.approx(3.22)
    assert over_helpers(50.0, 100.0) == 0.5


@pytest.mark.parametrize(("server_us", "helpers_us"), [(None, 40.0), (150.0, None), (150.0, 0.0)])
def test_no_ratio_without_both_figures(server_us: float | None, helpers_us: float | None) -> None:
    # No helper spawned (0 µs) or the server not measured: nothing to compare.
    assert over_helpers(server_us, helpers_us) is None
