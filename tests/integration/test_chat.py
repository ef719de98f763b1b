"""Chat in live rooms and direct conversations against real server processes.

Every test runs twice: on one server with the embedded broker ("memory", both
ends of a test on the same server), and on two servers sharing a private
redis-server ("redis", the two ends on different instances). Clients are raw
protocol clients, so refusals are asserted by their codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support.processes import RedisProcess, ServerProcess

# One time unit: every wait in these tests is a multiple of it.
MS = 0.001
TIMEOUT = 5.0
VIEWER_INTERVAL_S = 0.3
OFFLINE_GRACE_S = 0.6
MAX_TEXT = 50

CHAT_ENV: dict[str, str] = {
    "SIGNAL_COMMANDS_PER_SECOND": "1000",
    "SIGNAL_COMMAND_BURST": "1000",
    "SIGNAL_CHAT_MAX_TEXT": str(MAX_TEXT),
    "SIGNAL_CHAT_DEDUPE_WINDOW_S": "60",
    "SIGNAL_TYPING_PER_SECOND": "2",
    "SIGNAL_VIEWER_COUNT_INTERVAL_S": str(VIEWER_INTERVAL_S),
    "SIGNAL_OFFLINE_GRACE_S": str(OFFLINE_GRACE_S),
    "SIGNAL_LOG_LEVEL": "INFO",
    # Teardown stops servers with clients still connected: drain quickly.
    "SIGNAL_DRAIN_S": "0.2",
}

Push = dict[str, Any]


class Raw:
    """A raw protocol client: commands with ids, replies, pushes."""

    def __init__(self, ws: ClientConnection, user: str) -> None:
        self.ws = ws
        self.user = user
        self.next_id = 1
        self.inbox: list[dict[str, Any]] = []

    async def _fill(self, timeout: float) -> None:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(frame, str)
        for line in frame.strip().split("\n"):
            msg = orjson.loads(line)
            if msg == {}:
                await self.ws.send("{}")  # the server's ping
                continue
            self.inbox.append(msg)

    async def call(self, method: str, body: Any) -> dict[str, Any]:
        cmd_id = self.next_id
        self.next_id += 1
        await self.ws.send(orjson.dumps({"id": cmd_id, method: body}).decode())
        deadline = time.monotonic() + TIMEOUT
        while True:
            for msg in self.inbox:
                if msg.get("id") == cmd_id:
                    self.inbox.remove(msg)
                    return msg
            await self._fill(max(0.01, deadline - time.monotonic()))

    async def ok(self, method: str, body: Any) -> Any:
        reply = await self.call(method, body)
        assert method in reply, reply
        return reply[method]

    async def error(self, method: str, body: Any) -> int:
        reply = await self.call(method, body)
        assert "error" in reply, reply
        return int(reply["error"]["code"])

    async def rpc(self, method: str, data: Any) -> Any:
        result = await self.ok("rpc", {"method": method, "data": data})
        return result.get("data")

    async def rpc_error(self, method: str, data: Any) -> int:
        return await self.error("rpc", {"method": method, "data": data})

    async def subscribe(self, channel: str, **options: Any) -> Any:
        return await self.ok("subscribe", {"channel": channel, **options})

    async def publish(self, channel: str, data: Any) -> None:
        await self.ok("publish", {"channel": channel, "data": data})

    async def publish_error(self, channel: str, data: Any) -> int:
        return await self.error("publish", {"channel": channel, "data": data})

    async def history(self, channel: str) -> list[Push]:
        result = await self.ok("history", {"channel": channel, "limit": -1})
        return list(result.get("publications", []))

    def _take(self, pred: Callable[[Push], bool]) -> Push | None:
        for msg in self.inbox:
            push = msg.get("push")
            if push is not None and pred(push):
                self.inbox.remove(msg)
                return push
        return None

    async def push(self, pred: Callable[[Push], bool], timeout: float = TIMEOUT) -> Push:
        """The first push matching ``pred`` (already received or arriving)."""
        deadline = time.monotonic() + timeout
        while (found := self._take(pred)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.user}: no matching push; inbox {self.inbox}")
            try:
                await self._fill(left)
            except TimeoutError:
                continue
        return found

    async def pushes(self, pred: Callable[[Push], bool], within: float) -> list[Push]:
        """Every push matching ``pred`` that arrives within ``within`` seconds."""
        found: list[Push] = []
        deadline = time.monotonic() + within
        while True:
            while (push := self._take(pred)) is not None:
                found.append(push)
            left = deadline - time.monotonic()
            if left <= 0:
                return found
            with contextlib.suppress(TimeoutError):
                await self._fill(left)

    async def close(self) -> None:
        await self.ws.close()

    async def closed(self) -> bool:
        try:
            await self._fill(TIMEOUT)
        except ConnectionClosed:
            return True
        return False


def pub_of(channel: str, kind: str | None = None) -> Callable[[Push], bool]:
    """Publications in ``channel`` (of data type ``kind`` when given)."""

    def pred(push: Push) -> bool:
        if push.get("channel") != channel or "pub" not in push:
            return False
        return kind is None or push["pub"]["data"].get("type") == kind

    return pred


def unsubscribe_of(channel: str) -> Callable[[Push], bool]:
    return lambda push: push.get("channel") == channel and "unsubscribe" in push


_open: list[Raw] = []


async def client(server: ServerProcess, user: str, **claims: Any) -> Raw:
    ws = await connect(server.ws_url, open_timeout=TIMEOUT)
    raw = Raw(ws, user)
    _open.append(raw)
    await raw.ok("connect", {"token": server.token(user, **claims)})
    return raw


@pytest.fixture(autouse=True)
async def _close_clients(server_factory: Any, redis_factory: Any) -> AsyncIterator[None]:
    """Close every client before the servers stop (a server drains open
    connections, and the loop is blocked while the fixtures stop it)."""
    yield
    while _open:
        await _open.pop().close()


Pair = tuple[ServerProcess, ServerProcess]


@pytest.fixture(params=["memory", "redis"])
async def pair(request: Any, server_factory: Any, redis_factory: Any) -> Pair:
    """Two ends: the same server (memory) or two servers on one Redis."""
    if request.param == "memory":
        server = await server_factory(CHAT_ENV, name="chat")
        return server, server
    redis: RedisProcess = redis_factory()
    env = {**CHAT_ENV, "REDIS_URL": redis.url, "SIGNAL_REDIS_PREFIX": f"t{secrets.token_hex(4)}:"}
    secret = secrets.token_hex(32)
    a = await server_factory(env, name="chat-a", secret=secret)
    b = await server_factory(env, name="chat-b", secret=secret)
    return a, b


def metric(body: bytes, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


# --- schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param("hello", 1100, id="not-an-object"),
        pytest.param({"text": "hi"}, 1100, id="no-type"),
        pytest.param({"type": "poll", "text": "hi"}, 1100, id="unknown-type"),
        pytest.param({"type": "delete", "offset": 1}, 1100, id="server-only-type"),
        pytest.param({"type": "message", "text": 5}, 1100, id="text-not-string"),
        pytest.param({"type": "message", "text": "hi", "n": 1}, 1100, id="unknown-field"),
        pytest.param({"type": "message", "text": "hi", "sender": "admin"}, 1100, id="sender"),
        pytest.param({"type": "typing", "text": "x"}, 1100, id="typing-extra-field"),
        pytest.param({"type": "message", "text": "x" * (MAX_TEXT + 1)}, 1101, id="too-long"),
        pytest.param({"type": "message", "text": "  "}, 1102, id="blank"),
        pytest.param({"type": "message"}, 1102, id="empty"),
        pytest.param({"type": "message", "attachments": "a"}, 1103, id="attachments-type"),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "pdf", "ref": "r"}]},
            1103,
            id="attachment-kind",
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image"}]}, 1103, id="attachment-no-ref"
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image", "ref": "r"}] * 11},
            1103,
            id="too-many-attachments",
        ),
        pytest.param(
            {"type": "message", "text": "hi", "client_msg_id": "a:b"}, 1104, id="client-msg-id"
        ),
    ],
)
async def test_schema_violations_refused_with_codes(
    server_factory: Any, data: Any, code: int
) -> None:
    server = await server_factory(CHAT_ENV, name="schema")
    alice = await client(server, "alice")
    await alice.subscribe("room:cre")
    assert await alice.publish_error("room:cre", data) == code
    dm = "dm:#alice,bob"
    await alice.subscribe(dm)
    assert await alice.publish_error(dm, data) == code
    assert await alice.history("room:cre") == []
    assert await alice.history(dm) == []
    # The connection carries on.
    await alice.publish("room:cre", {"type": "message", "text": "fine"})
    await alice.close()


async def test_message_is_normalized_and_sender_comes_from_token(pair: Pair) -> None:
    a, b = pair
    alice = await client(a, "alice", name="Alice A.")
    bob = await client(b, "bob")
    await alice.subscribe("room:cre")
    await bob.subscribe("room:cre")
    message = {
        "type": "message",
        "text": "x" * MAX_TEXT,
        "attachments": [{"kind": "image", "ref": "media/1.jpg", "name": "cat"}],
        "client_msg_id": "m-1",
    }
    await alice.publish("room:cre", message)
    pub = (await bob.push(pub_of("room:cre", "message")))["pub"]
    assert pub["data"] == message
    assert pub["info"]["user"] == "alice"
    assert pub["info"]["conn_info"] == {"name": "Alice A."}
    # Attachments alone make a message; nulls are dropped.
    await alice.publish(
        "room:cre",
        {"type": "message", "text": None, "attachments": [{"kind": "file", "ref": "f/2"}]},
    )
    pub = (await bob.push(pub_of("room:cre", "message")))["pub"]
    assert pub["data"] == {"type": "message", "attachments": [{"kind": "file", "ref": "f/2"}]}
    await alice.subscribe("dm:#alice,bob")
    await alice.publish("dm:#alice,bob", {"type": "message", "text": "psst"})
    _, body = await a.aget("/metrics")
    assert metric(body, "chat_publications_total", kind="room", type="message") == 2
    assert metric(body, "chat_publications_total", kind="dm", type="message") == 1


# --- idempotent sends ----------------------------------------------------------------------------


async def test_retried_client_msg_id_is_delivered_once(pair: Pair) -> None:
    a, b = pair
    reader = await client(a, "reader")
    dm = "dm:#alice,bob"
    bob = await client(a, "bob")
    await bob.subscribe(dm)
    await reader.subscribe("room:cre")
    first = await client(a, "alice")
    # The retry comes from another connection, on the other instance.
    retry = await client(b, "alice")
    for channel in ("room:cre", dm):
        message = {"type": "message", "text": "once", "client_msg_id": "c-42"}
        await first.publish(channel, message)
        await retry.publish(channel, message)
        await retry.publish(channel, message)
    # Another user may use the same id; another id from alice is another message.
    other = await client(b, "other")
    await other.publish("room:cre", {"type": "message", "text": "mine", "client_msg_id": "c-42"})
    await first.publish("room:cre", {"type": "message", "text": "next", "client_msg_id": "c-43"})

    got = await reader.pushes(pub_of("room:cre", "message"), within=500 * MS)
    assert [(p["pub"]["info"]["user"], p["pub"]["data"]["text"]) for p in got] == [
        ("alice", "once"),
        ("other", "mine"),
        ("alice", "next"),
    ]
    assert len(await bob.pushes(pub_of(dm, "message"), within=200 * MS)) == 1
    assert [p["data"]["text"] for p in await reader.history("room:cre")] == ["once", "mine", "next"]
    _, body = await a.aget("/metrics")
    _, body_b = await b.aget("/metrics")
    assert (
        metric(body, "chat_deduplicated_retries_total")
        + (metric(body_b, "chat_deduplicated_retries_total") if b is not a else 0)
        == 4
    )


# --- typing --------------------------------------------------------------------------------------


async def test_typing_is_live_only_and_rate_limited(pair: Pair) -> None:
    a, b = pair
    dm = "dm:#alice,bob"
    alice = await client(a, "alice")
    bob = await client(b, "bob")
    await bob.subscribe(dm)
    await alice.subscribe(dm)
    await alice.publish(dm, {"type": "typing"})
    pub = (await bob.push(pub_of(dm, "typing")))["pub"]
    assert pub["data"] == {"type": "typing"} and pub["info"]["user"] == "alice"
    assert "offset" not in pub
    # A burst: acknowledged, but at most 2 per 1 s window (1 already used; the
    # burst may straddle two windows).
    for _ in range(6):
        await alice.publish(dm, {"type": "typing"})
    burst = await bob.pushes(pub_of(dm, "typing"), within=300 * MS)
    assert len(burst) <= 3
    await alice.publish(dm, {"type": "message", "text": "done"})
    await bob.push(pub_of(dm, "message"))
    assert [p["data"]["type"] for p in await bob.history(dm)] == ["message"]
    _, body = await a.aget("/metrics")
    assert metric(body, "chat_typing_dropped_total") >= 3


# --- read receipts -------------------------------------------------------------------------------


async def test_read_receipts(pair: Pair) -> None:
    a, b = pair
    dm = "dm:#alice,bob"
    alice = await client(a, "alice")
    bob = await client(b, "bob")
    await alice.subscribe(dm)
    for n in range(3):
        await alice.publish(dm, {"type": "message", "text": f"m{n}"})

    assert await bob.rpc("chat.mark_read", {"channel": dm, "offset": 2}) == {"offset": 2}
    pub = (await alice.push(pub_of(dm, "read")))["pub"]
    assert pub["data"] == {"type": "read", "user": "bob", "offset": 2}
    assert "offset" not in pub  # live only
    # Never backwards; no publication when nothing moved.
    assert await bob.rpc("chat.mark_read", {"channel": dm, "offset": 1}) == {"offset": 2}
    # Past the top: clamped.
    assert await bob.rpc("chat.mark_read", {"channel": dm, "offset": 99}) == {"offset": 3}
    pub = (await alice.push(pub_of(dm, "read")))["pub"]
    assert pub["data"]["offset"] == 3
    assert await alice.pushes(pub_of(dm, "read"), within=200 * MS) == []

    state = await alice.rpc("chat.read_state", {"channel": dm})
    assert state == {"reads": {"alice": 0, "bob": 3}, "epoch": state["epoch"]}
    assert isinstance(state["epoch"], str) and state["epoch"]
    assert [p["data"]["type"] for p in await alice.history(dm)] == ["message"] * 3

    carol = await client(a, "carol")
    assert await carol.rpc_error("chat.mark_read", {"channel": dm, "offset": 1}) == 103
    assert await carol.rpc_error("chat.read_state", {"channel": dm}) == 103
    assert await bob.rpc_error("chat.mark_read", {"channel": "room:cre", "offset": 1}) == 107
    assert await bob.rpc_error("chat.mark_read", {"channel": dm, "offset": -1}) == 107
    assert await bob.rpc_error("chat.mark_read", {"channel": dm}) == 107


# --- moderation ----------------------------------------------------------------------------------


async def test_barred_user_refused_on_both_instances_and_readmitted(pair: Pair) -> None:
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    fan = await client(b, "fan")
    fan_a = await client(a, "fan")
    await fan.subscribe(room)
    await fan_a.subscribe(room)
    stranger = await client(a, "stranger")
    assert await stranger.rpc_error("room.ban", {"channel": room, "user": "fan"}) == 103
    assert await creator.rpc_error("room.ban", {"channel": room, "user": "cre"}) == 103
    assert await creator.rpc_error("room.ban", {"channel": "dm:#a,b", "user": "fan"}) == 107
    assert (
        await creator.rpc_error("room.ban", {"channel": room, "user": "fan", "duration_s": 0})
        == 107
    )

    result = await creator.rpc("room.ban", {"channel": room, "user": "fan", "duration_s": 2})
    assert result["user"] == "fan" and result["until_ms"] > time.time() * 1000
    for conn in (fan, fan_a):
        push = await conn.push(unsubscribe_of(room))
        assert push["unsubscribe"]["code"] == 2100
    for conn in (fan, fan_a):
        assert await conn.error("subscribe", {"channel": room}) == 1110
        assert await conn.publish_error(room, {"type": "message", "text": "let me in"}) == 1110
        assert await conn.publish_error(room, {"type": "typing"}) == 1110
    bans = await creator.rpc("room.bans", {"channel": room})
    assert [ban["user"] for ban in bans["bans"]] == ["fan"]
    state = await fan.rpc("room.state", {"channel": room})
    assert state["you"]["banned"] is True
    # Other rooms are not affected.
    await fan.subscribe("room:other")

    await asyncio.sleep(2.2)
    await fan.subscribe(room)
    await fan_a.publish(room, {"type": "message", "text": "back"})
    assert (await creator.rpc("room.bans", {"channel": room}))["bans"] == []


async def test_permanent_ban_and_unban(pair: Pair) -> None:
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    fan = await client(b, "fan")
    await creator.publish(room, {"type": "message", "text": "before the ban"})
    result = await creator.rpc("room.ban", {"channel": room, "user": "fan", "reason": "spam"})
    assert result == {"user": "fan", "until_ms": None}
    assert await fan.error("subscribe", {"channel": room}) == 1110
    # Nor read the room without a subscription.
    assert await fan.error("history", {"channel": room, "limit": 10}) == 1110
    assert await fan.error("presence", {"channel": room}) == 1110
    assert await fan.error("presence_stats", {"channel": room}) == 1110
    assert (await fan.rpc("room.state", {"channel": room}))["you"]["banned_until_ms"] is None
    assert await creator.rpc("room.unban", {"channel": room, "user": "fan"}) == {
        "user": "fan",
        "lifted": True,
    }
    assert [p["data"]["text"] for p in await fan.history(room)] == ["before the ban"]
    await fan.subscribe(room)


async def test_a_banned_moderator_moderates_no_more(pair: Pair) -> None:
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    mod = await client(b, "mod")
    await creator.rpc("room.add_moderator", {"channel": room, "user": "mod"})
    await mod.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 60})
    await creator.rpc("room.ban", {"channel": room, "user": "mod", "duration_s": 60})
    assert await mod.rpc_error("room.ban", {"channel": room, "user": "fan"}) == 103
    assert await mod.rpc_error("room.slow_mode", {"channel": room, "interval_s": 5}) == 103
    state = await creator.rpc("room.state", {"channel": room})
    assert state["moderators"] == []
    # Unbanned, still not a moderator until made one again.
    await creator.rpc("room.unban", {"channel": room, "user": "mod"})
    assert await mod.rpc_error("room.ban", {"channel": room, "user": "fan"}) == 103


async def test_message_refused_for_a_bar_is_delivered_when_retried_after(pair: Pair) -> None:
    """A refused message takes no dedupe claim (the bars and the claim are one
    atomic step): its retry once the bar is lifted is published, on either
    instance, instead of being acknowledged as a duplicate and lost."""
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    fan = await client(b, "fan")
    fan_a = await client(a, "fan")
    message = {"type": "message", "text": "let me speak", "client_msg_id": "r-1"}
    await creator.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 60})
    assert await fan.publish_error(room, message) == 1111
    await creator.rpc("room.ban", {"channel": room, "user": "fan"})
    assert await fan_a.publish_error(room, message) == 1110
    await creator.rpc("room.unban", {"channel": room, "user": "fan"})
    assert await fan.publish_error(room, message) == 1111
    await creator.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 0})
    await fan_a.publish(room, message)
    await fan.publish(room, message)  # a real retry now: acknowledged, not published
    assert [p["data"] for p in await creator.history(room)] == [message]
    dedupes = 0.0
    for server in {a, b}:
        _, body = await server.aget("/metrics")
        dedupes += metric(body, "chat_deduplicated_retries_total")
    assert dedupes == 1


async def test_timeout_enforced_across_instances(pair: Pair) -> None:
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    fan = await client(b, "fan")
    watcher = await client(a, "watcher")
    await fan.subscribe(room)
    await watcher.subscribe(room)
    assert await creator.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 1}) == {
        "user": "fan",
        "duration_s": 1,
    }
    event = (await fan.push(pub_of(room, "timeout")))["pub"]["data"]
    assert event == {"type": "timeout", "user": "fan", "duration_s": 1}
    assert await fan.publish_error(room, {"type": "message", "text": "hey"}) == 1111
    fan_a = await client(a, "fan")
    assert await fan_a.publish_error(room, {"type": "message", "text": "hey"}) == 1111
    # Still reads.
    await watcher.publish(room, {"type": "message", "text": "you can read this"})
    await fan.push(pub_of(room, "message"))
    await asyncio.sleep(1.2)
    await fan.publish(room, {"type": "message", "text": "I'm back"})

    # Lifted early with 0.
    await creator.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 5})
    assert await fan.publish_error(room, {"type": "message", "text": "x"}) == 1111
    await creator.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 0})
    await fan.publish(room, {"type": "message", "text": "y"})


async def test_slow_mode_enforced_across_instances(pair: Pair) -> None:
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    fan_a = await client(a, "fan")
    fan_b = await client(b, "fan")
    await fan_b.subscribe(room)
    assert await creator.rpc_error("room.slow_mode", {"channel": room, "interval_s": 301}) == 107
    assert await fan_a.rpc_error("room.slow_mode", {"channel": room, "interval_s": 5}) == 103
    assert await creator.rpc("room.slow_mode", {"channel": room, "interval_s": 1}) == {
        "interval_s": 1
    }
    notice = (await fan_b.push(pub_of(room, "slow_mode")))["pub"]
    assert notice["data"] == {"type": "slow_mode", "interval_s": 1} and notice["offset"] > 0

    await fan_a.publish(room, {"type": "message", "text": "one"})
    assert await fan_b.publish_error(room, {"type": "message", "text": "two"}) == 1112
    assert await fan_a.publish_error(room, {"type": "message", "text": "two"}) == 1112
    # Typing is not a message; the owner is exempt.
    await fan_b.publish(room, {"type": "typing"})
    await creator.publish(room, {"type": "message", "text": "c1"})
    await creator.publish(room, {"type": "message", "text": "c2"})
    assert (await fan_a.rpc("room.state", {"channel": room}))["slow_mode_s"] == 1
    await asyncio.sleep(1.1)
    await fan_b.publish(room, {"type": "message", "text": "two"})

    await creator.rpc("room.slow_mode", {"channel": room, "interval_s": 0})
    await fan_a.publish(room, {"type": "message", "text": "three"})
    await fan_a.publish(room, {"type": "message", "text": "four"})


async def test_moderators_added_at_once_at_the_cap_are_all_real_moderators(pair: Pair) -> None:
    """The owner adds the 50th and 51st moderators at once, on both instances:
    each add that succeeds gives a moderator who can moderate; past the cap
    the answer is 106 (a racing add may be refused with it too), never a
    success for a moderator in name only."""
    a, b = pair
    room = "room:cre"
    owner_a, owner_b = await client(a, "cre"), await client(b, "cre")
    for i in range(49):
        await owner_a.rpc("room.add_moderator", {"channel": room, "user": f"m{i}"})
    results = await asyncio.gather(
        *(
            owner.call(
                "rpc", {"method": "room.add_moderator", "data": {"channel": room, "user": user}}
            )
            for owner, user in ((owner_a, "late1"), (owner_b, "late2"))
        )
    )
    added = [r["rpc"]["data"]["user"] for r in results if "rpc" in r]
    assert all(r["error"]["code"] == 106 for r in results if "error" in r), results
    assert len(added) <= 1, results  # one more fits at 49
    moderators = (await owner_a.rpc("room.state", {"channel": room}))["moderators"]
    assert len(moderators) == 49 + len(added) and set(added) <= set(moderators), moderators
    for user in added:
        mod = await client(b, user)
        await mod.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 1})


async def test_moderators_and_tombstones(pair: Pair) -> None:
    a, b = pair
    room = "room:cre"
    creator = await client(a, "cre")
    mod = await client(b, "mod")
    fan = await client(b, "fan")
    await fan.subscribe(room)
    assert await mod.rpc_error("room.add_moderator", {"channel": room, "user": "mod"}) == 103
    assert await creator.rpc("room.add_moderator", {"channel": room, "user": "mod"}) == {
        "user": "mod"
    }
    # A moderator times a fan out, but may not act on the owner or on themselves.
    await mod.rpc("room.timeout", {"channel": room, "user": "fan", "duration_s": 1})
    assert await mod.rpc_error("room.ban", {"channel": room, "user": "cre"}) == 103
    assert await fan.rpc_error("room.delete_message", {"channel": room, "offset": 1}) == 103

    await creator.publish(room, {"type": "message", "text": "oops"})
    offset = (await fan.push(pub_of(room, "message")))["pub"]["offset"]
    assert await mod.rpc_error("room.delete_message", {"channel": room, "offset": 999}) == 107
    assert await mod.rpc("room.delete_message", {"channel": room, "offset": offset}) == {
        "offset": offset
    }
    tomb = (await fan.push(pub_of(room, "delete")))["pub"]
    assert tomb["data"] == {"type": "delete", "offset": offset}
    kinds = [p["data"]["type"] for p in await fan.history(room)]
    assert kinds == ["message", "delete"]
    state = await fan.rpc("room.state", {"channel": room})
    assert state["deleted"] == [offset] and state["moderators"] == ["mod"]
    assert state["you"] == {
        "owner": False,
        "moderator": False,
        "banned": False,
        "banned_until_ms": None,
        "timed_out_until_ms": state["you"]["timed_out_until_ms"],
    }
    assert state["you"]["timed_out_until_ms"] > time.time() * 1000

    # Only the owner bans a moderator; removed moderators lose their powers.
    assert await creator.rpc("room.remove_moderator", {"channel": room, "user": "mod"}) == {
        "user": "mod",
        "removed": True,
    }
    assert await mod.rpc_error("room.delete_message", {"channel": room, "offset": offset}) == 103
    _, body = await a.aget("/metrics")
    assert metric(body, "chat_moderation_actions_total", action="add_moderator") == 1


# --- viewer counts -------------------------------------------------------------------------------


def viewers(push: Push) -> tuple[int, int]:
    data = push["pub"]["data"]
    return data["count"], data["peak"]


async def test_viewer_counts_across_instances(pair: Pair) -> None:
    a, b = pair
    room = "room:live"
    watcher = await client(a, "watcher")
    await watcher.subscribe(room)
    assert viewers(await watcher.push(pub_of(room, "viewers"))) == (1, 1)
    joiners = [await client(a, "u1"), await client(b, "u2"), await client(b, "u2")]
    for joiner in joiners:
        await joiner.subscribe(room)
    # Two connections of one user are one viewer.
    counts: list[tuple[int, int]] = []
    while not counts or counts[-1] != (3, 3):
        counts.append(viewers(await watcher.push(pub_of(room, "viewers"))))
    # Nothing changes, nothing is published.
    assert await watcher.pushes(pub_of(room, "viewers"), within=3 * VIEWER_INTERVAL_S) == []
    await joiners[1].close()
    await joiners[2].close()
    assert viewers(await watcher.push(pub_of(room, "viewers"))) == (2, 3)
    # Never more often than the interval.
    state = await watcher.rpc("room.state", {"channel": room})
    assert state["viewers"] == {"count": 2, "peak": 3}
    assert [p["data"]["type"] for p in await watcher.history(room)] == []


async def test_viewer_counts_published_at_most_every_interval(pair: Pair) -> None:
    a, b = pair
    room = "room:busy"
    watcher = await client(a, "watcher")
    await watcher.subscribe(room)
    churn = [await client(a if n % 2 else b, f"c{n}") for n in range(6)]
    started = time.monotonic()
    got: list[float] = []
    for joiner in churn:
        await joiner.subscribe(room)
        await asyncio.sleep(VIEWER_INTERVAL_S / 3)
        got += [time.monotonic() for _ in await watcher.pushes(pub_of(room, "viewers"), 0)]
    got += [time.monotonic() for _ in await watcher.pushes(pub_of(room, "viewers"), 1.0)]
    assert got, "no viewer count published"
    elapsed = time.monotonic() - started
    # Six joins in about two intervals: far fewer publications than joins.
    assert len(got) <= elapsed / VIEWER_INTERVAL_S + 2
