"""Read receipts in direct conversations (``dm:`` channels).

Each member's last-read position is a field of the hash ``chat:reads:{<dm>}``
(one Redis Cluster slot per conversation), ``<epoch>:<offset>``, and only moves
forward within an epoch. When the conversation's stream starts over (quiet
for 30 days, or lost by Redis or with the embedded broker's process), offsets
count from 1 again in a new epoch, and a position of the old epoch no longer counts: the
member has read nothing of the new one. When a position moves, a live-only
``{"type": "read", "user", "offset"}`` publication tells whoever has the
conversation open: the other participant and the reader's other devices. An
app opening a conversation asks ``chat.read_state``.
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
        """``chat.mark_read {channel, offset, epoch?}``: the caller has read
        ``channel`` up to ``offset`` (clamped to the stream's top) of ``epoch``
        (the subscription's; a mark of another epoch than the stream's now
        moves nothing). Returns the caller's stored offset, which never moves
        back within an epoch. Errors: 103 not a member, 107."""
        args = object_args(data)
        channel, _members = self._conversation(ctx, args)
        offset = arg_int(args, "offset", 0)
        their_epoch = args.get("epoch")
        if their_epoch is not None and not isinstance(their_epoch, str):
            raise bad_request()
        epoch, top = await self._top(channel)
        if their_epoch is not None and their_epoch != epoch:
            # Read in a stream that has since started over: its offsets say
            # nothing of this one's.
            offset = 0
        if top is not None:
            # An offset past the top belongs to an older epoch (or is made up).
            offset = min(offset, top)
        stored, moved = await self._advance(channel, ctx.user, epoch, offset)
        if moved:
            self._metrics.read_receipts.inc()
            await self._node.publish(
                channel, read_event(ctx.user, stored), info=ctx.info, history=False
            )
        return {"offset": stored}

    async def _top(self, channel: str) -> tuple[str, int | None]:
        """The conversation's stream position now: (epoch, top offset); ("",
        None) for a channel without history."""
        options = self._node.channel_options(channel)
        if not options.recoverable:
            return "", None
        page = await self._node.broker.history(
            channel, since=None, limit=0, reverse=False, history=options.history
        )
        return page.top.epoch, page.top.offset

    async def _advance(self, channel: str, user: str, epoch: str, offset: int) -> tuple[int, bool]:
        """Move ``user``'s position forward to ``offset`` of ``epoch``; (stored
        offset, moved)."""
        key, store = reads_key(channel), self._store
        value = f"{epoch}:{offset}"
        for _ in range(_CAS_ATTEMPTS):
            raw = (await store.hgetall(key)).get(user)
            current = _offset_in(raw, epoch)
            if current is not None and current >= offset:
                return current, False
            if raw is None:
                # First write of this member: nothing to compare with (a race
                # of two first writes may keep the smaller; the next one fixes it).
                await store.hset(key, {user: value}, READS_TTL_S)
                return offset, True
            # Forward in this epoch, or the first position of a new one.
            if await store.hcas(key, user, {raw}, {user: value}, READS_TTL_S):
                return offset, True
        # Lost every race: others keep moving it forward, which is what we wanted.
        raw = (await store.hgetall(key)).get(user)
        current = _offset_in(raw, epoch)
        return (offset if current is None else current), False

    async def rpc_read_state(self, ctx: RpcContext, data: JSON) -> JSON:
        """``chat.read_state {channel}``: ``{"reads": {member: offset}, "epoch"}``
        for both members, offsets in the stream's current epoch (0: nothing of
        it marked). Errors: 103 not a member, 107."""
        channel, members = self._conversation(ctx, object_args(data))
        epoch, _ = await self._top(channel)
        reads = await self._store.hgetall(reads_key(channel))
        return {
            "reads": {member: _offset_in(reads.get(member), epoch) or 0 for member in members},
            "epoch": epoch,
        }


def _offset_in(raw: str | None, epoch: str) -> int | None:
    """The offset a stored position holds in ``epoch``; None if there is none,
    or it is of another epoch. A bare offset (stored before epochs were) is
    taken to be of the current epoch."""
    if raw is None:
        return None
    stored_epoch, sep, offset = raw.rpartition(":")
    if sep and stored_epoch != epoch:
        return None
    return int(offset)
