"""Prometheus metrics of calls, registered in the node's registry.

Counters and histograms count what *this* instance did (the instance that
won a transition records it), so dashboards sum them over instances. The
active-calls gauge is different: every instance reports the same global
count, read from the shared store, so dashboards take its ``max``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["OUTCOMES", "CallMetrics"]

# Label values of signal_calls_total{outcome}: how calls finished.
OUTCOMES = (
    "rejected",
    "cancelled",
    "missed",
    "hangup",
    "max_duration",
    "participant_lost",
)

_RING_BUCKETS = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0, 18.0, 25.0, 30.0, 45.0, 60.0)
_DURATION_BUCKETS = (
    10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
)  # fmt: skip


class CallMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.calls = Counter(
            "signal_calls",
            "Calls by outcome (rejected, cancelled, missed, or the end reason of an "
            "accepted call: hangup, max_duration, participant_lost).",
            ["outcome"],
            registry=registry,
        )
        for outcome in OUTCOMES:
            self.calls.labels(outcome)
        self.invites = Counter(
            "signal_call_invites",
            "Calls started ringing (call.invite accepted).",
            registry=registry,
        )
        self.active = Gauge(
            "signal_calls_active",
            "Accepted calls in progress on all instances (same value everywhere: use max).",
            registry=registry,
        )
        self.ring_to_answer = Histogram(
            "signal_call_ring_to_answer_seconds",
            "Time from invite to accept.",
            buckets=_RING_BUCKETS,
            registry=registry,
        )
        self.duration = Histogram(
            "signal_call_duration_seconds",
            "Duration of accepted calls, accept to end.",
            buckets=_DURATION_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "signal_call_tokens_issued",
            "Agora RTC tokens issued, by method (join, renew).",
            ["method"],
            registry=registry,
        )
        for method in ("join", "renew"):
            self.tokens.labels(method)
        self.billing_redelivered = Counter(
            "signal_call_billing_redelivered",
            "Billing records this instance appended from a call's outbox on behalf of "
            "another change (its instance died or could not reach the stream).",
            registry=registry,
        )
        self.events_redelivered = Counter(
            "signal_call_events_redelivered",
            "End events (call.ended, call.missed ...) this instance published in the "
            "place of the instance that ended the call (it died or could not publish).",
            registry=registry,
        )
        self.timer_runs = Counter(
            "signal_call_timer_runs",
            "Call timers claimed and run by this instance.",
            registry=registry,
        )
