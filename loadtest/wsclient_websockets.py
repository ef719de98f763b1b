"""The same client interface as :class:`loadtest.wsclient.RawWebSocket`, on websockets'
asyncio client (``--backend websockets``).

Kept to compare the two (README § Client backends): this one needs a reader task per
connection and, because ``send()`` is a coroutine there, a task per message sent from a
callback. Compression is off and the library's keepalive is off: the Centrifuge
protocol has its own application-level ping, answered by the session layer.
"""

from __future__ import annotations

import asyncio
import contextlib

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from loadtest.wsclient import (
    ABNORMAL_CLOSE,
    MessageHandler,
    ack_on_read,
    connect_socket,
    split_url,
)

__all__ = ["LibraryWebSocket", "open_library"]


class LibraryWebSocket:
    __slots__ = ("_conn", "_reader", "close_code", "close_reason", "handler", "is_open")

    # No arrival stamps here (loadtest/wsclient.py has them).
    arrived_ns = 0
    stamp_shared = False

    def __init__(self, conn: ClientConnection, handler: MessageHandler) -> None:
        self._conn = conn
        self.handler = handler
        self.is_open = True
        self.close_code = ABNORMAL_CLOSE
        self.close_reason = ""
        self._reader = asyncio.create_task(self._read())

    def send_text(self, payload: bytes) -> None:
        if self.is_open:
            # send() is a coroutine: one task per message is this backend's price.
            task = asyncio.ensure_future(self._conn.send(payload.decode()))
            task.add_done_callback(_ignore_result)

    def ack_on_read(self) -> None:
        ack_on_read(self._conn.transport)

    def close(self, code: int = 1000) -> None:
        if self.is_open:
            self.is_open = False
            asyncio.ensure_future(self._conn.close(code)).add_done_callback(_ignore_result)

    def abort(self) -> None:
        self._conn.transport.abort()

    async def _read(self) -> None:
        conn = self._conn
        handler = self.handler
        try:
            while True:
                message = await conn.recv(decode=False)
                handler.on_text(message)
        except ConnectionClosed:
            pass
        finally:
            self.is_open = False
            if conn.close_code is not None:
                self.close_code, self.close_reason = conn.close_code, conn.close_reason or ""
            handler.on_closed(self.close_code, self.close_reason)


def _ignore_result(task: asyncio.Future[None]) -> None:
    with contextlib.suppress(BaseException):
        task.result()


async def open_library(
    url: str, source: str | None, handler: MessageHandler, timeout: float
) -> LibraryWebSocket:
    host, port, _ = split_url(url)
    async with asyncio.timeout(timeout):
        sock = await connect_socket(host, port, source)
        try:
            conn = await connect(
                url,
                sock=sock,
                compression=None,
                ping_interval=None,
                max_queue=64,
                open_timeout=None,
                user_agent_header="digis-signal-loadtest",
            )
        except BaseException:
            sock.close()
            raise
    return LibraryWebSocket(conn, handler)
