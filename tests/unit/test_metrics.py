"""Metrics counted on the hot paths reach the exposition at the next update."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from signaling.metrics import Metrics


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


def test_buffered_counts_appear_when_rendered() -> None:
    metrics = Metrics()
    metrics.deliveries.inc(3)
    metrics.deliveries.inc()
    metrics.publications.inc()
    metrics.command_done("publish", "ok", 0.001)
    metrics.command_done("publish", "ok", 0.002)
    # Nothing is handed to prometheus-client before an update.
    assert metrics.deliveries.pending == 4
    assert _value(metrics, "signal_deliveries_total") == 4
    assert _value(metrics, "signal_publications_total") == 1
    assert _value(metrics, "signal_commands_total", method="publish", result="ok") == 2
    assert _value(metrics, "signal_command_duration_seconds_count", method="publish") == 2
    assert metrics.deliveries.pending == 0
    # Flushed counts are not added twice.
    metrics.deliveries.inc(2)
    metrics.update_gauges()
    assert _value(metrics, "signal_deliveries_total") == 6


def test_buffered_durations_render_as_direct_observations() -> None:
    """The buffered histogram hands prometheus-client exactly what observing
    each duration directly would have: same buckets (values on a bound
    included), count and sum."""
    buffered, direct = Metrics(), Metrics()
    durations = [0.0, 0.0004, 0.0005, 0.00051, 0.001, 0.003, 0.05, 0.7, 2.5, 3.0, 120.0]
    for seconds in durations:
        buffered.command_done("rpc", "ok", seconds)
        direct.command_duration.labels("rpc").observe(seconds)
    buffered.command_done("rpc", "100", 0.002)  # another result, the same method
    direct.command_duration.labels("rpc").observe(0.002)

    def samples(metrics: Metrics) -> dict[tuple[str, str], float]:
        return {
            (sample.name, sample.labels.get("le", "")): sample.value
            for family in text_string_to_metric_families(metrics.render().decode())
            if family.name == "signal_command_duration_seconds"
            for sample in family.samples
            if not sample.name.endswith("_created")
        }

    expected = samples(direct)
    assert expected[("signal_command_duration_seconds_count", "")] == len(durations) + 1
    assert samples(buffered) == expected
    # A second flush adds only what came since.
    buffered.command_done("rpc", "ok", 0.004)
    direct.command_duration.labels("rpc").observe(0.004)
    assert samples(buffered) == samples(direct)


def test_worker_mode_merges_the_workers_files_at_most_once_a_second(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """In worker mode /metrics merges every worker's files on the event loop:
    a client asking in a loop must not make each request pay for it."""
    from signaling import metrics as metrics_module

    monkeypatch.setenv(metrics_module.MULTIPROC_ENV, str(tmp_path))
    merges = 0
    real = metrics_module.MultiProcessCollector

    def counting(registry: Any) -> Any:
        nonlocal merges
        merges += 1
        return real(registry)

    monkeypatch.setattr(metrics_module, "MultiProcessCollector", counting)
    clock = [100.0]
    monkeypatch.setattr(metrics_module.time, "monotonic", lambda: clock[0])
    metrics = Metrics()
    first = metrics.render()
    for _ in range(50):
        assert metrics.render() is first
    assert merges == 1
    clock[0] += metrics_module.WORKERS_RENDER_CACHE_S
    metrics.render()
    assert merges == 2
