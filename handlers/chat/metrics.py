"""Chat metrics, registered on the node's registry (one node per process).

Labels are bounded sets: channel kinds, publication types, action names.
The publish path goes through :meth:`ChatMetrics.child`, which keeps each
labelled child: ``Counter.labels()`` (argument checks, a lock, a dict lookup)
costs about three times the ``inc()`` itself, on every publication.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

__all__ = ["ChatMetrics"]


class Count(Protocol):
    def inc(self, amount: int = 1) -> None: ...


class ChatMetrics:
    """Args:
    registry: where the metrics are registered.
    buffered: wraps a child for the hot path
        (:meth:`signaling.metrics.Metrics.buffered`: counted in a plain int,
        flushed with the node's gauges); default: counted directly.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        buffered: Callable[[Counter], Count] | None = None,
    ) -> None:
        self._buffered = buffered
        # (counter, label values) -> its child. Bounded: the label sets are.
        self._children: dict[tuple[Counter, tuple[str, ...]], Count] = {}
        self.publications = Counter(
            "chat_publications",
            "Chat publications accepted, by channel kind (room, dm) and type.",
            ["kind", "type"],
            registry=registry,
        )
        self.refusals = Counter(
            "chat_refusals",
            "Chat publications refused, by error code.",
            ["code"],
            registry=registry,
        )
        self.deduplicated = Counter(
            "chat_deduplicated_retries",
            "Retried messages (same client_msg_id) acknowledged without publishing.",
            ["kind"],
            registry=registry,
        )
        self.typing_dropped = Counter(
            "chat_typing_dropped",
            "Typing events dropped over the per-user rate (typing_per_second).",
            registry=registry,
        )
        self.moderation_actions = Counter(
            "chat_moderation_actions",
            "Live-room moderation actions, by action.",
            ["action"],
            registry=registry,
        )
        self.read_receipts = Counter(
            "chat_read_receipts", "Read positions that moved forward.", registry=registry
        )
        self.viewer_counts = Counter(
            "chat_viewer_count_publications",
            "Viewer counts published (changed since the last one).",
            registry=registry,
        )

    def child(self, counter: Counter, *labels: str) -> Count:
        """``counter.labels(*labels)``, looked up once (and buffered, see
        ``buffered``). Counts into the object ``labels()`` returns, so
        readers of either see one value; a child appears in the exposition on
        first use, as with ``labels()``."""
        key = (counter, labels)
        found = self._children.get(key)
        if found is None:
            child = counter.labels(*labels)
            found = child if self._buffered is None else self._buffered(child)
            self._children[key] = found
        return found
