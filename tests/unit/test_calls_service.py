"""CallService on a real Node with the embedded broker and memory store, driven
with a fake clock: the call clock (ticks, warnings, max duration), the ring
timeout, races, timers taken over from a dead instance, liveness, and the
billing records read back from the memory store's log."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from test_calls_state import YieldingStore

from handlers.calls.agora import TokenIssuer
from handlers.calls.metrics import CallMetrics
from handlers.calls.service import CallService
from handlers.calls.state import CallState, busy_key
from handlers.calls.timers import LEASE_MS, TIMERS_KEY, TimerQueue
from handlers.channels import PlatformChannelPolicy, personal_channel
from signaling.auth import TokenVerifier
from signaling.broker.base import HistoryOptions
from signaling.broker.memory import MemoryBroker
from signaling.config import Secret, Settings
from signaling.errors import SignalError
from signaling.metrics import Metrics
from signaling.node import ConnectionEvent, Node
from signaling.state.memory import MemoryStateStore
from signaling.transport import encode_text_frame

STREAM = "test:call-events"
APP_ID = "0123456789abcdef0123456789abcdef"
CERT = "00112233445566778899aabbccddeeff"


class Clock:
    def __init__(self) -> None:
        self.ms = int(time.time() * 1000)

    def __call__(self) -> int:
        return self.ms

    def advance(self, ms: int) -> None:
        self.ms += ms


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "dev": True,
        "port": 0,
        "call_ring_timeout_s": 30.0,
        "call_tick_s": 60.0,
        "call_max_duration_s": 600.0,
        "call_warnings_s": (300.0, 60.0),
        "call_grace_s": 20.0,
        "call_invites_per_minute": 3,
        "call_events_stream": STREAM,
        "agora_app_id": APP_ID,
        "agora_app_certificate": Secret(CERT),
    }
    values.update(overrides)
    return Settings(**values)


class Harness:
    def __init__(self, **overrides: Any) -> None:
        self.settings = settings(**overrides)
        self.broker = MemoryBroker()
        self.memory = MemoryStateStore()
        self.node = Node(
            self.settings,
            broker=self.broker,
            presence=self.broker,
            store=self.memory,
            policy=PlatformChannelPolicy(100, 3600),
            verifier=TokenVerifier(self.settings),
            metrics=Metrics(),
            frame_encoder=encode_text_frame,
        )
        self.clock = Clock()
        self.service = self.instance()

    def instance(self, *, yielding: bool = False) -> CallService:
        """A CallService on the same store (another 'instance' of the cluster)."""
        store = YieldingStore(self.memory) if yielding else self.memory
        return CallService(
            self.node,
            store=store,  # type: ignore[arg-type]
            metrics=CallMetrics(CollectorRegistry()),
            clock=self.clock,
        )

    async def events(self, user: str) -> list[dict[str, Any]]:
        page = await self.broker.history(
            personal_channel(user),
            since=None,
            limit=1000,
            reverse=False,
            history=HistoryOptions(100, 3600),
        )
        return [orjson.loads(p.data) for p in page.publications]

    def records(self) -> list[dict[str, str]]:
        return [fields for _, fields in self.memory.read_stream(STREAM)]

    async def accepted_call(self, caller: str = "alice", callee: str = "bob") -> str:
        call = await self.service.invite(caller, callee, "video", "")
        await self.service.accept(callee, call.call_id)
        return call.call_id


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    harness = Harness()
    await harness.broker.start()
    yield harness
    await harness.broker.close()


def types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --------------------------------------------------------------------------- clock


async def test_ticks_warnings_and_max_duration_in_server_time(h: Harness) -> None:
    call_id = await h.accepted_call()
    call = await h.service.calls.get(call_id)
    assert call is not None and call.accepted_at_ms is not None
    accepted = call.accepted_at_ms
    # Both online all along (presence), so only the clock acts.
    for user in ("alice", "bob"):
        await h.node.user_presence.went_online(user)

    # Nothing due yet: the next look is the first liveness check.
    due = await h.service.run_timer(call_id)
    assert due is not None and due <= accepted + h.service.live_check_ms

    # Late by 3.5 minutes (an instance died): ticks 1-3 all come, in order.
    h.clock.ms = accepted + 210_000
    due = await h.service.run_timer(call_id)
    # The next liveness check (every grace/4 = 5 s) comes before tick 4.
    assert due == accepted + 210_000 + h.service.live_check_ms
    ticks = [e for e in await h.events("bob") if e["type"] == "call.tick"]
    assert [t["minute"] for t in ticks] == [1, 2, 3]
    assert [t["duration_ms"] for t in ticks] == [60_000, 120_000, 180_000]

    # Warnings at 300 s and 60 s before the 600 s maximum.
    h.clock.ms = accepted + 300_000
    await h.service.run_timer(call_id)
    warnings = [e for e in await h.events("alice") if e["type"] == "call.warning"]
    assert [w["remaining_s"] for w in warnings] == [300.0]
    assert warnings[0]["ends_at_ms"] == accepted + 600_000

    # Far past the end: the remaining ticks (up to the end only), then the end at
    # the limit itself; the late 60 s warning is skipped, not sent after the end.
    h.clock.ms = accepted + 900_000
    assert await h.service.run_timer(call_id) is None
    events = await h.events("alice")
    kinds = types(events)
    assert kinds.count("call.tick") == 10 and kinds.count("call.warning") == 1
    assert kinds[-1] == "call.ended"
    ended = events[-1]
    assert ended["reason"] == "max_duration"
    assert ended["ended_at_ms"] == accepted + 600_000 and ended["duration_ms"] == 600_000
    assert await h.node.store.get(busy_key("alice")) is None
    assert await h.node.store.get(busy_key("bob")) is None

    records = [r for r in h.records() if r["call_id"] == call_id]
    assert [r["type"] for r in records] == [
        "call.invited",
        "call.accepted",
        *["call.tick"] * 10,
        "call.ended",
    ]
    assert len({r["event_id"] for r in records}) == len(records)
    assert records[-1]["duration_ms"] == "600000"
    assert records[-1]["reason"] == "max_duration"


async def test_ring_timeout_and_a_late_answer(h: Harness) -> None:
    call = await h.service.invite("alice", "bob", "audio", '{"price":5}')
    assert await h.service.run_timer(call.call_id) == call.ring_deadline_ms
    incoming = (await h.events("bob"))[0]
    assert incoming["type"] == "call.incoming" and incoming["meta"] == {"price": 5}
    assert await h.events("alice") == []  # the caller got the RPC reply instead

    # The answer comes after the deadline but before any timer ran: too late.
    h.clock.ms = call.ring_deadline_ms
    with pytest.raises(SignalError) as err:
        await h.service.accept("bob", call.call_id)
    assert err.value.value.code == 1007
    assert "missed" in err.value.value.message  # type: ignore[union-attr]
    for user in ("alice", "bob"):
        assert types(await h.events(user))[-1] == "call.missed"
    # The missed event was sent once, though the timer also runs.
    assert await h.service.run_timer(call.call_id) is None
    assert types(await h.events("bob")).count("call.missed") == 1
    missed = [r for r in h.records() if r["type"] == "call.missed"]
    assert len(missed) == 1 and missed[0]["at_ms"] == str(call.ring_deadline_ms)


async def test_racing_transitions_across_instances_have_one_winner(h: Harness) -> None:
    a, b = h.instance(yielding=True), h.instance(yielding=True)
    outcomes = set()
    for n in range(15):
        caller, callee = f"alice{n}", f"bob{n}"
        call = await a.invite(caller, callee, "video", "")
        racers = [
            a.accept(callee, call.call_id),
            b.cancel(caller, call.call_id),
            b.accept(callee, call.call_id),
        ]
        # Rotate who starts first, so that each kind of racer gets to win.
        results = await asyncio.gather(*racers[n % 3 :], *racers[: n % 3], return_exceptions=True)
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert len(winners) == 1, results
        outcomes.add(winners[0].state)
        for loser in (r for r in results if isinstance(r, BaseException)):
            assert isinstance(loser, SignalError) and loser.value.code == 1007
        kinds = types(await h.events(callee))
        assert kinds.count("call.accepted") + kinds.count("call.cancelled") == 1
        if winners[0].state == CallState.ACCEPTED:
            # Hang-up racing hang-up, racing the max-duration timer.
            h.clock.advance(600_000)
            results = await asyncio.gather(
                a.end(caller, call.call_id),
                b.end(callee, call.call_id),
                a.run_timer(call.call_id),
                b.run_timer(call.call_id),
                return_exceptions=True,
            )
            hangups = [r for r in results[:2] if not isinstance(r, BaseException)]
            assert len(hangups) <= 1, results
            events = await h.events(caller)
            assert types(events).count("call.ended") == 1
            reason = events[-1]["reason"]
            assert reason == ("hangup" if hangups else "max_duration")
            h.clock.advance(-600_000)
    assert outcomes == {CallState.ACCEPTED, CallState.CANCELLED}


async def test_invite_refusals_release_what_they_claimed(h: Harness) -> None:
    with pytest.raises(SignalError) as err:
        await h.service.invite("alice", "alice", "video", "")
    assert err.value.value.code == 1003
    first = await h.service.invite("alice", "bob", "video", "")
    with pytest.raises(SignalError) as err:
        await h.service.invite("carol", "bob", "video", "")
    assert err.value.value.code == 1005
    # carol's own flag, claimed first, was released.
    assert await h.node.store.get(busy_key("carol")) is None
    with pytest.raises(SignalError) as err:
        await h.service.invite("bob", "dave", "video", "")
    assert err.value.value.code == 1004
    assert await h.node.store.get(busy_key("dave")) is None
    # Refused invites leave no call and no timer behind.
    timers = await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf"))
    assert [member for member, _ in timers] == [first.call_id]
    # Refused invites count against the caller's 3 per minute.
    for _ in range(2):
        with pytest.raises(SignalError) as err:
            await h.service.invite("carol", "bob", "video", "")
        assert err.value.value.code == 1005
    with pytest.raises(SignalError) as err:
        await h.service.invite("carol", "erin", "video", "")
    assert err.value.value.code == 1006


async def test_timers_are_claimed_once_and_taken_over_after_a_lease(h: Harness) -> None:
    call = await h.service.invite("alice", "bob", "video", "")
    queue = TimerQueue(h.memory)
    now = call.ring_deadline_ms
    first = await queue.claim(now)
    assert first == [call.call_id]
    # Claimed and leased: another instance polling now gets nothing...
    assert await queue.claim(now) == []
    # ...until the lease runs out (the claimer died without finishing it).
    assert await queue.claim(now + LEASE_MS) == [call.call_id]
    h.clock.ms = now + LEASE_MS
    await h.instance().fire(call.call_id)
    assert types(await h.events("bob"))[-1] == "call.missed"
    assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []


async def test_grant_tokens_only_for_accepted_calls(h: Harness) -> None:
    call = await h.service.invite("alice", "bob", "video", "")
    with pytest.raises(SignalError) as err:
        await h.service.grant("alice", call.call_id, renew=False)
    assert err.value.value.code == 1007
    await h.service.accept("bob", call.call_id)
    grant = await h.service.grant("alice", call.call_id, renew=False)
    assert grant.channel == f"call_{call.call_id}"
    assert grant.expires_at == h.clock.ms // 1000 + 3600
    with pytest.raises(SignalError) as err:
        await h.service.grant("mallory", call.call_id, renew=True)
    assert err.value.value.code == 1002
    # Past the maximum duration, though no timer ran yet: no token, the call ends.
    h.clock.advance(600_000)
    with pytest.raises(SignalError) as err:
        await h.service.grant("bob", call.call_id, renew=True)
    assert err.value.value.code == 1007
    assert types(await h.events("bob"))[-1] == "call.ended"
    # No token in any publication or record.
    for user in ("alice", "bob"):
        assert grant.token not in repr(await h.events(user))
    assert grant.token not in repr(h.records())
    unconfigured = CallService(
        h.node,
        metrics=CallMetrics(CollectorRegistry()),
        issuer=TokenIssuer(None, None, 600),
    )
    with pytest.raises(SignalError) as err:
        await unconfigured.grant("alice", call.call_id, renew=False)
    assert err.value.value.code == 1001


# --------------------------------------------------------------------------- liveness


async def test_a_participant_offline_for_the_grace_period_ends_the_call(h: Harness) -> None:
    h.clock = Clock()
    service = h.instance()
    h.service = service
    call_id = await h.accepted_call()
    presence = h.node.user_presence
    await presence.went_online("alice")
    await presence.went_online("bob")
    # Presence stamps the system clock: keep the service's clock on it here.
    h.clock.ms = int(time.time() * 1000)
    await service.run_timer(call_id)
    call = await service.calls.get(call_id)
    assert call is not None and call.caller_seen_ms == h.clock.ms

    # bob's last connection closes; alice stays connected throughout.
    await presence.went_offline("bob")
    gone_ms = int(time.time() * 1000)
    h.clock.ms = gone_ms
    await service.on_disconnect(ConnectionEvent("bob", "client-1", 0))
    due = await service.run_timer(call_id)
    assert due is not None and due <= gone_ms + 20_000 + 10
    assert (await service.calls.get(call_id)).state == CallState.ACCEPTED  # type: ignore[union-attr]

    h.clock.ms = gone_ms + 20_005  # last_seen is stamped with ms rounding
    assert await service.run_timer(call_id) is None
    ended = (await h.events("alice"))[-1]
    assert ended["type"] == "call.ended" and ended["reason"] == "participant_lost"
    assert ended["lost"] == "bob" and abs(ended["lost_since_ms"] - gone_ms) < 50
    record = h.records()[-1]
    assert record["reason"] == "participant_lost" and record["lost"] == "bob"


async def test_an_instance_crash_counts_from_the_last_time_a_participant_was_seen(
    h: Harness,
) -> None:
    call_id = await h.accepted_call()
    presence = h.node.user_presence
    await presence.went_online("alice")
    await presence.went_online("bob")
    h.clock.advance(5000)
    await h.service.run_timer(call_id)
    seen = h.clock.ms
    # bob's instance dies: his presence record simply disappears, no last_seen stamp.
    await h.memory.delete("online:{bob}")
    h.clock.advance(1000)
    due = await h.service.run_timer(call_id)
    assert due is not None and due <= seen + 20_000
    h.clock.ms = seen + 20_000
    await h.service.run_timer(call_id)
    ended = (await h.events("bob"))[-1]
    assert ended["reason"] == "participant_lost" and ended["lost_since_ms"] == seen
