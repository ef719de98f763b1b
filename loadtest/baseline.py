"""The baseline: the plain way to write a room server with websockets.

Every benchmark in ``docs/benchmarks.md`` reports digis-signal's cost as a ratio to
this server, measured in the same run on the same machine (issue 6, item 3). It is
deliberately what a competent developer would write first with the library and
nothing else:

* websockets' ``serve()`` (the asyncio implementation: a handler task per connection),
  on uvloop, permessage-deflate off (``compression=None``), every other option at the
  library's default - including its keepalive (a protocol-level ping every 20 s per
  connection), the counterpart of our server's heartbeat;
* orjson; each publication is decoded once, encoded once, and handed to
  ``websockets.broadcast()``, which writes the same bytes to every room member;
* no authentication, no channel policy, no offsets kept, no history, no presence.

With ``--redis-url`` (or ``REDIS_URL``), the plain way to share rooms between
instances: redis-py with hiredis and a pool that waits for a free connection (up to
64), each publication a ``PUBLISH`` awaited before its acknowledgement, and per
instance one pub/sub connection subscribed to the rooms it has members in, whose
messages go to ``broadcast()``. No offsets then (no instance
could number a room's publications alone). This is the chat scenario's baseline:
a 2-member room through Redis, the "naive" peer of ``../shared/PERFORMANCE-NOTES.md``.

Protocol (just what the load tool's fanout, chat, idle and connect scenarios need,
spoken by ``python -m loadtest ... --protocol baseline``):

* ``ws://HOST:PORT/sub/<room>`` - a member: joins ``room`` for as long as it is
  connected, and may publish to it as a publisher does (chat: every user writes to
  its own conversation and reads it).
* ``ws://HOST:PORT/pub/<room>`` - a publisher: sends ``{"id": N, "data": {...}}``
  (optionally ``"room": "<other room>"``, so one connection can feed many rooms); the
  server broadcasts ``{"channel": room, "offset": n, "data": {...}}`` to the room and
  then answers the publisher ``{"ack": N}`` (so the tool can tell an acknowledged
  publication that never arrived: the same loss accounting as for our server).
* ``GET /readyz`` - 200, so the tool knows it is up.

Run: ``python -m loadtest.baseline --host 127.0.0.1 --port 8765 [--redis-url URL]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
from collections.abc import Sequence

import orjson
import redis.asyncio as aioredis
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = ["main", "run"]

_rooms: dict[str, set[ServerConnection]] = {}
_offsets: dict[str, int] = {}


class _SharedRooms:
    """Rooms shared through Redis: publish with PUBLISH, receive on one pub/sub
    connection subscribed to the rooms with members here."""

    def __init__(self, url: str) -> None:
        # A pool that waits for a free connection: redis-py's default one raises
        # MaxConnectionsError past its cap, which failed a 2,000/s chat (every
        # handler ended with 1011): the first thing its developer would fix.
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=None)
        self.client = aioredis.Redis.from_pool(pool)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # The pub/sub connection is made here, once: redis-py makes it at the
        # first subscribe, and subscribes racing to make it would each make
        # one, all but the last lost with their subscriptions.
        await self.pubsub.subscribe("baseline:started")
        self._reader = asyncio.create_task(self._read())

    async def joined(self, room: str) -> None:
        """The room's first member here came: receive its publications."""
        await self.pubsub.subscribe(room)

    async def left(self, room: str) -> None:
        await self.pubsub.unsubscribe(room)

    async def publish(self, room: str, frame: bytes) -> None:
        await self.client.publish(room, frame)

    async def _read(self) -> None:
        async for message in self.pubsub.listen():
            room = message["channel"].decode()
            broadcast(_rooms.get(room, ()), message["data"].decode())

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        await self.pubsub.aclose()  # type: ignore[no-untyped-call]  # untyped upstream
        await self.client.aclose()


_shared: _SharedRooms | None = None


async def _handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else "/"
    role, _, room = path.strip("/").partition("/")
    if role == "sub" and room:
        members = _rooms.get(room)
        if members is None:
            members = _rooms[room] = set()
            if _shared is not None:
                await _shared.joined(room)
        members.add(ws)
        try:
            await _serve_publisher(ws, room)
        finally:
            members.discard(ws)
            if not members:
                _rooms.pop(room, None)
                if _shared is not None:
                    await _shared.left(room)
    elif role == "pub" and room:
        await _serve_publisher(ws, room)
    else:
        await ws.close(1008, "path must be /sub/<room> or /pub/<room>")


async def _serve_publisher(ws: ServerConnection, room: str) -> None:
    async for message in ws:
        request = orjson.loads(message)
        target = request.get("room", room)
        if _shared is not None:
            frame = orjson.dumps({"channel": target, "data": request["data"]})
            # Acknowledged once Redis took it, as our server's publish.
            await _shared.publish(target, frame)
        else:
            offset = _offsets.get(target, 0) + 1
            _offsets[target] = offset
            # Encoded once; broadcast() writes these bytes to every member.
            frame = orjson.dumps({"channel": target, "offset": offset, "data": request["data"]})
            broadcast(_rooms.get(target, ()), frame.decode())
        await ws.send(orjson.dumps({"ack": request["id"]}).decode())


def _http(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/readyz":
        return Response(200, "OK", Headers([("Content-Length", "6")]), b"ready\n")
    return None


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(host: str, port: int, redis_url: str | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    global _shared
    _raise_nofile()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _shared = _SharedRooms(redis_url) if redis_url else None
    if _shared is not None:
        await _shared.start()
    try:
        async with serve(_handler, host, port, compression=None, process_request=_http):
            shared = f" (rooms shared through {redis_url})" if redis_url else ""
            print(f"baseline listening on ws://{host}:{port}{shared}", flush=True)
            await stop.wait()
    finally:
        if _shared is not None:
            await _shared.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL") or None,
        help="share rooms with other instances through this Redis (default: $REDIS_URL)",
    )
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(run(args.host, args.port, args.redis_url))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(run(args.host, args.port, args.redis_url))


if __name__ == "__main__":
    main()
