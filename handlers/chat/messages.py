"""The publish hook of ``room:`` and ``dm:`` channels: schema, moderation,
typing rate, idempotent sends.

Order of checks for a client's publication (each refusal has its code):

1. schema (:mod:`handlers.chat.schema`): 1100-1104;
2. in a live room, the publisher's bars: 1110 banned, 1111 timed out;
3. typing: at most ``typing_per_second`` per user across all channels (a
   fixed window in the store, so across instances); excess is acknowledged
   and dropped silently, and counted. Typing is published live only;
4. messages with a ``client_msg_id``: a claim
   ``chat:dedupe:{<channel>}:<client_msg_id>:<user>`` (set_if_absent, TTL
   ``chat_dedupe_window_s``). A retry finds the claim taken and is
   acknowledged without publishing (across instances: the store is shared);
5. slow mode in a live room: 1112 if the user's slot is taken.

Messages are published by this hook itself (it then tells the core to skip
its own publish): if the broker fails, the dedupe and slow-mode claims are
released before the error reaches the client, so the client's retry is
delivered instead of being taken for a duplicate. Hooks registered after
this one do not see chat messages (they do see typing).
"""

from __future__ import annotations

import logging
import math
from typing import Final

from handlers.channels import dm_members, room_owner
from handlers.chat.metrics import ChatMetrics
from handlers.chat.moderation import Moderation
from handlers.chat.schema import ChatMessage, Typing, parse_publication
from signaling.broker.base import BrokerUnavailable
from signaling.errors import SignalError
from signaling.ids import unique_id
from signaling.node import Node, PublishContext, PublishDecision

__all__ = ["ChatPublisher", "channel_kind", "typing_window"]

log = logging.getLogger("handlers.chat.messages")

SKIP: Final = PublishDecision(skip=True)


def channel_kind(channel: str) -> str | None:
    """ "room", "dm", or None for channels that carry no chat."""
    if room_owner(channel) is not None:
        return "room"
    if dm_members(channel) is not None:
        return "dm"
    return None


def typing_window(per_second: float) -> tuple[float, int]:
    """(window in seconds, events allowed per window) for a typing rate: 2/s
    is 2 per 1 s window, 0.5/s is 1 per 2 s window."""
    window_s = max(1.0, 1.0 / per_second)
    return window_s, max(1, math.floor(per_second * window_s))


def _dedupe_key(channel: str, client_msg_id: str, user: str) -> str:
    # client_msg_id has no ":" (schema), so the key is unambiguous whatever
    # the user id holds.
    return f"chat:dedupe:{{{channel}}}:{client_msg_id}:{user}"


def _typing_key(user: str) -> str:
    return f"chat:typing:{{{user}}}"


class ChatPublisher:
    def __init__(self, node: Node, metrics: ChatMetrics, moderation: Moderation) -> None:
        self._node = node
        self._store = node.store
        self._metrics = metrics
        self._moderation = moderation
        settings = node.settings
        self._max_text = settings.chat_max_text
        self._dedupe_window_s = settings.chat_dedupe_window_s
        self._typing_window_s, self._typing_limit = typing_window(settings.typing_per_second)

    async def on_publish(self, ctx: PublishContext) -> PublishDecision | None:
        """Publish hook (see the module docstring for the order of checks)."""
        kind = channel_kind(ctx.channel)
        if kind is None:
            return None
        try:
            pub = parse_publication(ctx.data, max_text=self._max_text)
            if kind == "room":
                await self._moderation.check_publish(ctx.channel, ctx.user)
            if isinstance(pub, Typing):
                return await self._typing(ctx, kind, pub)
            return await self._message(ctx, kind, pub)
        except SignalError as exc:
            self._metrics.refusals.labels(str(exc.value.code)).inc()
            raise

    async def _typing(self, ctx: PublishContext, kind: str, pub: Typing) -> PublishDecision:
        count = await self._store.incr(_typing_key(ctx.user), self._typing_window_s)
        if count > self._typing_limit:
            self._metrics.typing_dropped.inc()
            return SKIP
        self._metrics.publications.labels(kind, "typing").inc()
        return PublishDecision(raw=pub.encode(), history=False)

    async def _message(self, ctx: PublishContext, kind: str, pub: ChatMessage) -> PublishDecision:
        store = self._store
        dedupe: tuple[str, str] | None = None
        if pub.client_msg_id is not None:
            dedupe = (_dedupe_key(ctx.channel, pub.client_msg_id, ctx.user), unique_id())
            if not await store.set_if_absent(*dedupe, self._dedupe_window_s):
                self._metrics.deduplicated.labels(kind).inc()
                return SKIP
        slow_key: str | None = None
        try:
            if kind == "room":
                slow_key = await self._moderation.claim_slow_mode(ctx.channel, ctx.user)
            await self._node.publish(ctx.channel, pub.encode(), info=ctx.info)
        except BaseException:
            await self._release(dedupe, slow_key)
            raise
        self._metrics.publications.labels(kind, "message").inc()
        # Published above: the core only acknowledges.
        return SKIP

    async def _release(self, dedupe: tuple[str, str] | None, slow_key: str | None) -> None:
        """Undo the claims of a message that was not published. Best effort:
        if the store is down too, the claims expire by their TTLs."""
        try:
            if dedupe is not None:
                await self._store.delete_if_equals(*dedupe)
            if slow_key is not None:
                await self._moderation.release_slow_mode(slow_key)
        except BrokerUnavailable as exc:
            log.warning("releasing chat claims failed: %s", exc)
