"""The call hash schema and its compare-and-set updates (handlers.calls.state),
on the memory store, with a wrapper that yields between store operations so
that concurrent updates really interleave."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from handlers.calls.state import (
    Call,
    CallState,
    CallStore,
    OutboxEntry,
    Role,
    busy_key,
    call_key,
    decode_outbox,
    encode_outbox,
    invites_key,
    wrong_state,
)
from signaling.errors import SignalError
from signaling.state.memory import MemoryStateStore


class YieldingStore:
    """A StateStore that gives the loop away before and after every operation,
    like a network round trip would."""

    def __init__(self, inner: MemoryStateStore) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(0)
            result = await method(*args, **kwargs)
            await asyncio.sleep(0)
            return result

        return call


BASE = {
    "caller": "alice",
    "callee": "bob",
    "media": "video",
    "meta": "",
    "created_at_ms": "1000",
    "ring_deadline_ms": "31000",
    "caller_uid": "7",
    "callee_uid": "8",
}


def test_keys_carry_hash_tags() -> None:
    assert call_key("c1") == "call:{c1}"
    assert busy_key("u") == "call-busy:{u}"
    assert invites_key("u") == "call-invites:{u}"


def test_call_from_hash() -> None:
    assert Call.from_hash("c", {}) is None
    call = Call.from_hash("c", {**BASE, "state": "accepted", "rev": "3", "accepted_at_ms": "2000"})
    assert call is not None
    assert call.state is CallState.ACCEPTED and call.rev == 3
    assert call.role("alice") is Role.CALLER and call.role("bob") is Role.CALLEE
    assert call.role("mallory") is None
    assert (call.uid("alice"), call.uid("bob")) == (7, 8)
    assert call.duration_ms(2500) == 500
    assert call.live
    ended = Call.from_hash(
        "c", {**BASE, "state": "ended", "accepted_at_ms": "2000", "ended_at_ms": "4000"}
    )
    assert ended is not None and ended.duration_ms(99999) == 2000 and not ended.live


def test_wrong_state_names_the_state() -> None:
    err = wrong_state(CallState.CANCELLED)
    assert isinstance(err, SignalError)
    assert err.value.code == 1007 and "cancelled" in err.value.message  # type: ignore[union-attr]


async def test_update_is_compare_and_set_one_winner_of_a_race() -> None:
    store = CallStore(YieldingStore(MemoryStateStore()), live_ttl_s=60)  # type: ignore[arg-type]
    for n in range(20):
        call_id = f"c{n}"
        await store.create(BASE, call_id)
        await store.update(call_id, lambda c: {"state": "ringing"})

        def to(state: str) -> Any:
            def decide(c: Call) -> dict[str, str]:
                if c.state != CallState.RINGING:
                    raise wrong_state(c.state)
                return {"state": state}

            return decide

        results = await asyncio.gather(
            store.update(call_id, to("accepted")),
            store.update(call_id, to("cancelled")),
            store.update(call_id, to("accepted")),
            return_exceptions=True,
        )
        winners = [r for r in results if not isinstance(r, BaseException)]
        losers = [r for r in results if isinstance(r, BaseException)]
        assert len(winners) == 1 and len(losers) == 2, results
        assert all(isinstance(e, SignalError) and e.value.code == 1007 for e in losers)
        final = await store.get(call_id)
        assert final is not None
        assert final.state == winners[0].after.state
        assert final.rev == 3  # created (1), ringing (2), the winner (3)


async def test_update_retries_a_lost_race_with_the_fresh_state() -> None:
    store = CallStore(YieldingStore(MemoryStateStore()), live_ttl_s=60)  # type: ignore[arg-type]
    await store.create(BASE, "c")
    # Ten concurrent increments of one field: each retries until it applies.
    results = await asyncio.gather(
        *(store.update("c", lambda c: {"ticks": str(c.ticks + 1)}) for _ in range(10))
    )
    assert all(r is not None for r in results)
    call = await store.get("c")
    assert call is not None and call.ticks == 10 and call.rev == 11
    with pytest.raises(LookupError):
        await store.update("missing", lambda c: {"ticks": "1"})
    assert await store.update("c", lambda c: None) is None


class CountingStore(YieldingStore):
    """Counts the hash reads."""

    def __init__(self, inner: MemoryStateStore) -> None:
        super().__init__(inner)
        self.reads = 0

    async def hgetall(self, key: str) -> dict[str, str]:
        self.reads += 1
        return await self.inner.hgetall(key)


async def test_update_starts_from_a_known_call_and_rereads_a_stale_one() -> None:
    counting = CountingStore(MemoryStateStore())
    store = CallStore(counting, live_ttl_s=60)  # type: ignore[arg-type]
    created = await store.create(BASE, "c")
    assert created == await store.get("c")  # create returns the call as written
    counting.reads = 0
    # Fresh: decided on the known call, written with no read.
    change = await store.update("c", lambda c: {"ticks": str(c.ticks + 1)}, known=created)
    assert change is not None and change.before == created and change.after.ticks == 1
    assert counting.reads == 0
    # Stale (the known call is one change behind): its compare-and-set fails,
    # the call is read and the change decided again on the fresh state.
    seen: list[int] = []

    def tick(c: Call) -> dict[str, str]:
        seen.append(c.ticks)
        return {"ticks": str(c.ticks + 1)}

    change = await store.update("c", tick, known=created)
    assert change is not None and change.after.ticks == 2 and change.after.rev == 3
    assert seen == [0, 1] and counting.reads == 1


async def test_pending_calls_expire_and_ended_calls_are_retained() -> None:
    now = [0.0]
    memory = MemoryStateStore(clock=lambda: now[0])
    store = CallStore(memory, live_ttl_s=100)
    await store.create(BASE, "p")
    now[0] = 31.0  # PENDING_TTL_S
    assert await store.get("p") is None
    await store.create(BASE, "c")
    await store.update("c", lambda c: {"state": "ringing"})
    now[0] += 99
    assert await store.get("c") is not None
    await store.update("c", lambda c: {"state": "missed"})
    now[0] += 86000  # ended calls are kept for a day, not live_ttl_s
    assert await store.get("c") is not None


async def test_busy_claims_and_stale_takeover() -> None:
    store = CallStore(MemoryStateStore(), live_ttl_s=60)
    await store.create(BASE, "c1")
    assert await store.claim_busy("bob", "c1")
    assert await store.busy_with("bob") == "c1"
    await store.create(BASE, "c2")
    # c1 is live (pending): bob stays busy.
    assert not await store.claim_busy("bob", "c2")
    # Releasing someone else's claim does nothing.
    await store.release_busy("bob", "c2")
    assert await store.busy_with("bob") == "c1"
    # c1 ends without releasing (its instance died): the flag is stale.
    await store.update("c1", lambda c: {"state": "missed"})
    assert await store.claim_busy("bob", "c2")
    assert await store.busy_with("bob") == "c2"
    # A flag pointing at a call that no longer exists is stale too.
    await store.discard("c2")
    assert await store.claim_busy("bob", "c3")
    await store.release_busy("bob", "c3")
    assert await store.busy_with("bob") is None


async def test_note_seen_writes_only_accepted_calls_without_a_revision() -> None:
    store = CallStore(MemoryStateStore(), live_ttl_s=60)
    await store.create(BASE, "c")
    await store.note_seen("c", {"caller_seen_ms": "5"})
    call = await store.get("c")
    assert call is not None and call.caller_seen_ms is None
    await store.update("c", lambda c: {"state": "accepted", "accepted_at_ms": "2"})
    await store.note_seen("c", {"caller_seen_ms": "5"})
    call = await store.get("c")
    assert call is not None and call.caller_seen_ms == 5 and call.rev == 2
    await store.note_seen("missing", {"caller_seen_ms": "5"})
    assert await store.store.hgetall(call_key("missing")) == {}


# --------------------------------------------------------------------------- billing outbox


def _records(kind: str) -> Any:
    """A Records callable: one record of ``kind`` for the change."""

    def records(before: Call, after: Call) -> list[dict[str, str]]:
        return [{"event_id": f"{after.call_id}-{after.rev}", "type": kind}]

    return records


def test_outbox_encoding_round_trips() -> None:
    entries = (
        OutboxEntry(5, {"event_id": "c-2", "type": "call.invited"}),
        OutboxEntry(7, {"event_id": "c-3", "type": "call.accepted", "by": 'a "quoted" id'}),
    )
    assert decode_outbox(encode_outbox(entries)) == entries
    assert encode_outbox(()) == "" and decode_outbox("") == ()
    assert entries[1].event_id == "c-3"


async def test_update_writes_its_records_into_the_outbox_in_the_same_write() -> None:
    store = CallStore(MemoryStateStore(), live_ttl_s=60)
    await store.create(BASE, "c")
    change = await store.update(
        "c", lambda c: {"state": "ringing"}, _records("call.invited"), written_ms=123
    )
    assert change is not None
    assert change.records == (OutboxEntry(123, {"event_id": "c-2", "type": "call.invited"}),)
    assert change.after.outbox == change.records and change.after.ver == 2
    # The next change appends: an unsent record is never overwritten.
    change = await store.update("c", lambda c: {"state": "accepted"}, _records("call.accepted"))
    assert change is not None
    assert [e.event_id for e in change.after.outbox] == ["c-2", "c-3"]
    # A change without records leaves the outbox as it is.
    change = await store.update("c", lambda c: {"warned": "1"}, lambda b, a: [])
    assert change is not None and len(change.after.outbox) == 2 and change.after.rev == 4

    # Clearing removes only the given records, as a compare-and-set of its own
    # (ver moves, rev, the events' seq, does not).
    call = await store.clear_outbox(change.after, ["c-2"])
    assert call is not None and [e.event_id for e in call.outbox] == ["c-3"]
    assert (call.rev, call.ver) == (4, 5)
    # From an out-of-date view, it reads again.
    call = await store.clear_outbox(change.after, ["c-3", "c-9"])
    assert call is not None and call.outbox == () and call.ver == 6
    assert (await store.store.hgetall(call_key("c")))["outbox"] == ""
    assert await store.clear_outbox(call, ["c-3"]) == call  # nothing left to clear
    # A call gone meanwhile (expired): nothing to clear.
    await store.discard("c")
    assert await store.clear_outbox(change.after, ["c-3"]) is None


async def test_a_change_racing_a_clearing_never_brings_a_sent_record_back() -> None:
    # A change reads the outbox, a clearing empties it, then the change writes:
    # the change must lose its compare-and-set and decide again from the
    # cleared outbox (else the sent record would be in the outbox again, and
    # appended twice by a timer).
    store = CallStore(MemoryStateStore(), live_ttl_s=60)
    await store.create(BASE, "c")
    first = await store.update("c", lambda c: {"state": "ringing"}, _records("call.invited"))
    assert first is not None
    reads = 0

    def decide(c: Call) -> dict[str, str]:
        nonlocal reads
        reads += 1
        return {"state": "accepted"}

    class ClearsOnFirstWrite:
        """The store, with a clearing slipped in before the change's first write."""

        def __init__(self, inner: MemoryStateStore) -> None:
            self.inner = inner
            self.cleared = False

        def __getattr__(self, name: str) -> Any:
            return getattr(self.inner, name)

        async def hcas(self, *args: Any, **kwargs: Any) -> Any:
            if not self.cleared:
                self.cleared = True
                assert first is not None
                await CallStore(self.inner, 60).clear_outbox(first.after, ["c-2"])
            return await self.inner.hcas(*args, **kwargs)

    racing = CallStore(ClearsOnFirstWrite(store.store), live_ttl_s=60)  # type: ignore[arg-type]
    change = await racing.update("c", decide, _records("call.accepted"))
    assert change is not None and reads == 2
    assert [e.event_id for e in change.after.outbox] == ["c-3"]


async def test_a_hash_written_before_ver_existed_is_still_updated() -> None:
    memory = MemoryStateStore()
    store = CallStore(memory, live_ttl_s=60)
    await memory.hset(call_key("old"), {**BASE, "state": "ringing", "rev": "2"}, 60)
    change = await store.update("old", lambda c: {"state": "accepted"}, _records("call.accepted"))
    assert change is not None and (change.after.rev, change.after.ver) == (3, 1)
    assert [e.event_id for e in change.after.outbox] == ["old-3"]


async def test_keep_renews_a_finished_call_whose_outbox_waits() -> None:
    now = [0.0]
    memory = MemoryStateStore(clock=lambda: now[0])
    store = CallStore(memory, live_ttl_s=100)
    await store.create(BASE, "c")
    change = await store.update("c", lambda c: {"state": "missed"}, _records("call.missed"))
    assert change is not None
    now[0] += 86000
    await store.keep(change.after)
    now[0] += 86000  # two days after the end, the outbox is still there
    call = await store.get("c")
    assert call is not None and [e.event_id for e in call.outbox] == ["c-2"]
