"""The load tool's arrival stamps (``loadtest.wsclient``, ``stamped=True``): after
the handshake a client connection reads its socket itself with ``SO_TIMESTAMPNS``,
so each frame carries the time the kernel received it, before the client's own
queue. Against a bare asyncio server that speaks just enough RFC 6455."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time

import pytest
import uvloop

from loadtest.wsclient import RawWebSocket, _frame_end, open_raw

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _frame(payload: bytes) -> bytes:
    """One unmasked server text frame (payloads under 64 KiB here)."""
    if len(payload) < 126:
        return bytes((0x81, len(payload))) + payload
    return bytes((0x81, 126)) + len(payload).to_bytes(2, "big") + payload


class _Handler:
    def __init__(self) -> None:
        self.ws: RawWebSocket | None = None
        # (payload, arrived_ns, stamp_shared, handled_ns)
        self.texts: list[tuple[bytes, int, bool, int]] = []
        self.closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def on_text(self, payload: bytes) -> None:
        # The first frame may come with the handshake, before open_raw returns.
        ws = self.ws
        arrived, shared = (ws.arrived_ns, ws.stamp_shared) if ws is not None else (0, False)
        self.texts.append((payload, arrived, shared, time.time_ns()))

    def on_closed(self, code: int, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(code)


async def _serve_one() -> tuple[asyncio.Server, asyncio.Queue[asyncio.StreamWriter]]:
    """A server that answers one upgrade, then hands its writer to the test."""
    writers: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(hashlib.sha1(key + _GUID).digest())
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        # A frame right behind the handshake: read by the transport with it.
        writer.write(_frame(b"first"))
        await writer.drain()
        await writers.put(writer)
        await reader.read()  # until the client goes

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    return server, writers


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _check_stamps() -> None:
    server, writers = await _serve_one()
    port = server.sockets[0].getsockname()[1]
    handler = _Handler()
    fds_before = _open_fds()
    ws = await open_raw(f"ws://127.0.0.1:{port}/", None, handler, 5.0, stamped=True)
    handler.ws = ws
    writer = await writers.get()
    try:
        sent: list[int] = []
        for n in range(3):
            sent.append(time.time_ns())
            writer.write(_frame(b"frame %d" % n))
            await writer.drain()
            await asyncio.sleep(0.02)  # one read each
        # Two frames in one segment: one read, one stamp for both, marked shared.
        writer.write(_frame(b"pair a") + _frame(b"pair b"))
        await writer.drain()
        await asyncio.sleep(0.02)
        # A frame the client reads late (its loop busy): the stamp is its arrival.
        late_at = time.time_ns()
        writer.write(_frame(b"late"))  # written to the socket at once (empty buffer)
        time.sleep(0.1)
        await asyncio.sleep(0.02)
        # Two frames that wait in the socket together: the kernel merges their
        # segments and keeps the later arrival, so the first's stamp is shared.
        first_at = time.time_ns()
        writer.write(_frame(b"waits"))
        time.sleep(0.05)
        second_at = time.time_ns()
        writer.write(_frame(b"L" * 300))  # an extended length (126 → 16 bits)
        time.sleep(0.05)
        for _ in range(100):
            if len(handler.texts) >= 9:
                break
            await asyncio.sleep(0.01)
        payloads = [text[0] for text in handler.texts]
        assert payloads[1:] == [
            b"frame 0",
            b"frame 1",
            b"frame 2",
            b"pair a",
            b"pair b",
            b"late",
            b"waits",
            b"L" * 300,
        ]
        for (_, arrived, shared, handled), at in zip(handler.texts[1:4], sent, strict=True):
            # The kernel's stamp: after the server wrote, before the client read.
            assert at <= arrived <= handled, (at, arrived, handled)
            assert not shared
        (_, a_at, a_shared, _), (_, b_at, b_shared, _) = handler.texts[4:6]
        assert a_at == b_at > 0 and a_shared and b_shared
        _, arrived, shared, handled = handler.texts[6]
        assert handled - late_at >= 100_000_000
        assert late_at <= arrived < late_at + 50_000_000, (late_at, arrived, handled)
        assert not shared
        (_, waits_at, waits_shared, _), (_, last_at, _, _) = handler.texts[7:9]
        assert second_at <= waits_at == last_at < second_at + 25_000_000, (first_at, waits_at)
        assert waits_shared
        # The server goes away: EOF on our read ends the connection as usual.
        writer.close()
        assert await asyncio.wait_for(handler.closed, 5.0) == 1006
        await asyncio.sleep(0.05)
        # Ours, the transport's and the server's descriptors are all closed.
        assert _open_fds() == fds_before
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


def test_frames_carry_their_kernel_arrival_time_on_uvloop() -> None:
    """The workers run uvloop: its transport stops reading, our descriptor reads."""
    uvloop.run(_check_stamps())


async def test_frames_carry_their_kernel_arrival_time_on_asyncio() -> None:
    await _check_stamps()


async def test_unstamped_connections_leave_arrival_at_zero() -> None:
    server, writers = await _serve_one()
    port = server.sockets[0].getsockname()[1]
    handler = _Handler()
    ws = await open_raw(f"ws://127.0.0.1:{port}/", None, handler, 5.0)
    handler.ws = ws
    writer = await writers.get()
    try:
        writer.write(_frame(b"plain"))
        await writer.drain()
        for _ in range(100):
            if len(handler.texts) >= 2:
                break
            await asyncio.sleep(0.01)
        assert [(p, a, s) for p, a, s, _ in handler.texts] == [
            (b"first", 0, False),
            (b"plain", 0, False),
        ]
    finally:
        ws.abort()
        writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("buffered", "length"),
    [
        (b"", None),
        (b"\x81", None),
        (b"\x81\x05", 7),  # a 5-byte payload
        (b"\x81\x05ab", 7),
        (b"\x81\x7e\x01", None),  # a 16-bit length, not all here yet
        (b"\x81\x7e\x01\x2c", 304),
        (b"\x81\x7f" + b"\x00" * 5, None),  # a 64-bit length
        (b"\x81\x7f" + (70000).to_bytes(8, "big") + b"x", 70010),
        (b"\x8a\x00", 2),  # an empty pong
    ],
)
def test_the_first_frame_of_a_buffer_is_measured(buffered: bytes, length: int | None) -> None:
    assert _frame_end(buffered) == length
