"""Protocol sessions on top of a WebSocket: Centrifuge JSON and the baseline's.

A client is one connection's protocol state in ``__slots__`` and nothing else; what it
receives goes straight to its :class:`Sink` (the scenario), so a worker holding 20,000
idle clients holds 20,000 small objects and no task.

Requests that a scenario awaits (connect, subscribe, rpc) use a future; publications,
the hot path, use a tuple in ``pending`` and report their ack to the sink.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import orjson

from loadtest.wsclient import MessageHandler, open_raw

__all__ = [
    "BaselineClient",
    "CentrifugeClient",
    "Client",
    "ConnectionClosedError",
    "Opener",
    "ServerError",
    "Sink",
    "opener_for",
]

JSONDict = dict[str, Any]
PING = b"{}"


class ServerError(Exception):
    """An error reply: ``{"id": N, "error": {"code": C, "message": M}}``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message


class ConnectionClosedError(Exception):
    """The connection closed before the reply came."""

    def __init__(self, code: int) -> None:
        super().__init__(f"connection closed ({code})")
        self.code = code


class WebSocketLike(Protocol):
    is_open: bool
    # The kernel's arrival time of the frame being handled (unix ns; 0: not
    # stamped), and whether a later frame's arrival stands in for it.
    arrived_ns: int
    stamp_shared: bool

    def send_text(self, payload: bytes) -> None: ...

    def ack_on_read(self) -> None: ...

    def close(self, code: int = 1000) -> None: ...

    def abort(self) -> None: ...


Opener = Callable[[str, str | None, MessageHandler, float], Awaitable[WebSocketLike]]


def opener_for(backend: str, stamped: bool = False) -> Opener:
    """How clients connect; ``stamped``: the raw client's arrival stamps
    (:mod:`loadtest.wsclient`), which the library client cannot give."""
    if backend == "raw":
        return functools.partial(open_raw, stamped=True) if stamped else open_raw
    if stamped:
        raise ValueError("arrival stamps need the raw backend")
    if backend == "websockets":
        from loadtest.wsclient_websockets import open_library

        return open_library
    raise ValueError(f"unknown backend {backend!r}")


class Sink(Protocol):
    """Where a client reports what it receives (implemented by scenarios)."""

    def on_pub(self, client: Client, channel: str, pub: JSONDict) -> None:
        """A publication push (or one recovered in a subscribe reply)."""

    def on_ack(self, client: Client, stream: int, seq: int, sent_at: float) -> None:
        """A publication was acknowledged; ``sent_at`` is ``time.perf_counter()``."""

    def on_error(self, client: Client, where: str, code: int) -> None:
        """An error reply to a publication (``where`` = "publish")."""

    def on_closed(self, client: Client, code: int, expected: bool) -> None:
        """The connection closed; ``expected`` when we closed it ourselves."""

    def on_ping(self, client: Client) -> None:
        """A server ping was answered."""


class Client:
    """State shared by both protocols."""

    __slots__ = (
        "channel",
        "closing",
        "epoch",
        "gid",
        "next_id",
        "offset",
        "pending",
        "ready",
        "received",
        "reconnects",
        "sink",
        "source",
        "token",
        "url",
        "user",
        "ws",
    )

    def __init__(
        self, gid: int, user: str, url: str, source: str | None, token: str, sink: Sink
    ) -> None:
        self.gid = gid
        self.user = user
        self.url = url
        self.source = source
        self.token = token
        self.sink = sink
        self.ws: WebSocketLike | None = None
        self.next_id = 1
        self.pending: dict[int, Any] = {}
        self.channel = ""  # the scenario channel (room or DM) this client is in
        self.offset = 0  # stream position of ``channel``, for recovery
        self.epoch = ""
        self.received: dict[int, bytearray] | None = None  # stream → bitmap of seqs
        self.reconnects = 0
        self.closing = False
        self.ready = False  # set up once: from then on its deliveries are checked

    @property
    def connected(self) -> bool:
        return self.ws is not None and self.ws.is_open

    @property
    def inflight(self) -> int:
        return len(self.pending)

    def publish(self, channel: str, data: JSONDict, stream: int, seq: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.closing = True
        if self.ws is not None:
            self.ws.close()

    # --- MessageHandler ---------------------------------------------------------

    def on_closed(self, code: int, reason: str) -> None:
        pending, self.pending = self.pending, {}
        for entry in pending.values():
            if isinstance(entry, asyncio.Future) and not entry.done():
                entry.set_exception(ConnectionClosedError(code))
        self.sink.on_closed(self, code, self.closing)

    def _ack(self, entry: tuple[int, int, float], error: JSONDict | None) -> None:
        stream, seq, sent_at = entry
        if error is None:
            self.sink.on_ack(self, stream, seq, sent_at)
        else:
            self.sink.on_error(self, "publish", int(error.get("code", 0)))


class CentrifugeClient(Client):
    """The Centrifuge bidirectional protocol, JSON (PROTOCOL-NOTES §1)."""

    __slots__ = ()

    async def open(
        self, opener: Opener, timeout: float, subscribe: str | None = None
    ) -> JSONDict | None:
        """Connect, send ``connect`` (and ``subscribe`` in the same frame, as
        centrifuge-js does); returns the subscribe result, if one was asked for."""
        self.closing = False
        self.ws = await opener(self.url, self.source, self, timeout)
        commands: list[tuple[str, JSONDict]] = [("connect", {"token": self.token})]
        if subscribe is not None:
            commands.append(("subscribe", self._subscribe_body(subscribe)))
        futures = self._send_commands(commands)
        async with asyncio.timeout(timeout):
            await futures[0]
            if subscribe is None:
                return None
            result: JSONDict = await futures[1]
        self._subscribed(subscribe, result)
        return result

    async def call(self, kind: str, body: JSONDict, timeout: float = 10.0) -> JSONDict:
        (future,) = self._send_commands([(kind, body)])
        async with asyncio.timeout(timeout):
            result: JSONDict = await future
        return result

    async def rpc(self, method: str, data: JSONDict, timeout: float = 10.0) -> JSONDict:
        result = await self.call("rpc", {"method": method, "data": data}, timeout)
        out: JSONDict = result.get("data") or {}
        return out

    def publish(self, channel: str, data: JSONDict, stream: int, seq: int) -> None:
        ws = self.ws
        if ws is None or not ws.is_open:
            return
        cmd_id = self.next_id
        self.next_id = cmd_id + 1
        self.pending[cmd_id] = (stream, seq, time.perf_counter())
        ws.send_text(orjson.dumps({"id": cmd_id, "publish": {"channel": channel, "data": data}}))

    def _subscribe_body(self, channel: str) -> JSONDict:
        body: JSONDict = {"channel": channel}
        if self.channel == channel and self.epoch:
            body.update(recover=True, offset=self.offset, epoch=self.epoch)
        return body

    def _subscribed(self, channel: str, result: JSONDict) -> None:
        self.channel = channel
        for pub in result.get("publications") or ():
            self.sink.on_pub(self, channel, pub)
        self.offset = int(result.get("offset", self.offset) or 0)
        self.epoch = str(result.get("epoch", self.epoch) or "")

    def _send_commands(self, commands: list[tuple[str, JSONDict]]) -> list[asyncio.Future[Any]]:
        ws = self.ws
        if ws is None or not ws.is_open:
            raise ConnectionClosedError(1006)
        loop = asyncio.get_running_loop()
        frames: list[bytes] = []
        futures: list[asyncio.Future[Any]] = []
        for kind, body in commands:
            cmd_id = self.next_id
            self.next_id = cmd_id + 1
            future: asyncio.Future[Any] = loop.create_future()
            self.pending[cmd_id] = future
            futures.append(future)
            frames.append(orjson.dumps({"id": cmd_id, kind: body}))
        ws.send_text(b"\n".join(frames))
        return futures

    # --- receiving ---------------------------------------------------------------

    def on_text(self, payload: bytes) -> None:
        if payload == PING:
            self._pong()
            return
        if b"\n" in payload:
            for part in payload.split(b"\n"):
                if part == PING:
                    self._pong()
                elif part:
                    self._message(orjson.loads(part))
            return
        self._message(orjson.loads(payload))

    def _pong(self) -> None:
        ws = self.ws
        if ws is not None:
            ws.send_text(PING)
            ws.ack_on_read()  # a pong is no conversation (wsclient.ack_on_read)
            self.sink.on_ping(self)

    def _message(self, msg: JSONDict) -> None:
        push = msg.get("push")
        if push is not None:
            pub = push.get("pub")
            if pub is not None:
                channel = push.get("channel", "")
                if channel == self.channel:
                    offset = pub.get("offset")
                    if offset:
                        self.offset = offset
                self.sink.on_pub(self, channel, pub)
            return
        cmd_id = msg.get("id")
        if not cmd_id:
            return
        entry = self.pending.pop(cmd_id, None)
        if entry is None:
            return
        error = msg.get("error")
        if isinstance(entry, tuple):
            self._ack(entry, error)
        elif not entry.done():
            if error is not None:
                entry.set_exception(
                    ServerError(int(error.get("code", 0)), str(error.get("message", "")))
                )
            else:
                for key, value in msg.items():
                    if key != "id":
                        entry.set_result(value)
                        break
                else:
                    entry.set_result({})


class BaselineClient(Client):
    """The baseline server's protocol (:mod:`loadtest.baseline`): the URL path says
    ``/sub/<room>`` or ``/pub/<room>``; a publisher sends ``{"id", "data"}`` and gets
    ``{"ack": id}``; subscribers get ``{"channel", "offset", "data"}``."""

    __slots__ = ()

    async def open_baseline(self, opener: Opener, timeout: float, role: str, room: str) -> None:
        base = self.url.split("://", 1)[1].split("/", 1)[0]
        self.closing = False
        self.channel = room
        self.ws = await opener(f"ws://{base}/{role}/{room}", self.source, self, timeout)

    def publish(self, channel: str, data: JSONDict, stream: int, seq: int) -> None:
        ws = self.ws
        if ws is None or not ws.is_open:
            return
        cmd_id = self.next_id
        self.next_id = cmd_id + 1
        self.pending[cmd_id] = (stream, seq, time.perf_counter())
        message: JSONDict = {"id": cmd_id, "data": data}
        if channel != self.channel:
            message["room"] = channel  # one publisher connection feeds several rooms
        ws.send_text(orjson.dumps(message))

    def on_text(self, payload: bytes) -> None:
        msg = orjson.loads(payload)
        ack = msg.get("ack")
        if ack is not None:
            entry = self.pending.pop(ack, None)
            if isinstance(entry, tuple):
                self._ack(entry, None)
            return
        self.sink.on_pub(self, msg.get("channel", ""), msg)
