"""Several server instances sharing one real redis-server behave as one server.

Every test starts 2-3 ``python -m signaling serve`` processes with the same
``REDIS_URL`` and JWT secret, and talks to them over real WebSockets: raw
protocol frames (tests/support/loadcheck.py) and the centrifuge-python SDK.

* publications cross instances, once each, in offset order, whoever publishes
  where;
* a client that reconnects to a different instance recovers exactly what it
  missed (rooms, and its personal channel through ``connect.subs``);
* presence, presence_stats, join and leave span instances.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from centrifuge import ClientState

from support.loadcheck import (
    Harness,
    Publisher,
    RawClient,
    SdkSubscriber,
    Subscriber,
    audit,
    message,
    now,
    pub_key,
    wait_until,
)
from support.processes import RedisProcess, ServerProcess
from support.sdk import SubEvents

TIMEOUT = 5.0


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    h = Harness()
    yield h
    await h.close()


@pytest.fixture
def secret() -> str:
    return secrets.token_hex(32)


@pytest.fixture
def cluster(server_factory: Any, redis_server: RedisProcess, secret: str) -> Callable[..., Any]:
    """``await cluster(n, **env)``: n instances on one Redis, one JWT secret."""

    async def start(n: int, **env: Any) -> list[ServerProcess]:
        full = {
            "REDIS_URL": redis_server.url,
            "SIGNAL_COMMANDS_PER_SECOND": "0",
            "SIGNAL_LOG_LEVEL": "INFO",
            **{k: str(v) for k, v in env.items()},
        }
        names = "abcdefgh"[:n]
        return list(
            await asyncio.gather(
                *(server_factory(full, name=f"inst-{c}", secret=secret) for c in names)
            )
        )

    return start


def uniq(name: str) -> str:
    """A user of its own per test (call invites are rate-limited per user)."""
    return f"{name}-{uuid.uuid4().hex[:6]}"


def n_of(data: Any) -> int:
    key = pub_key(data)
    assert key is not None, data
    return key[1]


def result_of(reply: dict[str, Any], method: str) -> dict[str, Any]:
    assert method in reply, reply
    return dict(reply[method])


async def server_info(client: RawClient) -> dict[str, Any]:
    reply = await client.call("rpc", {"method": "server.info", "data": {}})
    return dict(result_of(reply, "rpc")["data"])


async def node_name(client: RawClient) -> str:
    return str((await server_info(client))["node"])


async def client_id(client: RawClient) -> str:
    return str((await server_info(client))["client"])


# --------------------------------------------------------------------- fan-out


async def test_publications_cross_every_instance_once_and_in_order(
    cluster: Any, harness: Harness
) -> None:
    servers = await cluster(3)
    room = "room:fanout"
    targets = [s.ws_url for s in servers]
    token = servers[0].token  # one secret: a token is good on every instance
    subs = []
    for i in range(len(servers)):  # one subscriber per instance
        sub = Subscriber(
            f"sub-{i}",
            f"reader{i}",
            lambda u=f"reader{i}": token(u),
            lambda: targets,
            [room],
            start_at=i,
        )
        harness.subscribers.append(sub)
        subs.append(await sub.start())
    assert len({sub.url for sub in subs}) == 3
    sdk, sdk_events = harness.sdk_client(servers[1], "sdkreader")
    await sdk.connect()
    await sdk.ready(timeout=TIMEOUT)
    sdk_sub = await SdkSubscriber("sdk", sdk, [room]).start()

    publishers = [await harness.connected(s, f"writer{i}") for i, s in enumerate(servers)]
    names = [await node_name(p) for p in publishers]
    assert len(set(names)) == 3, names

    rounds = 30
    futures = []
    for n in range(rounds):
        for i, pub in enumerate(publishers):
            body = {"channel": room, "data": message(f"w{i}", n + 1)}
            futures.append(await pub.send("publish", body))
    replies = await asyncio.wait_for(asyncio.gather(*futures), TIMEOUT)
    assert all("publish" in r for r in replies), [r for r in replies if "publish" not in r]
    total = rounds * len(publishers)

    everyone = [*subs, sdk_sub]
    await wait_until(
        lambda: all(len(s.deliveries) >= total for s in everyone),
        TIMEOUT,
        what=f"{total} deliveries each: {[len(s.deliveries) for s in everyone]}",
    )
    await asyncio.sleep(0.3)  # anything extra would show up now
    for sub in everyone:
        offsets = [d.offset for d in sub.deliveries]
        assert offsets == list(range(1, total + 1)), (sub.name, offsets)
        keys = [d.key for d in sub.deliveries]
        assert len(set(keys)) == total, sub.name
        assert sub.anomalies == [], (sub.name, sub.anomalies)
    # Every instance saw the same stream in the same order.
    reference = [d.key for d in subs[0].deliveries]
    assert all([d.key for d in s.deliveries] == reference for s in everyone)
    assert sdk_events.of("error") == []

    # History is the same stream whichever instance is asked.
    tops = []
    for pub in publishers:
        hist = result_of(await pub.call("history", {"channel": room, "limit": -1}), "history")
        assert [p["offset"] for p in hist["publications"]] == list(range(1, total + 1))
        tops.append((hist["offset"], hist["epoch"]))
    assert len(set(tops)) == 1 and tops[0][0] == total, tops


async def test_publisher_on_any_instance_audited_under_steady_rate(
    cluster: Any, harness: Harness
) -> None:
    """A steady 150 publications/s from three instances to three rooms: every
    acknowledged one reaches every subscriber of its room once, in order."""
    servers = await cluster(3)
    rooms = ["room:s1", "room:s2", "room:s3"]
    targets = [s.ws_url for s in servers]
    token = servers[0].token
    subs = []
    for i in range(6):
        sub = Subscriber(
            f"sub-{i}", f"r{i}", lambda u=f"r{i}": token(u), lambda: targets, rooms, start_at=i
        )
        harness.subscribers.append(sub)
        subs.append(await sub.start())
    publishers = [
        Publisher(f"w{i}", lambda u=f"w{i}": token(u), lambda: targets, rooms, 50, start_at=i)
        for i in range(3)
    ]
    for p in publishers:
        await p.start()
    try:
        await asyncio.sleep(3)
        for p in publishers:
            await p.stop()
    finally:
        for p in publishers:
            await p.close()

    def settled() -> bool:
        return not audit(publishers, subs).lost

    await wait_until(settled, TIMEOUT, what="every acknowledged publication delivered")
    result = audit(publishers, subs)
    print(result.summary())
    assert result.acked >= 300 and result.refused == 0 and result.unknown == 0, result.summary()
    assert result.received == result.expected, result.details()
    assert not result.excused and not result.duplicates and not result.order, result.details()
    assert not result.anomalies, result.details()
    assert all(not s.unsubscribes and len(s.disconnects) == 0 for s in subs)


# -------------------------------------------------------------------- recovery


async def test_recovery_after_reconnecting_to_a_different_instance(
    cluster: Any, harness: Harness
) -> None:
    a, b, c = await cluster(3)
    room = "room:moving"

    reader = await harness.connected(a, "alice")
    sub = result_of(await reader.call("subscribe", {"channel": room}), "subscribe")
    epoch = sub["epoch"]
    writer = await harness.connected(b, "bob")
    for n in (1, 2):
        assert "publish" in await writer.call("publish", {"channel": room, "data": message("w", n)})
    seen = [
        await reader.wait_push(lambda p, n=n: p.get("pub", {}).get("offset") == n) for n in (1, 2)
    ]
    assert [n_of(p["pub"]["data"]) for p in seen] == [1, 2]
    await reader.close()

    missed = 7
    for n in range(3, 3 + missed):
        assert "publish" in await writer.call("publish", {"channel": room, "data": message("w", n)})

    again = await harness.open(c)
    connect = result_of(await again.call("connect", {"token": c.token("alice")}), "connect")
    assert len({await node_name(x) for x in (writer, again)}) == 2
    assert connect["subs"]["user:#alice"]["epoch"]
    body = {"channel": room, "recover": True, "offset": 2, "epoch": epoch}
    result = result_of(await again.call("subscribe", body), "subscribe")
    assert result["recovered"] is True and result["was_recovering"] is True, result
    assert result["epoch"] == epoch
    pubs = result["publications"]
    assert [p["offset"] for p in pubs] == list(range(3, 3 + missed))
    assert [n_of(p["data"]) for p in pubs] == list(range(3, 3 + missed))
    assert all(p["info"]["user"] == "bob" for p in pubs)

    # Live publications continue after the recovered ones, from any instance.
    other = await harness.connected(a, "carol")
    assert "publish" in await other.call("publish", {"channel": room, "data": message("w", 100)})
    live = await again.wait_push(lambda p: "pub" in p)
    assert live["pub"]["offset"] == 3 + missed and n_of(live["pub"]["data"]) == 100
    await asyncio.sleep(0.3)
    assert [p for p in again.pushes if "pub" in p] == [live]  # nothing twice


async def test_personal_channel_recovers_through_connect_subs_on_another_instance(
    cluster: Any, harness: Harness
) -> None:
    a, b, c = await cluster(3)
    first = await harness.connected(a, "dave")
    names = {await node_name(first)}
    assert (await server_info(first))["user"] == "dave"
    # The personal channel's position is the same stream from every instance.
    second = await harness.connected(b, "dave")
    names.add(await node_name(second))
    positions = []
    for client in (first, second):
        hist = result_of(
            await client.call("history", {"channel": "user:#dave", "limit": 0}), "history"
        )
        positions.append((hist.get("offset", 0), hist["epoch"]))
    assert positions[0] == positions[1], positions
    offset, epoch = positions[0]
    await first.close()

    third = await harness.open(c)
    subs = {"user:#dave": {"recover": True, "offset": offset, "epoch": epoch}}
    connect = result_of(
        await third.call("connect", {"token": c.token("dave"), "subs": subs}), "connect"
    )
    names.add(await node_name(third))
    assert len(names) == 3
    personal = connect["subs"]["user:#dave"]
    assert personal["was_recovering"] is True and personal["recovered"] is True, personal
    assert personal["epoch"] == epoch

    # A position the stream never had is reported as unrecoverable, not faked.
    fourth = await harness.open(a)
    bogus = {"user:#dave": {"recover": True, "offset": 3, "epoch": "not-an-epoch"}}
    connect = result_of(
        await fourth.call("connect", {"token": a.token("dave"), "subs": bogus}), "connect"
    )
    personal = connect["subs"]["user:#dave"]
    assert personal["was_recovering"] is True and personal.get("recovered") is not True
    assert personal["epoch"] == epoch


async def test_personal_channel_gets_server_publications_from_any_instance(
    cluster: Any, harness: Harness
) -> None:
    """The server publishes to ``user:#<id>`` (call events, handlers/calls)
    from whichever instance handles the RPC; the user receives them live on
    its own instance and recovers the missed ones on another."""
    a, b, c = await cluster(3)
    callee = uniq("callee")
    personal = f"user:#{callee}"
    callee_a = await harness.connected(a, callee)
    first_caller = await harness.connected(b, uniq("caller"))
    second_caller = await harness.connected(a, uniq("caller"))

    async def rpc(client: RawClient, method: str, data: dict[str, Any]) -> dict[str, Any]:
        reply = await client.call("rpc", {"method": method, "data": data})
        return dict(result_of(reply, "rpc")["data"])

    first = (await rpc(first_caller, "call.invite", {"callee": callee, "media": "audio"}))[
        "call_id"
    ]
    push = await callee_a.wait_push(lambda p: p.get("channel") == personal and "pub" in p)
    assert (
        push["pub"]["data"]["type"] == "call.incoming" and push["pub"]["data"]["call_id"] == first
    )
    last_seen = push["pub"]["offset"]
    hist = result_of(await callee_a.call("history", {"channel": personal, "limit": 0}), "history")
    epoch = hist["epoch"]
    await callee_a.close()

    # While the callee is away: events published by instances b and a.
    await rpc(first_caller, "call.cancel", {"call_id": first})
    second = (await rpc(second_caller, "call.invite", {"callee": callee, "media": "video"}))[
        "call_id"
    ]

    callee_c = await harness.open(c)
    subs = {personal: {"recover": True, "offset": last_seen, "epoch": epoch}}
    connect = result_of(
        await callee_c.call("connect", {"token": c.token(callee), "subs": subs}), "connect"
    )
    result = connect["subs"][personal]
    assert result["recovered"] is True and result["was_recovering"] is True, result
    pubs = result.get("publications", [])
    offsets = [p["offset"] for p in pubs]
    assert offsets == list(range(last_seen + 1, last_seen + 1 + len(pubs))), offsets
    events = [(p["data"]["type"], p["data"]["call_id"]) for p in pubs]
    assert ("call.cancelled", first) in events and ("call.incoming", second) in events, events

    # And live again, published by another instance than the callee's.
    await rpc(second_caller, "call.cancel", {"call_id": second})
    live = await callee_c.wait_push(lambda p: p.get("channel") == personal and "pub" in p)
    assert live["pub"]["offset"] == offsets[-1] + 1
    assert (live["pub"]["data"]["type"], live["pub"]["data"]["call_id"]) == (
        "call.cancelled",
        second,
    )


async def test_sdk_recovers_on_the_instance_that_replaced_its_server(
    server_factory: Any, redis_server: RedisProcess, secret: str, harness: Harness
) -> None:
    """The SDK reconnects to its one URL: instance A drains (3001), exits, and
    instance C starts on A's port; the SDK recovers there what B published."""
    env = {
        "REDIS_URL": redis_server.url,
        "SIGNAL_DRAIN_S": "0.3",
        "SIGNAL_COMMANDS_PER_SECOND": "0",
    }
    a, b = await asyncio.gather(
        server_factory(env, name="inst-a", secret=secret),
        server_factory(env, name="inst-b", secret=secret),
    )
    room = "room:sdkmove"
    client, events = harness.sdk_client(
        a, "erin", min_reconnect_delay=0.05, max_reconnect_delay=0.3
    )
    await client.connect()
    await client.ready(timeout=TIMEOUT)
    node_a = (await client.rpc("server.info", {})).data["node"]
    first_personal = await events.wait_for("subscribed", lambda c: c.channel == "user:#erin")
    sub_events = SubEvents()
    sub = client.new_subscription(room, events=sub_events, recoverable=True, positioned=True)
    await sub.subscribe()
    await sub_events.wait_for("subscribed")

    writer = await harness.connected(b, "frank")
    for n in (1, 2):
        assert "publish" in await writer.call("publish", {"channel": room, "data": message("w", n)})
    await sub_events.wait_count("publication", 2)

    mark, sub_mark = events.mark(), sub_events.mark()
    assert await a.aterminate(timeout=15) == 0, a.log_tail()
    connecting = await events.wait_for("connecting", since=mark)
    assert connecting.code == 3001, connecting
    for n in range(3, 8):
        assert "publish" in await writer.call("publish", {"channel": room, "data": message("w", n)})

    c = await server_factory(env, name="inst-c", secret=secret, port=a.port)
    await events.wait_for("connected", since=mark, timeout=10)
    assert client.state == ClientState.CONNECTED
    assert (await client.rpc("server.info", {})).data["node"] != node_a
    ctx = await sub_events.wait_for("subscribed", since=sub_mark)
    assert ctx.was_recovering is True and ctx.recovered is True, ctx
    pubs = [p.pub for p in await sub_events.wait_count("publication", 5, since=sub_mark)]
    assert [n_of(p.data) for p in pubs] == [3, 4, 5, 6, 7]
    assert [p.offset for p in pubs] == [3, 4, 5, 6, 7]
    personal = await events.wait_for("subscribed", lambda x: x.channel == "user:#erin", since=mark)
    assert personal.was_recovering is True and personal.recovered is True, personal
    assert personal.stream_position == first_personal.stream_position

    assert "publish" in await writer.call("publish", {"channel": room, "data": message("w", 8)})
    live = await sub_events.wait_for("publication", lambda x: n_of(x.pub.data) == 8, since=sub_mark)
    assert live.pub.offset == 8
    await asyncio.sleep(0.3)
    assert len(sub_events.of("publication", since=sub_mark)) == 6
    assert c.running


# ------------------------------------------------------------------ presence


def _client_ids(presence: dict[str, Any]) -> set[str]:
    return set(presence.get("presence", {}))


async def test_presence_and_join_leave_across_instances(cluster: Any, harness: Harness) -> None:
    a, b, c = await cluster(3)
    room = "room:gathering"

    watcher = await harness.connected(a, "alice")
    assert "subscribe" in await watcher.call("subscribe", {"channel": room, "join_leave": True})
    far_watcher = await harness.connected(c, "walt")
    assert "subscribe" in await far_watcher.call("subscribe", {"channel": room, "join_leave": True})
    alice_id = await client_id(watcher)

    bob = await harness.connected(b, "bob")
    bob_id = await client_id(bob)
    assert "subscribe" in await bob.call("subscribe", {"channel": room})
    carol_c = await harness.connected(c, "carol")
    carol_a = await harness.connected(a, "carol")
    ids = {}
    for name, client in (("carol_c", carol_c), ("carol_a", carol_a)):
        ids[name] = await client_id(client)
        assert "subscribe" in await client.call("subscribe", {"channel": room})

    # Joins reach watchers on other instances, with the joining client's info.
    for w in (watcher, far_watcher):
        for cid, user in (
            (bob_id, "bob"),
            (ids["carol_c"], "carol"),
            (ids["carol_a"], "carol"),
        ):
            join = await w.wait_push(
                lambda p, cid=cid: p.get("join", {}).get("info", {}).get("client") == cid
            )
            assert join["channel"] == room and join["join"]["info"]["user"] == user

    walt_id = await client_id(far_watcher)
    everyone = {alice_id, walt_id, bob_id, ids["carol_c"], ids["carol_a"]}
    for client in (watcher, bob, carol_c):  # instances a, b, c
        presence = result_of(await client.call("presence", {"channel": room}), "presence")
        assert _client_ids(presence) == everyone, presence
        users = {info["user"] for info in presence["presence"].values()}
        assert users == {"alice", "walt", "bob", "carol"}
        stats = result_of(await client.call("presence_stats", {"channel": room}), "presence_stats")
        assert stats == {"num_clients": 5, "num_users": 4}, stats

    # Leave by unsubscribe (instance b) and by closing the connection (instance c).
    assert "unsubscribe" in await bob.call("unsubscribe", {"channel": room})
    await carol_c.close()
    for w in (watcher, far_watcher):
        for cid in (bob_id, ids["carol_c"]):
            leave = await w.wait_push(
                lambda p, cid=cid: p.get("leave", {}).get("info", {}).get("client") == cid
            )
            assert leave["channel"] == room

    # The leaving clients' presence is removed (asynchronously after the leave).
    remaining = {alice_id, walt_id, ids["carol_a"]}
    deadline = now() + TIMEOUT
    while True:
        presence = result_of(await bob.call("presence", {"channel": room}), "presence")
        if _client_ids(presence) == remaining or now() > deadline:
            break
        await asyncio.sleep(0.1)
    assert _client_ids(presence) == remaining, presence
    stats = result_of(await far_watcher.call("presence_stats", {"channel": room}), "presence_stats")
    assert stats == {"num_clients": 3, "num_users": 3}
    # Each join and leave arrived once (a watcher's own join does not matter).
    others = {bob_id, ids["carol_c"], ids["carol_a"]}
    for w, own, expected_joins in (
        (watcher, alice_id, {walt_id} | others),
        (far_watcher, walt_id, others),
    ):
        joins = [p["join"]["info"]["client"] for p in w.pushes if "join" in p]
        joins = [j for j in joins if j != own]
        assert sorted(joins) == sorted(expected_joins), joins
        leaves = [p["leave"]["info"]["client"] for p in w.pushes if "leave" in p]
        assert sorted(leaves) == sorted([bob_id, ids["carol_c"]]), leaves
