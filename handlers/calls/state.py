"""The call state machine and its schema in the shared state store.

A call is one hash, ``call:{<call id>}``, in the node's
:class:`~signaling.state.base.StateStore` (memory on the embedded broker,
Redis with the Redis broker): every instance sees the same calls, and no
instance keeps a call's truth in its own memory.

States (docs/calls.md)::

    pending -> ringing -> accepted -> ended
                       -> rejected | cancelled | missed

``pending`` only exists while ``call.invite`` claims the two participants'
busy flags; nobody but the inviting instance ever sees it.

Concurrency: every change of a call is a compare-and-set on its ``ver``
field (:meth:`CallStore.update`): read the hash, decide, write the changes
with ``ver + 1`` only if ``ver`` is still what was read, else read again.
Of two racing changes (two accepts, an accept and a cancel, a hang-up and
the max-duration timer) exactly one wins and the other decides again from
the winner's state. The winner alone publishes the event, so every event is
sent once. ``rev`` numbers the changes of state (``seq`` on the wire, and
the billing records' ``event_id``); ``ver`` also counts the outbox's
clearings, which are not events.

**Billing outbox.** A change's billing records are written into the call's
hash by the same compare-and-set that makes the change (field ``outbox``, a
JSON list of the records not yet appended to the billing stream, each with
the time it was written). The winner then appends them to the stream and
removes them from the outbox (:meth:`CallStore.clear_outbox`, again a
compare-and-set on ``ver``). An instance that dies in between leaves them in
the outbox, where the call's timer (run by any instance) finds them and
appends them (:meth:`~handlers.calls.service.CallService.run_timer`); the
timer is not dropped while the outbox holds anything, so a record is never
lost, only possibly appended twice (dead after the append, before the
clearing). Single-key operations only: it works on Redis Cluster.

**The end's events.** A change that ends a call the participants were told
of also writes ``unannounced`` (the change's time, unix ms): its events
(``call.ended``, ``call.rejected`` ...) are still to be published. The winner
publishes them before it lets the call's timer go; if it dies first, the
timer (any instance) finds the mark older than the winner could take and
publishes those the participants' channels lack. The mark is cleared
(:meth:`CallStore.mark_announced`) by such a timer, or by the winner only
when the timer stays for billing records: the common path costs no write.

Other keys, one per user, each touched alone (single-key operations, hash
tags for Redis Cluster):

* ``call-busy:{<user>}`` holds the id of the user's live call, claimed with
  ``set_if_absent`` and released with ``delete_if_equals``.
* ``call-invites:{<user>}`` counts the user's invites in a one-minute window.

Times are integer unix milliseconds from the server's clock.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import field
from enum import StrEnum

import orjson

from handlers.calls.errors import CALL_WRONG_STATE
from signaling.errors import ERROR_INTERNAL, ErrorReply, SignalError
from signaling.state.base import StateStore
from signaling.values import record

__all__ = [
    "CALL_ID_RE",
    "LIVE_STATES",
    "TERMINAL_STATES",
    "UNANNOUNCED",
    "Call",
    "CallState",
    "CallStore",
    "Change",
    "Decide",
    "EndReason",
    "OutboxEntry",
    "Records",
    "Role",
    "busy_key",
    "call_key",
    "decode_outbox",
    "encode_outbox",
    "invites_key",
    "now_ms",
    "wrong_state",
]

# A call id: 32 lowercase hex digits (a uuid4), so that the Agora channel
# derived from it is short and made of safe characters.
CALL_ID_RE = re.compile(r"[0-9a-f]{32}")

# A pending call that never became ringing (its instance died mid-invite)
# disappears after this, which also frees the busy flags it holds.
PENDING_TTL_S = 30.0
# Ended calls stay readable (call.state, late events) for a day.
RETAIN_S = 86400.0
# The field of an ended call whose end's events may not be published yet.
UNANNOUNCED = "unannounced"
# Update retries before giving up (only reached under pathological contention).
_MAX_ATTEMPTS = 32


class CallState(StrEnum):
    PENDING = "pending"
    RINGING = "ringing"
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    MISSED = "missed"
    ENDED = "ended"


# A user with a call in one of these states is busy.
LIVE_STATES = frozenset({CallState.PENDING, CallState.RINGING, CallState.ACCEPTED})
TERMINAL_STATES = frozenset(
    {CallState.REJECTED, CallState.CANCELLED, CallState.MISSED, CallState.ENDED}
)


class EndReason(StrEnum):
    """Why an accepted call ended (``call.ended`` ``reason``)."""

    HANGUP = "hangup"
    MAX_DURATION = "max_duration"
    PARTICIPANT_LOST = "participant_lost"


class Role(StrEnum):
    CALLER = "caller"
    CALLEE = "callee"


def call_key(call_id: str) -> str:
    return f"call:{{{call_id}}}"


def busy_key(user: str) -> str:
    return f"call-busy:{{{user}}}"


def invites_key(user: str) -> str:
    return f"call-invites:{{{user}}}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@record
class OutboxEntry:
    """A billing record waiting in a call's outbox for its append to the stream."""

    # Unix ms (server clock) when the change that made it was written.
    written_ms: int
    # The record's flat string fields, exactly as they will be appended.
    fields: Mapping[str, str]

    @property
    def event_id(self) -> str:
        return self.fields["event_id"]


def encode_outbox(entries: Sequence[OutboxEntry]) -> str:
    """The ``outbox`` field's text ("" when empty)."""
    if not entries:
        return ""
    return orjson.dumps([{"w": e.written_ms, "f": dict(e.fields)} for e in entries]).decode()


def decode_outbox(text: str) -> tuple[OutboxEntry, ...]:
    if not text:
        return ()
    return tuple(
        OutboxEntry(int(item["w"]), {str(k): str(v) for k, v in item["f"].items()})
        for item in orjson.loads(text)
    )


@record
class Call:
    """One call, as read from its hash."""

    call_id: str
    rev: int
    state: CallState
    caller: str
    callee: str
    media: str
    # The invite's ``meta`` as JSON text ("" = none); opaque to the server.
    meta: str
    created_at_ms: int
    ring_deadline_ms: int
    # Agora uids of the two participants (stable for the call, distinct, nonzero).
    caller_uid: int
    callee_uid: int
    accepted_at_ms: int | None = None
    ended_at_ms: int | None = None
    reason: str | None = None
    # Who rejected, cancelled or hung up; who was lost (participant_lost).
    ended_by: str | None = None
    # Offline since (participant_lost).
    lost_since_ms: int | None = None
    # call.tick and call.warning events already sent.
    ticks: int = 0
    warned: int = 0
    # When the liveness check last saw each participant online.
    caller_seen_ms: int | None = None
    callee_seen_ms: int | None = None
    # The compare-and-set version: every change and every outbox clearing.
    ver: int = 0
    # Billing records written with a change, not yet appended to the stream.
    outbox: tuple[OutboxEntry, ...] = ()
    # Ended, and the end's events maybe not published yet: when it was written.
    unannounced_ms: int | None = None

    # The hash it was read from (what a compare-and-set on it starts from).
    fields: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_hash(cls, call_id: str, fields: Mapping[str, str]) -> Call | None:
        """The call, or None for an empty (missing) hash."""
        get = fields.get
        state = get("state")
        if not state:
            return None
        # Inline conversions: every transition reads a call two or three
        # times, and a helper call per field was most of the cost.
        return cls(
            call_id=call_id,
            rev=int(get("rev") or 0),
            state=CallState(state),
            caller=fields["caller"],
            callee=fields["callee"],
            media=get("media", "video"),
            meta=get("meta", ""),
            created_at_ms=int(get("created_at_ms") or 0),
            ring_deadline_ms=int(get("ring_deadline_ms") or 0),
            caller_uid=int(get("caller_uid") or 0),
            callee_uid=int(get("callee_uid") or 0),
            accepted_at_ms=int(text) if (text := get("accepted_at_ms")) else None,
            ended_at_ms=int(text) if (text := get("ended_at_ms")) else None,
            reason=get("reason") or None,
            ended_by=get("ended_by") or None,
            lost_since_ms=int(text) if (text := get("lost_since_ms")) else None,
            ticks=int(get("ticks") or 0),
            warned=int(get("warned") or 0),
            caller_seen_ms=int(text) if (text := get("caller_seen_ms")) else None,
            callee_seen_ms=int(text) if (text := get("callee_seen_ms")) else None,
            ver=int(get("ver") or 0),
            outbox=decode_outbox(text) if (text := get("outbox")) else (),
            unannounced_ms=int(text) if (text := get(UNANNOUNCED)) else None,
            fields=fields,
        )

    @property
    def participants(self) -> tuple[str, str]:
        return self.caller, self.callee

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def role(self, user: str) -> Role | None:
        if user == self.caller:
            return Role.CALLER
        if user == self.callee:
            return Role.CALLEE
        return None

    def uid(self, user: str) -> int:
        return self.caller_uid if user == self.caller else self.callee_uid

    def seen_ms(self, user: str) -> int | None:
        return self.caller_seen_ms if user == self.caller else self.callee_seen_ms

    def duration_ms(self, at_ms: int) -> int:
        """Time accepted until ``at_ms`` (or until the end), 0 before accepted."""
        if self.accepted_at_ms is None:
            return 0
        end = self.ended_at_ms if self.ended_at_ms is not None else at_ms
        return max(0, end - self.accepted_at_ms)


# Decides a change from the current call: the fields to write, or None for
# "nothing to do". Raises SignalError to refuse. Called again after a lost race.
Decide = Callable[[Call], Mapping[str, str] | None]

# The billing records of a change, from the call before and after it: written
# into the outbox with the change itself.
Records = Callable[[Call, Call], Sequence[Mapping[str, str]]]


@record
class Change:
    """A change that won its compare-and-set."""

    before: Call
    after: Call
    # The change's own billing records (also in ``after.outbox``).
    records: tuple[OutboxEntry, ...] = ()
    # What the outbox still held once the winner appended its records
    # (set by the service; others' records in flight, or a failed append).
    unsent: tuple[OutboxEntry, ...] = ()


class CallStore:
    """Calls and busy flags in a :class:`StateStore`.

    Args:
        store: the node's state store.
        live_ttl_s: lifetime of a live call's keys, a safety net only (a live
            call always ends before: ring timeout, max duration, liveness).
    """

    def __init__(self, store: StateStore, live_ttl_s: float) -> None:
        self.store = store
        self.live_ttl_s = live_ttl_s

    async def get(self, call_id: str) -> Call | None:
        return Call.from_hash(call_id, await self.store.hgetall(call_key(call_id)))

    def ttl_s(self, state: CallState) -> float:
        """The lifetime a call's hash gets with each write."""
        return self.live_ttl_s if state in LIVE_STATES else RETAIN_S

    async def create(self, fields: Mapping[str, str], call_id: str) -> Call:
        """Write a new ``pending`` call (short-lived until it becomes ringing)
        and return it as written."""
        values = {**fields, "state": CallState.PENDING.value, "rev": "1", "ver": "1"}
        await self.store.hset(call_key(call_id), values, PENDING_TTL_S)
        call = Call.from_hash(call_id, values)
        assert call is not None  # it has a state
        return call

    async def discard(self, call_id: str) -> None:
        """Drop a pending call whose invite failed."""
        await self.store.delete(call_key(call_id))

    async def update(
        self,
        call_id: str,
        decide: Decide,
        records: Records | None = None,
        *,
        written_ms: int | None = None,
        known: Call | None = None,
    ) -> Change | None:
        """Apply ``decide``'s change atomically (compare-and-set on ``ver``),
        with its billing ``records`` appended to the outbox in the same write.

        Returns the change, or None when ``decide`` found nothing to do.
        ``written_ms`` stamps the outbox entries (default: now). ``known``:
        the call as the caller just read (or wrote) it, tried first instead of
        reading it again; if it is stale, the compare-and-set fails and the
        call is read as usual.

        Raises:
            SignalError: CALL_NOT_FOUND-like refusals come from ``decide``;
                ERROR_INTERNAL (100) after too many lost races.
            LookupError: the call does not exist.
        """
        key = call_key(call_id)
        before: Call | None
        for _ in range(_MAX_ATTEMPTS):
            if known is not None and known.fields:
                before, fields, known = known, known.fields, None
            else:
                fields = await self.store.hgetall(key)
                before = Call.from_hash(call_id, fields)
            if before is None:
                raise LookupError(call_id)
            changes = decide(before)
            if changes is None:
                return None
            state = CallState(changes.get("state", before.state))
            values = {**changes, "rev": str(before.rev + 1), "ver": str(before.ver + 1)}
            entries: tuple[OutboxEntry, ...] = ()
            if records is not None:
                predicted = Call.from_hash(call_id, {**fields, **values})
                assert predicted is not None
                stamp = now_ms() if written_ms is None else written_ms
                entries = tuple(OutboxEntry(stamp, dict(r)) for r in records(before, predicted))
                if entries:
                    values["outbox"] = encode_outbox(before.outbox + entries)
            # A hash written before ``ver`` existed is compared on ``rev``.
            field, current = ("ver", before.ver) if "ver" in fields else ("rev", before.rev)
            written = await self.store.hcas(key, field, (str(current),), values, self.ttl_s(state))
            if written is not None:
                after = Call.from_hash(call_id, written)
                assert after is not None  # the hash exists: we just wrote it
                return Change(before, after, entries)
        raise SignalError(ERROR_INTERNAL)

    async def clear_outbox(self, call: Call, sent: Collection[str]) -> Call | None:
        """Remove the records with these event ids (appended to the stream)
        from the call's outbox; ``call`` is the latest known state. Returns
        the call as it is afterwards (None if it is gone). Other entries stay.

        Raises:
            SignalError: ERROR_INTERNAL (100) after too many lost races.
        """
        key = call_key(call.call_id)
        current: Call | None = call
        for _ in range(_MAX_ATTEMPTS):
            if current is None:
                return None
            remaining = tuple(e for e in current.outbox if e.event_id not in sent)
            if len(remaining) == len(current.outbox):
                return current  # none of them there (any more)
            values = {"outbox": encode_outbox(remaining), "ver": str(current.ver + 1)}
            written = await self.store.hcas(
                key, "ver", (str(current.ver),), values, self.ttl_s(current.state)
            )
            if written is not None:
                return Call.from_hash(call.call_id, written)
            current = await self.get(call.call_id)
        raise SignalError(ERROR_INTERNAL)

    async def keep(self, call: Call) -> None:
        """Renew the call's lifetime without changing it (a call whose outbox
        cannot be appended yet must not expire meanwhile)."""
        await self.store.hcas(
            call_key(call.call_id), "state", (call.state.value,), {}, self.ttl_s(call.state)
        )

    async def mark_announced(self, call: Call) -> None:
        """The end's events are published: a later run of the call's timer
        must not publish them again. No revision (not a change of state)."""
        await self.store.hcas(
            call_key(call.call_id), "state", (call.state.value,), {UNANNOUNCED: ""}, RETAIN_S
        )

    async def note_seen(self, call_id: str, values: Mapping[str, str]) -> None:
        """Record liveness observations of an accepted call, without a
        revision: they change no state and must not make transitions retry.
        Nothing is written once the call ended (or expired)."""
        if values:
            await self.store.hcas(call_key(call_id), "state", (CallState.ACCEPTED.value,), values)

    # --- busy flags ---------------------------------------------------------------

    async def claim_busy(self, user: str, call_id: str) -> bool:
        """Mark ``user`` busy with ``call_id``; False if busy with a live call.

        A flag whose call is gone or over is stale (an instance died before
        releasing it) and is taken over.
        """
        key = busy_key(user)
        for _ in range(3):
            if await self.store.set_if_absent(key, call_id, self.live_ttl_s):
                return True
            holder = await self.store.get(key)
            if holder is None:
                continue  # released meanwhile
            held = await self.get(holder)
            if held is not None and held.live:
                return False
            await self.store.delete_if_equals(key, holder)
        return False

    async def release_busy(self, user: str, call_id: str) -> None:
        await self.store.delete_if_equals(busy_key(user), call_id)

    async def busy_with(self, user: str) -> str | None:
        """The id of the call ``user`` is busy with, if any."""
        return await self.store.get(busy_key(user))


def wrong_state(state: CallState) -> SignalError:
    """CALL_WRONG_STATE (1007) naming the call's current state."""
    return SignalError(ErrorReply(CALL_WRONG_STATE.code, f"call is {state.value}"))
