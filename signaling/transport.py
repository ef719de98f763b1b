"""WebSocket and plain-HTTP transport on one port, with no task per connection.

websockets' sans-I/O ``ServerProtocol`` does the WebSocket protocol (handshake
checks, framing, size limits, close handshake); this module is the asyncio glue:
routing, timeouts, flow control, the slow-client policy and the lifecycle.
Nothing else in the server imports websockets. ``serve()`` is not used because
its task, coroutine chain and assembler per connection cost ≈ 13 KB against
≈ 6 KB here, and it cannot write one pre-serialized frame to many connections
(PERFORMANCE-NOTES).

One TCP connection: :class:`_HttpConnection` reads one request within
``open_timeout_s``. Without ``Upgrade: websocket`` it goes to
``TransportApp.handle_http`` and is answered with ``Connection: close``. An
upgrade that websockets accepts gets a 101, then a :class:`WebSocketConnection`
takes the socket over (``transport.set_protocol``) until ``connection_lost``,
which calls ``ConnectionHandler.on_closed`` exactly once. After our close frame
or EOF the peer has ``close_timeout_s`` to finish, then the socket is aborted;
that bound also frees a slow client whose close frame sits behind unread data.

websockets checks UTF-8 in its asyncio message assembler, not in the sans-I/O
layer, so complete text messages are validated here (invalid → close 1007).

Incoming messages that fit one ordinary frame (what clients send) are parsed
here, not by websockets' generator-based parser, while that parser sits at a
frame boundary; control frames still go to websockets whole, and anything
unusual (fragments, oversized or malformed frames) hands the stream back to it
for good (``WebSocketConnection._take_messages``).

Logging (``signaling.transport``): ERROR when an application callback raises
(with traceback; that connection closes with 1011); INFO only once per server
(listening, stopped, aborted at shutdown); DEBUG per connection. websockets'
per-connection INFO lines are demoted to DEBUG (``signaling.transport.websockets``).
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
import socket
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol, cast

from websockets.datastructures import Headers
from websockets.exceptions import ProtocolError
from websockets.extensions.base import ServerExtensionFactory
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import Close, CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import OPEN, Event, State
from websockets.protocol import Protocol as WsProtocol
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask
from websockets.typing import Origin

from signaling.handshake import (
    PROTOBUF_REFUSAL,
    RequestHeaders,
    parse_plain_upgrade,
    protobuf_requested,
    switching_protocols,
)
from signaling.logs import Throttle

__all__ = [
    "ConnectionHandler",
    "HttpResponse",
    "Transport",
    "TransportApp",
    "TransportOptions",
    "WebSocketConnection",
    "encode_text_frame",
    "start_transport",
]

_log = logging.getLogger("signaling.transport")
_protobuf_log = Throttle(_log, burst=1, window_s=60.0)

# Listen backlog: the asyncio default (100) drops SYNs when thousands of
# clients reconnect at once after a deploy; the kernel caps it at
# net.core.somaxconn (4096 by default since Linux 5.4).
_LISTEN_BACKLOG: Final = 4096
# asyncio's default high-water mark. The slow-client check only runs while the
# transport is paused (see WebSocketConnection.write_frame), so the mark is
# capped at send_buffer_max_bytes to keep that check exact.
_WRITE_HIGH_WATER_BYTES: Final = 65536
# Close-frame payload limit is 125 bytes (RFC 6455 5.5), 2 of them the code.
_MAX_CLOSE_REASON_BYTES: Final = 123
# After wait_closed() aborts the stragglers, connection_lost arrives within a
# loop iteration or two; this only bounds a bug.
_ABORT_GRACE_S: Final = 1.0
# Frames a held connection keeps before writing anyway (WebSocketConnection.hold).
_HOLD_MAX_FRAMES: Final = 16


# --- frames ------------------------------------------------------------------

_FIN_TEXT: Final = 0x81  # FIN bit + opcode 0x1; RSV bits 0 since no extension applies
_SHORT_HEADERS: Final = tuple(bytes((_FIN_TEXT, length)) for length in range(126))
_HEADER_16: Final = struct.Struct("!BBH")
_HEADER_64: Final = struct.Struct("!BBQ")


def encode_text_frame(payload: bytes) -> bytes:
    """Serialize one unmasked, unfragmented text frame (server → client).

    Done once per publication; the same bytes go to every subscriber through
    :meth:`WebSocketConnection.write_frame`. Server frames are never masked
    (RFC 6455 5.1), which is what makes them shareable.

    Args:
        payload: UTF-8 text (not validated here: it comes from our own encoder).
    """
    length = len(payload)
    if length < 126:
        return _SHORT_HEADERS[length] + payload
    if length < 65536:
        return _HEADER_16.pack(_FIN_TEXT, 126, length) + payload
    return _HEADER_64.pack(_FIN_TEXT, 127, length) + payload


def _at_frame_boundary(protocol: WsProtocol) -> bool:
    """True if websockets' frame parser holds no bytes and waits for the next
    frame's first byte (its generator chain ends in ``StreamReader.at_eof``).
    Anything else, including an unknown websockets internals layout, is False:
    the fast path is then never taken and websockets parses everything."""
    if protocol.state is not OPEN or protocol.reader.buffer:
        return False
    parser: Any = protocol.parser
    while getattr(parser, "gi_yieldfrom", None) is not None:
        parser = parser.gi_yieldfrom
    return getattr(getattr(parser, "gi_code", None), "co_name", None) == "at_eof"


def _frame_payloads(frames: bytes) -> list[bytes]:
    """The payloads of frames built by :func:`encode_text_frame`, back to back."""
    payloads = []
    pos, end = 0, len(frames)
    while pos < end:
        length = frames[pos + 1] & 0x7F
        if length < 126:
            start = pos + 2
        elif length == 126:
            start = pos + 4
            length = int.from_bytes(frames[pos + 2 : start], "big")
        else:
            start = pos + 10
            length = int.from_bytes(frames[pos + 2 : start], "big")
        payloads.append(frames[start : start + length])
        pos = start + length
    return payloads


# --- values and interfaces -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A plain HTTP response; the transport adds Content-Length, Date and Connection."""

    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


class ConnectionHandler(Protocol):
    """The application's per-connection object (the protocol session).

    Callbacks run on the event loop and must not block. An exception raised by
    any of them is logged at ERROR and closes this connection with 1011.
    """

    def on_text(self, data: bytes) -> None:
        """One complete text message, UTF-8 validated, in arrival order."""

    def on_binary(self, data: bytes) -> None:
        """One complete binary message, in arrival order."""

    def on_closed(self, code: int | None, reason: str) -> None:
        """Called exactly once when the TCP connection is gone, whatever the cause.

        ``code`` is the close code of whichever side started the closing
        handshake (ours for our close, 1009 for an oversized message, ...);
        ``None`` when the connection ended without a close frame (EOF, abort).
        A peer close frame without a code reports 1005.
        """


class TransportApp(Protocol):
    """What the server gives the transport. All methods are synchronous."""

    def handle_http(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> HttpResponse | None:
        """Answer a request that is not a WebSocket upgrade; ``None`` → 404.

        ``path`` includes the query string. Requests with a body are refused by
        the HTTP parser before this is called (the endpoints are GET-only).
        """

    def websocket_allowed(self) -> HttpResponse | None:
        """Called before accepting an upgrade; a response (e.g. 503) rejects it."""

    def websocket_opened(self, conn: WebSocketConnection) -> ConnectionHandler:
        """Called after the 101 response is written; returns the connection's handler."""


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Transport settings; units are in the names."""

    # Exact path of WebSocket upgrades; the query string is ignored.
    websocket_path: str = "/connection/websocket"
    # Largest incoming message, all fragments together; larger → close 1009.
    max_message_bytes: int = 65536
    # () accepts any Origin; otherwise exact matches, and no Origin at all is
    # accepted too (mobile SDKs send none; CSWSH needs a browser, which sends one).
    allowed_origins: tuple[str, ...] = ()
    # permessage-deflate costs ≈ 35 KB per connection and one compression per
    # recipient per message, so it is off unless asked for.
    compression: bool = False
    # Bytes allowed in a connection's user-space write buffer; more → close 3008.
    send_buffer_max_bytes: int = 1 << 20
    # Time to receive a complete HTTP request after the TCP accept.
    open_timeout_s: float = 10.0
    # Time the peer has to finish closing after our close frame or EOF.
    close_timeout_s: float = 5.0
    # Called once per connection closed as slow (metrics counter).
    on_slow_client: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        if not self.websocket_path.startswith("/"):
            raise ValueError("websocket_path must start with '/'")
        if self.max_message_bytes <= 0 or self.send_buffer_max_bytes <= 0:
            raise ValueError("max_message_bytes and send_buffer_max_bytes must be > 0")
        if self.open_timeout_s <= 0 or self.close_timeout_s <= 0:
            raise ValueError("open_timeout_s and close_timeout_s must be > 0")


class _NoHandler:
    """Stands in before websocket_opened() returns, or if it raised."""

    __slots__ = ()

    def on_text(self, data: bytes) -> None:
        pass

    def on_binary(self, data: bytes) -> None:
        pass

    def on_closed(self, code: int | None, reason: str) -> None:
        pass


_NO_HANDLER: Final[ConnectionHandler] = _NoHandler()


class _DemotingLogger(logging.LoggerAdapter[logging.Logger]):
    """Logs websockets' per-connection INFO lines at DEBUG (our logging contract)."""

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        self.debug(msg, *args, **kwargs)


# One adapter shared by every ServerProtocol: no per-connection cost.
_WEBSOCKETS_LOG: Final = _DemotingLogger(logging.getLogger("signaling.transport.websockets"))


# --- the WebSocket connection --------------------------------------------------


class WebSocketConnection(asyncio.Protocol):
    """One open WebSocket. Created by the transport after a 101; handed to the app.

    Every method is synchronous and never raises on a closed connection: sends
    after close are dropped, so fan-out never has to check.

    Attributes:
        remote_address: ``ip:port`` of the peer (``[ip6]:port`` for IPv6).
        path: request path including the query string.
        headers: request headers, case-insensitive; a repeated field reads as
            its values joined with ", ". Only available inside the app's
            ``websocket_opened``: they are released afterwards (≈ 2 KB per
            connection); copy what you need there.
    """

    __slots__ = (
        "_close_timer",
        "_compressed",
        "_fragment_opcode",
        "_fragments",
        "_handler",
        "_held",
        "_local_close",
        "_open",
        "_paused",
        "_protocol",
        "_rx",
        "_server",
        "_slack",
        "_transport",
        "headers",
        "path",
        "remote_address",
    )

    remote_address: str
    path: str
    headers: Mapping[str, str]

    def __init__(
        self,
        server: Transport,
        transport: asyncio.Transport,
        protocol: ServerProtocol,
        path: str,
        headers: Mapping[str, str],
        remote_address: str,
    ) -> None:
        self.remote_address = remote_address
        self.path = path
        self.headers = headers
        self._server = server
        self._transport = transport
        self._protocol = protocol
        self._handler = _NO_HANDLER
        # True while data frames may be sent: the protocol is OPEN and we have
        # neither started closing nor aborted.
        self._open = True
        # True once this side decided to end the connection (close, abort,
        # handler crash, invalid UTF-8): further messages are not delivered.
        self._local_close = False
        self._paused = False
        # The largest frame over the limit written since the buffer last
        # drained: the limit is on what the client leaves unread beyond it.
        self._slack = 0
        self._compressed = bool(protocol.extensions)
        self._fragments: list[bytes] | None = None
        self._fragment_opcode = Opcode.TEXT
        self._close_timer: asyncio.TimerHandle | None = None
        # The bytes of an incomplete frame while complete single-frame
        # messages are parsed here (data_received); None: websockets parses.
        self._rx: bytes | None = None
        # Frames kept by hold() until release(); None when not holding.
        self._held: list[bytes] | None = None

    # Public API

    @property
    def closed(self) -> bool:
        """True once nothing more can be sent: closing handshake started, or socket gone."""
        return not self._open

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting in the transport's user-space write buffer."""
        return self._transport.get_write_buffer_size()

    def write_frame(self, frame: bytes) -> None:
        """Write a frame made by :func:`encode_text_frame` (or several, back
        to back: the hub's runs of publications); never awaits.

        The same ``frame`` object is meant to go to many connections. On a
        connection that negotiated permessage-deflate the shared bytes cannot
        be used: each payload is cut out of its frame (the header is 2, 4 or 10
        bytes) and re-sent through the protocol object, compressed. That path
        costs one compression per recipient, which is why compression is off
        by default.

        If the write buffer already holds more than ``send_buffer_max_bytes``
        when a frame comes, the frame is dropped, the connection is closed with
        3008 "slow" and ``on_slow_client`` fires: the client is not reading. A
        frame larger than the limit (a page of history, a recovery) raises the
        limit by its size until the buffer drains, so that a client reading it
        is not taken for a slow one, while one that reads nothing is still
        closed within the limit past it. Dropped silently when the connection
        is closed.
        """
        if not self._open:
            return
        if self._compressed:
            for payload in _frame_payloads(frame):
                self.send_text(payload)
            return
        held = self._held
        if held is not None:
            held.append(frame)
            if len(held) >= _HOLD_MAX_FRAMES:
                self.release()
            return
        # The transport pauses us when its buffer passes the high-water mark,
        # which is capped at send_buffer_max_bytes: while not paused the buffer
        # is below the limit, so the common case costs one attribute test.
        if self._paused and self._over_limit():
            return
        self._transport.write(frame)
        if self._paused:
            self._note_large(len(frame))

    def send_text(self, payload: bytes) -> None:
        """Frame and write one text message for this connection only.

        On a compressed connection through the protocol object (it
        compresses); otherwise framed like a broadcast. Same slow-client
        check as :meth:`write_frame`; dropped when closed.
        """
        if not self._open:
            return
        if not self._compressed:
            # Framed here, as for broadcasts: the protocol object's own framing
            # (a Frame, its serializer, data_to_send) costs more than the frame.
            self.write_frame(encode_text_frame(payload))
            return
        if self._paused and self._over_limit():
            return
        self._protocol.send_text(payload)
        self._flush()
        if self._paused:
            self._note_large(len(payload))

    def hold(self) -> None:
        """Keep the frames written from now on and write them together at
        :meth:`release`: one system call instead of one per frame.

        For a command whose reply follows deliveries to the same connection
        (a publish: the publisher's own copy arrives with the broker's
        acknowledgement). The caller must release; at most
        ``_HOLD_MAX_FRAMES`` are kept before writing anyway. No effect on a
        compressed connection.
        """
        if self._held is None and not self._compressed:
            self._held = []

    @property
    def held_frames(self) -> int:
        """Frames kept by :meth:`hold` so far (0 when not holding)."""
        held = self._held
        return 0 if held is None else len(held)

    def release(self) -> None:
        """Write what :meth:`hold` kept, in order, and stop holding."""
        held = self._held
        if held is None:
            return
        self._held = None
        if held and self._open and not (self._paused and self._over_limit()):
            data = held[0] if len(held) == 1 else b"".join(held)
            self._transport.write(data)
            if self._paused:
                self._note_large(len(data))

    def close(self, code: int, reason: str = "") -> None:
        """Start the closing handshake; idempotent.

        The peer has ``close_timeout_s`` to complete it, then the socket is
        aborted, even if the close frame is still stuck behind unread data.

        Args:
            code: 1000-1003, 1007-1014 or 3000-4999 (Centrifuge disconnects).
            reason: truncated to 123 UTF-8 bytes if longer.

        Raises:
            ValueError: if ``code`` cannot be sent in a close frame.
        """
        if not self._open:
            return
        reason = _truncate_reason(reason)
        try:
            Close(code, reason).check()
        except ProtocolError:
            raise ValueError(f"invalid close code {code}") from None
        if self._held and self._paused and self._buffer_full():
            self._held = None  # a client that does not read: dropped, not written
        else:
            self.release()  # held frames go before the close frame
        self._local_close = True
        self._open = False
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: closing %d %r", self.remote_address, code, reason)
        self._protocol.send_close(code, reason)
        self._flush()
        self._arm_close_timer()

    def abort(self) -> None:
        """Drop the TCP connection now, without a closing handshake."""
        self._open = False
        self._local_close = True
        self._transport.abort()

    def pause_reading(self) -> None:
        """Stop reading from the socket (the peer's writes then wait in TCP's
        buffers, its own flow control) until :meth:`resume_reading`."""
        if not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._transport.is_closing():
            self._transport.resume_reading()

    # Internals

    def _attach(self, pending: list[Event]) -> None:
        """Deliver frames websockets parsed with the request, then take the
        fast path if websockets' parser allows it."""
        if pending:
            self._process(pending)
            if self._protocol.close_expected():
                self._arm_close_timer()
        if not self._compressed and self._fragments is None and _at_frame_boundary(self._protocol):
            self._rx = b""

    def _attach_raw(self, data: bytes) -> None:
        """Take the fast path from the start (a fresh parser, no extension),
        and parse what followed the request."""
        self._rx = b""
        if data:
            self.data_received(data)

    def _over_limit(self) -> bool:
        """Whether the write buffer is over ``send_buffer_max_bytes``; if so,
        the connection is closed with 3008 (the client does not read)."""
        if not self._buffer_full():
            return False
        self._close_slow()
        return True

    def _note_large(self, size: int) -> None:
        """A frame larger than the limit raises it by its size until the
        buffer drains (a client reading a big reply is not a slow one)."""
        if size > self._slack and size > self._server._options.send_buffer_max_bytes:
            self._slack = size

    def _buffer_full(self) -> bool:
        limit = self._server._options.send_buffer_max_bytes + self._slack
        return self._transport.get_write_buffer_size() > limit

    def _close_slow(self) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s: slow client, %d bytes buffered", self.remote_address, self.buffered_bytes
            )
        hook = self._server._options.on_slow_client
        if hook is not None:
            try:
                hook()
            except Exception:
                _log.error("on_slow_client hook failed", exc_info=True)
        self.close(3008, "slow")

    def _flush(self) -> None:
        """Write what the protocol produced; the empty bytes mean EOF."""
        if self._open and self._paused and self._protocol.state is OPEN and self._over_limit():
            # Pongs too: a client that sends pings and never reads must not
            # grow the buffer past the limit (the close flushed what was due).
            # Not once a closing handshake is under way (the peer's close
            # frame, its EOF): that one just goes out.
            return
        if self._held:
            self.release()  # held data frames go before pongs and close frames
        protocol = self._protocol
        for data in protocol.data_to_send():
            if data:
                self._transport.write(data)
            else:
                self._write_eof()
        if self._open and protocol.state is not OPEN:
            self._open = False

    def _write_eof(self) -> None:
        # websockets asks for EOF once the closing handshake is done or failed
        # (the server closes TCP first, RFC 6455 7.1.1).
        self._open = False
        if _half_close(self._transport):
            self._arm_close_timer()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self._transport.is_closing():
            self._close_timer = self._server._loop.call_later(
                self._server._options.close_timeout_s, self._on_close_timeout
            )

    def _on_close_timeout(self) -> None:
        self._close_timer = None
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: close timed out, aborting", self.remote_address)
        self._transport.abort()

    def _process(self, events: list[Event]) -> None:
        """Reassemble data frames into messages and deliver them in order.

        websockets answers pings and close frames itself and enforces
        max_message_bytes over all fragments, so only data frames matter here.
        """
        for event in events:
            if self._local_close:
                return
            if not isinstance(event, Frame):
                continue
            opcode = event.opcode
            data = event.data if isinstance(event.data, bytes) else bytes(event.data)
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
                if event.fin:
                    self._deliver(opcode, data)
                else:
                    self._fragment_opcode = opcode
                    self._fragments = [data]
            elif opcode is Opcode.CONT:
                fragments = self._fragments
                # websockets fails the connection on a stray continuation frame.
                assert fragments is not None
                fragments.append(data)
                if event.fin:
                    self._fragments = None
                    self._deliver(self._fragment_opcode, b"".join(fragments))

    def _deliver(self, opcode: Opcode, data: bytes) -> None:
        if opcode is Opcode.TEXT:
            try:
                data.decode()
            except UnicodeDecodeError as exc:
                self._fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
                return
            try:
                self._handler.on_text(data)
            except Exception:
                self._handler_failed("on_text")
        else:
            try:
                self._handler.on_binary(data)
            except Exception:
                self._handler_failed("on_binary")

    def _fail(self, code: int, reason: str) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: failing connection %d %s", self.remote_address, code, reason)
        self._local_close = True
        self._protocol.fail(code, reason)
        self._flush()
        self._open = False
        self._arm_close_timer()

    def _handler_failed(self, callback: str) -> None:
        _log.error(
            "connection handler %s failed (%s)", callback, self.remote_address, exc_info=True
        )
        self._local_close = True
        if self._open:
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    def _close_status(self) -> tuple[int | None, str]:
        protocol = self._protocol
        sent, received = protocol.close_sent, protocol.close_rcvd
        # Report the side that started the handshake: our code when we closed
        # first (or failed), the peer's when it did (our echo is the same).
        if sent is not None and (received is None or protocol.close_rcvd_then_sent is False):
            return sent.code, sent.reason
        if received is not None:
            return received.code, received.reason
        return None, ""

    # asyncio.Protocol callbacks

    def data_received(self, data: bytes) -> None:
        if self._rx is not None:
            data = self._take_messages(data)
            if not data:
                return
        self._receive(data)

    def _take_messages(self, data: bytes) -> bytes:
        """Deliver the complete single-frame messages at the head of the stream
        and keep an incomplete one; return what websockets must parse.

        The common frame (masked, final, text or binary, no RSV bit, within
        ``max_message_bytes``) is parsed here: through websockets' parser it
        costs a generator chain, a Frame and an event list per message, more
        than the rest of a publish. A control frame goes to websockets whole
        (it answers pings and closes) and the fast path carries on if its
        parser is back at a frame boundary. Anything else (fragments, large
        or unmasked frames, a close in progress) ends the fast path for the
        connection, at a frame boundary: websockets parses the rest and
        fails the connection where the protocol says so.
        """
        buffered = self._rx
        buf = buffered + data if buffered else data
        pos, end = 0, len(buf)
        limit = self._server._options.max_message_bytes
        # The loop ends by break where websockets takes over, by return on an
        # incomplete frame, or (else) with fewer bytes left than any frame has.
        while end - pos >= 6:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            start = pos + 6
            if length == 127 or not second & 0x80 or first & 0x70:
                break  # 64-bit length, unmasked or RSV bits: websockets decides
            if length == 126:
                if end - pos < 8:
                    self._rx = buf[pos:]
                    return b""
                length = (buf[pos + 2] << 8) | buf[pos + 3]
                start = pos + 8
            if length > limit:
                break  # websockets closes with 1009
            stop = start + length
            if stop > end:
                self._rx = buf[pos:]
                return b""
            opcode = first & 0x0F
            if opcode >= 8:  # control frame
                self._receive(buf[pos:stop])
                pos = stop
                if self._local_close or not _at_frame_boundary(self._protocol):
                    break
                continue
            if not first & 0x80 or opcode not in (1, 2):
                break  # a fragment, or a reserved opcode
            payload = apply_mask(buf[start:stop], buf[start - 4 : start])
            pos = stop
            self._deliver(Opcode.TEXT if opcode == 1 else Opcode.BINARY, payload)
            if self._local_close:
                break
        else:
            self._rx = buf[pos:] if pos < end else b""
            return b""
        self._rx = None
        return buf[pos:]

    def _receive(self, data: bytes) -> None:
        protocol = self._protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        # Automatic replies (pong, close echo, EOF) go out before the app runs,
        # as websockets' own asyncio connection does.
        self._flush()
        if events:
            self._process(events)
        if protocol.close_expected():
            self._arm_close_timer()

    def eof_received(self) -> bool | None:
        self._protocol.receive_eof()
        self._flush()
        # None: let asyncio close the socket. WebSocket never writes after the
        # peer's EOF (and half-open TLS could not anyway).
        return None

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._slack = 0  # drained to the low-water mark: the big frames are out

    def connection_lost(self, exc: Exception | None) -> None:
        self._open = False
        self._local_close = True
        # Idempotent; moves the protocol to CLOSED so close codes are final.
        self._protocol.receive_eof()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        self._server._forget(self)
        code, reason = self._close_status()
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s: closed code=%s reason=%r exc=%r", self.remote_address, code, reason, exc
            )
        handler, self._handler = self._handler, _NO_HANDLER
        try:
            handler.on_closed(code, reason)
        except Exception:
            _log.error(
                "connection handler on_closed failed (%s)", self.remote_address, exc_info=True
            )


def _half_close(transport: asyncio.Transport) -> bool:
    """Send FIN after the buffered data; False if the socket is already going.

    Half-close rather than close: closing with unread input sends RST, which
    can destroy the response or close frame in flight. The peer answers our
    FIN with its own and asyncio then closes the socket (eof_received returns
    None); the caller's timer aborts a peer that never does.
    """
    if transport.is_closing():
        return False
    try:
        transport.write_eof()
    except (OSError, RuntimeError):  # uvloop raises RuntimeError on a closed handle
        transport.abort()
        return False
    return True


def _truncate_reason(reason: str) -> str:
    encoded = reason.encode()
    if len(encoded) <= _MAX_CLOSE_REASON_BYTES:
        return reason
    # errors="ignore" drops a multi-byte character cut in half.
    return encoded[:_MAX_CLOSE_REASON_BYTES].decode(errors="ignore")


# --- the HTTP phase ----------------------------------------------------------


class _HttpConnection(asyncio.Protocol):
    """Owns a socket from accept until its HTTP request is answered or upgraded."""

    __slots__ = (
        "_answered",
        "_first_data",
        "_remote_address",
        "_server",
        "_timer",
        "_transport",
        "_ws",
    )

    _transport: asyncio.Transport
    _remote_address: str
    _timer: asyncio.TimerHandle

    def __init__(self, server: Transport) -> None:
        self._server = server
        # websockets' protocol, made only for requests the fast path leaves to it.
        self._ws: ServerProtocol | None = None
        self._first_data = True
        # Refused early and half-closed: whatever else the client sends
        # (another request, pipelined or not) is ignored, never answered.
        self._answered = False

    @property
    def _protocol(self) -> ServerProtocol:
        if self._ws is None:
            self._ws = self._server._new_protocol()
        return self._ws

    def abort(self) -> None:
        self._transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        self._remote_address = _format_address(transport.get_extra_info("peername"))
        server = self._server
        self._timer = server._loop.call_later(server._options.open_timeout_s, self._on_open_timeout)
        server._handshakes.add(self)

    def data_received(self, data: bytes) -> None:
        if self._answered:
            return
        if self._first_data:
            self._first_data = False
            if self._answered_early(data):
                return
        protocol = self._protocol
        protocol.receive_data(data)
        events = protocol.events_received()
        for index, event in enumerate(events):
            if isinstance(event, Request):
                self._timer.cancel()
                self._handle_request(event, events[index + 1 :])
                return
        # No request: websockets may have queued an error response (414, 431)
        # or EOF for a malformed request.
        self._flush()

    def _answered_early(self, data: bytes) -> bool:
        """Answer an upgrade request without websockets' parser: refused from
        the request line alone when the app refuses upgrades anyway (draining,
        overloaded), upgraded when it is the plain request clients send
        (:func:`~signaling.handshake.parse_plain_upgrade`). False: websockets
        parses the request.

        Under a reconnect storm most upgrades are refused; parsing each one
        and serializing a ``Response`` cost several times what the refusal
        itself does. Plain HTTP (health checks, metrics) is never answered here.
        """
        server = self._server
        prefix = server._upgrade_prefix
        if not data.startswith(prefix) or data[len(prefix) : len(prefix) + 1] not in (b" ", b"?"):
            return False
        answer = server._upgrade_refusal()
        if answer is None:
            upgrade = parse_plain_upgrade(
                data,
                server._options.websocket_path,
                server._origins,
                extensions_ignored=server._extensions is None,
            )
            if upgrade is None:
                return False
            if not protobuf_requested(upgrade.path, None):
                self._timer.cancel()
                self._transport.write(switching_protocols(upgrade.accept))
                conn = self._upgrade(server._open_protocol(), upgrade.path, upgrade.headers)
                if conn is not None:
                    conn._attach_raw(upgrade.rest)
                return True
            answer = _protobuf_refusal(self._remote_address)
        self._timer.cancel()
        self._answered = True
        transport = self._transport
        transport.write(_raw_response(answer))
        if _half_close(transport):
            self._timer = server._loop.call_later(server._options.close_timeout_s, transport.abort)
        return True

    def eof_received(self) -> bool | None:
        if not self._answered:
            self._protocol.receive_eof()
            self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()
        self._server._handshakes.discard(self)

    def _on_open_timeout(self) -> None:
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: no complete HTTP request in time, aborting", self._remote_address)
        self._transport.abort()

    def _flush(self) -> None:
        transport = self._transport
        for data in self._protocol.data_to_send():
            if data:
                transport.write(data)
                continue
            self._timer.cancel()
            if _half_close(transport):
                self._timer = self._server._loop.call_later(
                    self._server._options.close_timeout_s, transport.abort
                )

    def _handle_request(self, request: Request, pending: list[Event]) -> None:
        server = self._server
        protocol = self._protocol
        if not _is_websocket_upgrade(request.headers):
            response = server._answer_http(request)
        elif request.path.partition("?")[0] != server._options.websocket_path:
            response = _http_response(404, b"Not Found\n")
        elif (rejection := server._websocket_rejection()) is not None:
            response = rejection
        elif protobuf_requested(request.path, request.headers.get("Sec-WebSocket-Protocol")):
            refusal = _protobuf_refusal(self._remote_address)
            response = _http_response(refusal.status, refusal.body, refusal.content_type)
        else:
            response = protocol.accept(request)
            if response.status_code == 101:
                protocol.send_response(response)
                self._flush()
                if not pending:
                    _release_handshake(protocol)
                conn = self._upgrade(protocol, request.path, _header_view(request.headers))
                if conn is not None:
                    conn._attach(pending)
                return
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug(
                "%s: %s %s -> %d (%s)",
                self._remote_address,
                request.method,
                request.path,
                response.status_code,
                protocol.handshake_exc,
            )
        protocol.send_response(response)
        self._flush()

    def _upgrade(
        self, protocol: ServerProtocol, path: str, headers: Mapping[str, str]
    ) -> WebSocketConnection | None:
        """Hand the socket to a new connection (the 101 is written) and the
        app; None if the app failed (the connection is closing)."""
        server = self._server
        transport = self._transport
        server._handshakes.discard(self)
        conn = WebSocketConnection(server, transport, protocol, path, headers, self._remote_address)
        # From here on the transport calls conn; this object is dropped.
        transport.set_protocol(conn)
        limit = server._options.send_buffer_max_bytes
        high = min(_WRITE_HIGH_WATER_BYTES, limit)
        transport.set_write_buffer_limits(high=high, low=high // 4)
        server._connections.add(conn)
        if _log.isEnabledFor(logging.DEBUG):
            _log.debug("%s: websocket opened %s", self._remote_address, path)
        try:
            handler = server._app.websocket_opened(conn)
        except Exception:
            _log.error("websocket_opened failed (%s)", self._remote_address, exc_info=True)
            conn.close(CloseCode.INTERNAL_ERROR, "internal error")
            return None
        conn.headers = _NO_HEADERS
        conn._handler = handler
        return conn


def _header_view(headers: Headers) -> RequestHeaders:
    """websockets' ``Headers`` as the app sees request headers: case-insensitive,
    a repeated field read as its values joined with ", " (RFC 9110 5.3).
    websockets' own ``Headers`` raises ``MultipleValuesError`` there instead,
    a ``LookupError`` that ``Mapping.get`` does not catch."""
    # Iterating Headers yields each lower-case name once.
    return RequestHeaders({name: ", ".join(headers.get_all(name)) for name in headers})


_NO_HEADERS: Mapping[str, str] = {}


def _release_handshake(protocol: ServerProtocol) -> None:
    """Let the handshake request be freed (≈ 2.5 KB per connection).

    websockets' ``ServerProtocol.parse`` generator keeps the ``Request`` in
    its frame for the connection's whole life. Once the handshake is done
    and nothing more is buffered, the frame parser is restarted from the base
    ``Protocol.parse``, which is exactly what the old generator would run
    next, without the request. Only with an empty buffer: the old generator
    is then waiting at the start of a frame, with nothing half-consumed.
    """
    if protocol.state is State.OPEN and not protocol.reader.buffer:
        protocol.parser = WsProtocol.parse(protocol)
        next(protocol.parser)


def _is_websocket_upgrade(headers: Headers) -> bool:
    return any("websocket" in value.lower() for value in headers.get_all("Upgrade"))


def _raw_response(answer: HttpResponse) -> bytes:
    """``answer`` as HTTP/1.1 bytes that close the connection (no Date header:
    optional on 5xx responses, RFC 9110 6.6.1)."""
    head = (
        f"HTTP/1.1 {answer.status} {_reason_phrase(answer.status)}\r\nConnection: close\r\n"
        f"Content-Length: {len(answer.body)}\r\nContent-Type: {answer.content_type}\r\n\r\n"
    )
    return head.encode("latin-1") + answer.body


def _reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


def _http_response(
    status: int, body: bytes, content_type: str = "text/plain; charset=utf-8"
) -> Response:
    phrase = _reason_phrase(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
        ]
    )
    return Response(status, phrase, headers, body)


def _format_address(peername: object) -> str:
    if isinstance(peername, tuple) and len(peername) >= 2:
        host, port = peername[0], peername[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "unknown"


# --- the server --------------------------------------------------------------


class Transport:
    """A listening WebSocket/HTTP server; create it with :func:`start_transport`."""

    __slots__ = (
        "_app",
        "_connections",
        "_extensions",
        "_handshakes",
        "_idle_waiter",
        "_loop",
        "_options",
        "_origins",
        "_server",
        "_serving",
        "_upgrade_prefix",
    )

    _server: asyncio.Server

    def __init__(
        self, app: TransportApp, options: TransportOptions, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._app = app
        self._options = options
        self._loop = loop
        # The start of an upgrade's request line, for refusals before parsing.
        self._upgrade_prefix = b"GET " + options.websocket_path.encode()
        self._connections: set[WebSocketConnection] = set()
        self._handshakes: set[_HttpConnection] = set()
        self._serving = True
        self._idle_waiter: asyncio.Future[None] | None = None
        # Shared by all connections. No subprotocols are configured: the
        # Centrifuge SDKs send none, and configuring one makes websockets
        # answer 400 to clients that don't offer it.
        self._extensions: list[ServerExtensionFactory] | None = None
        if options.compression:
            # websockets' own "modest" defaults (enable_server_permessage_deflate).
            self._extensions = [
                ServerPerMessageDeflateFactory(
                    server_max_window_bits=12,
                    client_max_window_bits=12,
                    compress_settings={"memLevel": 5},
                )
            ]
        # None in the list lets requests without Origin through.
        self._origins: list[Origin | None] | None = None
        if options.allowed_origins:
            self._origins = [*map(Origin, options.allowed_origins), None]

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (empty after :meth:`stop_accepting`)."""
        return tuple(self._server.sockets)

    @property
    def port(self) -> int:
        """The bound port of the first listening socket (useful with port 0)."""
        sockets = self.sockets
        if not sockets:
            raise RuntimeError("transport is not listening")
        return int(sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Open WebSocket connections, from the 101 until the socket is gone."""
        return len(self._connections)

    def stop_accepting(self) -> None:
        """Close the listening sockets; open connections stay open.

        Handshakes already in progress are answered 503.
        """
        if not self._serving:
            return
        self._serving = False
        self._server.close()
        _log.info("stopped accepting connections (%d open)", len(self._connections))

    async def wait_closed(self, timeout: float) -> None:
        """Stop accepting if not done yet; wait until every WebSocket is closed.

        After ``timeout`` seconds, abort the remaining connections and wait for
        their ``on_closed``. Then abort whatever HTTP exchange or handshake is
        still in flight. Does not start closing handshakes: close each
        connection first (e.g. 3001 shutdown).
        """
        self.stop_accepting()
        if self._connections:
            waiter = self._idle_waiter = self._loop.create_future()
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(waiter)
            except TimeoutError:
                count = len(self._connections)
                _log.info("aborting %d connections still open after %.1f s", count, timeout)
                for conn in list(self._connections):
                    conn.abort()
                try:
                    async with asyncio.timeout(_ABORT_GRACE_S):
                        await asyncio.shield(waiter)
                except TimeoutError:
                    _log.error("%d connections never reported connection_lost", count)
            finally:
                self._idle_waiter = None
        for pending in list(self._handshakes):
            pending.abort()
        # From Python 3.12 on, Server.wait_closed() also waits for every
        # accepted socket; bounded in case one is stuck.
        try:
            async with asyncio.timeout(_ABORT_GRACE_S):
                await self._server.wait_closed()
        except TimeoutError:
            _log.error("listening server did not close")

    # Internals used by the connection classes.

    def _new_connection(self) -> _HttpConnection:
        return _HttpConnection(self)

    def _open_protocol(self) -> ServerProtocol:
        """websockets' protocol for a connection whose handshake was done here
        (no extension, no subprotocol), its parser at the first frame."""
        protocol = ServerProtocol(
            state=OPEN, max_size=self._options.max_message_bytes, logger=_WEBSOCKETS_LOG
        )
        # Its parser would keep ServerProtocol.parse's frame for life too.
        _release_handshake(protocol)
        return protocol

    def _new_protocol(self) -> ServerProtocol:
        return ServerProtocol(
            origins=self._origins,
            extensions=self._extensions,
            max_size=self._options.max_message_bytes,
            logger=_WEBSOCKETS_LOG,
        )

    def _forget(self, conn: WebSocketConnection) -> None:
        self._connections.discard(conn)
        waiter = self._idle_waiter
        if not self._connections and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _answer_http(self, request: Request) -> Response:
        try:
            answer = self._app.handle_http(
                request.method, request.path, _header_view(request.headers)
            )
        except Exception:
            _log.error("handle_http failed for %s %s", request.method, request.path, exc_info=True)
            return _http_response(500, b"Internal Server Error\n")
        if answer is None:
            return _http_response(404, b"Not Found\n")
        response = _http_response(answer.status, answer.body, answer.content_type)
        if request.method == "HEAD":
            response.body = b""  # Content-Length still describes the GET body
        return response

    def _upgrade_refusal(self) -> HttpResponse | None:
        """The answer to an upgrade that is refused now, or None to admit it."""
        if not self._serving:
            # stop_accepting() raced with a handshake in progress.
            return HttpResponse(503, b"Server is shutting down.\n")
        try:
            return self._app.websocket_allowed()
        except Exception:
            _log.error("websocket_allowed failed", exc_info=True)
            return HttpResponse(500, b"Internal Server Error\n")

    def _websocket_rejection(self) -> Response | None:
        answer = self._upgrade_refusal()
        if answer is None:
            return None
        return _http_response(answer.status, answer.body, answer.content_type)


def _protobuf_refusal(remote_address: str) -> HttpResponse:
    # A client built for the protobuf format: its app cannot work here until it
    # is configured for JSON, which its operator should hear of (throttled: the
    # SDK keeps retrying).
    _protobuf_log.log(
        logging.WARNING,
        "%s: upgrade refused with 400: the client asks for the protobuf format "
        "(JSON only here: the Swift, Kotlin and Dart SDKs speak protobuf)",
        remote_address,
    )
    return HttpResponse(400, PROTOBUF_REFUSAL)


async def start_transport(
    app: TransportApp,
    host: str,
    port: int,
    options: TransportOptions,
    *,
    reuse_port: bool = False,
    sock: socket.socket | None = None,
) -> Transport:
    """Listen on ``host:port`` (or on ``sock``) and serve WebSocket and HTTP.

    Args:
        app: routes plain HTTP, admits upgrades and creates connection handlers.
        host, port: bind address; port 0 picks a free port (see ``Transport.port``).
            Ignored when ``sock`` is given.
        options: see :class:`TransportOptions`.
        reuse_port: set SO_REUSEPORT so several processes share the port.
        sock: an already bound socket to serve on instead.

    Raises:
        OSError: if binding fails.
    """
    loop = asyncio.get_running_loop()
    transport = Transport(app, options, loop)
    factory = transport._new_connection
    if sock is not None:
        server = await loop.create_server(factory, sock=sock, backlog=_LISTEN_BACKLOG)
    else:
        server = await loop.create_server(
            factory, host, port, reuse_port=reuse_port, backlog=_LISTEN_BACKLOG
        )
    transport._server = server
    _log.info(
        "listening on %s",
        ", ".join(_format_address(s.getsockname()) for s in server.sockets),
    )
    return transport
