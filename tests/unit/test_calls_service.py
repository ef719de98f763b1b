"""CallService on a real Node with the embedded broker and memory store, driven
with a fake clock: the call clock (ticks, warnings, max duration), the ring
timeout, races, timers taken over from a dead instance, liveness, and the
billing records read back from the memory store's log."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry
from test_calls_state import YieldingStore

from handlers.calls.agora import TokenIssuer
from handlers.calls.metrics import CallMetrics
from handlers.calls.service import ANNOUNCE_GIVE_UP_MS, OUTBOX_STALE_MS, CallService
from handlers.calls.state import TERMINAL_STATES, CallState, busy_key
from handlers.calls.timers import ACTIVE_KEY, LEASE_MS, TIMERS_KEY, TimerQueue
from handlers.channels import PlatformChannelPolicy, personal_channel
from signaling.auth import TokenVerifier
from signaling.broker.base import BrokerUnavailable, HistoryOptions
from signaling.broker.memory import MemoryBroker
from signaling.config import Secret, Settings
from signaling.errors import SignalError
from signaling.metrics import Metrics
from signaling.node import ConnectionEvent, Node
from signaling.state.memory import MemoryStateStore
from signaling.transport import encode_text_frame

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from examples import billing_consumer  # noqa: E402

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

    def instance(self, *, yielding: bool = False, store: Any = None) -> CallService:
        """A CallService on the same store (another 'instance' of the cluster)."""
        if store is None:
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


async def test_a_hang_up_after_a_due_tick_the_timer_missed_bills_it_first(h: Harness) -> None:
    """The timer runs late (its instance died, its claim waits for the lease): a
    hang-up 10 s into minute 2 must not end the call with 1 tick billed; and
    one after the maximum ends it at the maximum, as the timer would have."""
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        await h.node.user_presence.went_online(user)  # only the clock acts
    call_id = await h.accepted_call()
    call = await h.service.calls.get(call_id)
    assert call is not None and call.accepted_at_ms is not None
    accepted = call.accepted_at_ms
    h.clock.ms = accepted + 70_000  # tick 1 due at 60 s; no timer ran
    ended = await h.service.end("bob", call_id)
    assert ended.state == "ended" and ended.ended_at_ms == accepted + 70_000
    events = [e for e in await h.events("alice") if e["type"] in ("call.tick", "call.ended")]
    assert types(events) == ["call.tick", "call.ended"]
    assert events[1]["reason"] == "hangup" and events[1]["duration_ms"] == 70_000
    records = [r for r in h.records() if r["call_id"] == call_id]
    assert [r["type"] for r in records][-2:] == ["call.tick", "call.ended"]

    # A hang-up just before the maximum is a hang-up, its last tick sent first.
    near_id = await h.accepted_call(caller="erin", callee="frank")
    near = await h.service.calls.get(near_id)
    assert near is not None and near.accepted_at_ms is not None
    h.clock.ms = near.accepted_at_ms + 600_000 - 1
    assert (await h.service.end("erin", near_id)).ended_at_ms == near.accepted_at_ms + 599_999
    kinds = types(await h.events("frank"))
    assert kinds.count("call.tick") == 9 and kinds[-1] == "call.ended"
    assert (await h.events("frank"))[-1]["reason"] == "hangup"

    late_id = await h.accepted_call(caller="carol", callee="dave")
    late = await h.service.calls.get(late_id)
    assert late is not None and late.accepted_at_ms is not None
    h.clock.ms = late.accepted_at_ms + 600_000 + 5_000  # past the 600 s maximum
    with pytest.raises(SignalError) as refused:
        await h.service.end("dave", late_id)
    assert refused.value.value.code == 1007  # the maximum ended it first
    final = [e for e in await h.events("carol") if e["type"] == "call.ended"]
    assert final[-1]["reason"] == "max_duration"
    assert final[-1]["duration_ms"] == 600_000
    ticks = [e for e in await h.events("carol") if e["type"] == "call.tick"]
    assert [t["minute"] for t in ticks] == list(range(1, 11))


async def test_an_accept_or_end_made_answers_so_though_a_follow_up_write_failed(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compare-and-set won: the change is made. A write after it that the
    broker refuses (the active set, the busy flags) must not turn the reply
    into error 100, whose retry finds "wrong state" and looks like a lost
    race; the events still go out, and the call's timer finishes the rest."""
    for user in ("alice", "bob"):
        await h.node.user_presence.went_online(user)
    store, calls = h.service.store, h.service.calls
    real_zadd, real_release = store.zadd, calls.release_busy

    async def zadd_refused(key: str, *args: Any, **kwargs: Any) -> Any:
        if key == ACTIVE_KEY:
            raise BrokerUnavailable("MISCONF")
        return await real_zadd(key, *args, **kwargs)

    async def release_refused(*args: Any, **kwargs: Any) -> Any:
        raise BrokerUnavailable("MISCONF")

    call = await h.service.invite("alice", "bob", "video", "")
    monkeypatch.setattr(store, "zadd", zadd_refused)
    accepted = await h.service.accept("bob", call.call_id)
    assert accepted.state == "accepted"
    assert "call.accepted" in types(await h.events("alice"))

    monkeypatch.setattr(store, "zadd", real_zadd)
    monkeypatch.setattr(calls, "release_busy", release_refused)
    ended = await h.service.end("alice", call.call_id)
    assert ended.state == "ended"
    assert types(await h.events("bob"))[-1] == "call.ended"
    assert await h.node.store.get(busy_key("alice")) == call.call_id  # not freed yet

    # The timer, still scheduled and due soon, frees them once the store takes
    # writes again: claimed from the queue as any instance would.
    monkeypatch.setattr(calls, "release_busy", real_release)
    h.clock.advance(OUTBOX_STALE_MS)
    assert await TimerQueue(h.memory).claim(h.clock.ms) == [call.call_id]
    await h.instance().fire(call.call_id)
    assert await h.node.store.get(busy_key("alice")) is None
    assert await h.node.store.get(busy_key("bob")) is None
    assert types(await h.events("bob")).count("call.ended") == 1


async def test_a_call_whose_timer_was_lost_is_settled_when_it_keeps_a_user_busy(
    h: Harness,
) -> None:
    """A failover that loses the timer entry of a ringing call (the call's hash
    on another shard survives): nothing would ever end it, and its users would
    be "busy" until their flags expire, hours later. Past its deadline, the
    next invite that finds it settles it (missed) and goes through."""
    call = await h.service.invite("alice", "bob", "video", "")
    await h.service.timers.cancel(call.call_id)  # the entry lost
    h.clock.ms = call.ring_deadline_ms + 1_000
    again = await h.service.invite("alice", "carol", "video", "")
    assert again.state == "ringing"
    assert types(await h.events("bob"))[-1] == "call.missed"
    # Before its deadline, a ringing call still makes its users busy.
    with pytest.raises(SignalError) as refused:
        await h.service.invite("dave", "carol", "video", "")
    assert refused.value.value.code == 1005


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
    # The missed event was sent once, though the timer also runs: at once it
    # cannot tell whether the end's instance is still publishing it, so it
    # looks again later, finds it in both personal channels and goes.
    again = await h.service.run_timer(call.call_id)
    assert again == h.clock.ms + OUTBOX_STALE_MS
    h.clock.ms = again
    assert await h.service.run_timer(call.call_id) is None
    assert types(await h.events("bob")).count("call.missed") == 1
    assert types(await h.events("alice")).count("call.missed") == 1
    assert h.service.metrics.events_redelivered._value.get() == 0
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
            # At the maximum itself a hang-up lets the clock catch up first:
            # the maximum ends the call, whoever runs first, once.
            hangups = [r for r in results[:2] if not isinstance(r, BaseException)]
            assert hangups == [], results
            events = await h.events(caller)
            assert types(events).count("call.ended") == 1
            assert events[-1]["reason"] == "max_duration"
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
    accepted = await h.service.accept("bob", call.call_id)
    grant = await h.service.grant("alice", call.call_id, renew=False)
    assert grant.channel == f"call_{call.call_id}"
    # The token lifetime (1 h here) is cut at the call's forced end (600 s after the
    # accept): Agora drops whoever is still in the channel then.
    assert accepted.accepted_at_ms is not None
    ends_at_s = -(-(accepted.accepted_at_ms + 600_000) // 1000)
    assert grant.expires_at == ends_at_s < h.clock.ms // 1000 + 3600
    h.clock.advance(590_000)
    assert (await h.service.grant("bob", call.call_id, renew=True)).expires_at == ends_at_s
    with pytest.raises(SignalError) as err:
        await h.service.grant("mallory", call.call_id, renew=True)
    assert err.value.value.code == 1002
    # Past the maximum duration, though no timer ran yet: no token, the call ends.
    h.clock.advance(10_000)
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


# --------------------------------------------------------------------------- billing outbox


class Died(Exception):
    """The instance died: nothing after this point of its work happens."""


class FailingStream:
    """The shared store as one instance sees it, with its billing appends
    failing: ``mode`` "die" kills the instance right before an append (the
    change is written, the record is not), "die-after" right after it (the
    record is appended, the outbox not cleared), "unavailable" makes the
    stream unreachable (the instance lives on)."""

    def __init__(self, inner: MemoryStateStore, mode: str) -> None:
        self.inner = inner
        self.mode = mode
        self.appends = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def xadd(self, stream: str, fields: Any, maxlen: int) -> str:
        self.appends += 1
        if self.mode == "die":
            raise Died
        if self.mode == "unavailable":
            raise BrokerUnavailable("stream unreachable")
        await self.inner.xadd(stream, fields, maxlen)
        raise Died


def records_of(h: Harness, call_id: str) -> list[dict[str, str]]:
    return [r for r in h.records() if r["call_id"] == call_id]


async def run_timers_until(
    h: Harness, service: CallService, done: Callable[[], bool], *, rounds: int = 10
) -> None:
    """Another instance's timer loop, with the clock jumping to each due time."""
    queue = TimerQueue(h.memory)
    for _ in range(rounds):
        if done():
            return
        due = await h.memory.zrange_by_score(TIMERS_KEY, float("-inf"), float("inf"))
        assert due, "no call timer left"
        h.clock.ms = max(h.clock.ms, int(min(score for _, score in due)))
        for call_id in await queue.claim(h.clock.ms):
            await service.fire(call_id)
    assert done()


async def both_online(h: Harness) -> None:
    for user in ("alice", "bob"):
        await h.node.user_presence.went_online(user)


async def test_a_hangup_record_survives_its_instance_dying_before_the_append(
    h: Harness,
) -> None:
    call_id = await h.accepted_call()
    await both_online(h)
    dying = h.instance(store=FailingStream(h.memory, "die"))
    with pytest.raises(Died):
        await dying.end("alice", call_id)
    # The call ended (the change was written), its record is not in the stream...
    assert [r["type"] for r in records_of(h, call_id)] == ["call.invited", "call.accepted"]
    call = await h.service.calls.get(call_id)
    assert call is not None and call.state == CallState.ENDED
    # ...but in the call's outbox, and the call's timer is still there.
    assert [e.fields["type"] for e in call.outbox] == ["call.ended"]
    assert call_id in dict(await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")))

    # Another instance's timer appends it (once it is older than its writer's
    # own append could take), and only then lets the timer go.
    survivor = h.instance()
    await run_timers_until(h, survivor, lambda: len(records_of(h, call_id)) == 3)
    ended = records_of(h, call_id)[-1]
    assert ended["type"] == "call.ended" and ended["reason"] == "hangup"
    assert ended["by"] == "alice" and ended["event_id"] == f"{call_id}-{call.rev}"
    assert int(ended["duration_ms"]) == call.duration_ms(0)
    assert int(ended["ended_at_ms"]) == call.ended_at_ms
    assert survivor.metrics.billing_redelivered._value.get() == 1
    after = await h.service.calls.get(call_id)
    assert after is not None and after.outbox == () and after.rev == call.rev
    assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []


@pytest.mark.parametrize("transition", ["invite", "accept", "tick", "cancel", "missed", "lost"])
async def test_every_kind_of_record_survives_its_instance_dying(
    h: Harness, transition: str
) -> None:
    dying = h.instance(store=FailingStream(h.memory, "die"))
    survivor = h.instance()
    expected = {
        "invite": "call.invited",
        "accept": "call.accepted",
        "tick": "call.tick",
        "cancel": "call.cancelled",
        "missed": "call.missed",
        "lost": "call.ended",
    }[transition]
    await both_online(h)
    if transition == "invite":
        with pytest.raises(Died):
            await dying.invite("alice", "bob", "video", "")
        (call_id,) = [m for m, _ in await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf"))]
    else:
        call = await h.service.invite("alice", "bob", "video", "")
        call_id = call.call_id
        if transition in ("tick", "lost"):
            await h.service.accept("bob", call_id)
        with pytest.raises(Died):
            if transition == "accept":
                await dying.accept("bob", call_id)
            elif transition == "cancel":
                await dying.cancel("alice", call_id)
            elif transition == "missed":
                h.clock.ms = call.ring_deadline_ms
                await dying.run_timer(call_id)
            elif transition == "tick":
                h.clock.advance(60_000)
                await dying.run_timer(call_id)
            else:
                await h.memory.delete("online:{bob}")  # bob's instance died too
                h.clock.advance(20_000)
                await dying.run_timer(call_id)
    assert expected not in [r["type"] for r in records_of(h, call_id)]

    await run_timers_until(
        h, survivor, lambda: expected in [r["type"] for r in records_of(h, call_id)]
    )
    records = records_of(h, call_id)
    assert [r["type"] for r in records].count(expected) == 1
    # Every change of the call's billing is there once, whoever appended it.
    seqs = sorted(int(r["seq"]) for r in records)
    assert len(set(seqs)) == len(seqs)
    call = await h.service.calls.get(call_id)
    assert call is not None and call.outbox == ()
    if transition == "tick":
        tick = next(r for r in records if r["type"] == "call.tick")
        assert tick["minute"] == "1" and tick["duration_ms"] == "60000"
    if transition == "lost":
        assert records[-1]["reason"] == "participant_lost" and records[-1]["lost"] == "bob"


async def test_dying_after_the_append_repeats_the_record_with_its_event_id(h: Harness) -> None:
    call_id = await h.accepted_call()
    await both_online(h)
    dying = h.instance(store=FailingStream(h.memory, "die-after"))
    with pytest.raises(Died):
        await dying.end("bob", call_id)
    assert [r["type"] for r in records_of(h, call_id)][-1] == "call.ended"
    await run_timers_until(
        h,
        h.instance(),
        lambda: [r["type"] for r in records_of(h, call_id)].count("call.ended") == 2,
    )
    # At least once: the same record twice, with the same event id, which the
    # consumer skips (examples/billing_consumer.py).
    first, again = [r for r in records_of(h, call_id) if r["type"] == "call.ended"]
    assert first == again
    handled: list[str] = []
    handle = billing_consumer.deduplicated(lambda _id, fields: handled.append(fields["event_id"]))
    for n, record in enumerate(records_of(h, call_id)):
        handle(f"0-{n}", record)
    assert handled == [r["event_id"] for r in records_of(h, call_id)[:-1]]
    assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []


async def test_an_unreachable_stream_delays_records_without_losing_them(h: Harness) -> None:
    stream = FailingStream(h.memory, "unavailable")
    service = h.instance(store=stream)
    h.service = service
    # The calls go on while the stream cannot be reached: nothing is refused.
    call = await service.invite("alice", "bob", "video", "")
    await service.accept("bob", call.call_id)
    await both_online(h)
    h.clock.advance(60_000)
    await service.run_timer(call.call_id)
    await service.end("alice", call.call_id)
    ended = await service.calls.get(call.call_id)
    assert ended is not None and ended.state == CallState.ENDED
    assert [e.fields["type"] for e in ended.outbox] == [
        "call.invited",
        "call.accepted",
        "call.tick",
        "call.ended",
    ]
    assert records_of(h, call.call_id) == []
    # The ended call keeps its timer while its outbox waits, and its timer
    # keeps failing harmlessly.
    for _ in range(3):
        due = await service.run_timer(call.call_id)
        assert due is not None and due > h.clock.ms
        h.clock.ms = due
    assert call.call_id in dict(await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")))
    # The stream is back: everything goes out, in order, once.
    stream.mode = "ok"
    stream.xadd = h.memory.xadd  # type: ignore[method-assign]
    await run_timers_until(h, service, lambda: len(records_of(h, call.call_id)) == 4)
    assert [int(r["seq"]) for r in records_of(h, call.call_id)] == [2, 3, 4, 5]
    assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []


async def test_racing_changes_append_each_record_once(h: Harness) -> None:
    # Ticks from two instances' timers racing a hang-up: every record once,
    # none appended for another (each writer appends its own), and nothing
    # left in any outbox or timer.
    a, b = h.instance(yielding=True), h.instance(yielding=True)
    for n in range(12):
        caller, callee = f"alice{n}", f"bob{n}"
        for user in (caller, callee):
            await h.node.user_presence.went_online(user)
        call = await a.invite(caller, callee, "video", "")
        await b.accept(callee, call.call_id)
        h.clock.advance(180_000)
        racers = [a.run_timer(call.call_id), b.run_timer(call.call_id), a.end(caller, call.call_id)]
        await asyncio.gather(*racers[n % 3 :], *racers[: n % 3], return_exceptions=True)
        final = await h.service.calls.get(call.call_id)
        assert final is not None and final.state == CallState.ENDED and final.outbox == ()
        records = sorted(records_of(h, call.call_id), key=lambda r: int(r["seq"]))
        ids = [r["event_id"] for r in records]
        assert len(ids) == len(set(ids)), ids
        kinds = [r["type"] for r in records]
        assert kinds[:2] == ["call.invited", "call.accepted"] and kinds[-1] == "call.ended"
        ticks = [int(r["minute"]) for r in records if r["type"] == "call.tick"]
        assert ticks == list(range(1, len(ticks) + 1)) and len(ticks) + 3 == len(records)
        # A timer kept for records in flight finds nothing left and goes.
        for _ in range(3):
            if not await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")):
                break
            h.clock.advance(OUTBOX_STALE_MS)
            for call_id in await TimerQueue(h.memory).claim(h.clock.ms):
                await a.fire(call_id)
        assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []
        # Every event once too, the end's included.
        for user in (caller, callee):
            events = [e for e in await h.events(user) if e["call_id"] == call.call_id]
            assert types(events).count("call.ended") == 1, (n, user)
            seqs = [e["seq"] for e in events]
            assert len(seqs) == len(set(seqs)), (n, user, seqs)
    assert a.metrics.billing_redelivered._value.get() == 0
    assert b.metrics.billing_redelivered._value.get() == 0
    assert a.metrics.events_redelivered._value.get() == 0


class PausedStream:
    """The store with billing appends held until ``release`` is set."""

    def __init__(self, inner: MemoryStateStore) -> None:
        self.inner = inner
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def xadd(self, stream: str, fields: Any, maxlen: int) -> str:
        self.waiting.set()
        await self.release.wait()
        return await self.inner.xadd(stream, fields, maxlen)


async def test_a_hangup_while_a_tick_is_being_appended_leaves_the_tick_to_its_writer(
    h: Harness,
) -> None:
    call_id = await h.accepted_call()
    await both_online(h)
    paused = PausedStream(h.memory)
    slow = h.instance(store=paused)
    h.clock.advance(60_000)
    # The slow instance wrote tick 1 and is appending it when the hang-up comes.
    ticking = asyncio.create_task(slow.run_timer(call_id))
    await paused.waiting.wait()
    await h.service.end("alice", call_id)
    ended = await h.service.calls.get(call_id)
    assert ended is not None
    assert [e.fields["type"] for e in ended.outbox] == ["call.tick"]
    assert [r["type"] for r in records_of(h, call_id)][-1] == "call.ended"
    # The hang-up's instance did not append the tick (it is in flight), and
    # kept the call's timer for it rather than dropping it.
    assert call_id in dict(await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")))
    paused.release.set()
    await ticking
    kinds = [r["type"] for r in records_of(h, call_id)]
    assert sorted(kinds) == sorted(["call.invited", "call.accepted", "call.ended", "call.tick"])
    # The kept timer then finds the outbox empty and goes.
    h.clock.advance(OUTBOX_STALE_MS)
    for claimed in await TimerQueue(h.memory).claim(h.clock.ms):
        await h.service.fire(claimed)
    assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []
    assert len(records_of(h, call_id)) == 4
    assert h.service.metrics.billing_redelivered._value.get() == 0


async def test_participants_hear_of_the_end_once_free_to_call_again(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end's follow-ups go out together, its events after them: when a
    participant's app hears ``call.ended``, their busy flag is gone (a new invite
    goes through), and so is the call's place among the active calls. The
    call's timer goes once the events are out (until then, should the instance
    die, it is what publishes them). A store that yields at every operation
    interleaves everything that runs concurrently."""
    service = h.instance(yielding=True)
    call = await service.invite("alice", "bob", "video", "")
    await service.accept("bob", call.call_id)
    store = h.memory
    assert await store.get(busy_key("alice")) == call.call_id
    seen: dict[str, tuple[Any, ...]] = {}
    publish = h.node.publish

    async def watching(channel: str, data: bytes, **kwargs: Any) -> Any:
        if orjson.loads(data).get("type") == "call.ended":
            timers = await store.zrange_by_score(TIMERS_KEY, 0, float("inf"))
            active = await store.zrange_by_score(ACTIVE_KEY, 0, float("inf"))
            seen[channel] = (
                await store.get(busy_key("alice")),
                await store.get(busy_key("bob")),
                call.call_id in {member for member, _ in timers},
                call.call_id in {member for member, _ in active},
            )
        return await publish(channel, data, **kwargs)

    monkeypatch.setattr(h.node, "publish", watching)
    await service.end("alice", call.call_id)
    free = (None, None, True, False)
    assert seen == {personal_channel("alice"): free, personal_channel("bob"): free}
    assert await store.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []
    # Free indeed: bob calls alice at once.
    await service.invite("bob", "alice", "audio", "")


async def test_an_in_call_status_left_by_a_failed_end_is_cleared_by_the_timer(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    from handlers import presence
    from handlers.calls import service as service_module

    call_id = await h.accepted_call()
    assert (await presence.status_view(h.node, "bob")).in_call
    real = presence.set_call_busy

    async def store_fails_on_clearing(
        node: Node, user: str, call: str, busy: bool, **kwargs: Any
    ) -> None:
        if not busy:
            raise BrokerUnavailable("the store failed as the call ended")
        await real(node, user, call, busy, **kwargs)

    monkeypatch.setattr(service_module, "set_call_busy", store_fails_on_clearing)
    await h.service.end("alice", call_id)
    # Still shown in the call: the end could not clear it, its timer will.
    assert (await presence.status_view(h.node, "bob")).in_call
    due = dict(await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf"))).get(call_id)
    assert due is not None and due > h.clock.ms
    monkeypatch.setattr(service_module, "set_call_busy", real)
    h.clock.ms = int(due)
    await h.instance().fire(call_id)
    for user in ("alice", "bob"):
        view = await presence.status_view(h.node, user)
        assert not view.in_call, user
    # The timer then makes sure of the end's events (published once, found
    # in the channels: not again) and goes.
    await drain_timers(h, h.instance())
    for user in ("alice", "bob"):
        assert len(call_events(await h.events(user), call_id, "call.ended")) == 1, user


# --------------------------------------------------------------------------- the end's events


class DyingNode:
    """The node as one instance sees it, with its publications of one kind of
    event failing: ``mode`` "die" kills the instance right before the n-th
    such publish (``after`` of them went out), "unavailable" makes the broker
    refuse them (the instance lives on)."""

    def __init__(self, node: Node, event: str, mode: str, after: int = 0) -> None:
        self.node = node
        self.event = event
        self.mode = mode
        self.after = after

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)

    async def publish(self, channel: str, data: bytes, **kwargs: Any) -> Any:
        if orjson.loads(data).get("type") == self.event:
            if self.after:
                self.after -= 1
            elif self.mode == "die":
                raise Died
            else:
                raise BrokerUnavailable("broker unreachable")
        return await self.node.publish(channel, data, **kwargs)


async def drain_timers(h: Harness, service: CallService, rounds: int = 5) -> None:
    """Another instance's timer loop, the clock jumping to each due time,
    until no call timer is left."""
    queue = TimerQueue(h.memory)
    for _ in range(rounds):
        due = await h.memory.zrange_by_score(TIMERS_KEY, float("-inf"), float("inf"))
        if not due:
            return
        h.clock.ms = max(h.clock.ms, int(min(score for _, score in due)))
        for call_id in await queue.claim(h.clock.ms):
            await service.fire(call_id)
    assert await h.memory.zrange_by_score(TIMERS_KEY, float("-inf"), float("inf")) == []


def call_events(events: list[dict[str, Any]], call_id: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["call_id"] == call_id and e["type"] == kind]


async def end_by(h: Harness, service: CallService, transition: str) -> tuple[str, str]:
    """A call of alice and bob brought to its end by ``service`` through
    ``transition``: (its id, the end's event type)."""
    await both_online(h)
    call = await h.service.invite("alice", "bob", "video", "")
    if transition in ("hangup", "max_duration", "lost"):
        await h.service.accept("bob", call.call_id)
    if transition == "hangup":
        await service.end("alice", call.call_id)
    elif transition == "reject":
        await service.reject("bob", call.call_id)
    elif transition == "cancel":
        await service.cancel("alice", call.call_id)
    elif transition == "missed":
        h.clock.ms = call.ring_deadline_ms
        await service.fire(call.call_id)
    elif transition == "max_duration":
        h.clock.advance(600_000)
        await service.fire(call.call_id)
    else:
        await h.memory.delete("online:{bob}")  # bob's instance died too
        h.clock.advance(20_000)
        await service.fire(call.call_id)
    kind = {"reject": "call.rejected", "cancel": "call.cancelled", "missed": "call.missed"}
    return call.call_id, kind.get(transition, "call.ended")


@pytest.mark.parametrize(
    "transition", ["hangup", "reject", "cancel", "missed", "max_duration", "lost"]
)
async def test_the_end_s_events_survive_its_instance_dying_before_publishing_them(
    h: Harness, transition: str
) -> None:
    dying = h.instance()
    kind = {"reject": "call.rejected", "cancel": "call.cancelled", "missed": "call.missed"}
    dying.node = DyingNode(h.node, kind.get(transition, "call.ended"), "die")  # type: ignore[assignment]
    if transition in ("missed", "max_duration", "lost"):
        # A timer's run dies: fire() logs what it cannot handle; Died is not
        # an Exception the loop would swallow in a real death, so run it bare.
        dying.fire = dying.run_timer  # type: ignore[method-assign]
    with pytest.raises(Died):
        await end_by(h, dying, transition)
    ((call_id, due),) = await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf"))
    call = await h.service.calls.get(call_id)
    assert call is not None and call.state in TERMINAL_STATES and call.unannounced_ms is not None
    # The timer comes back as soon as the events are overdue (not at the ring
    # deadline or the next liveness check).
    assert due == call.unannounced_ms + OUTBOX_STALE_MS
    ended = kind.get(transition, "call.ended")
    assert call_events(await h.events("alice"), call_id, ended) == []

    # Another instance's timer publishes them, once they are older than their
    # writer's own publish could take, to each participant once.
    survivor = h.instance()
    await drain_timers(h, survivor)
    for user in ("alice", "bob"):
        (event,) = call_events(await h.events(user), call_id, ended)
        assert event["seq"] == call.rev and event["at_ms"] == call.ended_at_ms
        if transition == "hangup":
            assert event["reason"] == "hangup" and event["by"] == "alice"
        if transition == "lost":
            assert event["reason"] == "participant_lost" and event["lost"] == "bob"
    assert survivor.metrics.events_redelivered._value.get() == 2
    after = await h.service.calls.get(call_id)
    assert after is not None and after.unannounced_ms is None and after.rev == call.rev
    assert not (await presence_of(h, "alice")).in_call


async def presence_of(h: Harness, user: str) -> Any:
    from handlers import presence

    return await presence.status_view(h.node, user)


async def hang_up_and_die(h: Harness, dying: CallService) -> str:
    """``dying`` hangs up a call of alice and bob and dies on the way: the
    id of the call, whose timer is left."""
    with pytest.raises(Died):
        await end_by(h, dying, "hangup")
    (call_id,) = {m for m, _ in await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf"))}
    return call_id


async def each_told_once_after_the_timers(h: Harness, call_id: str) -> CallService:
    """Another instance runs the timers until none is left; then each
    participant has the end's event exactly once. Returns that instance."""
    survivor = h.instance()
    await drain_timers(h, survivor)
    for user in ("alice", "bob"):
        assert len(call_events(await h.events(user), call_id, "call.ended")) == 1, user
    return survivor


async def test_an_end_published_to_one_participant_is_completed_for_the_other(
    h: Harness,
) -> None:
    dying = h.instance()
    dying.node = DyingNode(h.node, "call.ended", "die", after=1)  # type: ignore[assignment]
    call_id = await hang_up_and_die(h, dying)
    told = {u for u in ("alice", "bob") if call_events(await h.events(u), call_id, "call.ended")}
    assert len(told) == 1
    survivor = await each_told_once_after_the_timers(h, call_id)
    assert survivor.metrics.events_redelivered._value.get() == 1


async def test_dying_after_publishing_the_end_publishes_nothing_twice(h: Harness) -> None:
    class DiesOnLettingTheTimerGo:
        def __getattr__(self, name: str) -> Any:
            return getattr(h.memory, name)

        async def zrem(self, key: str, member: str) -> bool:
            if key == TIMERS_KEY:
                raise Died
            return await h.memory.zrem(key, member)

    call_id = await hang_up_and_die(h, h.instance(store=DiesOnLettingTheTimerGo()))
    survivor = await each_told_once_after_the_timers(h, call_id)
    assert survivor.metrics.events_redelivered._value.get() == 0


async def test_an_end_the_broker_refused_is_published_by_the_timer(h: Harness) -> None:
    flaky = h.instance()
    node = DyingNode(h.node, "call.ended", "unavailable")
    flaky.node = node  # type: ignore[assignment]
    call_id, _ = await end_by(h, flaky, "hangup")  # the hang-up itself succeeds
    assert call_events(await h.events("bob"), call_id, "call.ended") == []
    due = dict(await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf"))).get(call_id)
    assert due is not None
    # Still refused at the first retry: the timer keeps trying.
    h.clock.ms = int(max(due, h.clock.ms + OUTBOX_STALE_MS))
    for claimed in await TimerQueue(h.memory).claim(h.clock.ms):
        await flaky.fire(claimed)
    assert call_id in dict(await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")))
    node.mode = "ok"
    node.after = 1_000_000
    await drain_timers(h, flaky)
    for user in ("alice", "bob"):
        assert len(call_events(await h.events(user), call_id, "call.ended")) == 1, user


async def test_an_in_call_status_written_after_the_hangup_does_not_land(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accepting instance stalls before marking the participants in the
    call; the caller hangs up on another instance meanwhile (its end clears
    nothing yet). The late mark must not make them "busy" for hours."""
    from handlers import presence
    from handlers.calls import service as service_module

    real = presence.set_call_busy
    stalled = asyncio.Event()
    resume = asyncio.Event()

    async def stalling(node: Node, user: str, call: str, busy: bool, **kwargs: Any) -> None:
        if busy:
            stalled.set()
            await resume.wait()
        await real(node, user, call, busy, **kwargs)

    await both_online(h)
    call = await h.service.invite("alice", "bob", "video", "")
    slow = h.instance()
    monkeypatch.setattr(service_module, "set_call_busy", stalling)
    accepting = asyncio.create_task(slow.accept("bob", call.call_id))
    await stalled.wait()
    monkeypatch.setattr(service_module, "set_call_busy", real)
    await h.instance().end("alice", call.call_id)
    resume.set()
    await accepting
    for user in ("alice", "bob"):
        view = await presence.status_view(h.node, user)
        assert not view.in_call and view.status != "busy", user
    # A next call of theirs is shown again.
    nxt = await h.service.invite("bob", "alice", "audio", "")
    await h.service.accept("alice", nxt.call_id)
    assert (await presence.status_view(h.node, "alice")).in_call


async def test_an_end_the_broker_never_takes_is_given_up_after_a_while(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    flaky = h.instance()
    flaky.node = DyingNode(h.node, "call.ended", "unavailable")  # type: ignore[assignment]
    call_id, _ = await end_by(h, flaky, "hangup")
    ended = await h.service.calls.get(call_id)
    assert ended is not None and ended.unannounced_ms is not None
    queue = TimerQueue(h.memory)
    runs = 0
    while due := await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")):
        h.clock.ms = max(h.clock.ms, int(due[0][1]))
        for claimed in await queue.claim(h.clock.ms):
            await flaky.fire(claimed)
        runs += 1
        assert runs < 1000, "the timer never stops"
    # Tried about once a second for the give-up time, then let go.
    assert h.clock.ms - ended.unannounced_ms > ANNOUNCE_GIVE_UP_MS
    assert runs > ANNOUNCE_GIVE_UP_MS // 2000
    after = await h.service.calls.get(call_id)
    assert after is not None and after.unannounced_ms is None
    assert "given up" in caplog.text


async def test_a_participant_whose_id_names_no_channel_does_not_keep_the_timer(
    h: Harness,
) -> None:
    # The caller's id comes from their token and may name no personal channel:
    # their events cannot be published, now or ever, so nobody retries them.
    await both_online(h)
    call = await h.service.invite("auth0|42", "bob", "video", "")
    await h.service.accept("bob", call.call_id)
    await h.service.end("bob", call.call_id)
    assert await h.memory.zrange_by_score(TIMERS_KEY, 0, float("inf")) == []
    assert len(call_events(await h.events("bob"), call.call_id, "call.ended")) == 1
