"""Video-call signaling (handlers/calls, docs/calls.md) with real SDK clients.

Real ``python -m signaling serve`` processes with short call timings from the
environment, real centrifuge-python clients, and for the cross-instance tests
real ``redis-server`` processes shared by two server processes. Events are
read from each participant's personal channel (server-side subscription);
every Agora token a test receives is decoded and verified by
``support.agora`` (signature with the certificate, channel, uid, expiry).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis
from centrifuge import Client, ClientState, ReplyError
from conftest import DEFAULT_SERVER_ENV

from handlers.calls import errors
from handlers.calls.events import RecordType, record_fields
from handlers.calls.state import Call, OutboxEntry, encode_outbox
from support.agora import verify_token
from support.processes import REPO_ROOT, RedisProcess, ServerProcess
from support.sdk import ClientEvents, make_client

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples import billing_consumer

APP_ID = "0123456789abcdef0123456789abcdef"
CERTIFICATE = "00112233445566778899aabbccddeeff"
TOKEN_TTL_S = 600
MAX_DURATION_S = 60
AGORA_ENV = {
    "AGORA_APP_ID": APP_ID,
    "AGORA_APP_CERTIFICATE": CERTIFICATE,
    "SIGNAL_AGORA_TOKEN_TTL_S": str(TOKEN_TTL_S),
}
# Calls that ring 2 s, tick every 0.5 s, lose a participant after 1 s offline
# and could last 60 s (warnings far away).
FAST_ENV = {
    **DEFAULT_SERVER_ENV,
    **AGORA_ENV,
    "SIGNAL_CALL_RING_TIMEOUT_S": "2",
    "SIGNAL_CALL_TICK_S": "0.5",
    "SIGNAL_CALL_GRACE_S": "1",
    "SIGNAL_CALL_MAX_DURATION_S": str(MAX_DURATION_S),
    "SIGNAL_CALL_WARNINGS_S": "30",
}
CALL_ID = re.compile(r"[0-9a-f]{32}")


def uniq(name: str) -> str:
    """A user id of its own per test: invite rate limits and busy flags are per user."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


class Party:
    """One SDK client of one user, with the call events of its personal channel."""

    def __init__(self, user: str, client: Client, events: ClientEvents) -> None:
        self.user = user
        self.client = client
        self.events = events

    async def rpc(self, method: str, data: dict[str, Any]) -> dict[str, Any]:
        result = await self.client.rpc(method, data)
        assert isinstance(result.data, dict)
        return result.data

    async def refused(self, method: str, data: dict[str, Any]) -> int:
        """Call ``method`` where the server must refuse; the error code."""
        with pytest.raises(ReplyError) as err:
            await self.client.rpc(method, data)
        return int(err.value.code)

    def call_events(self, call_id: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        out = []
        for ctx in self.events.of("publication", since):
            if ctx.channel != f"user:#{self.user}":
                continue
            data = ctx.pub.data
            if call_id is None or data.get("call_id") == call_id:
                out.append(data)
        return out

    async def event(
        self, kind: str, call_id: str | None = None, *, since: int = 0, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The first ``kind`` event (of ``call_id``) in the personal channel."""

        def match(ctx: Any) -> bool:
            data = ctx.pub.data
            return (
                ctx.channel == f"user:#{self.user}"
                and isinstance(data, dict)
                and data.get("type") == kind
                and (call_id is None or data.get("call_id") == call_id)
            )

        ctx = await self.events.wait_for("publication", match, since=since, timeout=timeout)
        data: dict[str, Any] = ctx.pub.data
        return data


@pytest.fixture
async def parties() -> AsyncIterator[Callable[..., Any]]:
    """``await parties(server, "name")``: a connected Party; all closed at teardown."""
    made: list[Client] = []

    async def make(server: ServerProcess, user: str) -> Party:
        client, events = make_client(server.ws_url, server.token(user))
        made.append(client)
        await client.connect()
        await client.ready(timeout=5)
        assert client.state == ClientState.CONNECTED
        await events.wait_for("subscribed", lambda c: c.channel == f"user:#{user}")
        return Party(user, client, events)

    yield make

    for client in made:
        await client.disconnect()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and any(getattr(c, "_background_tasks", None) for c in made):
        await asyncio.sleep(0.02)


def check_token(
    grant: dict[str, Any], call_id: str, *, issued_at: float, accepted_at_ms: int
) -> None:
    """Verify a call.join / call.renew_token reply and its token."""
    assert set(grant) == {"app_id", "channel", "uid", "token", "expires_at"}
    assert grant["app_id"] == APP_ID
    assert grant["channel"] == f"call_{call_id}"
    assert len(grant["channel"].encode()) < 64
    assert isinstance(grant["uid"], int) and 0 < grant["uid"] < 2**32
    # Absolute expiry: issue time (server clock) + the configured lifetime, but not
    # past the call's forced end (here the sooner).
    ends_at = -(-(accepted_at_ms + MAX_DURATION_S * 1000) // 1000)
    assert ends_at < issued_at + TOKEN_TTL_S
    assert grant["expires_at"] == ends_at
    verify_token(
        grant["token"],
        app_id=APP_ID,
        certificate=CERTIFICATE,
        channel=grant["channel"],
        uid=grant["uid"],
        expires_at=grant["expires_at"],
    )
    assert CERTIFICATE not in str(grant)


async def start_call(caller: Party, callee: Party, **meta: Any) -> str:
    """invite -> call.incoming -> accept -> call.accepted on both; the call id."""
    since = callee.events.mark()
    reply = await caller.rpc(
        "call.invite", {"callee": callee.user, "media": "video", "meta": meta or None}
    )
    call_id = reply["call_id"]
    await callee.event("call.incoming", call_id, since=since)
    await callee.rpc("call.accept", {"call_id": call_id})
    for party in (caller, callee):
        await party.event("call.accepted", call_id)
    return call_id


def assert_no_token_anywhere(parties: list[Party], tokens: list[str]) -> None:
    for party in parties:
        for data in party.call_events():
            text = repr(data)
            assert CERTIFICATE not in text
            for token in tokens:
                assert token not in text


# --------------------------------------------------------------------------- flows


async def test_invite_accept_join_renew_ticks_end(server_factory, parties) -> None:
    server = await server_factory(FAST_ENV, name="calls")
    caller = await parties(server, uniq("alice"))
    callee = await parties(server, uniq("bob"))

    before = time.time()
    reply = await caller.rpc(
        "call.invite", {"callee": callee.user, "media": "video", "meta": {"price": 120}}
    )
    assert set(reply) == {"call_id", "state"} and reply["state"] == "ringing"
    call_id = reply["call_id"]
    assert CALL_ID.fullmatch(call_id)
    incoming = await callee.event("call.incoming", call_id)
    assert incoming["from"] == caller.user and incoming["to"] == callee.user
    # An app that does not know the call id yet (opened by a push) finds it.
    current = await callee.rpc("call.state", {})
    assert current["call_id"] == call_id and current["state"] == "ringing"
    assert incoming["media"] == "video" and incoming["meta"] == {"price": 120}
    assert abs(incoming["ring_deadline_ms"] - incoming["created_at_ms"] - 2000) <= 1
    assert before * 1000 - 1000 <= incoming["created_at_ms"] <= time.time() * 1000 + 1000

    # No token before the answer.
    assert await caller.refused("call.join", {"call_id": call_id}) == errors.CALL_WRONG_STATE.code
    state = await callee.rpc("call.state", {"call_id": call_id})
    assert state["state"] == "ringing" and state["from"] == caller.user

    accepted = await callee.rpc("call.accept", {"call_id": call_id})
    assert accepted["state"] == "accepted"
    events = [await p.event("call.accepted", call_id) for p in (caller, callee)]
    assert events[0]["accepted_at_ms"] == events[1]["accepted_at_ms"] == accepted["accepted_at_ms"]

    # Fans see both as busy while the call is accepted (handlers.presence).
    statuses = (await caller.rpc("user.status", {"users": [caller.user, callee.user]}))["statuses"]
    assert [statuses[p.user]["status"] for p in (caller, callee)] == ["busy", "busy"]

    grants = {}
    for party in (caller, callee):
        issued = time.time()
        grants[party.user] = await party.rpc("call.join", {"call_id": call_id})
        check_token(
            grants[party.user], call_id, issued_at=issued, accepted_at_ms=accepted["accepted_at_ms"]
        )
    uids = {g["uid"] for g in grants.values()}
    assert len(uids) == 2  # distinct uids in the channel
    assert len({g["channel"] for g in grants.values()}) == 1

    issued = time.time()
    renewed = await callee.rpc("call.renew_token", {"call_id": call_id})
    check_token(renewed, call_id, issued_at=issued, accepted_at_ms=accepted["accepted_at_ms"])
    assert renewed["uid"] == grants[callee.user]["uid"]  # stable per user in the call
    assert renewed["token"] != grants[callee.user]["token"]

    # Ticks every 0.5 s of server time: minute n at accepted_at + n * tick.
    for party in (caller, callee):
        await party.event("call.tick", call_id, timeout=3)
    await asyncio.sleep(0.6)
    ticks = [e for e in callee.call_events(call_id) if e["type"] == "call.tick"]
    assert [t["minute"] for t in ticks] == list(range(1, len(ticks) + 1))
    assert len(ticks) >= 2
    for tick in ticks:
        assert tick["duration_ms"] == tick["minute"] * 500
        assert tick["at_ms"] >= accepted["accepted_at_ms"] + tick["duration_ms"]

    ended_reply = await caller.rpc("call.end", {"call_id": call_id})
    assert ended_reply["state"] == "ended"
    for party in (caller, callee):
        ended = await party.event("call.ended", call_id)
        assert ended["reason"] == "hangup" and ended["by"] == caller.user
        assert ended["duration_ms"] == ended_reply["duration_ms"]
        assert ended["duration_ms"] == ended["ended_at_ms"] - ended["accepted_at_ms"]
    final = await callee.rpc("call.state", {"call_id": call_id})
    assert final["state"] == "ended" and final["reason"] == "hangup"
    assert await callee.rpc("call.state", {}) == {"call_id": None, "state": None}
    statuses = (await caller.rpc("user.status", {"users": [caller.user, callee.user]}))["statuses"]
    assert not any(statuses[p.user]["in_call"] for p in (caller, callee))

    # Over: no more tokens, no more ticks, no second end.
    assert await callee.refused("call.renew_token", {"call_id": call_id}) == 1007
    assert await callee.refused("call.end", {"call_id": call_id}) == 1007
    count = len(callee.call_events(call_id))
    await asyncio.sleep(0.8)
    assert len(callee.call_events(call_id)) == count

    # One event sequence, numbered by seq, the same for both.
    kinds = [e["type"] for e in caller.call_events(call_id)]
    assert kinds[0] == "call.accepted" and kinds[-1] == "call.ended"
    seqs = [e["seq"] for e in callee.call_events(call_id)]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    tokens = [g["token"] for g in grants.values()] + [renewed["token"]]
    assert_no_token_anywhere([caller, callee], tokens)
    # ...nor in the recoverable history of the personal channels, nor in the log.
    log_text = server.log_text()
    for token in tokens:
        assert token not in log_text
    assert CERTIFICATE not in log_text

    status, body = await server.aget("/metrics")
    text = body.decode()
    assert status == 200
    assert 'signal_calls_total{outcome="hangup"} 1.0' in text
    assert 'signal_call_tokens_issued_total{method="join"} 2.0' in text
    assert 'signal_call_tokens_issued_total{method="renew"} 1.0' in text
    assert "signal_call_ring_to_answer_seconds_count 1.0" in text
    assert "signal_call_duration_seconds_count 1.0" in text
    assert "signal_calls_active" in text


async def test_reject_cancel_and_missed(server_factory, parties) -> None:
    server = await server_factory(FAST_ENV, name="calls")
    caller = await parties(server, uniq("alice"))
    callee = await parties(server, uniq("bob"))

    # Rejected by the callee.
    call_id = (await caller.rpc("call.invite", {"callee": callee.user, "media": "audio"}))[
        "call_id"
    ]
    incoming = await callee.event("call.incoming", call_id)
    assert incoming["media"] == "audio" and incoming["meta"] is None
    assert (await callee.rpc("call.reject", {"call_id": call_id}))["state"] == "rejected"
    for party in (caller, callee):
        event = await party.event("call.rejected", call_id)
        assert event["by"] == callee.user and event["from"] == caller.user

    # Cancelled by the caller.
    call_id = (await caller.rpc("call.invite", {"callee": callee.user, "media": "video"}))[
        "call_id"
    ]
    await callee.event("call.incoming", call_id)
    assert (await caller.rpc("call.cancel", {"call_id": call_id}))["state"] == "cancelled"
    for party in (caller, callee):
        assert (await party.event("call.cancelled", call_id))["by"] == caller.user
    assert await callee.refused("call.accept", {"call_id": call_id}) == 1007

    # Not answered within the ring timeout (2 s): missed, pushed to both.
    started = time.monotonic()
    call_id = (await caller.rpc("call.invite", {"callee": callee.user, "media": "video"}))[
        "call_id"
    ]
    missed = [await p.event("call.missed", call_id, timeout=5) for p in (caller, callee)]
    assert 1.8 <= time.monotonic() - started <= 3.5
    assert missed[0]["at_ms"] == missed[1]["at_ms"]
    assert await callee.refused("call.accept", {"call_id": call_id}) == 1007
    assert (await caller.rpc("call.state", {"call_id": call_id}))["state"] == "missed"

    _, body = await server.aget("/metrics")
    for outcome in ("rejected", "cancelled", "missed"):
        assert f'signal_calls_total{{outcome="{outcome}"}} 1.0' in body.decode()


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


async def test_busy_self_and_bad_requests(server_factory, parties) -> None:
    server = await server_factory(FAST_ENV, name="calls")
    alice = await parties(server, uniq("alice"))
    bob = await parties(server, uniq("bob"))
    carol = await parties(server, uniq("carol"))

    assert await alice.refused("call.invite", {"callee": alice.user, "media": "video"}) == 1003
    for bad in (
        {"media": "video"},
        {"callee": bob.user},
        {"callee": bob.user, "media": "hologram"},
        {"callee": "", "media": "video"},
        {"callee": "no/such user", "media": "video"},
        {"callee": bob.user, "media": "video", "meta": "not an object"},
        {"callee": bob.user, "media": "video", "meta": {"blob": "x" * 2000}},
        # Deeper than orjson writes (it reads it): refused, not a disconnect.
        {"callee": bob.user, "media": "video", "meta": _nested(300)},
    ):
        assert await alice.refused("call.invite", bad) == errors.CALL_BAD_REQUEST.code, bad
    for method in ("call.accept", "call.state", "call.join"):
        assert await alice.refused(method, {"call_id": "nope"}) == 1000
        assert await alice.refused(method, {"call_id": None}) == 1000
    assert await alice.refused("call.accept", {}) == 1000
    with pytest.raises(ReplyError) as err:
        await alice.client.rpc("call.state", ["not", "an", "object"])
    assert err.value.code == 1000

    call_id = (await alice.rpc("call.invite", {"callee": bob.user, "media": "video"}))["call_id"]
    # The callee is ringing: busy for anyone else.
    assert await carol.refused("call.invite", {"callee": bob.user, "media": "video"}) == 1005
    # The caller is ringing someone: cannot call anyone else.
    assert await alice.refused("call.invite", {"callee": carol.user, "media": "video"}) == 1004
    # ...nor can the callee call out while ringing.
    assert await bob.refused("call.invite", {"callee": carol.user, "media": "video"}) == 1004
    await bob.rpc("call.accept", {"call_id": call_id})
    assert await carol.refused("call.invite", {"callee": alice.user, "media": "video"}) == 1005
    await alice.rpc("call.end", {"call_id": call_id})
    # Free again once the call is over.
    again = await carol.rpc("call.invite", {"callee": bob.user, "media": "video"})
    assert again["state"] == "ringing"


async def test_invites_are_rate_limited_per_caller(server_factory, parties) -> None:
    server = await server_factory({**FAST_ENV, "SIGNAL_CALL_INVITES_PER_MINUTE": "3"})
    alice = await parties(server, uniq("alice"))
    bob = await parties(server, uniq("bob"))
    for _ in range(3):
        call_id = (await alice.rpc("call.invite", {"callee": bob.user, "media": "video"}))[
            "call_id"
        ]
        await alice.rpc("call.cancel", {"call_id": call_id})
    assert await alice.refused("call.invite", {"callee": bob.user, "media": "video"}) == 1006
    # Per caller: bob still may.
    assert (await bob.rpc("call.invite", {"callee": alice.user, "media": "video"}))["call_id"]


async def test_only_participants_act_and_each_in_their_role(server_factory, parties) -> None:
    server = await server_factory(FAST_ENV, name="calls")
    alice = await parties(server, uniq("alice"))
    bob = await parties(server, uniq("bob"))
    mallory = await parties(server, uniq("mallory"))
    call_id = (await alice.rpc("call.invite", {"callee": bob.user, "media": "video"}))["call_id"]
    await bob.event("call.incoming", call_id)
    methods = (
        "call.accept",
        "call.reject",
        "call.cancel",
        "call.end",
        "call.join",
        "call.renew_token",
        "call.state",
    )
    for method in methods:
        assert await mallory.refused(method, {"call_id": call_id}) == 1002, method
    # Unknown call: the same answer (an outsider cannot probe for calls).
    assert await mallory.refused("call.state", {"call_id": uuid.uuid4().hex}) == 1002
    assert await mallory.rpc("call.state", {}) == {"call_id": None, "state": None}
    # Roles: only the callee answers, only the caller cancels.
    assert await alice.refused("call.accept", {"call_id": call_id}) == 1008
    assert await alice.refused("call.reject", {"call_id": call_id}) == 1008
    assert await bob.refused("call.cancel", {"call_id": call_id}) == 1008
    # call.end is for accepted calls.
    assert await alice.refused("call.end", {"call_id": call_id}) == 1007

    await bob.rpc("call.accept", {"call_id": call_id})
    for method in methods:
        assert await mallory.refused(method, {"call_id": call_id}) == 1002, method
    assert (await alice.rpc("call.state", {"call_id": call_id}))["state"] == "accepted"
    # Mallory's personal channel never heard of the call.
    await asyncio.sleep(0.3)
    assert mallory.call_events() == []
    await bob.rpc("call.end", {"call_id": call_id})


async def test_accept_racing_cancel_and_two_accepts_have_one_winner(
    server_factory, parties
) -> None:
    server = await server_factory({**FAST_ENV, "SIGNAL_CALL_INVITES_PER_MINUTE": "100"})
    alice = await parties(server, uniq("alice"))
    bob = await parties(server, uniq("bob"))
    bob_phone = await parties(server, bob.user)  # the callee's second device
    outcomes = set()
    for _ in range(8):
        call_id = (await alice.rpc("call.invite", {"callee": bob.user, "media": "video"}))[
            "call_id"
        ]
        await bob.event("call.incoming", call_id)
        results = await asyncio.gather(
            bob.client.rpc("call.accept", {"call_id": call_id}),
            alice.client.rpc("call.cancel", {"call_id": call_id}),
            return_exceptions=True,
        )
        won = [r for r in results if not isinstance(r, BaseException)]
        lost = [r for r in results if isinstance(r, BaseException)]
        assert len(won) == 1 and len(lost) == 1, results
        assert isinstance(lost[0], ReplyError) and lost[0].code == 1007
        state = won[0].data["state"]
        outcomes.add(state)
        assert (await alice.rpc("call.state", {"call_id": call_id}))["state"] == state
        if state == "accepted":
            await alice.rpc("call.end", {"call_id": call_id})
            await bob.event("call.ended", call_id)
        else:
            await bob.event("call.cancelled", call_id)
        # Exactly one outcome event for the call.
        await asyncio.sleep(0.05)
        finals = [
            e for e in bob.call_events(call_id) if e["type"] in ("call.accepted", "call.cancelled")
        ]
        assert len(finals) == 1, finals

    for _ in range(5):
        call_id = (await alice.rpc("call.invite", {"callee": bob.user, "media": "video"}))[
            "call_id"
        ]
        await bob_phone.event("call.incoming", call_id)
        results = await asyncio.gather(
            bob.client.rpc("call.accept", {"call_id": call_id}),
            bob_phone.client.rpc("call.accept", {"call_id": call_id}),
            return_exceptions=True,
        )
        errors_ = [r for r in results if isinstance(r, BaseException)]
        assert len(errors_) == 1 and isinstance(errors_[0], ReplyError), results
        assert errors_[0].code == 1007
        await alice.event("call.accepted", call_id)
        await alice.rpc("call.end", {"call_id": call_id})
        await asyncio.sleep(0.05)
        accepted = [e for e in alice.call_events(call_id) if e["type"] == "call.accepted"]
        assert len(accepted) == 1


async def test_participant_lost_while_the_other_stays(server_factory, parties) -> None:
    server = await server_factory(FAST_ENV, name="calls")
    caller = await parties(server, uniq("alice"))
    callee = await parties(server, uniq("bob"))
    call_id = await start_call(caller, callee)

    # The caller stays connected the whole time; the callee goes away.
    await callee.client.disconnect()
    gone = time.time() * 1000
    ended = await caller.event("call.ended", call_id, timeout=5)
    assert ended["reason"] == "participant_lost"
    assert ended["lost"] == callee.user
    # Offline for the grace period (1 s), measured from the disconnect.
    assert ended["ended_at_ms"] - ended["lost_since_ms"] >= 1000
    assert abs(ended["lost_since_ms"] - gone) < 500
    assert ended["ended_at_ms"] - gone < 2500
    assert (await caller.rpc("call.state", {"call_id": call_id}))["state"] == "ended"

    # A participant who reconnects within the grace period keeps the call.
    other = await parties(server, uniq("carol"))
    call_id = await start_call(caller, other)
    await other.client.disconnect()
    await asyncio.sleep(0.4)
    await other.client.connect()
    await other.client.ready(timeout=5)
    await asyncio.sleep(1.5)
    assert (await caller.rpc("call.state", {"call_id": call_id}))["state"] == "accepted"
    await other.rpc("call.end", {"call_id": call_id})


async def test_max_duration_with_warnings(server_factory, parties) -> None:
    env = {
        **FAST_ENV,
        "SIGNAL_CALL_MAX_DURATION_S": "2.5",
        "SIGNAL_CALL_WARNINGS_S": "1.5,0.5",
        "SIGNAL_CALL_TICK_S": "1",
    }
    server = await server_factory(env, name="calls")
    caller = await parties(server, uniq("alice"))
    callee = await parties(server, uniq("bob"))
    call_id = await start_call(caller, callee)
    accepted_at = (await caller.rpc("call.state", {"call_id": call_id}))["accepted_at_ms"]

    for party in (caller, callee):
        ended = await party.event("call.ended", call_id, timeout=5)
        assert ended["reason"] == "max_duration"
        assert ended["duration_ms"] == 2500
        assert ended["ended_at_ms"] == accepted_at + 2500
        events = [e for e in party.call_events(call_id) if e["type"] != "call.incoming"]
        kinds = [e["type"] for e in events]
        assert kinds == [
            "call.accepted",
            "call.tick",
            "call.warning",
            "call.tick",
            "call.warning",
            "call.ended",
        ], kinds
        warnings = [e for e in events if e["type"] == "call.warning"]
        assert [w["remaining_s"] for w in warnings] == [1.5, 0.5]
        assert all(w["ends_at_ms"] == accepted_at + 2500 for w in warnings)
        assert warnings[0]["at_ms"] >= accepted_at + 1000
        assert warnings[1]["at_ms"] >= accepted_at + 2000
    assert await caller.refused("call.join", {"call_id": call_id}) == 1007


async def test_calls_without_agora_credentials(server_factory, parties) -> None:
    env = {k: v for k, v in FAST_ENV.items() if not k.startswith("AGORA_")}
    server = await server_factory(env, name="calls-no-agora")
    caller = await parties(server, uniq("alice"))
    callee = await parties(server, uniq("bob"))
    call_id = await start_call(caller, callee)  # signaling works
    with pytest.raises(ReplyError) as err:
        await caller.client.rpc("call.join", {"call_id": call_id})
    assert err.value.code == errors.CALL_NOT_CONFIGURED.code
    assert err.value.message == "calls not configured"
    assert await callee.refused("call.renew_token", {"call_id": call_id}) == 1001
    await callee.rpc("call.end", {"call_id": call_id})
    assert "call.join is refused" in server.log_text()


async def test_events_missed_while_disconnected_are_recovered(server_factory, parties) -> None:
    server = await server_factory(FAST_ENV, name="calls")
    caller = await parties(server, uniq("alice"))
    callee = await parties(server, uniq("bob"))
    call_id = await start_call(caller, callee)
    await callee.client.disconnect()
    # Published while the callee has no connection (within the grace period).
    await caller.rpc("call.end", {"call_id": call_id})
    mark = callee.events.mark()
    await callee.client.connect()
    await callee.client.ready(timeout=5)
    ended = await callee.event("call.ended", call_id, since=mark)
    assert ended["reason"] == "hangup" and ended["by"] == caller.user
    subscribed = await callee.events.wait_for(
        "subscribed", lambda c: c.channel == f"user:#{callee.user}", since=mark
    )
    assert subscribed.was_recovering and subscribed.recovered


# --------------------------------------------------------------------------- two instances


def redis_env(redis_server: RedisProcess, prefix: str) -> dict[str, str]:
    return {**FAST_ENV, "REDIS_URL": redis_server.url, "SIGNAL_REDIS_PREFIX": prefix}


async def two_servers(
    server_factory, redis_server: RedisProcess, **extra: str
) -> tuple[ServerProcess, ServerProcess, str]:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    secret = uuid.uuid4().hex * 2
    env = {**redis_env(redis_server, prefix), **extra}
    first = await server_factory(env, name="calls-a", secret=secret)
    second = await server_factory(env, name="calls-b", secret=secret)
    return first, second, prefix


async def test_cross_instance_flow_and_billing_consumer_group(
    server_factory, parties, redis_server
) -> None:
    node_a, node_b, prefix = await two_servers(server_factory, redis_server)
    stream = f"{prefix}signal:call-events"
    client = redis.Redis.from_url(redis_server.url)
    billing_consumer.ensure_group(client, stream, "billing", start="$")

    caller = await parties(node_a, uniq("alice"))
    callee = await parties(node_b, uniq("bob"))
    call_id = await start_call(caller, callee, price=90)
    accepted_at_ms = (await caller.rpc("call.state", {"call_id": call_id}))["accepted_at_ms"]
    for party in (caller, callee):
        issued = time.time()
        grant = await party.rpc("call.join", {"call_id": call_id})
        check_token(grant, call_id, issued_at=issued, accepted_at_ms=accepted_at_ms)
    issued = time.time()
    grant = await caller.rpc("call.renew_token", {"call_id": call_id})
    check_token(grant, call_id, issued_at=issued, accepted_at_ms=accepted_at_ms)
    await callee.event("call.tick", call_id, timeout=3)
    await caller.event("call.tick", call_id, timeout=3)
    await callee.rpc("call.end", {"call_id": call_id})
    for party in (caller, callee):
        assert (await party.event("call.ended", call_id))["by"] == callee.user

    # A second call: rejected, across instances the other way round.
    other = (await callee.rpc("call.invite", {"callee": caller.user, "media": "audio"}))["call_id"]
    await caller.event("call.incoming", other)
    await caller.rpc("call.reject", {"call_id": other})
    await callee.event("call.rejected", other)

    # A consumer group reads every event exactly once, through a consumer failure:
    # c1 fails on its second entry (left pending, unacknowledged), c2 claims it.
    handled: list[dict[str, str]] = []
    calls_seen = [0]

    def flaky(entry_id: str, fields: Any) -> None:
        calls_seen[0] += 1
        if calls_seen[0] == 2:
            raise RuntimeError("billing database down")
        handled.append(dict(fields))

    def steady(entry_id: str, fields: Any) -> None:
        handled.append(dict(fields))

    group = "billing"
    await asyncio.to_thread(billing_consumer.drain, client, stream, group, "c1", flaky)
    assert client.xpending(stream, group)["pending"] == 1
    await asyncio.to_thread(billing_consumer.claim_stale, client, stream, group, "c2", steady, 0)
    assert client.xpending(stream, group)["pending"] == 0
    assert await asyncio.to_thread(billing_consumer.drain, client, stream, group, "c2", steady) == 0
    records = handled
    ids = [r["event_id"] for r in records]
    assert len(ids) == len(set(ids)) == client.xlen(stream)
    first = [r for r in records if r["call_id"] == call_id]
    kinds = [r["type"] for r in sorted(first, key=lambda r: int(r["seq"]))]
    assert kinds[:2] == ["call.invited", "call.accepted"] and kinds[-1] == "call.ended"
    assert set(kinds[2:-1]) == {"call.tick"}
    for record in first:
        assert record["caller"] == caller.user and record["callee"] == callee.user
        assert record["event_id"] == f"{call_id}-{record['seq']}"
        assert int(record["at_ms"]) >= int(record["created_at_ms"])
        assert "token" not in record and CERTIFICATE not in repr(record)
    ended = next(r for r in first if r["type"] == "call.ended")
    assert ended["reason"] == "hangup" and ended["by"] == callee.user
    assert int(ended["duration_ms"]) == int(ended["ended_at_ms"]) - int(ended["accepted_at_ms"])
    ticks = [r for r in first if r["type"] == "call.tick"]
    assert [int(t["minute"]) for t in ticks] == list(range(1, len(ticks) + 1))
    assert all(int(t["duration_ms"]) == 500 * int(t["minute"]) for t in ticks)
    second = sorted((r for r in records if r["call_id"] == other), key=lambda r: int(r["seq"]))
    assert [r["type"] for r in second] == ["call.invited", "call.rejected"]
    client.close()


async def test_instance_owning_a_ringing_call_killed(server_factory, parties, redis_server) -> None:
    node_a, node_b, _ = await two_servers(server_factory, redis_server)
    caller = await parties(node_a, uniq("alice"))
    callee = await parties(node_b, uniq("bob"))
    call_id = (await caller.rpc("call.invite", {"callee": callee.user, "media": "video"}))[
        "call_id"
    ]
    await callee.event("call.incoming", call_id)
    node_a.kill()  # SIGKILL: the instance that handled the invite and set the timer
    missed = await callee.event("call.missed", call_id, timeout=6)
    assert missed["from"] == caller.user
    assert (await callee.rpc("call.state", {"call_id": call_id}))["state"] == "missed"
    # The callee is free again.
    carol = await parties(node_b, uniq("carol"))
    assert (await carol.rpc("call.invite", {"callee": callee.user, "media": "video"}))["call_id"]


async def test_instance_running_an_accepted_call_killed(
    server_factory, parties, redis_server
) -> None:
    # Presence reaps a killed instance's users after its heartbeat expires:
    # max(2 s, SIGNAL_OFFLINE_GRACE_S).
    node_a, node_b, _ = await two_servers(server_factory, redis_server, SIGNAL_OFFLINE_GRACE_S="1")
    caller = await parties(node_a, uniq("alice"))
    callee = await parties(node_b, uniq("bob"))
    call_id = await start_call(caller, callee)
    await callee.event("call.tick", call_id, timeout=3)
    node_a.kill()  # SIGKILL: the caller's instance, which also ran call timers
    killed = time.time() * 1000
    # Ticks go on from the surviving instance...
    mark = callee.events.mark()
    await callee.event("call.tick", call_id, since=mark, timeout=4)
    # ...and the caller, whose only connection died with node A, is lost: once
    # node A is reaped (its users go offline) and the grace period has passed.
    ended = await callee.event("call.ended", call_id, timeout=8)
    assert ended["reason"] == "participant_lost" and ended["lost"] == caller.user
    assert ended["ended_at_ms"] - ended["lost_since_ms"] >= 1000
    assert ended["lost_since_ms"] >= killed - 500
    assert (await callee.rpc("call.state", {})) == {"call_id": None, "state": None}


async def test_participant_lost_across_instances(server_factory, parties, redis_server) -> None:
    node_a, node_b, _ = await two_servers(server_factory, redis_server)
    caller = await parties(node_a, uniq("alice"))
    callee = await parties(node_b, uniq("bob"))
    call_id = await start_call(caller, callee)
    # The callee has a second connection on the caller's instance: still online.
    phone = await parties(node_a, callee.user)
    await callee.client.disconnect()
    await asyncio.sleep(1.5)
    assert (await caller.rpc("call.state", {"call_id": call_id}))["state"] == "accepted"
    # Now the callee's last connection anywhere goes; the caller stays.
    await phone.client.disconnect()
    gone = time.time() * 1000
    ended = await caller.event("call.ended", call_id, timeout=5)
    assert ended["reason"] == "participant_lost" and ended["lost"] == callee.user
    assert ended["ended_at_ms"] - gone >= 900


async def test_an_outbox_left_by_a_dead_instance_is_appended_from_redis(
    server_factory, parties, redis_server
) -> None:
    # What an instance killed between a call's end and its billing append
    # leaves in Redis: the ended call with the record in its outbox, and the
    # call's timer. The surviving instances' timers append the record.
    node_a, node_b, prefix = await two_servers(server_factory, redis_server)
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    stream = f"{prefix}signal:call-events"
    call_id = uuid.uuid4().hex
    now = int(time.time() * 1000)
    fields = {
        "caller": "alice",
        "callee": "bob",
        "media": "video",
        "meta": "",
        "created_at_ms": str(now - 70_000),
        "ring_deadline_ms": str(now - 68_000),
        "caller_uid": "11",
        "callee_uid": "12",
        "accepted_at_ms": str(now - 65_000),
        "ended_at_ms": str(now - 3_000),
        "state": "ended",
        "reason": "hangup",
        "ended_by": "bob",
        "ticks": "1",
        "rev": "5",
        "ver": "6",
    }
    call = Call.from_hash(call_id, fields)
    assert call is not None
    record = record_fields(
        RecordType.ENDED,
        call,
        now - 3_000,
        duration_ms=62_000,
        node="killed",
        extra={"by": "bob", "reason": "hangup"},
    )
    fields["outbox"] = encode_outbox([OutboxEntry(now - 3_000, record)])
    key = f"{prefix}call:{{{call_id}}}"
    client.hset(key, mapping=fields)
    client.pexpire(key, 86_400_000)
    client.zadd(f"{prefix}calls:{{timers}}", {call_id: now - 2_000})

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if (
            client.hget(key, "outbox") == ""
            and client.zscore(f"{prefix}calls:{{timers}}", call_id) is None
        ):
            break
        await asyncio.sleep(0.05)
    entries = [f for _, f in client.xrange(stream) if f["call_id"] == call_id]
    assert entries == [record]
    assert client.hget(key, "outbox") == ""
    assert client.zscore(f"{prefix}calls:{{timers}}", call_id) is None
    # Still the ended call, kept a day; the events' seq did not move.
    assert client.hget(key, "rev") == "5" and client.pttl(key) > 86_000_000
    redelivered = 0.0
    for node in (node_a, node_b):
        _, body = await node.aget("/metrics")
        for line in body.decode().splitlines():
            if line.startswith("signal_call_billing_redelivered_total "):
                redelivered += float(line.split()[1])
    assert redelivered == 1.0
    client.close()
