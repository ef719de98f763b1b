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

Protocol (just what the load tool's fanout, idle and connect scenarios need, spoken by
``python -m loadtest ... --protocol baseline``):

* ``ws://HOST:PORT/sub/<room>`` - a subscriber: joins ``room`` for as long as it is
  connected; anything it sends is ignored.
* ``ws://HOST:PORT/pub/<room>`` - a publisher: sends ``{"id": N, "data": {...}}``
  (optionally ``"room": "<other room>"``, so one connection can feed many rooms); the
  server broadcasts ``{"channel": room, "offset": n, "data": {...}}`` to the room and
  then answers the publisher ``{"ack": N}`` (so the tool can tell an acknowledged
  publication that never arrived: the same loss accounting as for our server).
* ``GET /readyz`` - 200, so the tool knows it is up.

Run: ``python -m loadtest.baseline --host 127.0.0.1 --port 8765``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import signal
from collections.abc import Sequence

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

__all__ = ["main", "run"]

_rooms: dict[str, set[ServerConnection]] = {}
_offsets: dict[str, int] = {}


async def _handler(ws: ServerConnection) -> None:
    path = ws.request.path if ws.request is not None else "/"
    role, _, room = path.strip("/").partition("/")
    if role == "sub" and room:
        members = _rooms.setdefault(room, set())
        members.add(ws)
        try:
            async for _ in ws:  # subscribers have nothing to say; drain anyway
                pass
        finally:
            members.discard(ws)
            if not members:
                _rooms.pop(room, None)
    elif role == "pub" and room:
        async for message in ws:
            request = orjson.loads(message)
            target = request.get("room", room)
            offset = _offsets.get(target, 0) + 1
            _offsets[target] = offset
            # Encoded once; broadcast() writes these bytes to every member.
            frame = orjson.dumps({"channel": target, "offset": offset, "data": request["data"]})
            broadcast(_rooms.get(target, ()), frame.decode())
            await ws.send(orjson.dumps({"ack": request["id"]}).decode())
    else:
        await ws.close(1008, "path must be /sub/<room> or /pub/<room>")


def _http(connection: ServerConnection, request: Request) -> Response | None:
    if request.path == "/readyz":
        return Response(200, "OK", Headers([("Content-Length", "6")]), b"ready\n")
    return None


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def run(host: str, port: int) -> None:
    """Serve until SIGTERM or SIGINT."""
    _raise_nofile()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serve(_handler, host, port, compression=None, process_request=_http):
        print(f"baseline listening on ws://{host}:{port}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.baseline", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)
    try:
        import uvloop

        uvloop.run(run(args.host, args.port))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(run(args.host, args.port))


if __name__ == "__main__":
    main()
