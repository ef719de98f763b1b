"""Chat and presence handlers on an in-process node (embedded broker and
state store, no sockets): what needs a failure injected or another handler's
call (``set_call_busy``) that a client cannot trigger."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from redis.crc import key_slot

from handlers import app
from handlers import presence as presence_module
from handlers.chat import messages as messages_keys
from handlers.chat import moderation as moderation_keys
from handlers.chat.messages import ChatPublisher
from handlers.chat.metrics import ChatMetrics
from handlers.chat.moderation import Moderation
from handlers.presence import (
    NODES_KEY,
    OFFLINE_DUE_KEY,
    PresenceTracker,
    node_ttl_s,
    publish_if_changed,
    set_call_busy,
    set_status,
    status_view,
)
from signaling.auth import Credentials
from signaling.broker import memory as memory_broker
from signaling.broker.base import BrokerUnavailable, Claim
from signaling.broker.redis import RedisBroker
from signaling.config import Settings
from signaling.errors import SignalError
from signaling.metrics import Metrics
from signaling.node import ConnectionEvent, Node, PublishContext, PublishDecision, RpcContext
from signaling.protocol import ClientInfo
from signaling.server import build_node
from signaling.users import online_key

ROOM = "room:cre"


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    settings = Settings(dev=True, port=0, offline_grace_s=0.1, viewer_count_interval_s=60.0)
    node = build_node(settings, app, Metrics())
    await node.start()
    yield node
    await node.close()


def chat(node: Node) -> tuple[ChatPublisher, ChatMetrics, Moderation]:
    metrics = ChatMetrics(CollectorRegistry())
    moderation = Moderation(node, metrics)
    return ChatPublisher(node, metrics, moderation), metrics, moderation


def context(node: Node, data: Any, user: str = "fan", channel: str = ROOM) -> PublishContext:
    raw = orjson.dumps(data)
    info = ClientInfo(user, f"client-{user}")
    return PublishContext(
        user, info.client, info, channel, orjson.loads(raw), raw, node.channel_options(channel)
    )


def fail_once(
    monkeypatch: pytest.MonkeyPatch, target: object, name: str, *, after_running: bool = False
) -> None:
    """Make the coroutine method ``target.name`` fail once with BrokerUnavailable:
    before doing anything, or ``after_running`` it (its reply lost)."""
    real = getattr(target, name)
    failures = [BrokerUnavailable("down")]

    async def flaky(*args: Any, **kwargs: Any) -> Any:
        if failures and not after_running:
            raise failures.pop()
        result = await real(*args, **kwargs)
        if failures:
            raise failures.pop()
        return result

    monkeypatch.setattr(target, name, flaky)


async def history(node: Node, channel: str) -> list[Any]:
    page = await node.broker.history(
        channel, since=None, limit=-1, reverse=False, history=node.channel_options(channel).history
    )
    return [orjson.loads(pub.data) for pub in page.publications]


async def test_message_is_published_by_the_hook_and_acknowledged(node: Node) -> None:
    publisher, metrics, _ = chat(node)
    decision = await publisher.on_publish(context(node, {"type": "message", "text": "hi"}))
    assert decision == PublishDecision(skip=True)
    assert await history(node, ROOM) == [{"type": "message", "text": "hi"}]
    assert metrics.publications.labels("room", "message")._value.get() == 1


async def test_a_publication_whose_reply_was_lost_is_not_delivered_again_on_retry(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim and the publication are one step (one script on Redis): when it
    ran but its reply was lost (the connection dropped, the reply timed out),
    the client gets a temporary error and retries with the same client_msg_id;
    the claim must still be there, or the message is delivered twice."""
    publisher, metrics, _ = chat(node)
    fail_once(monkeypatch, node, "publish_claimed", after_running=True)
    message = {"type": "message", "text": "hi", "client_msg_id": "m1"}
    with pytest.raises(BrokerUnavailable):
        await publisher.on_publish(context(node, message))
    assert await publisher.on_publish(context(node, message)) == PublishDecision(skip=True)
    assert await history(node, ROOM) == [message]
    assert metrics.deduplicated.labels("room")._value.get() == 1


async def test_other_channels_are_left_to_the_core(node: Node) -> None:
    publisher, _, _ = chat(node)
    assert await publisher.on_publish(context(node, {"n": 1}, channel="user:#fan")) is None


async def test_failed_publish_releases_dedupe_and_slow_mode_claims(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, metrics, moderation = chat(node)
    await node.store.set("chat:slow:{room:cre}", "60")
    fail_once(monkeypatch, node, "publish")
    message = {"type": "message", "text": "hi", "client_msg_id": "m1"}
    with pytest.raises(BrokerUnavailable):
        await publisher.on_publish(context(node, message))
    # The client's retry is delivered: neither claim survived the failure.
    assert await publisher.on_publish(context(node, message)) == PublishDecision(skip=True)
    assert await history(node, ROOM) == [message]
    assert metrics.deduplicated.labels("room")._value.get() == 0
    # Now the retry of a delivered message is a duplicate, and slow mode holds.
    assert await publisher.on_publish(context(node, message)) == PublishDecision(skip=True)
    assert metrics.deduplicated.labels("room")._value.get() == 1
    with pytest.raises(SignalError) as refused:
        await publisher.on_publish(context(node, {"type": "message", "text": "again"}))
    assert refused.value.value.code == 1112
    assert await history(node, ROOM) == [message]
    assert not await moderation.is_moderator(ROOM, "fan")


async def test_slow_mode_refusal_releases_the_dedupe_claim(node: Node) -> None:
    publisher, _, _ = chat(node)
    await node.store.set("chat:slow:{room:cre}", "60")
    await publisher.on_publish(context(node, {"type": "message", "text": "first"}))
    message = {"type": "message", "text": "second", "client_msg_id": "m2"}
    for _ in range(2):
        with pytest.raises(SignalError) as refused:
            await publisher.on_publish(context(node, message))
        # Refused again, not taken for an already-delivered duplicate.
        assert refused.value.value.code == 1112


@pytest.mark.parametrize(("bar", "code"), [("ban", 1110), ("timeout", 1111)])
async def test_barred_message_takes_no_dedupe_claim(node: Node, bar: str, code: int) -> None:
    """Refused for a bar, a message must leave no dedupe claim behind: its retry
    once the bar is lifted is published, not acknowledged as a duplicate and lost."""
    publisher, metrics, _ = chat(node)
    bar_key = f"chat:{bar}:{{{ROOM}}}:fan"
    await node.store.set(bar_key, f"{time.time() + 60:.3f}")
    message = {"type": "message", "text": "hi", "client_msg_id": "m1"}
    with pytest.raises(SignalError) as refused:
        await publisher.on_publish(context(node, message))
    assert refused.value.value.code == code
    assert await node.store.get(f"chat:dedupe:{{{ROOM}}}:m1:fan") is None
    await node.store.delete(bar_key)
    assert await publisher.on_publish(context(node, message)) == PublishDecision(skip=True)
    assert await history(node, ROOM) == [message]
    assert metrics.deduplicated.labels("room")._value.get() == 0
    assert metrics.refusals.labels(str(code))._value.get() == 1


class CountingStore:
    """The node's store, counting the commands the chat hook issues."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return await method(*args, **kwargs)

        return call


@pytest.mark.parametrize(
    ("channel", "data", "commands"),
    [
        # Bars, dedupe claim (and publish: Node.publish_claimed, one script on
        # Redis; the embedded engine's claim_unless here): one command.
        (ROOM, {"type": "message", "text": "hi", "client_msg_id": "m1"}, ["claim_unless"]),
        (ROOM, {"type": "message", "text": "hi"}, ["get_many"]),
        ("dm:#a,fan", {"type": "message", "text": "hi", "client_msg_id": "m1"}, ["claim_unless"]),
        ("dm:#a,fan", {"type": "message", "text": "hi"}, []),
        (ROOM, {"type": "typing"}, ["get_many", "incr"]),
        ("dm:#a,fan", {"type": "typing"}, ["incr"]),
    ],
)
async def test_store_commands_per_publication(
    node: Node, monkeypatch: pytest.MonkeyPatch, channel: str, data: Any, commands: list[str]
) -> None:
    """The performance budget rests on these counts (each command is a round trip
    and Python work per publication on Redis)."""
    store = CountingStore(node.store)
    monkeypatch.setattr(node, "store", store)
    publisher, _, _ = chat(node)
    await publisher.on_publish(context(node, data, channel=channel))
    assert store.calls == commands


async def test_slow_mode_reads_the_interval_with_the_bars(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    await node.store.set("chat:slow:{room:cre}", "60")
    store = CountingStore(node.store)
    monkeypatch.setattr(node, "store", store)
    publisher, _, _ = chat(node)
    await publisher.on_publish(context(node, {"type": "message", "text": "hi"}))
    # The interval came with the bars: no separate read of chat:slow.
    assert store.calls == ["get_many", "zrange_by_score", "set_if_absent"]
    with pytest.raises(SignalError) as refused:
        await publisher.on_publish(context(node, {"type": "message", "text": "again"}))
    assert refused.value.value.code == 1112
    # The owner is exempt without asking the store who moderates.
    store.calls.clear()
    await publisher.on_publish(context(node, {"type": "message", "text": "mine"}, user="cre"))
    assert store.calls == ["get_many"]


def test_keys_read_together_share_a_cluster_slot() -> None:
    """A room message reads the ban, timeout and slow-mode keys, takes the
    dedupe claim and appends to the channel's stream in one script: on Redis
    Cluster they must hash to one slot, whatever the prefix, user or
    client_msg_id."""
    user, room = "u{1}:x", "room:c-9.z"
    keys = [
        moderation_keys._ban_key(room, user),
        moderation_keys._timeout_key(room, user),
        moderation_keys._slow_key(room),
        messages_keys._dedupe_key(room, "id-1", user),
    ]
    stream_keys = RedisBroker("redis://127.0.0.1:1", prefix="sig:")._stream_keys(room)
    slots = {key_slot(f"sig:{key}".encode()) for key in keys}
    slots |= {key_slot(key.encode()) for key in stream_keys}
    assert slots == {key_slot(room.encode())}


async def test_typing_over_the_rate_is_dropped_and_counted(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    publisher, metrics, _ = chat(node)
    typing = context(node, {"type": "typing"}, channel="dm:#a,fan")
    published = metrics.publications.labels("dm", "typing")
    # Published by the hook (live only), and counted once it was: a broker
    # failure is the client's error 100, not a typing indicator counted.
    fail_once(monkeypatch, node, "publish")
    with pytest.raises(BrokerUnavailable):
        await publisher.on_publish(typing)
    assert published._value.get() == 0
    decisions = [await publisher.on_publish(typing) for _ in range(4)]
    assert decisions == [PublishDecision(skip=True)] * 4
    assert published._value.get() == 1
    assert metrics.typing_dropped._value.get() == 3


async def test_set_call_busy_makes_the_user_busy_while_in_a_call(node: Node) -> None:
    await node.user_presence.went_online("cre")
    await set_status(node, "cre", "away")
    channel = "status:cre"
    assert [p["status"] for p in await history(node, channel)] == ["away"]

    await set_call_busy(node, "cre", "call-1", True)
    view = await status_view(node, "cre")
    assert (view.status, view.chosen, view.in_call) == ("busy", "away", True)
    assert (await history(node, channel))[-1] | {"last_seen_ms": None} == {
        "user": "cre",
        "online": True,
        "status": "busy",
        "chosen": "away",
        "in_call": True,
        "last_seen_ms": None,
    }
    # Choosing another status during the call changes nothing fans see.
    await set_status(node, "cre", "available")
    assert (await history(node, channel))[-1]["status"] == "busy"
    await set_call_busy(node, "cre", "call-1", False)
    assert (await history(node, channel))[-1]["status"] == "available"
    # Twice is harmless.
    await set_call_busy(node, "cre", "call-1", False)
    assert (await status_view(node, "cre")).status == "available"
    # A late clearing of an earlier call leaves the next call's mark.
    await set_call_busy(node, "cre", "call-2", True)
    await set_call_busy(node, "cre", "call-1", False)
    assert (await status_view(node, "cre")).status == "busy"


async def test_busy_user_offline_is_offline(node: Node) -> None:
    await set_call_busy(node, "gone", "call-1", True)
    view = await status_view(node, "gone")
    assert (view.online, view.status, view.in_call) == (False, "offline", True)


async def test_users_of_a_dead_node_are_reaped_and_go_offline(node: Node) -> None:
    store, now = node.store, time.time()
    # "dead" held ghost's only connection and stopped heartbeating a second ago;
    # its online record of ghost would only expire in 30 s.
    await store.zadd(online_key("ghost"), "dead", now + 30)
    await store.zadd("presence:node-users:{dead}", "ghost", now)
    await store.zadd(NODES_KEY, "dead", now - 1)
    await publish_if_changed(node, await status_view(node, "ghost"))
    assert (await history(node, "status:ghost"))[-1]["online"] is True

    tracker = PresenceTracker(node)
    await tracker.heartbeat()
    await tracker.sweep()
    assert (await history(node, "status:ghost"))[-1]["status"] == "offline"
    assert await store.get("presence:reaped:{dead}") == "1"
    # Reaped once: its users were taken, it is no longer listed.
    assert await store.zrange_by_score("presence:node-users:{dead}", 0, float("inf")) == []
    live = [n for n, _ in await store.zrange_by_score(NODES_KEY, 0, float("inf"))]
    assert "dead" not in live and node.name in live


async def test_a_reap_cut_short_is_taken_up_again_after_its_lease(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, now = node.store, time.time()
    for user in ("g1", "g2"):
        await store.zadd(online_key(user), "dead", now + 30)
        await store.zadd("presence:node-users:{dead}", user, now)
        await publish_if_changed(node, await status_view(node, user))
    await store.zadd(NODES_KEY, "dead", now - 1)
    monkeypatch.setattr(presence_module, "_REAP_LEASE_S", 0.3)
    monkeypatch.setattr(presence_module, "_SWEEP_LEASE_S", 0.3)
    tracker = PresenceTracker(node)
    forget = node.user_presence.forget_node

    async def store_fails(user: str, dead: str) -> None:
        raise BrokerUnavailable("the store failed mid-reap")

    monkeypatch.setattr(node.user_presence, "forget_node", store_fails)
    with pytest.raises(BrokerUnavailable):
        await tracker.reap_dead_nodes()
    monkeypatch.setattr(node.user_presence, "forget_node", forget)
    # Claimed: not taken again before its lease runs out...
    await tracker.reap_dead_nodes()
    users = await store.zrange_by_score("presence:node-users:{dead}", 0, float("inf"))
    assert [u for u, _ in users] == ["g1", "g2"]
    # ...and taken up after it, nothing lost.
    await asyncio.sleep(0.4)
    await tracker.reap_dead_nodes()
    assert await store.zrange_by_score("presence:node-users:{dead}", 0, float("inf")) == []
    assert "dead" not in [n for n, _ in await store.zrange_by_score(NODES_KEY, 0, float("inf"))]
    # The same for the offline checks: a sweep cut short loses none of them.
    view = presence_module.status_view
    calls = 0

    async def fails_once(node: Node, user: str) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise BrokerUnavailable("the store failed mid-sweep")
        return await view(node, user)

    monkeypatch.setattr(presence_module, "status_view", fails_once)
    with pytest.raises(BrokerUnavailable):
        await tracker.sweep()
    await tracker.sweep()  # leased: nothing due yet
    for user in ("g1", "g2"):
        assert (await history(node, f"status:{user}"))[-1]["online"] is True
    await asyncio.sleep(0.4)
    await tracker.sweep()
    assert [(await history(node, f"status:{u}"))[-1]["status"] for u in ("g1", "g2")] == [
        "offline",
        "offline",
    ]
    assert await store.zrange_by_score(OFFLINE_DUE_KEY, 0, float("inf")) == []


async def test_a_long_sweep_does_not_let_the_heartbeat_lapse() -> None:
    """After a restart thousands of users may fall due at once; however long
    the sweep takes, the node keeps beating, or its siblings would take it
    for dead and it would republish every user it holds."""
    bare = types.ModuleType("bare_app")
    bare.channel_policy = app.channel_policy  # type: ignore[attr-defined]
    bare.install = lambda node: None  # type: ignore[attr-defined]
    settings = Settings(dev=True, port=0, offline_grace_s=0.1)
    node = build_node(settings, bare, Metrics())
    tracker = PresenceTracker(node)
    ttl = node_ttl_s(settings.offline_grace_s)
    sweeping = asyncio.Event()

    async def slow_sweep() -> None:
        sweeping.set()
        await asyncio.sleep(2 * ttl)

    tracker.sweep = slow_sweep  # type: ignore[method-assign]
    tracker.register()
    await node.start()
    try:
        await asyncio.wait_for(sweeping.wait(), 5)
        await asyncio.sleep(1.5 * ttl)  # well past the TTL of a beat before the sweep
        alive = await node.store.zrange_by_score(NODES_KEY, time.time(), float("inf"))
        assert node.name in [name for name, _ in alive]
    finally:
        await node.close()


class Connection:
    """What the node keeps of a session here: its identity in a set, its id."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id


@pytest.fixture
async def bare_node() -> AsyncIterator[Node]:
    """A node without the app's hooks: the tests drive a tracker by hand."""
    bare = types.ModuleType("bare_app")
    bare.channel_policy = app.channel_policy  # type: ignore[attr-defined]
    bare.install = lambda node: None  # type: ignore[attr-defined]
    node = build_node(Settings(dev=True, port=0, offline_grace_s=0.1), bare, Metrics())
    await node.start()
    yield node
    await node.close()


async def connect(node: Node, tracker: PresenceTracker, user: str) -> Any:
    session = Connection(f"c-{user}")
    node.session_connected(session, user)  # type: ignore[arg-type]
    await tracker.on_connect(ConnectionEvent(user, session.client_id, 1))
    return session


async def test_a_storm_of_connects_is_recorded_in_one_round(
    bare_node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = bare_node
    store = CountingStore(node.store)
    monkeypatch.setattr(node, "store", store)
    tracker = PresenceTracker(node)
    users = [f"u{i}" for i in range(300)]
    for user in users:
        await connect(node, tracker, user)
    await tracker.record_transitions()
    # One command per sorted set and one read per user, whatever the count;
    # then "online" is news for every one of them, and published once.
    assert store.calls.count("zadd_members") == 1
    assert store.calls.count("zrem_members") == 1
    assert store.calls.count("get_groups") == 1
    listed = await node.store.zrange_by_score(
        f"presence:node-users:{{{node.name}}}", 0, float("inf"), limit=1000
    )
    assert sorted(user for user, _ in listed) == sorted(users)
    for user in users[:5]:
        assert [p["online"] for p in await history(node, f"status:{user}")] == [True]
    # Recorded again (a reconnect here): nothing is news, nothing is published.
    store.calls.clear()
    for user in users:
        await tracker.on_connect(ConnectionEvent(user, f"c-{user}", 1))
    await tracker.record_transitions()
    assert "publish" not in " ".join(store.calls)
    assert [p["online"] for p in await history(node, "status:u0")] == [True]


async def test_users_noted_before_a_close_are_recorded(bare_node: Node) -> None:
    node = bare_node
    tracker = PresenceTracker(node)
    # The hooks and the flush at close, not the loops: nothing else records.
    node.on_connect.append(tracker.on_connect)
    node.on_close.append(tracker.flush)
    for user in ("a", "b", "c"):
        node.session_connected(Connection(f"c-{user}"), user)  # type: ignore[arg-type]
    await node.close()
    listed = await node.store.zrange_by_score(
        f"presence:node-users:{{{node.name}}}", 0, float("inf")
    )
    assert sorted(user for user, _ in listed) == ["a", "b", "c"]


async def test_a_node_taken_for_dead_republishes_its_users(bare_node: Node) -> None:
    node = bare_node
    tracker = PresenceTracker(node)
    await connect(node, tracker, "cre")
    await tracker.record_transitions()
    # A sibling took this node for dead: it dropped its users and published them
    # offline, and marked that as published (it holds no connection of theirs: were
    # this node to publish it, its second read would see the user online here).
    mine = f"presence:node-users:{{{node.name}}}"
    await node.store.zrem(mine, "cre")
    await node.store.set(f"presence:reaped:{{{node.name}}}", "1")
    offline = await status_view(node, "cre", online=False)
    await node.publish("status:cre", orjson.dumps(offline.to_json()))
    await node.store.set("presence:last:{cre}", offline.signature)
    assert (await history(node, "status:cre"))[-1]["online"] is False

    await tracker.heartbeat()
    await tracker.record_transitions()
    assert (await history(node, "status:cre"))[-1]["online"] is True
    assert [user for user, _ in await node.store.zrange_by_score(mine, 0, float("inf"))] == ["cre"]


async def test_a_connect_and_close_within_one_round_is_not_published(bare_node: Node) -> None:
    node = bare_node
    tracker = PresenceTracker(node)
    session = await connect(node, tracker, "flap")
    node.session_closed(session, "flap")
    await tracker.on_disconnect(ConnectionEvent("flap", session.client_id, 0))
    await tracker.record_transitions()
    assert await history(node, "status:flap") == []
    due = await node.store.zrange_by_score(OFFLINE_DUE_KEY, 0, float("inf"))
    assert [user for user, _ in due] == ["flap"]


async def test_a_failed_round_is_retried_by_the_loop(
    bare_node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node = bare_node
    tracker = PresenceTracker(node)
    await connect(node, tracker, "cre")
    real = node.store.zadd_members

    async def unavailable(*args: Any) -> None:
        raise BrokerUnavailable("redis down")

    monkeypatch.setattr(node.store, "zadd_members", unavailable)
    await tracker.record_transitions()
    assert await history(node, "status:cre") == []
    monkeypatch.setattr(node.store, "zadd_members", real)
    await tracker._tick()  # the loop's round: the failed users are noted again
    await tracker.record_transitions()
    assert [p["online"] for p in await history(node, "status:cre")] == [True]


async def test_slow_mode_message_with_client_msg_id_takes_the_steps(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-step claimed publish finds the room's slow-mode key and stops
    without claiming; the message then goes through the slow-mode steps."""
    await node.store.set("chat:slow:{room:cre}", "60")
    store = CountingStore(node.store)
    monkeypatch.setattr(node, "store", store)
    publisher, _, _ = chat(node)
    message = {"type": "message", "text": "hi", "client_msg_id": "s1"}
    assert await publisher.on_publish(context(node, message)) == PublishDecision(skip=True)
    assert store.calls == ["claim_unless", "claim_unless", "zrange_by_score", "set_if_absent"]
    assert await history(node, ROOM) == [message]
    with pytest.raises(SignalError) as refused:
        await publisher.on_publish(context(node, {**message, "client_msg_id": "s2"}))
    assert refused.value.value.code == 1112
    # Refused for slow mode: its dedupe claim was released, so a retry after the
    # interval is published, not taken for a duplicate.
    assert await store.inner.get("chat:dedupe:{room:cre}:s2:fan") is None


async def test_read_positions_of_an_older_epoch_do_not_count(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A conversation whose stream starts over (quiet past the stream's meta
    lifetime, here shortened; or lost by Redis) counts its offsets from 1 again
    in a new epoch: a member's position of the old epoch (here 2) must not
    hide what is new (offset 1), as read, forever."""
    monkeypatch.setattr(memory_broker, "META_TTL_S", 0.3)
    settings = Settings(dev=True, port=0, viewer_count_interval_s=60.0)
    node = build_node(settings, app, Metrics())
    await node.start()
    try:
        dm = "dm:#ann,ben"

        async def rpc(user: str, method: str, data: Any) -> Any:
            info = ClientInfo(user, f"client-{user}")
            ctx = RpcContext(user, info.client, info, Credentials(user, None, None, None), node)
            return await node.rpc_handlers[method](ctx, data)

        async def say(text: str) -> None:
            await node.publish(dm, orjson.dumps({"type": "message", "text": text}))

        await say("one")
        await say("two")
        assert await rpc("ben", "chat.mark_read", {"channel": dm, "offset": 2}) == {"offset": 2}
        first = await rpc("ann", "chat.read_state", {"channel": dm})
        assert first["reads"] == {"ann": 0, "ben": 2}
        await asyncio.sleep(0.4)
        await say("three, in a new epoch")
        state = await rpc("ann", "chat.read_state", {"channel": dm})
        assert state["reads"] == {"ann": 0, "ben": 0}
        assert state["epoch"] != first["epoch"]
        assert await rpc("ben", "chat.mark_read", {"channel": dm, "offset": 1}) == {"offset": 1}
        assert (await rpc("ann", "chat.read_state", {"channel": dm}))["reads"]["ben"] == 1
        # Within the epoch, still never backwards.
        assert await rpc("ben", "chat.mark_read", {"channel": dm, "offset": 0}) == {"offset": 1}
        # A device still on the old stream marks what it read there: nothing
        # of the new one moves (offsets of the two say nothing of each other).
        await say("four")
        await say("five")
        old = {"channel": dm, "offset": 2, "epoch": first["epoch"]}
        assert await rpc("ben", "chat.mark_read", old) == {"offset": 1}
        now = {"channel": dm, "offset": 2, "epoch": state["epoch"]}
        assert await rpc("ben", "chat.mark_read", now) == {"offset": 2}
        with pytest.raises(SignalError) as refused:
            await rpc("ben", "chat.mark_read", {"channel": dm, "offset": 2, "epoch": 7})
        assert refused.value.value.code == 107
    finally:
        await node.close()


async def test_a_claim_taken_in_its_own_step_is_released_when_the_publish_fails(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the claim and the publish are two steps (the embedded broker; a
    channel without history on Redis), a failed publish releases the claim:
    kept, it would make the client's retry a "duplicate" of a message that
    was never published."""
    fail_once(monkeypatch, node.broker, "publish")
    claim = Claim("dedupe:{room:cre}:m1", "attempt-1", 60.0, ())
    with pytest.raises(BrokerUnavailable):
        await node.publish_claimed(ROOM, b'{"type":"message","text":"hi"}', claim)
    assert await node.store.get(claim.key) is None
    retry = Claim(claim.key, "attempt-2", 60.0, ())
    assert (await node.publish_claimed(ROOM, b'{"type":"message","text":"hi"}', retry)).position
    assert await node.store.get(claim.key) == "attempt-2"
