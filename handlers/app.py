"""Wires the domain handlers into a node (the core never imports handlers)."""

from __future__ import annotations

from handlers import calls, chat, presence, system
from handlers.channels import PlatformChannelPolicy
from signaling.config import Settings
from signaling.node import Node

__all__ = ["channel_policy", "install"]


def channel_policy(settings: Settings) -> PlatformChannelPolicy:
    return PlatformChannelPolicy(settings.history_size, settings.history_ttl_s)


def install(node: Node) -> None:
    """Register every handler's RPC methods and hooks on ``node``."""
    system.register(node)
    calls.register(node)
    chat.register(node)
    presence.register(node)
