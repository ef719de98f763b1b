"""Participant events and billing records (handlers.calls.events), the billing
log read back from the memory store (the embedded broker's call-events log)."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from pathlib import Path

import orjson
import pytest

from handlers.calls.events import (
    BILLING_VERSION,
    BillingLog,
    EventType,
    RecordType,
    event_data,
    meta_json,
    record_fields,
)
from handlers.calls.state import Call, CallState
from signaling.state.memory import MemoryStateStore

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CALL = Call(
    call_id="0123456789abcdef0123456789abcdef",
    rev=5,
    state=CallState.ENDED,
    caller="alice",
    callee="bob",
    media="video",
    meta='{"price":120}',
    created_at_ms=1_000,
    ring_deadline_ms=31_000,
    caller_uid=1,
    callee_uid=2,
    accepted_at_ms=4_000,
    ended_at_ms=64_500,
    reason="hangup",
    ended_by="bob",
    ticks=1,
)


def test_event_data_shape() -> None:
    data = orjson.loads(event_data(EventType.ENDED, CALL, 64_500, {"reason": "hangup"}))
    assert data == {
        "type": "call.ended",
        "call_id": CALL.call_id,
        "from": "alice",
        "to": "bob",
        "seq": 5,
        "at_ms": 64_500,
        "reason": "hangup",
    }
    assert meta_json(CALL) == {"price": 120}
    assert {e.value for e in EventType} == {
        "call.incoming",
        "call.accepted",
        "call.rejected",
        "call.cancelled",
        "call.missed",
        "call.tick",
        "call.warning",
        "call.ended",
    }


def test_record_fields() -> None:
    fields = record_fields(
        RecordType.ENDED, CALL, 64_500, duration_ms=60_500, node="n1", extra={"reason": "hangup"}
    )
    assert fields == {
        "v": BILLING_VERSION,
        "event_id": f"{CALL.call_id}-5",
        "type": "call.ended",
        "call_id": CALL.call_id,
        "caller": "alice",
        "callee": "bob",
        "media": "video",
        "seq": "5",
        "at_ms": "64500",
        "created_at_ms": "1000",
        "accepted_at_ms": "4000",
        "ended_at_ms": "64500",
        "duration_ms": "60500",
        "node": "n1",
        "reason": "hangup",
    }
    # Only strings (stream fields), and nothing of the invite's opaque meta.
    assert all(isinstance(v, str) for v in fields.values())
    assert "meta" not in fields and "price" not in repr(fields)


async def test_billing_log_appends_to_the_memory_stream() -> None:
    store = MemoryStateStore()
    log = BillingLog(store, "calls:test", maxlen=1000)
    ids = []
    for seq, kind in enumerate((RecordType.INVITED, RecordType.ACCEPTED, RecordType.TICK), 1):
        call = dataclasses.replace(CALL, rev=seq)
        fields = record_fields(kind, call, 1_000 * seq, duration_ms=0, node="n1")
        ids.append(await log.append(fields))
    entries = store.read_stream("calls:test")
    assert [entry_id for entry_id, _ in entries] == ids
    assert [fields["type"] for _, fields in entries] == [
        "call.invited",
        "call.accepted",
        "call.tick",
    ]
    assert [fields["event_id"] for _, fields in entries] == [
        f"{CALL.call_id}-{n}" for n in (1, 2, 3)
    ]


async def test_billing_log_is_bounded() -> None:
    store = MemoryStateStore()
    log = BillingLog(store, "calls:bounded", maxlen=3)
    for n in range(5):
        await log.append({"event_id": str(n)})
    assert [f["event_id"] for _, f in store.read_stream("calls:bounded")] == ["2", "3", "4"]


def test_the_example_consumer_skips_repeated_event_ids() -> None:
    # The server appends at least once (docs/calls.md): a record may come twice.
    from examples import billing_consumer

    handled: list[str] = []
    failing = {"c-3"}

    def handle(entry_id: str, fields: Mapping[str, str]) -> None:
        if fields["event_id"] in failing:
            raise RuntimeError("billing database down")
        handled.append(fields["event_id"])

    once = billing_consumer.deduplicated(handle, capacity=2)
    for n, event_id in enumerate(["c-1", "c-2", "c-1", "c-2"]):
        once(f"1-{n}", {"event_id": event_id})
    assert handled == ["c-1", "c-2"]
    # A failed entry is not taken as handled: its retry goes through.
    with pytest.raises(RuntimeError):
        once("1-5", {"event_id": "c-3"})
    failing.clear()
    once("1-6", {"event_id": "c-3"})
    assert handled == ["c-1", "c-2", "c-3"]
    # The window is bounded: the oldest id (c-1) was forgotten.
    once("1-7", {"event_id": "c-1"})
    assert handled[-1] == "c-1"
