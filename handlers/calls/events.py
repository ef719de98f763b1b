"""What a call tells the world: events for the participants, records for billing.

**Events** are publications in each participant's personal channel
(``user:#<id>``, history on): both SDKs receive them live and recover them
after a reconnect. Their data is a JSON object ``{"type": "call.<name>",
"call_id", "from", "to", "seq", "at_ms", ...}`` where ``from`` is always the
caller and ``to`` the callee, and ``seq`` (the call's revision) orders a
call's events.

**Billing records** are entries of the call-events stream
(``settings.call_events_stream``; a Redis Stream with the Redis broker, the
memory store's log on the embedded one): one per transition and per tick,
flat string fields (docs/calls.md, "Billing stream"). ``event_id`` is
``<call_id>-<seq>``, unique and stable, so a consumer can deduplicate.

Neither ever carries an Agora token or anything of the certificate: tokens
exist only in RPC replies (:mod:`handlers.calls.agora`).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import orjson

from handlers.calls.state import Call
from signaling.state.base import StateStore
from signaling.values import JSON, JSONObject

__all__ = [
    "BILLING_VERSION",
    "BillingLog",
    "EventType",
    "RecordType",
    "event_data",
    "meta_json",
    "record_fields",
]

# Version of the billing record schema (field ``v``).
BILLING_VERSION = "1"


class EventType(StrEnum):
    """``type`` of the events published to participants."""

    INCOMING = "call.incoming"
    ACCEPTED = "call.accepted"
    REJECTED = "call.rejected"
    CANCELLED = "call.cancelled"
    MISSED = "call.missed"
    TICK = "call.tick"
    WARNING = "call.warning"
    ENDED = "call.ended"


class RecordType(StrEnum):
    """``type`` of the billing records."""

    INVITED = "call.invited"
    ACCEPTED = "call.accepted"
    REJECTED = "call.rejected"
    CANCELLED = "call.cancelled"
    MISSED = "call.missed"
    TICK = "call.tick"
    ENDED = "call.ended"


def event_data(kind: EventType, call: Call, at_ms: int, extra: JSONObject | None = None) -> bytes:
    """The JSON data of a participant event about ``call`` (its state after
    the change), as published."""
    data: JSONObject = {
        "type": kind.value,
        "call_id": call.call_id,
        "from": call.caller,
        "to": call.callee,
        "seq": call.rev,
        "at_ms": at_ms,
    }
    if extra:
        data.update(extra)
    return orjson.dumps(data)


def meta_json(call: Call) -> JSON:
    """The invite's ``meta`` object (None when absent)."""
    if not call.meta:
        return None
    value: JSON = orjson.loads(call.meta)
    return value


def record_fields(
    kind: RecordType,
    call: Call,
    at_ms: int,
    *,
    duration_ms: int,
    node: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The flat string fields of one billing record about ``call``."""
    fields = {
        "v": BILLING_VERSION,
        "event_id": f"{call.call_id}-{call.rev}",
        "type": kind.value,
        "call_id": call.call_id,
        "caller": call.caller,
        "callee": call.callee,
        "media": call.media,
        "seq": str(call.rev),
        "at_ms": str(at_ms),
        "created_at_ms": str(call.created_at_ms),
        "duration_ms": str(duration_ms),
        "node": node,
    }
    if call.accepted_at_ms is not None:
        fields["accepted_at_ms"] = str(call.accepted_at_ms)
    if call.ended_at_ms is not None:
        fields["ended_at_ms"] = str(call.ended_at_ms)
    if extra:
        fields.update(extra)
    return fields


class BillingLog:
    """Appends billing records to the call-events stream.

    Args:
        store: the node's state store (``xadd``).
        stream: the stream's key (``SIGNAL_CALL_EVENTS_STREAM``; the Redis
            store prefixes it like every key).
        maxlen: entries kept, approximately.
    """

    def __init__(self, store: StateStore, stream: str, maxlen: int) -> None:
        self._store = store
        self.stream = stream
        self.maxlen = maxlen

    async def append(self, fields: Mapping[str, str]) -> str:
        """Append one record; returns the stream entry id. Raises what the
        store raises (BrokerUnavailable)."""
        return await self._store.xadd(self.stream, fields, self.maxlen)
