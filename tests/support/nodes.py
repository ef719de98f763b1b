"""Nodes started in the test's own event loop (no server, no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from signaling.config import Settings
from signaling.metrics import Metrics
from signaling.node import Node
from signaling.server import build_node


@asynccontextmanager
async def started_nodes(settings: Settings, app: Any, count: int) -> AsyncIterator[list[Node]]:
    """``count`` nodes of ``app`` (a module with ``channel_policy`` and
    ``install``) on ``settings``, started, and closed on the way out: on a
    shared Redis they are instances of one cluster."""
    nodes = [build_node(settings, app, Metrics()) for _ in range(count)]
    for node in nodes:
        await node.start()
    try:
        yield nodes
    finally:
        for node in nodes:
            await node.close()
