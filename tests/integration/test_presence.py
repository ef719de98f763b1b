"""Online state and availability against real server processes: the
``status:<user>`` channel, ``user.set_status``, ``user.status``, offline after
the grace, and offline after an instance is killed outright (Redis)."""

from __future__ import annotations

import secrets
import time
from typing import Any

import test_chat
from test_chat import CHAT_ENV, MS, OFFLINE_GRACE_S, Pair, Push, client, pub_of

from support.processes import RedisProcess, ServerProcess

# The chat tests' fixtures: both backends, and clients closed before servers stop.
pair = test_chat.pair
_close_clients = test_chat._close_clients


def status_of(user: str, status: str | None = None) -> Any:
    channel = f"status:{user}"

    def pred(push: Push) -> bool:
        if not pub_of(channel)(push):
            return False
        return status is None or push["pub"]["data"]["status"] == status

    return pred


def status_change_from(user: str, status: str) -> Any:
    """A push of ``user``'s status other than ``status``. Two instances may both
    publish the same state (handlers.presence.publish_if_changed): a repeat is
    no change, and subscribers take it as a no-op."""
    is_status = status_of(user)
    return lambda push: is_status(push) and push["pub"]["data"]["status"] != status


async def test_status_changes_are_published(pair: Pair) -> None:
    a, b = pair
    fan = await client(a, "fan")
    await fan.subscribe("status:cre")
    assert await fan.publish_error("status:cre", {"status": "available"}) == 103

    creator = await client(b, "cre")
    data = (await fan.push(status_of("cre")))["pub"]["data"]
    assert data == {
        "user": "cre",
        "online": True,
        "status": "available",
        "chosen": "available",
        "in_call": False,
        "last_seen_ms": None,
    }
    view = await creator.rpc("user.set_status", {"status": "dnd"})
    assert view["status"] == "dnd" and view["online"] is True
    assert (await fan.push(status_of("cre")))["pub"]["data"]["status"] == "dnd"
    # Setting the same again publishes nothing.
    await creator.rpc("user.set_status", {"status": "dnd"})
    assert await fan.pushes(status_of("cre"), within=200 * MS) == []
    await creator.rpc("user.set_status", {"status": "away"})
    assert (await fan.push(status_of("cre")))["pub"]["data"]["status"] == "away"

    statuses = (await fan.rpc("user.status", {"users": ["cre", "ghost", "cre"]}))["statuses"]
    assert statuses["cre"]["status"] == "away" and statuses["cre"]["online"] is True
    assert statuses["ghost"] == {
        "user": "ghost",
        "online": False,
        "status": "offline",
        "chosen": "available",
        "in_call": False,
        "last_seen_ms": None,
    }
    assert await creator.rpc_error("user.set_status", {"status": "sleeping"}) == 107
    assert await creator.rpc_error("user.set_status", {}) == 107
    many = [f"u{n}" for n in range(101)]
    assert await fan.rpc_error("user.status", {"users": many}) == 106
    assert len((await fan.rpc("user.status", {"users": many[:100]}))["statuses"]) == 100
    assert await fan.rpc("user.status", {"users": []}) == {"statuses": {}}
    assert await fan.rpc_error("user.status", {"users": "cre"}) == 107
    assert await fan.rpc_error("user.status", {"users": [5]}) == 107
    # The channel keeps the latest state for whoever subscribes later.
    late = await client(a, "late")
    history = await late.history("status:cre")
    assert [p["data"]["status"] for p in history] == ["away"]


async def test_offline_after_the_last_connection_closes(pair: Pair) -> None:
    a, b = pair
    fan = await client(a, "fan")
    await fan.subscribe("status:cre")
    on_a = await client(a, "cre")
    on_b = await client(b, "cre")
    await fan.push(status_of("cre", "available"))

    await on_a.close()
    assert (
        await fan.pushes(status_change_from("cre", "available"), within=2 * OFFLINE_GRACE_S) == []
    )
    closed_at = time.monotonic()
    await on_b.close()
    data = (await fan.push(status_of("cre", "offline")))["pub"]["data"]
    elapsed = time.monotonic() - closed_at
    assert OFFLINE_GRACE_S * 0.8 <= elapsed < OFFLINE_GRACE_S + 2.0
    assert data["online"] is False and data["last_seen_ms"] > (time.time() - 10) * 1000
    statuses = (await fan.rpc("user.status", {"users": ["cre"]}))["statuses"]
    assert statuses["cre"]["status"] == "offline"

    # Back within the grace (a page reload): no "offline" in between.
    again = await client(b, "cre")
    await fan.push(status_of("cre", "available"))
    await again.close()
    reload = await client(a, "cre")
    assert (
        await fan.pushes(status_change_from("cre", "available"), within=2 * OFFLINE_GRACE_S) == []
    )
    await reload.close()
    await fan.push(status_of("cre", "offline"))


async def test_offline_after_an_instance_is_killed(server_factory: Any, redis_factory: Any) -> None:
    redis: RedisProcess = redis_factory()
    env = {**CHAT_ENV, "REDIS_URL": redis.url, "SIGNAL_REDIS_PREFIX": f"k{secrets.token_hex(4)}:"}
    secret = secrets.token_hex(32)
    a: ServerProcess = await server_factory(env, name="alive", secret=secret)
    b: ServerProcess = await server_factory(env, name="doomed", secret=secret)
    fan = await client(a, "fan")
    await fan.subscribe("status:cre")
    await fan.subscribe("status:both")
    await client(b, "cre")
    await client(b, "both")
    await client(a, "both")
    await fan.push(status_of("cre", "available"))
    await fan.push(status_of("both", "available"))

    b.kill()
    killed_at = time.monotonic()
    await fan.push(status_of("cre", "offline"), timeout=10.0)
    # The node's heartbeat lives max(2 s, grace); then a survivor reaps it.
    assert time.monotonic() - killed_at < 2.0 + OFFLINE_GRACE_S + 3.0
    statuses = (await fan.rpc("user.status", {"users": ["cre", "both"]}))["statuses"]
    assert statuses["cre"]["online"] is False
    # Still connected to the survivor: stays online.
    assert statuses["both"]["online"] is True
    assert await fan.pushes(status_of("both"), within=0.5) == []


async def test_busy_while_in_a_call_then_back_to_the_chosen_status(pair: Pair) -> None:
    # A fan follows a creator and another fan; the two start a call (on two
    # instances with Redis: the caller on one, the creator on the other).
    a, b = pair
    fan = await client(a, "fan")
    await fan.subscribe("status:cre")
    await fan.subscribe("status:fan2")
    creator = await client(b, "cre")
    caller = await client(a, "fan2")
    await fan.push(status_of("cre", "available"))
    await fan.push(status_of("fan2", "available"))
    await creator.rpc("user.set_status", {"status": "away"})
    await fan.push(status_of("cre", "away"))

    call_id = (await caller.rpc("call.invite", {"callee": "cre", "media": "video"}))["call_id"]
    await creator.push(pub_of("user:#cre", "call.incoming"))
    # Ringing is not busy yet (docs/calls.md: busy while the call is accepted).
    assert await fan.pushes(status_of("cre"), within=200 * MS) == []

    await creator.rpc("call.accept", {"call_id": call_id})
    busy = {
        user: (await fan.push(status_of(user, "busy")))["pub"]["data"] for user in ("cre", "fan2")
    }
    assert busy["cre"] == {
        "user": "cre",
        "online": True,
        "status": "busy",
        "chosen": "away",
        "in_call": True,
        "last_seen_ms": None,
    }
    assert busy["fan2"] == {**busy["cre"], "user": "fan2", "chosen": "available"}
    statuses = (await fan.rpc("user.status", {"users": ["cre", "fan2"]}))["statuses"]
    assert statuses == busy

    # Busy because of the call: an invite to either is refused, callee busy
    # (1005), from either instance; and one of them calling out, 1004.
    other = await client(b, "fan3")
    assert await other.rpc_error("call.invite", {"callee": "cre", "media": "video"}) == 1005
    assert await fan.rpc_error("call.invite", {"callee": "fan2", "media": "audio"}) == 1005
    assert await creator.rpc_error("call.invite", {"callee": "fan3", "media": "video"}) == 1004
    # No further status change while the call goes on.
    assert await fan.pushes(status_of("cre"), within=200 * MS) == []

    await caller.rpc("call.end", {"call_id": call_id})
    back = {user: (await fan.push(status_of(user)))["pub"]["data"] for user in ("cre", "fan2")}
    assert back["cre"] == {**busy["cre"], "status": "away", "in_call": False}
    assert back["fan2"] == {**busy["fan2"], "status": "available", "in_call": False}
    statuses = (await fan.rpc("user.status", {"users": ["cre", "fan2"]}))["statuses"]
    assert statuses == back
    # The channel keeps the latest state for whoever subscribes later.
    history = await other.history("status:cre")
    assert [p["data"]["status"] for p in history] == ["away"]
    # Free again: the creator can be called.
    again = await other.rpc("call.invite", {"callee": "cre", "media": "video"})
    assert again["state"] == "ringing"
