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

Store round trips. A message with a ``client_msg_id`` (the SDKs' retry-safe
send): ONE, in the common case: the bars (rooms), the dedupe claim and the
publish are a single claimed publish (``Node.publish_claimed``; on Redis one
script), which publishes nothing and claims nothing when a bar or the room's
slow mode is on. In slow mode the message then takes the steps below. Without
a ``client_msg_id``, or in slow mode: a room message makes ONE command for
steps 2 and 4 together, which also reads the slow-mode interval
(:meth:`Moderation.admit_message`: ``claim_unless``, atomic, so a barred
message takes no claim), then the slow-mode claim only while slow mode is on,
then the publish; a DM message is published directly. Typing: the bars
(rooms, one MGET), then the rate counter; these two stay apart because their
keys are in different cluster slots and a barred user's typing must not use
up their rate.

Messages are published by this hook itself (it then tells the core to skip
its own publish): if the broker fails, the dedupe and slow-mode claims are
released before the error reaches the client, so the client's retry is
delivered instead of being taken for a duplicate; a slow-mode refusal
releases the dedupe claim the same way. Typing indicators are published by
this hook too (live only), and counted once they were. Hooks registered after
this one see neither.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Final

from handlers.channels import dm_members, room_owner
from handlers.chat.metrics import ChatMetrics
from handlers.chat.moderation import Moderation
from handlers.chat.schema import ChatMessage, Typing, parse_publication
from signaling.broker.base import BrokerUnavailable, Claim
from signaling.errors import SignalError
from signaling.ids import unique_id
from signaling.node import Node, PublishContext, PublishDecision

__all__ = ["ChatPublisher", "channel_kind", "typing_window"]

log = logging.getLogger("handlers.chat.messages")

SKIP: Final = PublishDecision(skip=True)


# Every publication asks; validating a channel name char by char costs 1-2.5 µs,
# a cache hit a tenth of that. Bounded: channels come and go.
@functools.lru_cache(maxsize=4096)
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
            if isinstance(pub, Typing):
                if kind == "room":
                    await self._moderation.check_publish(ctx.channel, ctx.user)
                return await self._typing(ctx, kind, pub)
            return await self._message(ctx, kind, pub)
        except SignalError as exc:
            metrics = self._metrics
            metrics.child(metrics.refusals, str(exc.value.code)).inc()
            raise

    async def _typing(self, ctx: PublishContext, kind: str, pub: Typing) -> PublishDecision:
        count = await self._store.incr(_typing_key(ctx.user), self._typing_window_s)
        metrics = self._metrics
        if count > self._typing_limit:
            metrics.typing_dropped.inc()
            return SKIP
        # Published here, live only, so that it is counted once it was.
        await self._node.publish(
            ctx.channel, pub.encode(), info=ctx.info, history=False, options=ctx.options
        )
        metrics.child(metrics.publications, kind, "typing").inc()
        return SKIP

    async def _message(self, ctx: PublishContext, kind: str, pub: ChatMessage) -> PublishDecision:
        dedupe: tuple[str, str] | None = None
        if pub.client_msg_id is not None:
            dedupe = (_dedupe_key(ctx.channel, pub.client_msg_id, ctx.user), unique_id())
            decision = await self._message_in_one_step(ctx, kind, pub, dedupe)
            if decision is not None:
                return decision
        # A room in slow mode, or a message without client_msg_id.
        return await self._message_in_steps(ctx, kind, pub, dedupe)

    async def _message_in_one_step(
        self, ctx: PublishContext, kind: str, pub: ChatMessage, dedupe: tuple[str, str]
    ) -> PublishDecision | None:
        """Bars, dedupe claim and publish as one store step (one Redis script):
        the common case. None when the room is in slow mode, which needs the
        moderator check and the user's slot first (nothing claimed then)."""
        room = kind == "room"
        guards = self._moderation.message_guards(ctx.channel, ctx.user) if room else ()
        claim = Claim(*dedupe, self._dedupe_window_s, guards)
        # No release on failure: claim and publication are one atomic step, so a
        # claim exists only if the message was published. After a failure that
        # hides the outcome (a reply lost with the connection, a reply timeout) the
        # client's retry then finds the claim and is not delivered a second time.
        result = await self._node.publish_claimed(
            ctx.channel, pub.encode(), claim, info=ctx.info, options=ctx.options
        )
        if result.position is not None:
            return self._published(kind)
        if result.guard is None:
            return self._duplicate(kind)
        self._moderation.raise_if_bar(ctx.channel, ctx.user, result.guard)
        return None

    async def _message_in_steps(
        self, ctx: PublishContext, kind: str, pub: ChatMessage, dedupe: tuple[str, str] | None
    ) -> PublishDecision:
        interval: str | None = None
        if kind == "room":
            # Bars, dedupe claim and slow-mode interval in one round trip; raises
            # 1110/1111 with no claim taken.
            claim = None if dedupe is None else (*dedupe, self._dedupe_window_s)
            claimed, interval = await self._moderation.admit_message(ctx.channel, ctx.user, claim)
        elif dedupe is not None:
            claimed = await self._store.set_if_absent(*dedupe, self._dedupe_window_s)
        else:
            claimed = True
        if not claimed:
            return self._duplicate(kind)
        slow_key: str | None = None
        try:
            if interval:
                slow_key = await self._moderation.claim_slow_mode(ctx.channel, ctx.user, interval)
            # The options the core already asked the policy for (no second lookup).
            await self._node.publish(ctx.channel, pub.encode(), info=ctx.info, options=ctx.options)
        except BaseException:
            await self._release(dedupe, slow_key)
            raise
        return self._published(kind)

    def _published(self, kind: str) -> PublishDecision:
        metrics = self._metrics
        metrics.child(metrics.publications, kind, "message").inc()
        # Published by this hook: the core only acknowledges.
        return SKIP

    def _duplicate(self, kind: str) -> PublishDecision:
        metrics = self._metrics
        metrics.child(metrics.deduplicated, kind).inc()
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
