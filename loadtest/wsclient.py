"""A lean RFC 6455 client: one ``asyncio.Protocol`` per connection, no task, no queue.

Why not ``websockets.asyncio.client``: a load generator has to hold tens of thousands
of connections and parse ~100k frames/s on one core. The library's asyncio client keeps
a reader task, a message assembler and a send lock per connection; here a connection is
one small object with ``__slots__`` and frames are cut out of the receive buffer in a
plain loop (server frames are never masked, so there is nothing to unmask). The README
(§ Client backends) has the measurement that made this the default; the library client
is still available as ``--backend websockets`` (:mod:`loadtest.wsclient_websockets`).

What it implements: the opening handshake (with ``Sec-WebSocket-Accept`` checked, no
extensions offered, so never compression), text/binary/continuation frames, ping → pong,
the closing handshake, masking of client frames. What it does not: TLS, proxies.

Arrival stamps (``open_raw(..., stamped=True)``): after the handshake the connection's
frames are read by this module with ``recvmsg`` and ``SO_TIMESTAMPNS``, so each read
carries the kernel's time of arrival of its last segment (``RawWebSocket.arrived_ns``,
unix ns; ``stamp_shared`` when the read held a later frame too). A delivery's latency
to that moment leaves out the client's own queue: a worker reads a publication's 1,000
deliveries one after another, and on a machine of 2 cores that reading, not the
server, decides the p99 measured after it (loadtest/README.md, "Arrival stamps").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import random
import socket
import struct
import time
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

__all__ = [
    "ABNORMAL_CLOSE",
    "HandshakeError",
    "MessageHandler",
    "RawWebSocket",
    "connect_socket",
    "open_raw",
    "split_url",
]

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ABNORMAL_CLOSE: Final = 1006  # no close frame received (RFC 6455 7.1.5)
_NO_STATUS: Final = 1005
# Linux: bind() to an address with port 0 but let connect() pick the port for the full
# 4-tuple, so one source address is not limited to one set of ~28k ephemeral ports.
_IP_BIND_ADDRESS_NO_PORT: Final = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_MAX_HANDSHAKE_BYTES: Final = 16384
# Linux's SO_TIMESTAMPNS (= its control message type SCM_TIMESTAMPNS); Python's socket
# module does not name it. The stamp is a struct timespec of two longs.
_SO_TIMESTAMPNS: Final = 35
_TIMESPEC: Final = struct.Struct("@qq")
_STAMP_CONTROL_BYTES: Final = socket.CMSG_SPACE(_TIMESPEC.size)
_STAMPED_READ_BYTES: Final = 262144  # what uvloop reads at once


class HandshakeError(Exception):
    """The server did not switch protocols (status line or accept key wrong)."""


class MessageHandler(Protocol):
    def on_text(self, payload: bytes) -> None:
        """A complete text (or binary) message."""

    def on_closed(self, code: int, reason: str) -> None:
        """The connection is gone; ``code`` is 1006 when no close frame came."""


def split_url(url: str) -> tuple[str, int, str]:
    """``ws://host:port/path`` → (host, port, path with query)."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise ValueError(f"only ws:// URLs are supported, got {url!r}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return host, port, path


async def connect_socket(host: str, port: int, source: str | None) -> socket.socket:
    """A connected non-blocking TCP socket, bound to ``source`` when given."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source is not None:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        await loop.sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def ack_on_read(transport: asyncio.BaseTransport) -> None:
    """Put the connection's socket back in the kernel's bulk-receive ACK mode.

    A socket that sent something soon after receiving (a request answered, a
    pong) is taken for an interactive session and delays its ACKs, hoping to
    piggyback them on its next message. A subscriber has no next message: its
    ACK then goes out when the server's next frame arrives, and on one machine
    that frame's arrival runs inside the server's ``write()``: the client's
    ACK and the server's handling of it are billed to the server. A Centrifuge
    client has sent connect and subscribe; the baseline's has sent nothing since
    its upgrade, so the same delivery cost digis-signal one ACK round more per
    two frames (loadtest/README.md, "Client ACKs"). ``TCP_QUICKACK`` ends the
    interactive guess: ACKs go out when the client reads, on the client's CPU,
    for every server alike. Called when the measured phase starts and after
    each pong.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)


def _frame_end(buf: bytes) -> int | None:
    """The length of the frame that ``buf`` begins (a server frame: never masked),
    or None while its header is incomplete."""
    have = len(buf)
    if have < 2:
        return None
    code = buf[1] & 0x7F
    if code == 126:
        return 4 + int.from_bytes(buf[2:4], "big") if have >= 4 else None
    if code == 127:
        return 10 + int.from_bytes(buf[2:10], "big") if have >= 10 else None
    return 2 + code


def _mask(payload: bytes, key: int) -> bytes:
    """XOR ``payload`` with the 4-byte ``key`` repeated, via one big-int XOR."""
    n = len(payload)
    if n == 0:
        return b""
    repeated = key.to_bytes(4, "big") * ((n + 3) // 4)
    masked = int.from_bytes(payload, "big") ^ int.from_bytes(repeated[:n], "big")
    return masked.to_bytes(n, "big")


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, unfragmented client frame (RFC 6455 5.2-5.3)."""
    key = random.getrandbits(32)
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return header + key.to_bytes(4, "big") + _mask(payload, key)


class RawWebSocket(asyncio.Protocol):
    """One client connection. Create with :func:`open_raw`."""

    __slots__ = (
        "_buf",
        "_fragments",
        "_key",
        "_opened",
        "_own",
        "_request",
        "_stamped",
        "arrived_ns",
        "close_code",
        "close_reason",
        "handler",
        "is_open",
        "stamp_shared",
        "transport",
    )

    def __init__(
        self, request: bytes, key: bytes, handler: MessageHandler, stamped: bool = False
    ) -> None:
        self._request = request
        self._key = key
        self._buf = b""
        self._fragments: list[bytes] | None = None
        self._opened: asyncio.Future[None] | None = asyncio.get_running_loop().create_future()
        self._stamped = stamped
        # Our own handle on the socket while we read it (arrival stamps), else None.
        self._own: socket.socket | None = None
        # Kernel arrival time (unix ns) of the data being handled; 0 without stamps.
        self.arrived_ns = 0
        # That read held more than the frame it completes: the stamp is a later
        # frame's arrival, an upper bound (RawWebSocket._read_own).
        self.stamp_shared = False
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.is_open = False
        self.close_code = ABNORMAL_CLOSE
        self.close_reason = ""

    # --- sending ---------------------------------------------------------------

    def send_text(self, payload: bytes) -> None:
        """Send one text message; dropped once the connection is closing."""
        if self.is_open and self.transport is not None:
            self.transport.write(_client_frame(0x1, payload))

    def ack_on_read(self) -> None:
        """Acknowledge what arrives when it is read (see :func:`ack_on_read`)."""
        if self.transport is not None:
            ack_on_read(self.transport)

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake (the server's close frame ends it)."""
        if self.is_open and self.transport is not None:
            self.is_open = False
            self.transport.write(_client_frame(0x8, code.to_bytes(2, "big")))
            # Don't wait forever for the server's answer.
            asyncio.get_running_loop().call_later(2.0, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # --- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but behave as one.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self._request)
        self._request = b""

    def data_received(self, data: bytes) -> None:
        if self._opened is not None:
            self._handshake(data)
            return
        if self._buf:
            data = self._buf + data
            self._buf = b""
        self._frames(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_open = False
        self._stop_own_reading()
        if self._opened is not None:
            if not self._opened.done():
                self._opened.set_exception(exc or ConnectionResetError("closed during handshake"))
            self._opened = None
            return
        self.handler.on_closed(self.close_code, self.close_reason)

    # --- internals -----------------------------------------------------------------

    def _handshake(self, data: bytes) -> None:
        assert self._opened is not None
        buf = self._buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HANDSHAKE_BYTES:
                self._fail_handshake("response headers too large")
            else:
                self._buf = buf
            return
        head, rest = buf[:end].decode("latin-1"), buf[end + 4 :]
        self._buf = b""
        lines = head.split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            self._fail_handshake(f"HTTP status {' '.join(status[1:]) or '?'}")
            return
        accept = ""
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-accept":
                accept = value.strip()
        expected = base64.b64encode(hashlib.sha1(self._key + _GUID).digest()).decode()
        if accept != expected:
            self._fail_handshake("bad Sec-WebSocket-Accept")
            return
        opened, self._opened = self._opened, None
        self.is_open = True
        if self._stamped:
            self._start_own_reading()
        if not opened.done():
            opened.set_result(None)
        if rest:
            self._frames(rest)

    def _start_own_reading(self) -> None:
        """Read the socket ourselves from now on, with arrival stamps: a duplicate of
        its descriptor is watched by the loop, the transport's reading paused for good
        (it still writes). Bytes the transport already read were handed over with the
        handshake, in the same callback."""
        transport = self.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        if transport is None or sock is None:
            return
        own = socket.socket(fileno=os.dup(sock.fileno()))
        try:
            own.setblocking(False)
            own.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
            transport.pause_reading()
            asyncio.get_running_loop().add_reader(own.fileno(), self._read_own)
        except BaseException:
            own.close()
            raise
        self._own = own

    def _stop_own_reading(self) -> None:
        own, self._own = self._own, None
        if own is not None:
            asyncio.get_running_loop().remove_reader(own.fileno())
            own.close()

    def _read_own(self) -> None:
        own = self._own
        if own is None:
            return
        try:
            data, control, _, _ = own.recvmsg(_STAMPED_READ_BYTES, _STAMP_CONTROL_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF or reset: the transport ends the connection as usual
            self._stop_own_reading()
            if self.transport is not None:
                self.transport.abort()
            return
        arrived = 0
        for level, kind, value in control:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                arrived = seconds * 1_000_000_000 + nanoseconds
        self.arrived_ns = arrived or time.time_ns()
        # A stamp is the arrival of the last segment a read took, and the kernel
        # merges segments that wait in the socket, the later's arrival kept: frames
        # read together share the latest stamp, an upper bound for all but the last.
        # A read that holds more than the frame it starts or completes is marked.
        buffered = self._buf
        end = _frame_end(buffered + data[:10] if len(buffered) < 10 else buffered)
        self.stamp_shared = end is not None and len(buffered) + len(data) > end
        self.data_received(data)

    def _fail_handshake(self, why: str) -> None:
        assert self._opened is not None
        if not self._opened.done():
            self._opened.set_exception(HandshakeError(why))
        if self.transport is not None:
            self.transport.abort()

    def _frames(self, data: bytes) -> None:
        pos = 0
        n = len(data)
        handler = self.handler
        while n - pos >= 2:
            b0 = data[pos]
            length = data[pos + 1] & 0x7F
            start = pos + 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 4], "big")
                start = pos + 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(data[pos + 2 : pos + 10], "big")
                start = pos + 10
            end = start + length
            if end > n:
                break
            payload = data[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == 0x1 or opcode == 0x2:
                if b0 & 0x80:
                    handler.on_text(payload)
                else:
                    self._fragments = [payload]
            elif opcode == 0x0:
                if self._fragments is not None:
                    self._fragments.append(payload)
                    if b0 & 0x80:
                        whole = b"".join(self._fragments)
                        self._fragments = None
                        handler.on_text(whole)
            elif opcode == 0x9:  # ping (websockets' keepalive in the baseline)
                if self.transport is not None and self.is_open:
                    self.transport.write(_client_frame(0xA, payload))
                    ack_on_read(self.transport)
            elif opcode == 0x8:
                self._on_close_frame(payload)
                return
            # 0xA pong: nothing to do
        if pos < n:
            self._buf = data[pos:]

    def _on_close_frame(self, payload: bytes) -> None:
        if len(payload) >= 2:
            self.close_code = int.from_bytes(payload[:2], "big")
            self.close_reason = payload[2:].decode("utf-8", "replace")
        else:
            self.close_code = _NO_STATUS
        if self.transport is not None:
            if self.is_open:
                # Echo the close (RFC 6455 5.5.1); the server then closes TCP.
                self.transport.write(_client_frame(0x8, payload[:2]))
            self.is_open = False
            # The server closes TCP first after a close exchange; don't linger if not.
            asyncio.get_running_loop().call_later(2.0, self.transport.abort)


async def open_raw(
    url: str, source: str | None, handler: MessageHandler, timeout: float, stamped: bool = False
) -> RawWebSocket:
    """Connect (TCP + opening handshake) and return the open connection; ``stamped``:
    read it with arrival stamps (module docstring)."""
    host, port, path = split_url(url)
    loop = asyncio.get_running_loop()
    key = base64.b64encode(os.urandom(16))
    request = (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\nUser-Agent: digis-signal-loadtest\r\n\r\n"
    ).encode()
    async with asyncio.timeout(timeout):
        # The event loop connects (not loop.sock_connect + sock=): under uvloop, a
        # sock_connect cancelled by the time-out while the fd number is reused raises
        # "File descriptor N is used by transport" inside the cancel and leaves the task
        # pending forever (seen in reconnect storms of 20,000). Loses
        # IP_BIND_ADDRESS_NO_PORT: each source address's ports are then shared by all
        # destinations (~28k per address; 4 addresses cover 100,000 connections).
        _, proto = await loop.create_connection(
            lambda: RawWebSocket(request, key, handler, stamped),
            host,
            port,
            local_addr=(source, 0) if source is not None else None,
        )
        opened = proto._opened
        try:
            if opened is not None:
                await opened
        except BaseException:
            proto.abort()
            raise
    return proto
