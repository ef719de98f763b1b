"""1-on-1 video calls: signaling, the server's call clock, Agora tokens, billing events.

``register(node)`` installs the ``call.*`` RPC methods, the disconnect hook
that feeds liveness, and this instance's share of the call timers. The
contract (methods, events, error codes, state machine, billing stream) is
docs/calls.md.

Modules: :mod:`~handlers.calls.state` (state machine and store schema),
:mod:`~handlers.calls.service` (transitions, clock, liveness),
:mod:`~handlers.calls.timers` (timers shared by every instance),
:mod:`~handlers.calls.agora` (RTC tokens), :mod:`~handlers.calls.events`
(participant events, billing records), :mod:`~handlers.calls.rpc`,
:mod:`~handlers.calls.errors`, :mod:`~handlers.calls.metrics`.
"""

from __future__ import annotations

import logging

from handlers.calls import rpc
from handlers.calls.service import CallService
from signaling.node import Node

__all__ = ["CallService", "register"]

log = logging.getLogger("handlers.calls")


def register(node: Node) -> CallService:
    """Install calls on ``node``; call from ``install()`` inside the event loop.

    Raises:
        ConfigError: invalid Agora credentials (start-up stops).
        RuntimeError: no running event loop (the timers could not start).
    """
    service = CallService(node)
    for method, handler in rpc.handlers(service).items():
        node.register_rpc(method, handler)
    node.on_disconnect.append(service.on_disconnect)
    node.run_in_background(service.run, "call-timers")
    if not service.issuer.configured:
        log.warning("calls: AGORA_APP_ID/AGORA_APP_CERTIFICATE not set, call.join is refused")
    return service
