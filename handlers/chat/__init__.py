"""Chat in creators' live rooms (``room:``) and direct conversations (``dm:``).

``register(node)`` installs, on the core's public API:

* a publish hook validating every publication against the chat schema,
  enforcing live-room bars and slow mode, rate-limiting typing and
  deduplicating retried messages (:mod:`handlers.chat.messages`);
* a subscribe hook keeping barred users out of live rooms, and the
  ``room.*`` moderation RPC methods (:mod:`handlers.chat.moderation`);
* read receipts, ``chat.mark_read`` and ``chat.read_state``
  (:mod:`handlers.chat.receipts`);
* the viewer-count loop of live rooms (:mod:`handlers.chat.viewers`);
* the chat metrics (:mod:`handlers.chat.metrics`).

The client-facing contract (schema, methods, codes) is ``docs/chat.md``.
"""

from __future__ import annotations

from handlers.chat.messages import ChatPublisher
from handlers.chat.metrics import ChatMetrics
from handlers.chat.moderation import Moderation
from handlers.chat.receipts import Receipts
from handlers.chat.viewers import ViewerCounter
from signaling.node import Node

__all__ = ["register"]


def register(node: Node) -> None:
    metrics = ChatMetrics(node.metrics.registry, node.metrics.buffered)
    moderation = Moderation(node, metrics)
    moderation.register()
    Receipts(node, metrics).register()
    node.publish_hooks.append(ChatPublisher(node, metrics, moderation).on_publish)
    node.run_in_background(ViewerCounter(node, metrics).run, "chat-viewer-counts")
