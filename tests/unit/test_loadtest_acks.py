"""The load tool's clients hand their sockets back to bulk-receive ACKs
(``loadtest.wsclient.ack_on_read``): on one machine an "interactive" subscriber's
ACKs run inside the server's ``write()`` and would be billed to the server.

``getsockopt(TCP_QUICKACK)`` reads the kernel's guess: 0 while the socket is
taken for an interactive session (delayed ACKs), 1 otherwise."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from loadtest.wsclient import ack_on_read


def _interactive_guess_gone(transport: asyncio.BaseTransport) -> bool:
    sock = transport.get_extra_info("socket")
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK))


async def _check_reset() -> None:
    """A client connection that received a request and answered it at once
    (as a Centrifuge client does with connect and subscribe) is taken for an
    interactive session; ack_on_read ends that."""
    accepted: asyncio.Future[asyncio.StreamWriter] = asyncio.get_running_loop().create_future()

    async def on_client(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(writer)

    server = await asyncio.start_server(on_client, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    server_side = await accepted
    try:
        server_side.write(b"request")
        assert await reader.readexactly(7) == b"request"
        writer.write(b"answer")
        await writer.drain()
        assert not _interactive_guess_gone(writer.transport)  # the kernel's guess, before
        ack_on_read(writer.transport)
        assert _interactive_guess_gone(writer.transport)
    finally:
        for side in (writer, server_side):
            side.close()
            await side.wait_closed()
        server.close()
        await server.wait_closed()


async def test_an_answering_socket_goes_back_to_acks_on_read() -> None:
    await _check_reset()


def test_the_same_on_uvloop_transports() -> None:
    """The workers run uvloop, whose transports hand out a pseudo-socket."""
    uvloop.run(_check_reset())


async def test_a_transport_without_a_socket_is_left_alone() -> None:
    class NoSocket(asyncio.BaseTransport):
        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

    ack_on_read(NoSocket())  # no error
