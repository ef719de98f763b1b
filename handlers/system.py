"""RPC methods about the server itself."""

from __future__ import annotations

import time

from signaling.node import Node, RpcContext
from signaling.values import JSON

__all__ = ["register"]


async def server_info(ctx: RpcContext, data: JSON) -> JSON:
    """Who the caller is to the server, and the server's clock (ms), which
    apps use to correct their own clock for call timers."""
    return {
        "user": ctx.user,
        "client": ctx.client,
        "node": ctx.node.name,
        "time_ms": int(time.time() * 1000),
    }


def register(node: Node) -> None:
    node.register_rpc("server.info", server_info)
