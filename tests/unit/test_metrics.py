"""Metrics counted on the hot paths reach the exposition at the next update."""

from __future__ import annotations

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
