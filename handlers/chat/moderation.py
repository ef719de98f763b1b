"""Live-room moderation: bans, timeouts, slow mode, tombstones, moderators.

The creator who owns ``room:<creator_id>`` moderates it, and so do the
moderators the creator names. All state is in the node's state store, so
every instance enforces the same bars (keys share the room's hash tag
``{room:<id>}``, one Redis Cluster slot per room):

* ``chat:ban:{room}:<user>`` - a bar; its TTL is the bar's (none: for good).
  ``chat:bans:{room}`` (sorted set, score = until) lists bars for moderators.
* ``chat:timeout:{room}:<user>`` - a timeout; TTL = its duration.
* ``chat:slow:{room}`` - slow-mode interval (s); ``chat:slowuser:{room}:<user>``
  a per-user claim that lives for the interval after each message.
* ``chat:mods:{room}`` - moderators (sorted set, score = when named).
* ``chat:deleted:{room}`` - deleted offsets (sorted set), kept as long as
  history is.

The shared tag is also what lets a message's checks take one store command:
the ban, timeout and slow-mode keys, and the message's dedupe claim
(``chat:dedupe:{room}:...``, :mod:`handlers.chat.messages`), are read and
taken together (MGET, or one script), which Redis Cluster allows only for keys
of one slot. A new key read on that path must carry the same tag.

A bar ends the user's subscriptions on every node with the protocol's
unsubscribe push (code :data:`UNSUBSCRIBE_BANNED`, below 2500 so the SDKs
do not resubscribe) and refuses subscribing and publishing (1110) until it
expires; the user is then readmitted with no further action.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Final

from handlers.channels import room_owner
from handlers.chat.args import (
    arg_int,
    arg_optional_int,
    arg_str,
    arg_user,
    bad_request,
    object_args,
)
from handlers.chat.errors import ERROR_CHAT_BANNED, ERROR_CHAT_SLOW_MODE, ERROR_CHAT_TIMED_OUT
from handlers.chat.metrics import ChatMetrics
from handlers.chat.schema import delete_event, slow_mode_event, timeout_event
from handlers.chat.viewers import viewers_key
from signaling.errors import (
    ERROR_LIMIT_EXCEEDED,
    ERROR_PERMISSION_DENIED,
    SignalError,
)
from signaling.node import Node, RpcContext, SubscribeContext
from signaling.values import JSON, JSONObject

__all__ = [
    "MAX_BAN_S",
    "MAX_MODERATORS",
    "MAX_SLOW_MODE_S",
    "MAX_TIMEOUT_S",
    "UNSUBSCRIBE_BANNED",
    "Moderation",
]

log = logging.getLogger("handlers.chat.moderation")

MAX_SLOW_MODE_S: Final = 300
MAX_TIMEOUT_S: Final = 7 * 86400
MAX_BAN_S: Final = 365 * 86400
MAX_MODERATORS: Final = 50
# Unsubscribe push of a barred user (application range 2000-2499: stay out).
UNSUBSCRIBE_BANNED: Final = (2100, "banned")
# A subscribe that passed the ban check just before the bar was set can still
# complete after the first unsubscribe push: a second one closes that race.
_REPEAT_UNSUBSCRIBE_S: Final = 1.0
# Score of a bar for good in chat:bans (unix seconds, far future).
_FOREVER: Final = float(2**40)
_MAX_REASON: Final = 200


def _ban_key(room: str, user: str) -> str:
    return f"chat:ban:{{{room}}}:{user}"


def _bans_key(room: str) -> str:
    return f"chat:bans:{{{room}}}"


def _timeout_key(room: str, user: str) -> str:
    return f"chat:timeout:{{{room}}}:{user}"


def _slow_key(room: str) -> str:
    return f"chat:slow:{{{room}}}"


def _slow_user_key(room: str, user: str) -> str:
    return f"chat:slowuser:{{{room}}}:{user}"


def _mods_key(room: str) -> str:
    return f"chat:mods:{{{room}}}"


def _deleted_key(room: str) -> str:
    return f"chat:deleted:{{{room}}}"


def _raise_if_barred(banned: str | None, timed_out: str | None) -> None:
    """1110 before 1111: a barred user who is also timed out is told "banned".
    A bar is a key that exists, as for ``claim_unless``'s guards: a claim not
    taken with no bar raised is then always a duplicate. (Bar values are never
    empty: they hold the until time.)"""
    if banned is not None:
        raise SignalError(ERROR_CHAT_BANNED)
    if timed_out is not None:
        raise SignalError(ERROR_CHAT_TIMED_OUT)


def _until_ms(until: float) -> int | None:
    """Unix ms for a client, None for "for good"."""
    return None if until >= _FOREVER else int(until * 1000)


@dataclass(frozen=True, slots=True)
class Bars:
    """One user's standing in a room; until values are unix seconds."""

    banned_until: float | None
    timed_out_until: float | None


class Moderation:
    """Enforcement (hooks, checks for the publish path) and the RPC methods."""

    def __init__(self, node: Node, metrics: ChatMetrics) -> None:
        self._node = node
        self._store = node.store
        self._metrics = metrics

    def register(self) -> None:
        node = self._node
        node.subscribe_hooks.append(self.on_subscribe)
        for method, handler in (
            ("room.ban", self.rpc_ban),
            ("room.unban", self.rpc_unban),
            ("room.timeout", self.rpc_timeout),
            ("room.slow_mode", self.rpc_slow_mode),
            ("room.delete_message", self.rpc_delete_message),
            ("room.add_moderator", self.rpc_add_moderator),
            ("room.remove_moderator", self.rpc_remove_moderator),
            ("room.bans", self.rpc_bans),
            ("room.state", self.rpc_state),
        ):
            node.register_rpc(method, handler)

    # --- enforcement ------------------------------------------------------------

    async def on_subscribe(self, ctx: SubscribeContext) -> None:
        """Subscribe hook: a barred user stays out of the room (1110)."""
        if room_owner(ctx.channel) is not None and await self._store.get(
            _ban_key(ctx.channel, ctx.user)
        ):
            raise SignalError(ERROR_CHAT_BANNED)

    async def check_publish(self, room: str, user: str) -> None:
        """Raise 1110 if ``user`` is barred from ``room``, 1111 if timed out
        (typing: one MGET)."""
        banned, timed_out = await self._store.get_many(
            (_ban_key(room, user), _timeout_key(room, user))
        )
        _raise_if_barred(banned, timed_out)

    async def admit_message(
        self, room: str, user: str, claim: tuple[str, str, float] | None
    ) -> tuple[bool, str | None]:
        """A message's first step in ``room``, in ONE store command: raise 1110
        if ``user`` is barred, 1111 if timed out; otherwise take ``claim`` (the
        dedupe claim: key, value, TTL; its key must carry the room's hash tag),
        and read the slow-mode interval for :meth:`claim_slow_mode`.

        The claim is taken in the same atomic step only if no bar holds
        (:meth:`StateStore.claim_unless`), so a refused message never leaves a
        claim that would make its retry, after the bar is lifted, be taken for
        a duplicate. Returns (claimed: False means a duplicate; True without
        a claim, the slow-mode interval or None when off)."""
        keys = (_ban_key(room, user), _timeout_key(room, user), _slow_key(room))
        if claim is None:
            banned, timed_out, interval = await self._store.get_many(keys)
            claimed = True
        else:
            key, value, ttl_s = claim
            (banned, timed_out, interval), claimed = await self._store.claim_unless(
                key, value, ttl_s, guards=keys[:2], reads=keys[2:]
            )
        _raise_if_barred(banned, timed_out)
        return claimed, interval

    def message_guards(self, room: str, user: str) -> tuple[str, str, str]:
        """Keys that stop ``user``'s message in ``room`` when they exist, for a
        one-step claimed publish (``Node.publish_claimed``): the two bars,
        then the room's slow-mode interval. Pass the guard found to
        :meth:`raise_if_bar`; slow mode is left to :meth:`admit_message` and
        :meth:`claim_slow_mode` (moderators are exempt, slots are per user)."""
        return _ban_key(room, user), _timeout_key(room, user), _slow_key(room)

    def raise_if_bar(self, room: str, user: str, guard: str) -> None:
        """1110 or 1111 if ``guard`` is one of ``user``'s bars in ``room``."""
        if guard == _ban_key(room, user):
            raise SignalError(ERROR_CHAT_BANNED)
        if guard == _timeout_key(room, user):
            raise SignalError(ERROR_CHAT_TIMED_OUT)

    async def claim_slow_mode(self, room: str, user: str, interval: str | None) -> str | None:
        """Take ``user``'s slow-mode slot in ``room`` (1112 if taken), given the
        interval :meth:`admit_message` read. Returns the claim's key, to release
        if the message is not published after all, or None when slow mode is
        off or the user moderates the room."""
        if not interval or await self.is_moderator(room, user):
            return None
        key = _slow_user_key(room, user)
        # The claim's TTL is the interval: set_if_absent is the whole check,
        # atomic on every instance.
        if not await self._store.set_if_absent(key, "1", float(interval)):
            raise SignalError(ERROR_CHAT_SLOW_MODE)
        return key

    async def release_slow_mode(self, key: str) -> None:
        await self._store.delete(key)

    async def is_moderator(self, room: str, user: str) -> bool:
        if user == room_owner(room):
            return True
        return user in await self._moderators(room)

    async def _moderators(self, room: str) -> list[str]:
        members = await self._store.zrange_by_score(
            _mods_key(room), float("-inf"), float("inf"), MAX_MODERATORS
        )
        return [member for member, _ in members]

    async def bars(self, room: str, user: str) -> Bars:
        # One MGET (the keys share the room's hash tag), no task per key.
        banned, timed_out = await self._store.get_many(
            (_ban_key(room, user), _timeout_key(room, user))
        )
        return Bars(float(banned) if banned else None, float(timed_out) if timed_out else None)

    # --- authorization ---------------------------------------------------------------

    def _room(self, args: JSONObject) -> str:
        channel = arg_str(args, "channel", 200)
        if room_owner(channel) is None:
            raise bad_request()
        return channel

    async def _authorize_against(self, ctx: RpcContext, room: str, target: str) -> None:
        """The caller may act on ``target`` (ban, timeout): the caller moderates
        the room; nobody acts on the owner or on themselves; only the owner acts
        on a moderator."""
        owner = room_owner(room)
        if target == owner or target == ctx.user:
            raise SignalError(ERROR_PERMISSION_DENIED)
        moderators = await self._moderators(room)
        if ctx.user != owner and (ctx.user not in moderators or target in moderators):
            raise SignalError(ERROR_PERMISSION_DENIED)

    async def _authorize(self, ctx: RpcContext, room: str) -> None:
        if not await self.is_moderator(room, ctx.user):
            raise SignalError(ERROR_PERMISSION_DENIED)

    def _count(self, action: str) -> None:
        self._metrics.moderation_actions.labels(action).inc()

    # --- RPC methods --------------------------------------------------------------------

    async def rpc_ban(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.ban {channel, user, duration_s?, reason?}``: remove ``user`` and
        bar them for ``duration_s`` (1 s - 1 year) or, without it, for good.
        Errors: 103 not a moderator (or target is the owner, a moderator, you),
        107 bad arguments."""
        args = object_args(data)
        room, target = self._room(args), arg_user(args)
        duration = arg_optional_int(args, "duration_s", 1, MAX_BAN_S)
        reason = args.get("reason")
        if reason is not None and (not isinstance(reason, str) or len(reason) > _MAX_REASON):
            raise bad_request()
        await self._authorize_against(ctx, room, target)
        until = _FOREVER if duration is None else time.time() + duration
        ttl = None if duration is None else float(duration)
        await self._store.set(_ban_key(room, target), f"{until:.3f}", ttl)
        # Expired bars leave the listing as new ones come (and in room.bans).
        await self._store.zpop_due(_bans_key(room), time.time(), 100)
        await self._store.zadd(_bans_key(room), target, until)
        # A banned moderator moderates no more (only the owner bans one).
        await self._store.zrem(_mods_key(room), target)
        # The repeat first: it still runs if this first unsubscribe fails.
        self._node.spawn(self._repeat_unsubscribe(target, room), "chat-ban-repeat")
        await self._unsubscribe(target, room)
        self._count("ban")
        log.info("room %s: %s barred %s for %s s", room, ctx.user, target, duration or "ever")
        return {"user": target, "until_ms": _until_ms(until)}

    async def _unsubscribe(self, user: str, room: str) -> None:
        code, reason = UNSUBSCRIBE_BANNED
        await self._node.unsubscribe_user_everywhere(user, room, code, reason)

    async def _repeat_unsubscribe(self, user: str, room: str) -> None:
        await asyncio.sleep(_REPEAT_UNSUBSCRIBE_S)
        if await self._store.get(_ban_key(room, user)):
            await self._unsubscribe(user, room)

    async def rpc_unban(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.unban {channel, user}``: lift a bar. Errors: 103, 107."""
        args = object_args(data)
        room, target = self._room(args), arg_user(args)
        await self._authorize_against(ctx, room, target)
        existed = await self._store.delete(_ban_key(room, target))
        await self._store.zrem(_bans_key(room), target)
        self._count("unban")
        return {"user": target, "lifted": existed}

    async def rpc_timeout(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.timeout {channel, user, duration_s}``: ``user`` stays and
        reads but may not publish for ``duration_s`` (1 s - 7 days; 0 lifts
        it). Announced to the room (live only). Errors: 103, 107."""
        args = object_args(data)
        room, target = self._room(args), arg_user(args)
        duration = arg_int(args, "duration_s", 0, MAX_TIMEOUT_S)
        await self._authorize_against(ctx, room, target)
        key = _timeout_key(room, target)
        if duration:
            await self._store.set(key, f"{time.time() + duration:.3f}", float(duration))
        else:
            await self._store.delete(key)
        await self._node.publish(room, timeout_event(target, duration), history=False)
        self._count("timeout" if duration else "untimeout")
        return {"user": target, "duration_s": duration}

    async def rpc_slow_mode(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.slow_mode {channel, interval_s}``: at most one message per
        user per ``interval_s`` (0-300; 0 turns it off; moderators are exempt).
        Announced to the room (kept in history). Errors: 103, 107."""
        args = object_args(data)
        room = self._room(args)
        interval = arg_int(args, "interval_s", 0, MAX_SLOW_MODE_S)
        await self._authorize(ctx, room)
        if interval:
            await self._store.set(_slow_key(room), str(interval))
        else:
            await self._store.delete(_slow_key(room))
        await self._node.publish(room, slow_mode_event(interval))
        self._count("slow_mode")
        return {"interval_s": interval}

    async def rpc_delete_message(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.delete_message {channel, offset}``: publish a tombstone for
        the publication at ``offset`` (kept in history, after its target, so
        recovering clients apply it too). Errors: 103, 107 (no such offset)."""
        args = object_args(data)
        room = self._room(args)
        offset = arg_int(args, "offset", 1)
        await self._authorize(ctx, room)
        options = self._node.channel_options(room)
        top = await self._node.broker.history(
            room, since=None, limit=0, reverse=False, history=options.history
        )
        if offset > top.top.offset:
            raise bad_request()
        await self._store.zadd(
            _deleted_key(room), str(offset), time.time(), options.history.ttl_s or None
        )
        await self._node.publish(room, delete_event(offset))
        self._count("delete")
        return {"offset": offset}

    async def rpc_add_moderator(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.add_moderator {channel, user}`` (owner only). Errors: 103,
        106 (more than 50 moderators), 107."""
        args = object_args(data)
        room, target = self._room(args), arg_user(args)
        if ctx.user != room_owner(room) or target == ctx.user:
            raise SignalError(ERROR_PERMISSION_DENIED)
        moderators = await self._moderators(room)
        if target not in moderators and len(moderators) >= MAX_MODERATORS:
            raise SignalError(ERROR_LIMIT_EXCEEDED)
        key = _mods_key(room)
        await self._store.zadd(key, target, time.time())
        if target not in moderators and (
            await self._store.zcount(key, float("-inf"), float("inf")) > MAX_MODERATORS
        ):
            # Another add raced this one past the cap: a moderator beyond it
            # would be one in name only (the checks read the first 50).
            await self._store.zrem(key, target)
            raise SignalError(ERROR_LIMIT_EXCEEDED)
        self._count("add_moderator")
        return {"user": target}

    async def rpc_remove_moderator(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.remove_moderator {channel, user}`` (owner only). Errors: 103, 107."""
        args = object_args(data)
        room, target = self._room(args), arg_user(args)
        if ctx.user != room_owner(room):
            raise SignalError(ERROR_PERMISSION_DENIED)
        removed = await self._store.zrem(_mods_key(room), target)
        self._count("remove_moderator")
        return {"user": target, "removed": removed}

    async def rpc_bans(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.bans {channel}``: current bars (moderators). Errors: 103, 107."""
        room = self._room(object_args(data))
        await self._authorize(ctx, room)
        key = _bans_key(room)
        # Expired bars leave the listing here; their ban keys expired by TTL.
        await self._store.zpop_due(key, time.time(), 1000)
        bars = await self._store.zrange_by_score(key, float("-inf"), float("inf"), 1000)
        return {"bans": [{"user": user, "until_ms": _until_ms(until)} for user, until in bars]}

    async def rpc_state(self, ctx: RpcContext, data: JSON) -> JSON:
        """``room.state {channel}``: slow mode, moderators, deleted offsets, the
        viewer count, and the caller's own standing. Any user. Errors: 107."""
        room = self._room(object_args(data))
        store = self._store
        slow, moderators, deleted, bars, viewers = await asyncio.gather(
            store.get(_slow_key(room)),
            self._moderators(room),
            store.zrange_by_score(_deleted_key(room), float("-inf"), float("inf"), 1000),
            self.bars(room, ctx.user),
            store.hgetall(viewers_key(room)),
        )
        owner = room_owner(room)
        moderators_json: list[JSON] = list(moderators)
        deleted_json: list[JSON] = [offset for offset in sorted(int(o) for o, _ in deleted)]
        return {
            "slow_mode_s": int(slow) if slow else 0,
            "moderators": moderators_json,
            "deleted": deleted_json,
            "viewers": {
                "count": int(viewers.get("count", 0)),
                "peak": int(viewers.get("peak", 0)),
            },
            "you": {
                "owner": ctx.user == owner,
                "moderator": ctx.user == owner or ctx.user in moderators,
                "banned": bars.banned_until is not None,
                "banned_until_ms": None
                if bars.banned_until is None
                else _until_ms(bars.banned_until),
                "timed_out_until_ms": None
                if bars.timed_out_until is None
                else int(bars.timed_out_until * 1000),
            },
        }
