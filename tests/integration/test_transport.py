"""Integration tests for signaling.transport: real sockets on 127.0.0.1, real clients.

Every scenario runs on the default asyncio loop and on uvloop. Scenarios are
plain coroutines wrapped by :func:`scenario` into a sync test that owns its own
``asyncio.Runner``, so the loop choice stays local to this file (no conftest
hook that would change other tests' loops).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any

import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.typing import Origin

from signaling.transport import (
    _HOLD_MAX_FRAMES,
    ConnectionHandler,
    HttpResponse,
    Transport,
    TransportOptions,
    WebSocketConnection,
    encode_text_frame,
    start_transport,
)

# One scalable time unit (websockets' tests/utils.py MS): raise the factor on a
# slow CI machine instead of editing timeouts.
MS = 0.001 * float(os.environ.get("SIGNAL_TEST_TIME_FACTOR", "1"))
SCENARIO_TIMEOUT = 5000 * MS

LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {
    "asyncio": None,  # the default loop of asyncio.Runner
    "uvloop": uvloop.new_event_loop,
}

Scenario = Callable[[], Coroutine[Any, Any, None]]


def scenario(fn: Scenario) -> Callable[[str], None]:
    """Turn an async scenario into a sync test parametrised over both loops."""

    def test(loop_name: str) -> None:
        with asyncio.Runner(loop_factory=LOOP_FACTORIES[loop_name]) as runner:
            runner.run(asyncio.wait_for(fn(), SCENARIO_TIMEOUT))

    test.__name__ = test.__qualname__ = fn.__name__
    test.__doc__ = fn.__doc__
    return pytest.mark.parametrize("loop_name", list(LOOP_FACTORIES))(test)


# --- a tiny echo application ------------------------------------------------------


class EchoSession:
    """Echoes text; ``close CODE REASON`` closes, ``raise`` raises."""

    def __init__(self, conn: WebSocketConnection) -> None:
        self.conn = conn
        # Headers are only available while the app opens the connection.
        self.headers = dict(conn.headers.items())
        self.header_view = conn.headers
        self.texts: list[bytes] = []
        self.binaries: list[bytes] = []
        self.closed: asyncio.Future[tuple[int | None, str]] = (
            asyncio.get_running_loop().create_future()
        )
        self.on_closed_calls = 0

    def on_text(self, data: bytes) -> None:
        self.texts.append(data)
        if data == b"raise":
            raise RuntimeError("handler bug")
        if data.startswith(b"close "):
            _, code, reason = data.decode().split(" ", 2)
            self.conn.close(int(code), reason)
            return
        self.conn.send_text(data)

    def on_binary(self, data: bytes) -> None:
        self.binaries.append(data)

    def on_closed(self, code: int | None, reason: str) -> None:
        self.on_closed_calls += 1
        if not self.closed.done():
            self.closed.set_result((code, reason))


class EchoApp:
    def __init__(self) -> None:
        self.sessions: asyncio.Queue[EchoSession] = asyncio.Queue()
        self.all_sessions: list[EchoSession] = []
        self.http_requests: list[tuple[str, str, Mapping[str, str]]] = []
        self.rejection: HttpResponse | None = None
        self.slow_clients = 0

    def handle_http(
        self, method: str, path: str, headers: Mapping[str, str]
    ) -> HttpResponse | None:
        self.http_requests.append((method, path, headers))
        if path.partition("?")[0] == "/healthz":
            return HttpResponse(200, b"ok\n")
        return None

    def websocket_allowed(self) -> HttpResponse | None:
        return self.rejection

    def websocket_opened(self, conn: WebSocketConnection) -> ConnectionHandler:
        if conn.path.endswith("?explode"):
            raise RuntimeError("app bug")
        session = EchoSession(conn)
        self.all_sessions.append(session)
        self.sessions.put_nowait(session)
        return session

    def on_slow(self) -> None:
        self.slow_clients += 1


@asynccontextmanager
async def serving(**overrides: Any) -> AsyncIterator[tuple[Transport, EchoApp]]:
    app = EchoApp()
    settings: dict[str, Any] = {
        "open_timeout_s": 1000 * MS,
        "close_timeout_s": 500 * MS,
        "on_slow_client": app.on_slow,
    }
    settings.update(overrides)
    transport = await start_transport(app, "127.0.0.1", 0, TransportOptions(**settings))
    try:
        yield transport, app
    finally:
        transport.stop_accepting()
        for session in app.all_sessions:
            session.conn.close(3001, "shutdown")
        await transport.wait_closed(1000 * MS)


def ws_uri(transport: Transport, path: str = "/connection/websocket") -> str:
    return f"ws://127.0.0.1:{transport.port}{path}"


async def next_session(app: EchoApp) -> EchoSession:
    return await asyncio.wait_for(app.sessions.get(), 1000 * MS)


async def close_code(ws: ClientConnection) -> int | None:
    """Wait until the server closes ``ws``; return the close code it sent."""
    with pytest.raises(ConnectionClosedError) as info:
        while True:
            await ws.recv()
    return info.value.rcvd.code if info.value.rcvd is not None else None


async def http_request(
    transport: Transport, request_line: str, *headers: str
) -> tuple[int, dict[str, str], bytes]:
    """Send one raw HTTP request; read the response until the server's EOF."""
    reader, writer = await asyncio.open_connection("127.0.0.1", transport.port)
    head = "\r\n".join([request_line, "Host: 127.0.0.1", *headers, "", ""])
    writer.write(head.encode())
    raw = await asyncio.wait_for(reader.read(), 1000 * MS)
    writer.close()
    await writer.wait_closed()
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    status_line, *header_lines = head_bytes.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split(" ")[1]), {k.lower(): v for k, v in fields.items()}, body


def upgrade_headers() -> list[str]:
    key = base64.b64encode(os.urandom(16)).decode()
    return [
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]


async def raw_websocket(transport: Transport) -> socket.socket:
    """A WebSocket client that completes the handshake and then never reads.

    A small receive buffer makes the kernel stop accepting data early.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", transport.port))
    request = "\r\n".join(
        ["GET /connection/websocket HTTP/1.1", "Host: 127.0.0.1", *upgrade_headers(), "", ""]
    )
    await loop.sock_sendall(sock, request.encode())
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = await loop.sock_recv(sock, 1)  # byte by byte: read nothing past the 101
        assert chunk, "server closed during handshake"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101 ")
    return sock


class LogRecorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


# --- frames -------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70000])
def test_encode_text_frame_matches_websockets(length: int) -> None:
    payload = b"a" * length
    expected = Frame(Opcode.TEXT, payload).serialize(mask=False)
    assert encode_text_frame(payload) == expected


# --- handshake and messages -------------------------------------------------------


@scenario
async def test_handshake_and_echo() -> None:
    repeated = [("X-Forwarded-For", "10.0.0.1"), ("X-Forwarded-For", "10.0.0.2")]
    async with (
        serving() as (transport, app),
        connect(ws_uri(transport), additional_headers=repeated) as ws,
    ):
        session = await next_session(app)
        assert transport.connections == 1
        assert session.conn.path == "/connection/websocket"
        view = session.header_view
        assert view["Sec-WebSocket-Version"] == "13"
        assert view.get("x-forwarded-for") == "10.0.0.1, 10.0.0.2"
        assert view.get("x-missing") is None
        assert "upgrade" in view
        # Released after websocket_opened (the handshake request is freed).
        assert dict(session.conn.headers) == {}
        assert session.conn.remote_address.startswith("127.0.0.1:")
        await ws.send('{"id":1}')
        assert await ws.recv() == '{"id":1}'
        assert session.texts == [b'{"id":1}']
        # The query string is ignored for routing and kept in conn.path.
        async with connect(ws_uri(transport, "/connection/websocket?format=json")) as ws2:
            second = await next_session(app)
            assert second.conn.path == "/connection/websocket?format=json"
            await ws2.send("two")
            assert await ws2.recv() == "two"


@scenario
async def test_several_connections_are_independent() -> None:
    async with serving() as (transport, _app):
        clients = [await connect(ws_uri(transport)) for _ in range(5)]
        for index, ws in enumerate(clients):
            await ws.send(f"message {index}")
        for index, ws in enumerate(clients):
            assert await ws.recv() == f"message {index}"
        assert transport.connections == 5
        for ws in clients:
            await ws.close()
        await transport.wait_closed(1000 * MS)
        assert transport.connections == 0


@scenario
async def test_fragmented_messages_are_reassembled() -> None:
    async with serving() as (transport, app), connect(ws_uri(transport)) as ws:
        session = await next_session(app)
        await ws.send(["frag", "ment", "ed ✓"])
        assert await ws.recv() == "fragmented ✓"
        await ws.send([b"\x00\x01", b"\x02"])
        await (await ws.ping())  # the pong comes after the server processed the fragments
        assert session.texts == ["fragmented ✓".encode()]
        assert session.binaries == [b"\x00\x01\x02"]


def client_frame(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin=fin).serialize(mask=True, extensions=[])


async def read_server_frames(sock: socket.socket, count: int) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the next ``count`` frames the server sends."""
    loop = asyncio.get_running_loop()
    buf, frames = b"", []
    while len(frames) < count:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 1000 * MS)
        assert chunk, "server closed"
        buf += chunk
        while len(buf) >= 2:
            length, start = buf[1] & 0x7F, 2
            if length == 126:
                length, start = int.from_bytes(buf[2:4], "big"), 4
            if len(buf) < start + length:
                break
            frames.append((buf[0] & 0x0F, buf[start : start + length]))
            buf = buf[start + length :]
    return frames


@scenario
async def test_frames_split_anywhere_are_delivered_in_order() -> None:
    """Messages are parsed by the transport's fast path whatever the TCP
    segmentation; a ping in between is answered by websockets, and a
    fragmented message (which websockets then reassembles, and every message
    after it) arrives in order too."""
    for chunk_size in (1, 2, 5, 7, 64, 100_000):
        await split_frames_scenario(chunk_size)


async def split_frames_scenario(chunk_size: int) -> None:
    async with serving() as (transport, app):
        sock = await raw_websocket(transport)
        loop = asyncio.get_running_loop()
        try:
            session = await next_session(app)
            stream = b"".join(
                [
                    client_frame(Opcode.TEXT, b"one"),
                    client_frame(Opcode.TEXT, b""),
                    client_frame(Opcode.PING, b"are you there"),
                    client_frame(Opcode.TEXT, "x✓".encode() * 100),  # 16-bit length
                    client_frame(Opcode.BINARY, b"\x00\x01"),
                ]
            )
            for i in range(0, len(stream), chunk_size):
                await loop.sock_sendall(sock, stream[i : i + chunk_size])
            frames = await read_server_frames(sock, 4)
            assert frames == [
                (Opcode.TEXT.value, b"one"),
                (Opcode.TEXT.value, b""),
                (Opcode.PONG.value, b"are you there"),
                (Opcode.TEXT.value, "x✓".encode() * 100),
            ]
            assert session.binaries == [b"\x00\x01"]
            # Still on the fast path after the ping (websockets parses it whole).
            assert session.conn._rx is not None
            stream = b"".join(
                [
                    client_frame(Opcode.TEXT, b"frag", fin=False),
                    client_frame(Opcode.CONT, b"mented"),
                    client_frame(Opcode.TEXT, b"after"),
                ]
            )
            for i in range(0, len(stream), chunk_size):
                await loop.sock_sendall(sock, stream[i : i + chunk_size])
            frames = await read_server_frames(sock, 2)
            assert frames == [(Opcode.TEXT.value, b"fragmented"), (Opcode.TEXT.value, b"after")]
            assert session.conn._rx is None  # websockets parses from the fragment on
        finally:
            sock.close()


@scenario
async def test_request_and_first_frame_in_one_write() -> None:
    """A client that sends its first message right behind the upgrade request
    (in the same TCP segment) gets it delivered; so does one whose request
    arrives in pieces (websockets parses that one)."""
    loop = asyncio.get_running_loop()
    async with serving() as (transport, app):
        request = "\r\n".join(
            ["GET /connection/websocket HTTP/1.1", "Host: 127.0.0.1", *upgrade_headers(), "", ""]
        ).encode()
        for pieces in (
            [request + client_frame(Opcode.TEXT, b"early")],
            [request[:20], request[20:]],
        ):
            sock = socket.create_connection(("127.0.0.1", transport.port))
            sock.setblocking(False)
            try:
                for piece in pieces:
                    await loop.sock_sendall(sock, piece)
                    await asyncio.sleep(0.01)
                if len(pieces) > 1:
                    await loop.sock_sendall(sock, client_frame(Opcode.TEXT, b"early"))
                response = b""
                while b"\r\n\r\n" not in response:
                    response += await loop.sock_recv(sock, 1)
                assert response.startswith(b"HTTP/1.1 101 ")
                assert await read_server_frames(sock, 1) == [(Opcode.TEXT.value, b"early")]
                session = await next_session(app)
                assert session.conn._rx is not None  # on the fast path
            finally:
                sock.close()


@scenario
async def test_binary_message_goes_to_on_binary() -> None:
    async with serving() as (transport, app), connect(ws_uri(transport)) as ws:
        session = await next_session(app)
        await ws.send(b"\xff\x00binary")
        await (await ws.ping())
        assert session.binaries == [b"\xff\x00binary"]
        assert session.texts == []


@scenario
async def test_oversized_message_closes_with_1009() -> None:
    async with serving(max_message_bytes=1000) as (transport, app):
        async with connect(ws_uri(transport)) as ws:
            session = await next_session(app)
            await ws.send("x" * 1000)  # exactly the limit is fine
            assert await ws.recv() == "x" * 1000
            await ws.send("x" * 1001)
            assert await close_code(ws) == 1009
        assert (await session.closed)[0] == 1009
        # The limit counts all fragments of a message together.
        async with connect(ws_uri(transport)) as ws:
            await ws.send(["x" * 600, "x" * 600])
            assert await close_code(ws) == 1009


@scenario
async def test_invalid_utf8_text_closes_with_1007() -> None:
    async with serving() as (transport, app), connect(ws_uri(transport)) as ws:
        session = await next_session(app)
        await ws.send(b"\xff\xfe", text=True)
        assert await close_code(ws) == 1007
        assert session.texts == []


@scenario
async def test_peer_close_reaches_on_closed_once() -> None:
    async with serving() as (transport, app):
        async with connect(ws_uri(transport)) as ws:
            session = await next_session(app)
            await ws.close(1000, "bye")
        assert await session.closed == (1000, "bye")
        await transport.wait_closed(1000 * MS)
        assert transport.connections == 0
        assert session.conn.closed
        assert session.on_closed_calls == 1


@scenario
async def test_abrupt_disconnect_reports_no_code() -> None:
    async with serving() as (transport, app):
        sock = await raw_websocket(transport)
        session = await next_session(app)
        sock.close()  # no close frame
        assert await session.closed == (None, "")
        assert session.on_closed_calls == 1
        assert transport.connections == 0


@scenario
async def test_server_close_sends_code_and_reason() -> None:
    async with serving() as (transport, app), connect(ws_uri(transport)) as ws:
        session = await next_session(app)
        await ws.send("close 3001 shutdown")
        with pytest.raises(ConnectionClosedError) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert (info.value.rcvd.code, info.value.rcvd.reason) == (3001, "shutdown")
        assert await session.closed == (3001, "shutdown")
        # Idempotent, and sends after close are dropped without error.
        session.conn.close(3002, "again")
        session.conn.write_frame(encode_text_frame(b"late"))
        session.conn.send_text(b"late")
        assert session.on_closed_calls == 1


@scenario
async def test_close_rejects_invalid_code_and_truncates_reason() -> None:
    async with serving() as (transport, app), connect(ws_uri(transport)) as ws:
        session = await next_session(app)
        with pytest.raises(ValueError):
            session.conn.close(1006, "reserved")
        assert not session.conn.closed
        session.conn.close(3500, "é" * 100)  # 200 bytes: cut to 122, whole characters
        with pytest.raises(ConnectionClosedError) as info:
            await ws.recv()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 3500
        assert info.value.rcvd.reason == "é" * 61


@scenario
async def test_handler_error_closes_1011_and_spares_others() -> None:
    recorder = LogRecorder()
    logger = logging.getLogger("signaling.transport")
    logger.addHandler(recorder)
    try:
        async with (
            serving() as (transport, app),
            connect(ws_uri(transport)) as bad,
            connect(ws_uri(transport)) as good,
        ):
            await next_session(app)
            await next_session(app)
            await bad.send("raise")
            assert await close_code(bad) == 1011
            await good.send("still here")
            assert await good.recv() == "still here"
    finally:
        logger.removeHandler(recorder)
    errors = [r for r in recorder.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None


@scenario
async def test_websocket_opened_error_closes_1011() -> None:
    async with serving() as (transport, _app):
        async with connect(ws_uri(transport, "/connection/websocket?explode")) as ws:
            assert await close_code(ws) == 1011
        async with connect(ws_uri(transport)) as ws:
            await ws.send("fine")
            assert await ws.recv() == "fine"


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        TransportOptions(websocket_path="connection/websocket")
    with pytest.raises(ValueError):
        TransportOptions(close_timeout_s=0)


# --- HTTP on the same port -------------------------------------------------------


@scenario
async def test_plain_http_goes_to_the_app() -> None:
    async with serving() as (transport, app):
        status, headers, body = await http_request(transport, "GET /healthz?full=1 HTTP/1.1")
        assert (status, body) == (200, b"ok\n")
        assert headers["connection"] == "close"
        assert headers["content-type"] == "text/plain; charset=utf-8"
        method, path, request_headers = app.http_requests[0]
        assert (method, path, request_headers["host"]) == ("GET", "/healthz?full=1", "127.0.0.1")

        status, headers, body = await http_request(transport, "HEAD /healthz HTTP/1.1")
        assert (status, headers["content-length"], body) == (200, "3", b"")

        status, _, _ = await http_request(transport, "GET /nope HTTP/1.1")
        assert status == 404
        # Without an Upgrade header the WebSocket path is plain HTTP too.
        status, _, _ = await http_request(transport, "GET /connection/websocket HTTP/1.1")
        assert status == 404


@scenario
async def test_upgrade_on_another_path_is_404() -> None:
    async with serving() as (transport, app):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_uri(transport, "/elsewhere")):
                pass
        assert info.value.response.status_code == 404
        assert app.http_requests == []


@scenario
async def test_bad_handshake_gets_websockets_answer() -> None:
    async with serving() as (transport, _app):
        headers = [h for h in upgrade_headers() if not h.startswith("Sec-WebSocket-Key")]
        status, _, _ = await http_request(transport, "GET /connection/websocket HTTP/1.1", *headers)
        assert status == 400
        assert transport.connections == 0


@scenario
async def test_websocket_allowed_can_reject() -> None:
    async with serving() as (transport, app):
        app.rejection = HttpResponse(503, b"draining\n")
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_uri(transport)):
                pass
        assert info.value.response.status_code == 503
        assert info.value.response.body == b"draining\n"


@scenario
async def test_more_bytes_after_an_early_refusal_are_ignored() -> None:
    """A refused upgrade (draining, overloaded) is answered from its request
    line and the socket half-closed: another request on it (pipelined, or a
    health check on the same connection) is ignored, not answered after the
    EOF, which raised in data_received (uvloop: "Fatal error on transport")."""
    failures: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    try:
        async with serving() as (transport, app):
            app.rejection = HttpResponse(503, b"draining\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", transport.port)
            request = "\r\n".join(
                ["GET /connection/websocket HTTP/1.1", "Host: x", *upgrade_headers(), "", ""]
            )
            writer.write(request.encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 503")
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" + b"x" * 70000)
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 2.0)
            assert b"HTTP/1.1" not in rest  # nothing answered after the refusal
            writer.close()
            await asyncio.sleep(0.05)
    finally:
        loop.set_exception_handler(previous)
    assert failures == []


@scenario
async def test_origin_allow_list() -> None:
    async with serving(allowed_origins=("https://app.example",)) as (transport, _app):
        async with connect(ws_uri(transport), origin=Origin("https://app.example")) as ws:
            await ws.send("allowed")
            assert await ws.recv() == "allowed"
        async with connect(ws_uri(transport)) as ws:  # mobile SDKs send no Origin
            await ws.send("no origin")
            assert await ws.recv() == "no origin"
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_uri(transport), origin=Origin("https://evil.example")):
                pass
        assert info.value.response.status_code == 403


# --- compression --------------------------------------------------------------------


@scenario
async def test_compression_off_declines_permessage_deflate() -> None:
    async with serving() as (transport, app), connect(ws_uri(transport)) as ws:  # offers deflate
        session = await next_session(app)
        assert ws.response is not None
        assert "Sec-WebSocket-Extensions" not in ws.response.headers
        session.conn.write_frame(encode_text_frame(b"shared"))
        assert await ws.recv() == "shared"


@scenario
async def test_compression_on_negotiates_and_write_frame_still_works() -> None:
    async with serving(compression=True) as (transport, app):
        async with connect(ws_uri(transport)) as ws:
            session = await next_session(app)
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers["Sec-WebSocket-Extensions"]
            payloads = (b"short", b"m" * 300, b"l" * 70000)  # all three header sizes
            for payload in payloads:
                session.conn.write_frame(encode_text_frame(payload))
                assert await ws.recv() == payload.decode()
            # Frames back to back in one call (the hub's run of publications):
            # each is compressed and arrives as its own message.
            session.conn.write_frame(b"".join(encode_text_frame(p) for p in payloads))
            for payload in payloads:
                assert await ws.recv() == payload.decode()
            await ws.send("compressed echo " * 20)
            assert await ws.recv() == "compressed echo " * 20
        # A client that doesn't offer it gets the shared, uncompressed bytes.
        async with connect(ws_uri(transport), compression=None) as ws:
            session = await next_session(app)
            assert ws.response is not None
            assert "Sec-WebSocket-Extensions" not in ws.response.headers
            session.conn.write_frame(encode_text_frame(b"plain"))
            assert await ws.recv() == "plain"
            session.conn.write_frame(encode_text_frame(b"one") + encode_text_frame(b"two"))
            assert [await ws.recv(), await ws.recv()] == ["one", "two"]


# --- fan-out and flow control ------------------------------------------------------


@scenario
async def test_write_frame_shared_by_50_connections() -> None:
    async with serving() as (transport, app):
        clients = await asyncio.gather(*(connect(ws_uri(transport)) for _ in range(50)))
        sessions = [await next_session(app) for _ in range(50)]
        frame = encode_text_frame(b'{"push":{"channel":"room:1"}}')
        for session in sessions:
            session.conn.write_frame(frame)
        received = await asyncio.gather(*(ws.recv() for ws in clients))
        assert received == ['{"push":{"channel":"room:1"}}'] * 50
        await asyncio.gather(*(ws.close() for ws in clients))


@scenario
async def test_held_frames_are_written_at_release_in_order() -> None:
    """hold() keeps frames until release() (one write); a close releases them
    first, and a full hold writes without waiting."""
    async with serving() as (transport, app):
        async with connect(ws_uri(transport)) as ws:
            conn = (await next_session(app)).conn
            conn.hold()
            conn.write_frame(encode_text_frame(b"push 1"))
            conn.send_text(b"reply")
            conn.write_frame(encode_text_frame(b"push 2"))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 100 * MS)  # nothing sent while held
            conn.release()
            assert [await ws.recv() for _ in range(3)] == ["push 1", "reply", "push 2"]
            conn.send_text(b"not held")  # released: written at once
            assert await ws.recv() == "not held"

            conn.hold()
            for n in range(_HOLD_MAX_FRAMES):
                conn.write_frame(encode_text_frame(f"burst {n}".encode()))
            received = [await ws.recv() for _ in range(_HOLD_MAX_FRAMES)]
            assert received == [f"burst {n}" for n in range(_HOLD_MAX_FRAMES)]
            conn.release()

        async with connect(ws_uri(transport)) as ws:
            conn = (await next_session(app)).conn
            conn.hold()
            conn.send_text(b"last words")
            conn.close(3001, "bye")
            assert await ws.recv() == "last words"
            assert await close_code(ws) == 3001


@scenario
async def test_slow_client_is_closed_3008() -> None:
    limit = 256 * 1024
    async with serving(send_buffer_max_bytes=limit, close_timeout_s=200 * MS) as (transport, app):
        sock = await raw_websocket(transport)
        try:
            session = await next_session(app)
            frame = encode_text_frame(b"x" * 65536)
            for _ in range(2000):  # at most 128 MB; the kernel takes a few MB
                if session.conn.closed:
                    break
                session.conn.write_frame(frame)
                # Checked before each write: at most one frame past the limit.
                assert session.conn.buffered_bytes <= limit + len(frame) or session.conn.closed
                await asyncio.sleep(0)
            assert session.conn.closed
            assert app.slow_clients == 1
            # The close frame is stuck behind unread data: aborted after close_timeout_s.
            started = time.monotonic()
            assert await session.closed == (3008, "slow")
            assert time.monotonic() - started < 1000 * MS
            assert transport.connections == 0
        finally:
            sock.close()


@scenario
async def test_one_reply_larger_than_the_send_buffer_limit_reaches_a_reading_client() -> None:
    """A page of history can be larger than ``send_buffer_max_bytes``: the
    limit is on what a client leaves unread, not on one message."""
    limit = 64 * 1024
    async with (
        serving(send_buffer_max_bytes=limit) as (transport, app),
        connect(ws_uri(transport), max_size=None) as ws,
    ):
        session = await next_session(app)
        big = b"x" * (limit * 256)  # past what the kernel buffers on loopback
        session.conn.write_frame(encode_text_frame(big))
        session.conn.write_frame(encode_text_frame(b"after"))
        assert await ws.recv() == big.decode()
        assert await ws.recv() == "after"
        assert not session.conn.closed and app.slow_clients == 0


@scenario
async def test_a_client_that_pings_and_never_reads_is_closed_3008() -> None:
    """Pongs count against the limit like everything else written: a flood of
    pings from a client that reads nothing cannot grow the buffer unbounded."""
    limit = 64 * 1024
    async with serving(send_buffer_max_bytes=limit, close_timeout_s=200 * MS) as (
        transport,
        app,
    ):
        sock = await raw_websocket(transport)
        loop = asyncio.get_running_loop()
        try:
            session = await next_session(app)
            # Masked (all-zero key) pings with the largest payload allowed.
            ping = b"\x89" + bytes([0x80 | 125]) + b"\x00" * 4 + b"p" * 125
            burst = ping * 256
            for _ in range(2000):  # at most 65 MB of pings
                if session.conn.closed:
                    break
                assert session.conn.buffered_bytes <= limit + 131, session.conn.buffered_bytes
                with suppress(BlockingIOError, ConnectionResetError, BrokenPipeError):
                    await asyncio.wait_for(loop.sock_sendall(sock, burst), 1000 * MS)
                await asyncio.sleep(0)
            assert session.conn.closed
            assert app.slow_clients == 1
            assert await session.closed == (3008, "slow")
        finally:
            sock.close()


@scenario
async def test_a_client_over_the_limit_that_closes_is_answered_without_an_error() -> None:
    """The limit is checked before a write: a client that reads nothing can
    sit over it until the next one. Its close frame then gets the closing
    handshake's answer, not a 3008 attempted on a connection already
    closing (an exception in the transport's callback)."""
    failures: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: failures.append(context))
    limit = 64 * 1024
    try:
        async with serving(send_buffer_max_bytes=limit, close_timeout_s=200 * MS) as (
            transport,
            app,
        ):
            sock = await raw_websocket(transport)
            try:
                session = await next_session(app)
                frame = encode_text_frame(b"x" * 16384)
                for _ in range(2000):
                    if session.conn.buffered_bytes > limit:
                        break
                    session.conn.write_frame(frame)
                    await asyncio.sleep(0)
                assert session.conn.buffered_bytes > limit and not session.conn.closed
                close = b"\x88\x82" + b"\x00" * 4 + b"\x03\xe8"  # masked close 1000
                await loop.sock_sendall(sock, close)
                assert (await session.closed)[0] == 1000
            finally:
                sock.close()
    finally:
        loop.set_exception_handler(previous)
    assert failures == []


# --- timeouts and shutdown -----------------------------------------------------------


@scenario
async def test_silent_tcp_client_dropped_after_open_timeout() -> None:
    async with serving(open_timeout_s=100 * MS) as (transport, _app):
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", transport.port)
        partial_reader, partial_writer = await asyncio.open_connection("127.0.0.1", transport.port)
        partial_writer.write(b"GET /connection/websocket HTTP/1.1\r\nHost: x\r\n")
        try:
            for stream in (reader, partial_reader):
                with suppress(ConnectionResetError):  # abort() may RST
                    assert await asyncio.wait_for(stream.read(), 1000 * MS) == b""
            assert 90 * MS <= time.monotonic() - started < 1000 * MS
        finally:
            for w in (writer, partial_writer):
                w.close()
                with suppress(ConnectionResetError):
                    await w.wait_closed()


@scenario
async def test_stop_accepting_then_wait_closed() -> None:
    async with serving() as (transport, app):
        clients = [await connect(ws_uri(transport)) for _ in range(2)]
        sessions = [await next_session(app) for _ in range(2)]
        uri = ws_uri(transport)
        transport.stop_accepting()
        assert transport.sockets == ()
        with pytest.raises(OSError):
            await connect(uri)
        for ws in clients:  # the open connections still work
            await ws.send("after stop")
            assert await ws.recv() == "after stop"
        for session in sessions:
            session.conn.close(3001, "shutdown")
        await transport.wait_closed(1000 * MS)
        assert transport.connections == 0
        assert [await s.closed for s in sessions] == [(3001, "shutdown")] * 2
        for ws in clients:
            assert ws.close_code == 3001


@scenario
async def test_wait_closed_aborts_stragglers_after_timeout() -> None:
    # A long close timeout, so that wait_closed's own timeout does the abort.
    async with serving(close_timeout_s=5000 * MS) as (transport, app):
        sock = await raw_websocket(transport)
        try:
            session = await next_session(app)
            session.conn.close(3001, "shutdown")  # the raw client never answers
            started = time.monotonic()
            await transport.wait_closed(200 * MS)
            assert 190 * MS <= time.monotonic() - started < 1000 * MS
            assert transport.connections == 0
            assert await session.closed == (3001, "shutdown")
        finally:
            sock.close()
