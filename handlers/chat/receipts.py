"""Read receipts in direct conversations (``dm:`` channels).

Each member's last-read offset is a field of the hash ``chat:reads:{<dm>}``
(one Redis Cluster slot per conversation), and only moves forward. When it
moves, a live-only ``{"type": "read", "user", "offset"}`` publication tells
whoever has the conversation open: the other participant and the reader's
other devices. An app opening a conversation asks ``chat.read_state``.
"""

from __future__ import annotations

from typing import Final

from handlers.channels import dm_members
from handlers.chat.args import arg_int, arg_str, bad_request, object_args
from handlers.chat.metrics import ChatMetrics
from handlers.chat.schema import read_event
from signaling.errors import ERROR_PERMISSION_DENIED, SignalError
from signaling.node import Node, RpcContext
from signaling.values import JSON, JSONObject

__all__ = ["READS_TTL_S", "Receipts"]

# Read positions outlive the conversation's history; refreshed on each write.
READS_TTL_S: Final = 30 * 86400.0
# Concurrent forward moves of one member's offset (two devices) retry this often.
_CAS_ATTEMPTS: Final = 5


def reads_key(channel: str) -> str:
    return f"chat:reads:{{{channel}}}"


class Receipts:
    def __init__(self, node: Node, metrics: ChatMetrics) -> None:
        self._node = node
        self._store = node.store
        self._metrics = metrics

    def register(self) -> None:
        self._node.register_rpc("chat.mark_read", self.rpc_mark_read)
        self._node.register_rpc("chat.read_state", self.rpc_read_state)

    def _conversation(self, ctx: RpcContext, args: JSONObject) -> tuple[str, tuple[str, str]]:
        channel = arg_str(args, "channel", 200)
        members = dm_members(channel)
        if members is None:
            raise bad_request()
        if ctx.user not in members:
            raise SignalError(ERROR_PERMISSION_DENIED)
        return channel, members

    async def rpc_mark_read(self, ctx: RpcContext, data: JSON) -> JSON:
        """``chat.mark_read {channel, offset}``: the caller has read ``channel``
        up to ``offset`` (clamped to the stream's top). Returns the caller's
        stored offset, which never moves back. Errors: 103 not a member, 107."""
        args = object_args(data)
        channel, _members = self._conversation(ctx, args)
        offset = arg_int(args, "offset", 0)
        options = self._node.channel_options(channel)
        if options.recoverable:
            top = await self._node.broker.history(
                channel, since=None, limit=0, reverse=False, history=options.history
            )
            # An offset past the top belongs to an older epoch (or is made up).
            offset = min(offset, top.top.offset)
        stored, moved = await self._advance(channel, ctx.user, offset)
        if moved:
            self._metrics.read_receipts.inc()
            await self._node.publish(
                channel, read_event(ctx.user, stored), info=ctx.info, history=False
            )
        return {"offset": stored}

    async def _advance(self, channel: str, user: str, offset: int) -> tuple[int, bool]:
        """Move ``user``'s offset forward to ``offset``; (stored offset, moved)."""
        key, store = reads_key(channel), self._store
        for _ in range(_CAS_ATTEMPTS):
            reads = await store.hgetall(key)
            current = reads.get(user)
            if current is not None and int(current) >= offset:
                return int(current), False
            if current is None:
                # First write of this member: nothing to compare with (a race
                # of two first writes may keep the smaller; the next one fixes it).
                await store.hset(key, {user: str(offset)}, READS_TTL_S)
                return offset, True
            if await store.hcas(key, user, {current}, {user: str(offset)}, READS_TTL_S):
                return offset, True
        # Lost every race: others keep moving it forward, which is what we wanted.
        return int((await store.hgetall(key)).get(user, offset)), False

    async def rpc_read_state(self, ctx: RpcContext, data: JSON) -> JSON:
        """``chat.read_state {channel}``: ``{"reads": {member: offset}}`` for both
        members (0: nothing marked). Errors: 103 not a member, 107."""
        channel, members = self._conversation(ctx, object_args(data))
        reads = await self._store.hgetall(reads_key(channel))
        return {"reads": {member: int(reads.get(member, 0)) for member in members}}
