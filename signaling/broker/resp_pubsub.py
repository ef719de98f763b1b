"""Redis pub/sub over the lean RESP client (:mod:`signaling.broker.resp`).

One :class:`RespPubSub` is one connection in subscribe mode, for one
lifetime: reconnecting and resubscribing is its owner's job (the broker's
pub/sub shard), because only the owner knows what must be subscribed now.

* SUBSCRIBE and UNSUBSCRIBE calls of one loop iteration go out in one write
  (512 channels per command), in call order.
* Each message is handed to a synchronous callback straight from
  ``data_received``, in Redis's order: no reader task, no queue, no await
  per message. Confirmations go to their own callback.
* ``ping()`` is the liveness probe: its PONG comes after everything sent
  before it, and a PONG that does not come drops the connection.

An error reply in subscribe mode (ACL: NOPERM on a channel) cannot be tied to
the command that caused it, so it drops the connection (``on_lost``) rather
than risk misreading what follows.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Final

import hiredis

from signaling.broker.base import BrokerUnavailable
from signaling.broker.resp import (
    CONNECT_TIMEOUT_S,
    NEED_MORE,
    BaseRespConnection,
    RedisAddress,
    encode_command,
)
from signaling.state.redis import RedisArg

__all__ = ["RespPubSub"]

log = logging.getLogger("signaling.redis")

# Channels per SUBSCRIBE/UNSUBSCRIBE command (centrifuge uses 512).
SUBSCRIBE_BATCH: Final = 512


class RespPubSub(BaseRespConnection):
    """One connection in subscribe mode (one lifetime: make a new one to
    reconnect, and subscribe again).

    Args:
        address: where to connect (:func:`parse_redis_url`).
        on_message: ``(channel, data)`` for each message, called synchronously
            from ``data_received`` in Redis's order; it must not block. An
            exception it raises is logged and the next message is delivered.
        on_subscribed: ``channel`` once Redis confirmed a SUBSCRIBE of it.
        on_unsubscribed: ``channel`` once Redis confirmed an UNSUBSCRIBE.
        on_lost: called once if the connection drops, or an error reply (ACL:
            NOPERM on a channel) makes us drop it; not after :meth:`close`.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        on_message: Callable[[bytes, bytes], None],
        on_subscribed: Callable[[bytes], None] | None = None,
        on_unsubscribed: Callable[[bytes], None] | None = None,
        on_lost: Callable[[Exception], None] | None = None,
    ) -> None:
        super().__init__(address)
        self._on_message = on_message
        self._on_subscribed = on_subscribed
        self._on_unsubscribed = on_unsubscribed
        self._on_lost_callback = on_lost
        # (command, arguments) to write on the next flush, in call order;
        # consecutive (un)subscribes share one entry.
        self._ops: list[tuple[bytes, list[RedisArg]]] = []
        self._connected = False
        # Channels subscribed, as Redis counted in its last confirmation.
        self.subscriptions = 0

    async def connect(
        self,
        *,
        timeout_s: float = CONNECT_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Connect and authenticate.

        Raises:
            BrokerUnavailable: as :meth:`RespConnection.connect`.
        """
        if ssl_context is None:
            ssl_context = self.address.ssl_context()
        await self._open(timeout_s, ssl_context)
        self._connected = True
        if self._ops:
            self._schedule_flush()

    def subscribe(self, *channels: str | bytes) -> None:
        """SUBSCRIBE on the next loop iteration (one command per 512
        channels for all calls of this iteration); confirmations come to
        ``on_subscribed``. A no-op once the connection is closed."""
        self._queue(b"SUBSCRIBE", channels)

    def unsubscribe(self, *channels: str | bytes) -> None:
        """UNSUBSCRIBE likewise (no channel: all of them)."""
        self._queue(b"UNSUBSCRIBE", channels)

    async def ping(self, timeout_s: float = 5.0) -> None:
        """Round trip after everything queued so far; drops the connection
        if it does not come back in time.

        Raises:
            BrokerUnavailable: closed, lost, or no reply within ``timeout_s``.
        """
        if self.closed or not self._connected:
            raise BrokerUnavailable("redis pub/sub not connected")
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append(future)
        self._ops.append((b"PING", []))
        if not self._flush_scheduled:
            self._schedule_flush()
        try:
            await asyncio.wait_for(future, timeout_s)
        except TimeoutError:
            self._fail(TimeoutError(f"no PONG from redis in {timeout_s}s"))
            raise BrokerUnavailable("redis pub/sub ping timed out") from None

    # --- internals --------------------------------------------------------------------

    def _queue(self, command: bytes, channels: tuple[str | bytes, ...]) -> None:
        if self.closed:
            return
        ops = self._ops
        if ops and ops[-1][0] == command and channels and ops[-1][1]:
            ops[-1][1].extend(channels)
        else:
            ops.append((command, list(channels)))
        if not self._flush_scheduled:
            self._schedule_flush()

    def _flush(self) -> None:
        if self._ops and self._connected and not self.closed:
            ops, self._ops = self._ops, []
            for command, names in ops:
                if not names:
                    self._wbuf.append(encode_command((command,)))
                for start in range(0, len(names), SUBSCRIBE_BATCH):
                    chunk = names[start : start + SUBSCRIBE_BATCH]
                    self._wbuf.append(encode_command((command, *chunk)))
        super()._flush()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        on_message = self._on_message
        try:
            reply = reader.gets()
            while reply is not NEED_MORE:
                if type(reply) is list and reply[0] == b"message":
                    try:
                        on_message(reply[1], reply[2])
                    except Exception:
                        log.exception("redis pub/sub message handler failed")
                elif type(reply) is list:
                    self._push(reply)
                elif isinstance(reply, Exception) and self._connected:
                    # Which command it answers is ambiguous in subscribe mode
                    # (a refused SUBSCRIBE, say): drop rather than desync.
                    self._fail(reply)
                    return
                else:
                    self._reply(reply)  # handshake, or PONG outside subscribe mode
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            self._fail(BrokerUnavailable(f"redis protocol error: {exc}"))

    def _push(self, reply: list[Any]) -> None:
        kind = reply[0]
        if kind == b"pong":
            self._reply(None)
        elif kind == b"subscribe":
            self.subscriptions = reply[2]
            if self._on_subscribed is not None:
                self._callback(self._on_subscribed, reply[1])
        elif kind == b"unsubscribe":
            self.subscriptions = reply[2]
            if self._on_unsubscribed is not None and reply[1] is not None:
                self._callback(self._on_unsubscribed, reply[1])
        elif kind == b"pmessage":
            self._callback(self._on_message, reply[2], reply[3])

    def _reply(self, reply: Any) -> None:
        """Resolve the oldest FIFO future (handshake, PING) with ``reply``."""
        if not self._pending:
            self._fail(BrokerUnavailable("redis sent a reply nobody asked for"))
            return
        future = self._pending.popleft()
        if future.done():  # its waiter timed out
            return
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)

    @staticmethod
    def _callback(callback: Callable[..., None], *args: bytes) -> None:
        try:
            callback(*args)
        except Exception:
            log.exception("redis pub/sub callback failed")

    def _on_lost(self, exc: Exception | None) -> None:
        self._ops = []
        if self._connected and not self._closing and self._on_lost_callback is not None:
            reason = exc if exc is not None else BrokerUnavailable("redis closed the connection")
            try:
                self._on_lost_callback(reason)
            except Exception:
                log.exception("redis pub/sub on_lost failed")
