"""A gap in a channel's stream found while a subscription to it is still
recovering (registered in the hub, its subscribe reply not sent yet).

The client must get its reply and then an unsubscribe push with 2500
(insufficient state), so that it recovers from the reply's position. Before
the fix it got the push first and a successful reply after it: the SDKs took
the reply for a live subscription that the server had already dropped, and
every later publication of the channel was lost without a word (seen once in
a few dozen runs of test_redis_faults' pub/sub cuts, by the centrifuge-python
client).

In-process, to put the gap inside that window every time: a real node on the
embedded broker, the real transport and a websockets client, with the
broker's history read (the subscription's recovery) held at a gate while the
hub is told of a gap (``Hub.lose_position``, what a pub/sub gap calls).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from signaling.auth import mint_token
from signaling.config import load_settings
from signaling.metrics import Metrics
from signaling.node import Node
from signaling.server import DEFAULT_APP, App, build_node, load_app
from signaling.transport import Transport, TransportOptions, start_transport

SECRET = "gap-while-subscribing-" + "s" * 32
ROOM = "room:creator1"
TIMEOUT = 5.0


@pytest.fixture
async def served() -> AsyncIterator[tuple[Node, Transport]]:
    settings = load_settings({"SIGNAL_JWT_SECRET": SECRET})
    node = build_node(settings, load_app(DEFAULT_APP), Metrics())
    await node.start()
    transport = await start_transport(App(node), "127.0.0.1", 0, TransportOptions())
    try:
        yield node, transport
    finally:
        transport.stop_accepting()
        await transport.wait_closed(2.0)
        await node.close()


async def _messages(ws: ClientConnection) -> list[dict[str, Any]]:
    """The replies and pushes of the next frame (one JSON object per line)."""
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    return [orjson.loads(line) for line in frame.splitlines() if line]


async def _read_until(
    ws: ClientConnection, done: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while not done(seen):
        seen += await _messages(ws)
    return seen


def _reply(seen: list[dict[str, Any]], cmd_id: int) -> dict[str, Any] | None:
    return next((m for m in seen if m.get("id") == cmd_id), None)


def _unsubscribe_index(seen: list[dict[str, Any]]) -> int | None:
    return next(
        (
            i
            for i, m in enumerate(seen)
            if m.get("push", {}).get("channel") == ROOM and "unsubscribe" in m["push"]
        ),
        None,
    )


async def _subscribe(ws: ClientConnection, cmd_id: int, **fields: Any) -> None:
    body = {"channel": ROOM, "recoverable": True, "positioned": True, **fields}
    await ws.send(orjson.dumps({"id": cmd_id, "subscribe": body}).decode())


def _hold_history(node: Node) -> tuple[asyncio.Event, asyncio.Event, Callable[[], None]]:
    """Hold the broker's next history reads until ``gate`` is set; ``entered``
    is set once one is held. Returns (entered, gate, restore)."""
    broker: Any = node.broker
    history: Callable[..., Awaitable[Any]] = broker.history
    entered, gate = asyncio.Event(), asyncio.Event()

    async def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        return await history(*args, **kwargs)

    broker.history = held

    def restore() -> None:
        del broker.history  # the class's method again

    return entered, gate, restore


async def test_a_gap_while_recovering_is_told_after_the_subscribe_reply(
    served: tuple[Node, Transport],
) -> None:
    node, transport = served
    for n in range(3):
        await node.publish(ROOM, b'{"n":%d}' % n)
    url = f"ws://127.0.0.1:{transport.port}/connection/websocket"
    async with connect(url) as ws:
        connect_cmd = {"id": 1, "connect": {"token": mint_token(SECRET, "fan1")}}
        await ws.send(orjson.dumps(connect_cmd).decode())
        assert "connect" in (await _read_until(ws, lambda s: _reply(s, 1) is not None))[-1]

        entered, gate, restore = _hold_history(node)
        await _subscribe(ws, 2)
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        node.hub.lose_position(ROOM)  # the subscription is syncing: registered, no reply yet
        restore()
        gate.set()

        seen = await _read_until(
            ws, lambda s: _reply(s, 2) is not None and _unsubscribe_index(s) is not None
        )
        reply = _reply(seen, 2)
        assert reply is not None and "subscribe" in reply, seen
        pushed = _unsubscribe_index(seen)
        assert pushed is not None and seen.index(reply) < pushed, seen
        assert seen[pushed]["push"]["unsubscribe"]["code"] == 2500, seen
        position = reply["subscribe"]
        assert position["offset"] == 3 and position["epoch"], position

        # The client recovers from the reply's position, as the SDKs do, and is
        # live again: a publication made after that reaches it.
        await _subscribe(ws, 3, recover=True, offset=position["offset"], epoch=position["epoch"])
        recovered = await _read_until(ws, lambda s: _reply(s, 3) is not None)
        again = _reply(recovered, 3)
        assert again is not None and again["subscribe"].get("recovered") is True, recovered
        await node.publish(ROOM, b'{"n":99}')
        pubs = await _read_until(ws, lambda s: any("pub" in m.get("push", {}) for m in s))
        delivered = [m["push"]["pub"] for m in pubs if "pub" in m.get("push", {})]
        assert delivered[0]["data"] == {"n": 99} and delivered[0]["offset"] == 4, pubs


async def _connected(url: str, user: str) -> ClientConnection:
    ws = await connect(url)
    await ws.send(orjson.dumps({"id": 1, "connect": {"token": mint_token(SECRET, user)}}).decode())
    reply = _reply(await _read_until(ws, lambda s: _reply(s, 1) is not None), 1)
    assert reply is not None and "connect" in reply, reply
    return ws


async def test_a_ban_while_subscribing_is_told_after_the_subscribe_reply(
    served: tuple[Node, Transport],
) -> None:
    # The same window, another server-side unsubscribe: a moderator's ban.
    node, transport = served
    url = f"ws://127.0.0.1:{transport.port}/connection/websocket"
    owner = await _connected(url, "creator1")  # owns ROOM
    fan = await _connected(url, "fan1")
    try:
        entered, gate, restore = _hold_history(node)
        await _subscribe(fan, 2)
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        ban = {"method": "room.ban", "data": {"channel": ROOM, "user": "fan1"}}
        await owner.send(orjson.dumps({"id": 2, "rpc": ban}).decode())
        banned = _reply(await _read_until(owner, lambda s: _reply(s, 2) is not None), 2)
        assert banned is not None and "rpc" in banned, banned
        restore()
        gate.set()

        seen = await _read_until(
            fan, lambda s: _reply(s, 2) is not None and _unsubscribe_index(s) is not None
        )
        reply = _reply(seen, 2)
        pushed = _unsubscribe_index(seen)
        assert reply is not None and pushed is not None and seen.index(reply) < pushed, seen
        code = seen[pushed]["push"]["unsubscribe"]["code"]
        assert code < 2500, seen  # banned: the SDK must not resubscribe
    finally:
        await owner.close()
        await fan.close()


async def test_a_gap_in_the_personal_channel_while_connecting_reconnects_after_the_reply(
    served: tuple[Node, Transport],
) -> None:
    # The personal channel is subscribed by the server inside connect: a gap
    # there is recovered through a reconnect (3010), after the connect reply.
    node, transport = served
    url = f"ws://127.0.0.1:{transport.port}/connection/websocket"
    entered, gate, restore = _hold_history(node)
    async with connect(url) as ws:
        connect_cmd = {"id": 1, "connect": {"token": mint_token(SECRET, "fan2")}}
        await ws.send(orjson.dumps(connect_cmd).decode())
        await asyncio.wait_for(entered.wait(), TIMEOUT)
        node.hub.lose_position("user:#fan2")
        restore()
        gate.set()
        seen: list[dict[str, Any]] = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                seen += await _messages(ws)
        reply = _reply(seen, 1)
        assert reply is not None and "connect" in reply, seen
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 3010, closed.value


async def test_a_second_gap_before_the_first_ones_cleanup_costs_no_reconnect(
    served: tuple[Node, Transport],
) -> None:
    # The first gap removes the subscription and spawns its cleanup (the hub
    # entry goes in that task); a second gap in between found no subscription
    # and used to close the connection with 3010, a reconnect for nothing.
    node, transport = served
    url = f"ws://127.0.0.1:{transport.port}/connection/websocket"
    ws = await _connected(url, "fan3")
    try:
        await _subscribe(ws, 2)
        reply = _reply(await _read_until(ws, lambda s: _reply(s, 2) is not None), 2)
        assert reply is not None and "subscribe" in reply, reply
        node.hub.lose_position(ROOM)
        node.hub.lose_position(ROOM)  # before the first one's cleanup ran
        seen = await _read_until(ws, lambda s: _unsubscribe_index(s) is not None)
        pushed = _unsubscribe_index(seen)
        assert pushed is not None and seen[pushed]["push"]["unsubscribe"]["code"] == 2500, seen

        # Still connected: it resubscribes, as the SDKs do, and is live again.
        await _subscribe(ws, 3)
        again = await _read_until(ws, lambda s: _reply(s, 3) is not None)
        assert "subscribe" in (_reply(again, 3) or {}), again
        await node.publish(ROOM, b'{"n":7}')
        pubs = await _read_until(ws, lambda s: any("pub" in m.get("push", {}) for m in s))
        unsubscribes = [m for m in again + pubs if "unsubscribe" in m.get("push", {})]
        assert unsubscribes == [], unsubscribes  # told once only
        delivered = [m["push"]["pub"]["data"] for m in pubs if "pub" in m.get("push", {})]
        assert delivered == [{"n": 7}], pubs
    finally:
        await ws.close()
