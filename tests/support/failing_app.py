"""An app whose workers fail at start-up: it imports (the supervisor checks
that much), but its install() raises in every worker."""

from __future__ import annotations

from handlers.app import channel_policy
from signaling.node import Node

__all__ = ["channel_policy", "install"]


def install(node: Node) -> None:
    raise RuntimeError("this app cannot install itself")
