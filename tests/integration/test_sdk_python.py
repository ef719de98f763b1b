"""The official centrifuge-python SDK (0.7.0) against a real server process.

Every test talks to a real ``python -m signaling serve`` over a real WebSocket with
the unmodified SDK; nothing is mocked. Channel rules under test (server contract):

* ``room:<creator>`` - any authenticated user subscribes and publishes; history,
  presence, join/leave, recoverable;
* ``dm:#<a>,<b>`` - only users a and b;
* ``user:#<id>`` - personal channel, subscribed by the server at connect (connect
  reply ``subs``), read-only for clients, 103 for anyone else;
* any other namespace - 102 unknown channel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest
from centrifuge import (
    Client,
    ClientState,
    ReplyError,
    StreamPosition,
    Subscription,
    SubscriptionState,
)

from support.processes import ServerProcess
from support.sdk import ClientEvents, SubEvents, make_client

ROOM_OPTS: dict[str, Any] = {"recoverable": True, "positioned": True, "join_leave": True}


def msg(text: str) -> dict[str, str]:
    """A chat message publication (the schema of handlers/chat)."""
    return {"type": "message", "text": text}


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., tuple[Client, ClientEvents]]]:
    """Factory of real SDK clients; all are disconnected at teardown."""
    made: list[Client] = []

    def make(server: ServerProcess, user: str, **kwargs: Any) -> tuple[Client, ClientEvents]:
        token = kwargs.pop("token", None)
        claims = kwargs.pop("claims", {})
        if token is None:
            token = server.token(user, **claims)
        client, events = make_client(server.ws_url, token, **kwargs)
        made.append(client)
        return client, events

    yield make

    for client in made:
        await client.disconnect()
    # Let the SDK's background close tasks finish before the loop goes away.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(getattr(c, "_background_tasks", None) for c in made):
        await asyncio.sleep(0.02)


async def connect(client: Client, events: ClientEvents) -> str:
    await client.connect()
    try:
        await client.ready(timeout=5)
    except Exception as exc:
        raise AssertionError(f"client did not connect: {exc}; events: {events.events}") from exc
    assert client.state == ClientState.CONNECTED
    return client.client_id


async def subscribe(
    client: Client, channel: str, **opts: Any
) -> tuple[Subscription, SubEvents, Any]:
    events = SubEvents()
    sub = client.new_subscription(channel, events=events, **opts)
    await sub.subscribe()
    ctx = await events.wait_for("subscribed")
    return sub, events, ctx


async def subscribe_error(client: Client, channel: str) -> int:
    """Subscribe where the server must refuse; returns the unsubscribed code."""
    events = SubEvents()
    sub = client.new_subscription(channel, events=events)
    await sub.subscribe()
    ctx = await events.wait_for("unsubscribed")
    assert sub.state == SubscriptionState.UNSUBSCRIBED
    assert not events.of("subscribed"), events.events
    return int(ctx.code)


async def eventually(check: Callable[[], Any], timeout: float = 5.0) -> Any:
    """Await ``check()`` (a coroutine function) until it returns without AssertionError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await check()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
        await asyncio.sleep(0.1)


# --------------------------------------------------------------------------- connect


async def test_connect_gets_personal_server_side_subscription(server, clients) -> None:
    alice, ev = clients(server, "alice")
    client_id = await connect(alice, ev)
    connected = await ev.wait_for("connected")
    assert connected.client == client_id

    personal = await ev.wait_for("subscribed", lambda c: c.channel == "user:#alice")
    assert personal.recoverable is True
    assert personal.stream_position is not None
    assert personal.was_recovering is False
    # Only the own personal channel is server-subscribed.
    assert [c.channel for c in ev.of("subscribed")] == ["user:#alice"]


async def test_room_publish_roundtrip_with_server_set_info(server, clients) -> None:
    alice, ev_a = clients(server, "alice")
    alice_id = await connect(alice, ev_a)
    sub_a, sev_a, ctx = await subscribe(alice, "room:alice", **ROOM_OPTS)
    assert ctx.recoverable is True
    assert ctx.positioned is True
    assert ctx.stream_position is not None
    start = ctx.stream_position.offset

    await sub_a.publish(msg("hello"))
    pub = (await sev_a.wait_for("publication")).pub
    assert pub.data == msg("hello")
    assert pub.info is not None
    assert pub.info.user == "alice"
    assert pub.info.client == alice_id
    assert pub.offset == start + 1

    # A second user joins: join event, and both get each other's publications.
    bob, ev_b = clients(server, "bob")
    bob_id = await connect(bob, ev_b)
    mark = sev_a.mark()
    sub_b, sev_b, ctx_b = await subscribe(bob, "room:alice", **ROOM_OPTS)
    assert ctx_b.stream_position is not None
    assert ctx_b.stream_position.offset == start + 1
    assert ctx_b.stream_position.epoch == ctx.stream_position.epoch
    join = await sev_a.wait_for("join", since=mark)
    assert (join.info.user, join.info.client) == ("bob", bob_id)

    mark = sev_a.mark()
    await sub_b.publish(msg("hi alice"))
    got_a = (await sev_a.wait_for("publication", since=mark)).pub
    got_b = (await sev_b.wait_for("publication")).pub
    for got in (got_a, got_b):
        assert got.data == msg("hi alice")
        assert (got.info.user, got.info.client) == ("bob", bob_id)
        assert got.offset == start + 2

    # Bob leaves: leave event for alice.
    mark = sev_a.mark()
    await sub_b.unsubscribe()
    leave = await sev_a.wait_for("leave", since=mark)
    assert (leave.info.user, leave.info.client) == ("bob", bob_id)


async def test_spoofed_info_in_data_does_not_change_publication_info(server, clients) -> None:
    alice, ev = clients(server, "alice", claims={"info": {"name": "Alice"}})
    alice_id = await connect(alice, ev)
    sub, sev, _ = await subscribe(alice, "room:alice", **ROOM_OPTS)
    spoof = {
        **msg("trust me"),
        "info": {"user": "mallory", "client": "forged"},
        "user": "mallory",
    }
    # Sender fields in the data are refused by the chat schema (handlers/chat).
    with pytest.raises(ReplyError) as err:
        await sub.publish(spoof)
    assert err.value.code >= 1000
    await sub.publish(msg("trust me"))
    pub = (await sev.wait_for("publication")).pub
    assert pub.data == msg("trust me")
    assert pub.info is not None
    assert pub.info.user == "alice"
    assert pub.info.client == alice_id
    # The token's info claim is the connection info (Centrifuge ClientInfo.conn_info).
    assert pub.info.conn_info == {"name": "Alice"}

    history = await sub.history(limit=10)
    assert [p.info.user for p in history.publications] == ["alice"]


# --------------------------------------------------------------------------- RPC


async def test_rpc_server_info_and_unknown_method(server, clients) -> None:
    alice, ev = clients(server, "alice")
    alice_id = await connect(alice, ev)

    result = await alice.rpc("server.info", {})
    data = result.data
    assert data["user"] == "alice"
    assert data["client"] == alice_id
    assert isinstance(data["node"], str) and data["node"]
    assert isinstance(data["time_ms"], int)
    assert abs(data["time_ms"] - time.time() * 1000) < 60_000

    with pytest.raises(ReplyError) as err:
        await alice.rpc("nope", {"x": 1})
    assert err.value.code == 104
    assert err.value.temporary is False

    # The error failed one command only: the connection is still usable.
    assert alice.state == ClientState.CONNECTED
    assert (await alice.rpc("server.info", None)).data["client"] == alice_id
    assert not ev.of("connecting", since=1)


# ---------------------------------------------------------------- presence / history


async def test_presence_and_presence_stats(server, clients) -> None:
    a1, ev1 = clients(server, "alice")
    a2, ev2 = clients(server, "alice")
    b, evb = clients(server, "bob")
    ids = {"a1": await connect(a1, ev1), "a2": await connect(a2, ev2), "b": await connect(b, evb)}
    subs = {}
    for key, client in (("a1", a1), ("a2", a2), ("b", b)):
        subs[key], _, _ = await subscribe(client, "room:alice", **ROOM_OPTS)

    presence = await subs["a1"].presence()
    assert set(presence.clients) == set(ids.values())
    assert {k: v.user for k, v in presence.clients.items()} == {
        ids["a1"]: "alice",
        ids["a2"]: "alice",
        ids["b"]: "bob",
    }
    for client_id, info in presence.clients.items():
        assert info.client == client_id

    stats = await subs["b"].presence_stats()
    assert (stats.num_clients, stats.num_users) == (3, 2)

    # Bob disconnects: presence shrinks.
    await b.disconnect()

    async def only_alice() -> None:
        stats = await subs["a1"].presence_stats()
        assert (stats.num_clients, stats.num_users) == (2, 1), stats

    await eventually(only_alice)
    presence = await subs["a2"].presence()
    assert set(presence.clients) == {ids["a1"], ids["a2"]}


async def test_history_limit_reverse_since(server, clients) -> None:
    alice, ev = clients(server, "alice")
    await connect(alice, ev)
    sub, sev, ctx = await subscribe(alice, "room:alice", **ROOM_OPTS)
    for n in range(6):
        await sub.publish(msg(str(n)))
    await sev.wait_count("publication", 6)

    full = await sub.history(limit=100)
    assert [int(p.data["text"]) for p in full.publications] == [0, 1, 2, 3, 4, 5]
    offsets = [p.offset for p in full.publications]
    assert offsets == list(range(offsets[0], offsets[0] + 6))
    assert full.offset == offsets[-1]
    assert full.epoch == ctx.stream_position.epoch
    assert all(p.info is not None and p.info.user == "alice" for p in full.publications)

    first3 = await sub.history(limit=3)
    assert [int(p.data["text"]) for p in first3.publications] == [0, 1, 2]

    newest2 = await sub.history(limit=2, reverse=True)
    assert [int(p.data["text"]) for p in newest2.publications] == [5, 4]

    since = await sub.history(limit=10, since=StreamPosition(offsets[2], full.epoch))
    assert [int(p.data["text"]) for p in since.publications] == [3, 4, 5]
    assert since.offset == full.offset

    since_top = await sub.history(limit=10, since=StreamPosition(full.offset, full.epoch))
    assert since_top.publications == []

    with pytest.raises(ReplyError) as err:
        await sub.history(limit=10, since=StreamPosition(offsets[0], "not-the-epoch"))
    assert err.value.code == 112


async def test_history_size_is_bounded(server_factory, clients) -> None:
    server = await server_factory({"SIGNAL_HISTORY_SIZE": 3}, name="small-history")
    alice, ev = clients(server, "alice")
    await connect(alice, ev)
    sub, sev, _ = await subscribe(alice, "room:alice", **ROOM_OPTS)
    for n in range(5):
        await sub.publish(msg(str(n)))
    await sev.wait_count("publication", 5)
    history = await sub.history(limit=100)
    assert [int(p.data["text"]) for p in history.publications] == [2, 3, 4]


# ------------------------------------------------------------------ permissions


async def test_forbidden_channels(server, clients) -> None:
    alice, ev = clients(server, "alice")
    await connect(alice, ev)

    assert await subscribe_error(alice, "chat:x") == 102
    assert await subscribe_error(alice, "user:#bob") == 103
    assert await subscribe_error(alice, "dm:#bob,carol") == 103

    with pytest.raises(ReplyError) as err:
        await alice.publish("user:#alice", msg("to myself"))
    assert err.value.code == 103, err.value
    with pytest.raises(ReplyError) as err:
        await alice.publish("chat:x", msg("?"))
    assert err.value.code == 102, err.value
    with pytest.raises(ReplyError) as err:
        await alice.publish("dm:#bob,carol", msg("psst"))
    assert err.value.code == 103, err.value

    # Errors fail commands, not the connection.
    assert alice.state == ClientState.CONNECTED
    assert not ev.of("connecting", since=1)


async def test_dm_between_its_two_users(server, clients) -> None:
    alice, ev_a = clients(server, "alice")
    bob, ev_b = clients(server, "bob")
    alice_id = await connect(alice, ev_a)
    await connect(bob, ev_b)
    channel = "dm:#alice,bob"
    sub_a, _, _ = await subscribe(alice, channel, recoverable=True, positioned=True)
    _, sev_b, _ = await subscribe(bob, channel, recoverable=True, positioned=True)

    await sub_a.publish(msg("hi bob"))
    pub = (await sev_b.wait_for("publication")).pub
    assert pub.data == msg("hi bob")
    assert (pub.info.user, pub.info.client) == ("alice", alice_id)

    carol, ev_c = clients(server, "carol")
    await connect(carol, ev_c)
    assert await subscribe_error(carol, channel) == 103


# --------------------------------------------------------------------- recovery


async def test_recovery_of_missed_room_publications(server, clients) -> None:
    alice, ev_a = clients(server, "alice")
    bob, ev_b = clients(server, "bob")
    await connect(alice, ev_a)
    await connect(bob, ev_b)
    sub_a, sev_a, _ = await subscribe(alice, "room:alice", **ROOM_OPTS)
    sub_b, _sev_b, _ = await subscribe(bob, "room:alice", **ROOM_OPTS)

    await sub_b.publish(msg("seen"))
    last_seen = (await sev_a.wait_for("publication")).pub.offset

    await alice.disconnect()
    assert alice.state == ClientState.DISCONNECTED
    assert sub_a.state == SubscriptionState.SUBSCRIBING

    for n in range(5):
        await sub_b.publish(msg(str(n)))

    mark = sev_a.mark()
    await connect(alice, ev_a)
    ctx = await sev_a.wait_for("subscribed", since=mark)
    assert ctx.was_recovering is True
    assert ctx.recovered is True, ctx

    pubs = [c.pub for c in await sev_a.wait_count("publication", 5, since=mark)]
    assert [int(p.data["text"]) for p in pubs] == [0, 1, 2, 3, 4]
    assert [p.offset for p in pubs] == [last_seen + i for i in range(1, 6)]
    assert all(p.info.user == "bob" for p in pubs)

    # Nothing twice, and live publications continue after the recovered ones.
    await sub_b.publish(msg("live"))
    live = await sev_a.wait_for("publication", lambda c: c.pub.data["text"] == "live", since=mark)
    assert live.pub.offset == last_seen + 6
    assert len(sev_a.of("publication", since=mark)) == 6


async def test_recovery_fails_cleanly_when_history_was_trimmed(server_factory, clients) -> None:
    server = await server_factory({"SIGNAL_HISTORY_SIZE": 3}, name="small-history")
    alice, ev_a = clients(server, "alice")
    bob, ev_b = clients(server, "bob")
    await connect(alice, ev_a)
    await connect(bob, ev_b)
    sub_a, sev_a, _ = await subscribe(alice, "room:alice", **ROOM_OPTS)
    sub_b, _, _ = await subscribe(bob, "room:alice", **ROOM_OPTS)
    await sub_b.publish(msg("-1"))
    await sev_a.wait_for("publication")

    await alice.disconnect()
    for n in range(5):  # more than the 3 the server keeps
        await sub_b.publish(msg(str(n)))

    mark = sev_a.mark()
    await connect(alice, ev_a)
    ctx = await sev_a.wait_for("subscribed", since=mark)
    assert ctx.was_recovering is True
    assert ctx.recovered is False
    assert ctx.stream_position is not None
    # The position moved to the stream top so that the app can reload its state.
    history = await sub_a.history(limit=10)
    assert ctx.stream_position.offset == history.offset


async def test_recovery_of_personal_server_side_subscription(server, clients) -> None:
    alice, ev = clients(server, "alice")
    await connect(alice, ev)
    first = await ev.wait_for("subscribed", lambda c: c.channel == "user:#alice")
    assert first.recoverable is True
    position = first.stream_position

    await alice.disconnect()
    mark = ev.mark()
    await connect(alice, ev)
    again = await ev.wait_for("subscribed", lambda c: c.channel == "user:#alice", since=mark)
    # The SDK sent connect.subs {"user:#alice": {recover, offset, epoch}}.
    assert again.was_recovering is True
    assert again.recovered is True, again
    assert again.stream_position == position


# ----------------------------------------------------------- liveness / shutdown


async def test_connection_survives_ping_pong_cycles(server, clients) -> None:
    # The default server pings every 2 s and wants a pong within 1 s. With
    # max_server_ping_delay=1.5 the SDK reconnects if no ping came for 3.5 s, and
    # the server closes with 3012 if the SDK's pongs are not accepted.
    alice, ev = clients(server, "alice", max_server_ping_delay=1.5)
    alice_id = await connect(alice, ev)
    await asyncio.sleep(5.5)
    assert alice.state == ClientState.CONNECTED
    assert ev.kinds().count("connecting") == 1, ev.events  # only the initial connect
    assert ev.of("connected")[-1].client == alice_id
    assert (await alice.rpc("server.info", {})).data["client"] == alice_id


async def test_invalid_token_is_terminal(server, clients) -> None:
    # Right claims, wrong key.
    forged = jwt.encode({"sub": "alice", "exp": int(time.time()) + 3600}, "x" * 64)
    alice, ev = clients(server, "alice", token=forged)
    await alice.connect()
    ctx = await ev.wait_for("disconnected")
    assert alice.state == ClientState.DISCONNECTED
    assert ctx.code in (3500, 101), ctx  # close 3500 invalid token, or error 101
    assert not ev.of("connected")


async def test_expired_token_is_refreshed_with_get_token(server, clients) -> None:
    calls: list[float] = []

    async def get_token() -> str:
        calls.append(time.monotonic())
        return server.token("alice")

    expired = server.token("alice", ttl_s=-60)
    alice, ev = clients(server, "alice", token=expired, get_token=get_token)
    await alice.connect()
    await ev.wait_for("connected", timeout=10)
    assert len(calls) == 1
    assert (await alice.rpc("server.info", {})).data["user"] == "alice"


async def test_sigterm_drains_clients_with_3001_and_exits_0(server_factory, clients) -> None:
    server = await server_factory(
        {"SIGNAL_PING_INTERVAL_S": 2, "SIGNAL_PONG_TIMEOUT_S": 1, "SIGNAL_DRAIN_S": 1},
        name="draining",
    )
    alice, ev = clients(server, "alice", min_reconnect_delay=0.5, max_reconnect_delay=1.0)
    await connect(alice, ev)
    await subscribe(alice, "room:alice", **ROOM_OPTS)

    mark = ev.mark()
    rc = await server.aterminate(timeout=20)
    assert rc == 0, server.log_tail()
    ctx = await ev.wait_for("connecting", since=mark)
    assert ctx.code == 3001, (ctx, ev.events[mark:])
    assert alice.state == ClientState.CONNECTING  # 3001 means: reconnect
    await alice.disconnect()
