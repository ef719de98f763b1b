"""The calls: transitions, the server's call clock, liveness, and what follows each.

:class:`CallService` is what the RPC methods (:mod:`handlers.calls.rpc`) and
the timers (:mod:`handlers.calls.timers`) act through. Every change of a call
is a compare-and-set in the shared store (:class:`CallStore.update`); the
instance whose change wins then does the follow-up, once: publish the
participants' events, append the billing record, release busy flags,
re-schedule or drop the call's timer, count metrics.

Billing records are durable across the death of that instance: each is
written into the call's outbox by the compare-and-set of its change, then
appended to the stream and removed from the outbox (:mod:`handlers.calls.state`).
Records left there (the instance died, or the stream could not be reached)
are appended by the call's timer, on whichever instance, before anything
else; a call's timer is not dropped while its outbox holds anything.

The end's events survive that instance too: the change that ends a call
marks it ``unannounced`` (:mod:`handlers.calls.state`); the winner sets the
call's timer to when they would be overdue, publishes them, and only then
lets the timer go. A timer that finds the mark overdue looks for the events
in the participants' personal channels' history and publishes those missing.

The clock of an accepted call belongs to the server: ``accepted_at``,
minute ticks at ``accepted_at + n * call_tick_s``, warnings before and the
end at ``accepted_at + call_max_duration_s``, all in server time, whichever
instance runs the timer.

Liveness, per participant: a participant is offline when no instance holds
a connection of theirs (``node.user_presence``). Offline since the latest of
their last disconnect, the last time a check saw them online, and the accept;
offline for ``call_grace_s`` ends the call for both (``participant_lost``).
The other party's connection does not matter. A killed instance's users
count as online until handlers.presence reaps the instance (or, at the
latest, until their online records expire, 60 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence

from handlers.calls.agora import MAX_UID, RtcGrant, TokenIssuer, channel_name
from handlers.calls.errors import (
    CALL_BUSY,
    CALL_CALLEE_BUSY,
    CALL_NOT_CONFIGURED,
    CALL_NOT_FOUND,
    CALL_RATE_LIMITED,
    CALL_SELF,
    CALL_WRONG_ROLE,
)
from handlers.calls.events import (
    BillingLog,
    EventType,
    RecordType,
    event_data,
    meta_json,
    record_fields,
)
from handlers.calls.metrics import CallMetrics
from handlers.calls.state import (
    TERMINAL_STATES,
    UNANNOUNCED,
    Call,
    CallState,
    CallStore,
    Change,
    Decide,
    EndReason,
    OutboxEntry,
    Role,
    busy_key,
    invites_key,
    now_ms,
    wrong_state,
)
from handlers.calls.timers import ACTIVE_KEY, GAUGE_S, TimerQueue, run_timers
from handlers.channels import personal_channel
from handlers.presence import set_call_busy
from signaling.broker.base import BrokerUnavailable
from signaling.errors import SignalError
from signaling.ids import random_below, random_uuid_hex
from signaling.node import ConnectionEvent, Node
from signaling.protocol import publication_data
from signaling.state.base import StateStore
from signaling.values import JSONObject

__all__ = ["CallService"]

log = logging.getLogger("handlers.calls")

# Invites are counted per caller in windows of this many seconds.
INVITE_WINDOW_S = 60.0
# Times a hang-up lets the call's clock catch up before it ends the call (a new
# step can fall due while the timer runs; the last attempt ends it regardless).
_END_CATCH_UPS = 3


class _ClockDue(Exception):
    """The call's clock has a step due: run the timer before the change."""


# Liveness checks of an accepted call: every grace/4, within these bounds (ms).
_LIVE_CHECK_MIN_MS = 250
_LIVE_CHECK_MAX_MS = 5000

# A record in a call's outbox, or an end's events, are taken over by whoever
# finds them once this old (ms): their writer appends or publishes them at
# once, so by then it died or failed.
OUTBOX_STALE_MS = 2000
# An outbox that could not be appended is tried again after at least this (ms).
OUTBOX_RETRY_MS = 1000
# An end's events the broker keeps refusing are given up after this (ms): an
# app back after that long asks call.state (and its history may have expired).
ANNOUNCE_GIVE_UP_MS = 600_000

# States a participant sees as their current call (pending is not visible yet).
LIVE_CALL_STATES = frozenset({CallState.RINGING, CallState.ACCEPTED})
# How many of a personal channel's latest publications a timer reads to find
# an end's event a dead instance may or may not have published.
_EVENTS_LOOKED_AT = 50

_TERMINAL_EVENT = {
    CallState.REJECTED: EventType.REJECTED,
    CallState.CANCELLED: EventType.CANCELLED,
    CallState.MISSED: EventType.MISSED,
    CallState.ENDED: EventType.ENDED,
}
_TERMINAL_RECORD = {
    CallState.REJECTED: RecordType.REJECTED,
    CallState.CANCELLED: RecordType.CANCELLED,
    CallState.MISSED: RecordType.MISSED,
    CallState.ENDED: RecordType.ENDED,
}


class CallService:
    """Calls on one node.

    Args:
        node: the node (settings, publishing, users' presence, metrics).
        store: the shared store; default ``node.store`` (tests wrap it).
        issuer: Agora token issuer; default from the settings.
        metrics: default registered in ``node.metrics.registry``.
        clock: unix milliseconds; default the system clock.

    Raises:
        ConfigError: invalid Agora credentials (see :class:`TokenIssuer`).
    """

    def __init__(
        self,
        node: Node,
        *,
        store: StateStore | None = None,
        issuer: TokenIssuer | None = None,
        metrics: CallMetrics | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        s = node.settings
        self.node = node
        # Unix ms, the server's clock (injectable for tests).
        self.clock = clock
        self.store = store if store is not None else node.store
        self.ring_ms = round(s.call_ring_timeout_s * 1000)
        self.tick_ms = round(s.call_tick_s * 1000)
        self.max_ms = round(s.call_max_duration_s * 1000)
        self.grace_ms = round(s.call_grace_s * 1000)
        # Remaining time at each warning, largest first (= earliest first).
        self.warnings_ms = sorted({round(w * 1000) for w in s.call_warnings_s}, reverse=True)
        self.live_check_ms = min(_LIVE_CHECK_MAX_MS, max(_LIVE_CHECK_MIN_MS, self.grace_ms // 4))
        # Keys of a live call outlive it by far: they are a safety net only.
        live_ttl_s = s.call_ring_timeout_s + s.call_max_duration_s + s.call_grace_s + 3600
        self.calls = CallStore(self.store, live_ttl_s)
        self.timers = TimerQueue(self.store)
        self.billing = BillingLog(self.store, s.call_events_stream, s.call_events_maxlen)
        self.issuer = issuer if issuer is not None else TokenIssuer.from_settings(s)
        self.metrics = metrics if metrics is not None else CallMetrics(node.metrics.registry)
        self.invites_per_window = s.call_invites_per_minute

    # --- background -----------------------------------------------------------------

    async def run(self) -> None:
        """This instance's share of the call timers, and the active gauge."""
        while not self.node.broker.is_ready():  # the node starts after install()
            await asyncio.sleep(0.05)
        gauge = asyncio.create_task(self._refresh_gauge_forever(), name="calls-gauge")
        try:
            await run_timers(self.timers, self.fire, self.clock)
        finally:
            gauge.cancel()

    async def fire(self, call_id: str) -> None:
        """Run a claimed timer and re-schedule or drop it. Never raises: a
        failed run keeps its lease and is retried when the lease runs out."""
        self.metrics.timer_runs.inc()
        try:
            await self._set_timer(call_id, await self.run_timer(call_id))
        except BrokerUnavailable as exc:
            log.warning("call %s: timer deferred, store unavailable: %s", call_id, exc)
        except Exception:
            log.exception("call %s: timer failed", call_id)

    async def _refresh_gauge_forever(self) -> None:
        while True:
            try:
                now = self.clock()
                # Members past their safety bound belong to calls whose end was
                # never recorded (an instance died at that moment): drop them.
                await self.store.zpop_due(ACTIVE_KEY, float(now), 1000)
                self.metrics.active.set(await self.store.zcount(ACTIVE_KEY, float(now), math.inf))
            except BrokerUnavailable as exc:
                log.debug("active calls gauge not refreshed: %s", exc)
            await asyncio.sleep(GAUGE_S)

    async def on_disconnect(self, event: ConnectionEvent) -> None:
        """A user's last connection on this node closed: look at their call
        now rather than at its next periodic liveness check."""
        if event.user_connections:
            return
        try:
            call_id = await self.calls.busy_with(event.user)
            if call_id is not None:
                await self.timers.schedule(call_id, self.clock())
        except BrokerUnavailable as exc:
            log.debug("liveness nudge skipped: %s", exc)

    # --- transitions from RPCs ---------------------------------------------------

    async def invite(self, caller: str, callee: str, media: str, meta: str) -> Call:
        """Start ringing ``callee``. ``meta``: JSON text of the invite's meta, or "".

        Raises SignalError: CALL_SELF, CALL_RATE_LIMITED, CALL_BUSY, CALL_CALLEE_BUSY.
        """
        if caller == callee:
            raise SignalError(CALL_SELF)
        count = await self.store.incr(invites_key(caller), INVITE_WINDOW_S)
        if count > self.invites_per_window:
            raise SignalError(CALL_RATE_LIMITED)
        call_id = random_uuid_hex()
        now = self.clock()
        caller_uid = random_below(MAX_UID) + 1
        callee_uid = caller_uid % MAX_UID + 1  # distinct, nonzero, <= MAX_UID
        fields = {
            "caller": caller,
            "callee": callee,
            "media": media,
            "meta": meta,
            "created_at_ms": str(now),
            "ring_deadline_ms": str(now + self.ring_ms),
            "caller_uid": str(caller_uid),
            "callee_uid": str(callee_uid),
        }
        # The call exists (pending) and has its timer before anyone is marked
        # busy with it: a busy flag always points at a call that will end.
        # (A timer whose call was never created finds nothing and is dropped.)
        pending, _ = await asyncio.gather(
            self.calls.create(fields, call_id), self.timers.schedule(call_id, now + self.ring_ms)
        )
        try:
            await self._claim_both(caller, callee, call_id)
            change = await self.calls.update(
                call_id,
                lambda c: (
                    {"state": CallState.RINGING.value} if c.state == CallState.PENDING else None
                ),
                functools.partial(self._billing, at=now),
                written_ms=self.clock(),
                known=pending,
            )
        except BaseException:
            # Best effort: what is left behind (a pending call, busy flags
            # pointing at it) expires or is taken over as stale.
            with contextlib.suppress(Exception):
                await self._abandon(call_id, (caller, callee))
            raise
        if change is None:  # the pending call timed out meanwhile
            await self._abandon(call_id, (caller, callee))
            raise wrong_state(CallState.MISSED)
        call = change.after
        self.metrics.invites.inc()
        extra: JSONObject = {
            "media": call.media,
            "meta": meta_json(call),
            "created_at_ms": call.created_at_ms,
            "ring_deadline_ms": call.ring_deadline_ms,
        }
        # The invited record's append is issued first, the ring with it: the
        # ring waits for neither its reply nor the outbox's clearing. The
        # billing stream keeps its order whatever happens: an accept's record
        # follows the ring, and a record not appended waits in the outbox,
        # which is appended in order.
        await asyncio.gather(
            self._deliver(change),
            self._publish((callee,), event_data(EventType.INCOMING, call, now, extra)),
        )
        return call

    async def _claim_both(self, caller: str, callee: str, call_id: str) -> None:
        # One key at a time (single-key operations only); undo on failure.
        if not await self._claim_busy(caller, call_id):
            raise SignalError(CALL_BUSY)
        if not await self._claim_busy(callee, call_id):
            await self.calls.release_busy(caller, call_id)
            raise SignalError(CALL_CALLEE_BUSY)

    async def _claim_busy(self, user: str, call_id: str) -> bool:
        """Mark ``user`` busy with ``call_id``. A ringing call holding the flag
        past its ring timeout is one whose timer did not run (its entry lost in
        a failover, say): it is settled now (missed), and the flag claimed
        again, instead of refusing the user's calls until the flag expires,
        hours later. (Not an accepted call past its maximum: its timer would
        bill every minute up to it, with no liveness seen in between.)"""
        if await self.calls.claim_busy(user, call_id):
            return True
        holder = await self.calls.busy_with(user)
        held = await self.calls.get(holder) if holder is not None else None
        if held is None or not self._past_deadline(held, self.clock()):
            return False
        log.warning("call %s: past its deadline with no timer run; settled now", held.call_id)
        await self._set_timer(held.call_id, await self.run_timer(held.call_id))
        return await self.calls.claim_busy(user, call_id)

    def _past_deadline(self, call: Call, at: int) -> bool:
        return call.state in (CallState.PENDING, CallState.RINGING) and at >= call.ring_deadline_ms

    async def _abandon(self, call_id: str, users: tuple[str, str]) -> None:
        for user in users:
            await self.calls.release_busy(user, call_id)
        await self.timers.cancel(call_id)
        await self.calls.discard(call_id)

    async def accept(self, user: str, call_id: str) -> Call:
        """The callee answers. Raises SignalError: CALL_NOT_FOUND,
        CALL_WRONG_ROLE, CALL_WRONG_STATE (not ringing, or the ring timed out)."""
        change = await self._settle_ringing(
            user,
            call_id,
            Role.CALLEE,
            lambda at: {"state": CallState.ACCEPTED.value, "accepted_at_ms": str(at)},
        )
        await self._accepted(change)
        return change.after

    async def reject(self, user: str, call_id: str) -> Call:
        """The callee declines a ringing call (same errors as :meth:`accept`)."""
        return await self._end_ringing(user, call_id, Role.CALLEE, CallState.REJECTED)

    async def cancel(self, user: str, call_id: str) -> Call:
        """The caller gives up before an answer (same errors as :meth:`accept`)."""
        return await self._end_ringing(user, call_id, Role.CALLER, CallState.CANCELLED)

    async def _end_ringing(self, user: str, call_id: str, role: Role, state: CallState) -> Call:
        change = await self._settle_ringing(
            user,
            call_id,
            role,
            lambda at: {"state": state.value, "ended_at_ms": str(at), "ended_by": user},
        )
        await self._after_change(call_id, await self._finished(change))
        return change.after

    async def _settle_ringing(
        self, user: str, call_id: str, role: Role, changes: Callable[[int], dict[str, str]]
    ) -> Change:
        """Move a ringing call on by ``user`` in ``role``; the winning change.
        Who may is checked on the state the change is decided on: one read."""

        def decide(c: Call) -> Mapping[str, str] | None:
            if _participant_role(c, user) is not role:
                raise SignalError(CALL_WRONG_ROLE)
            if c.state != CallState.RINGING:
                raise wrong_state(c.state)
            at = self.clock()
            if at >= c.ring_deadline_ms:
                return None  # too late: missed, only the timer has not run yet
            return changes(at)

        change = await self._update(call_id, decide)
        if change is None:
            await self._set_timer(call_id, await self.run_timer(call_id))  # the miss, now
            raise wrong_state(CallState.MISSED)
        return change

    async def end(self, user: str, call_id: str) -> Call:
        """Either participant hangs up an accepted call. What its clock had due
        by then (a tick, the maximum duration) that the timer has not done yet
        is done first, as the timer would have: a minute begun before the
        hang-up is billed, and a call past its maximum ends at the maximum."""
        for attempt in range(_END_CATCH_UPS + 1):
            now = self.clock()
            catch_up = attempt < _END_CATCH_UPS

            def decide(c: Call, now: int = now, catch_up: bool = catch_up) -> Mapping[str, str]:
                _participant_role(c, user)
                if c.state != CallState.ACCEPTED:
                    raise wrong_state(c.state)
                if catch_up and self._tick_or_end_due(c, now):
                    raise _ClockDue
                return _ended(EndReason.HANGUP, now, user)

            try:
                change = await self._update(call_id, decide)
            except _ClockDue:
                # The clock's steps only; liveness is the timer's, not the
                # hang-up's. At its maximum the call ends here, as the timer
                # would end it.
                ended = await self._run_clock(call_id)
                if ended is not None:
                    await self._after_change(call_id, await self._finished(ended))
                continue
            assert change is not None
            await self._after_change(call_id, await self._finished(change))
            return change.after
        raise AssertionError("unreachable: the last attempt does not catch up")

    async def grant(self, user: str, call_id: str, *, renew: bool) -> RtcGrant:
        """An Agora token for a participant of an accepted call (call.join,
        call.renew_token). Raises SignalError: CALL_NOT_CONFIGURED,
        CALL_NOT_FOUND, CALL_WRONG_STATE."""
        if not self.issuer.configured:
            raise SignalError(CALL_NOT_CONFIGURED)
        call = await self.participant_call(user, call_id)
        if call.state == CallState.ACCEPTED and self._clock_overdue(call, self.clock()):
            # The timers lag behind the clock: settle the call before granting.
            await self._set_timer(call_id, await self.run_timer(call_id))
            call = await self.participant_call(user, call_id)
        if call.state != CallState.ACCEPTED:
            raise wrong_state(call.state)
        assert call.accepted_at_ms is not None
        # Not past the call's forced end: the media session then ends with it, even
        # for a client that ignores the end event (or that fetched a token to stay on).
        ends_at_s = -(-(call.accepted_at_ms + self.max_ms) // 1000)
        grant = self.issuer.issue(
            channel_name(call_id), call.uid(user), self.clock() // 1000, until_s=ends_at_s
        )
        self.metrics.tokens.labels("renew" if renew else "join").inc()
        log.info("call %s: %s token for %s", call_id, "renewed" if renew else "join", user)
        return grant

    async def participant_call(self, user: str, call_id: str) -> Call:
        """The call if ``user`` is one of its participants, else CALL_NOT_FOUND."""
        call = await self.calls.get(call_id)
        if call is None:
            raise SignalError(CALL_NOT_FOUND)
        _participant_role(call, user)
        return call

    async def current_call(self, user: str) -> Call | None:
        """The user's ringing or accepted call, if any."""
        call_id = await self.calls.busy_with(user)
        if call_id is None:
            return None
        call = await self.calls.get(call_id)
        if call is None or call.role(user) is None or call.state not in LIVE_CALL_STATES:
            return None
        return call

    async def _update(self, call_id: str, decide: Decide, at: int | None = None) -> Change | None:
        """Apply a change with its billing records (``at``: the time of a
        tick), then append them: the winning change, or None."""
        when = self.clock()

        def deciding(c: Call) -> Mapping[str, str] | None:
            values = decide(c)
            if (
                values is not None
                and c.state in LIVE_CALL_STATES
                and values.get("state", c.state) in TERMINAL_STATES
            ):
                # It ends a call its participants know of: until its events
                # are out, the call's timer may have to send them.
                return {**values, UNANNOUNCED: str(when)}
            return values

        try:
            change = await self.calls.update(
                call_id,
                deciding,
                functools.partial(self._billing, at=when if at is None else at),
                written_ms=when,
            )
        except LookupError:
            raise SignalError(CALL_NOT_FOUND) from None
        if change is None:
            return None
        return await self._deliver(change)

    # --- the clock ------------------------------------------------------------------

    def _clock_overdue(self, call: Call, at: int) -> bool:
        assert call.accepted_at_ms is not None
        return at >= call.accepted_at_ms + self.max_ms

    async def run_timer(self, call_id: str) -> int | None:
        """Do what is due for the call now; returns when to look again (unix
        ms), or None once the call is over and nothing of it is left to do.

        First of all, billing records left in the call's outbox by another
        instance (dead, or unable to append them) are appended.
        """
        call = await self.calls.get(call_id)
        if call is None:
            return None
        unsent = await self._flush(call, frozenset()) if call.outbox else ()
        if call.state in TERMINAL_STATES:
            due = await self._settle_end(call)
        elif call.state in (CallState.PENDING, CallState.RINGING):
            due = await self._ring_timer(call)
        else:
            due = await self._call_timer(call_id)
        if due is None and call.state not in TERMINAL_STATES:
            # It ended during this run, and what the end left is in ``due``.
            return None
        return _earliest(due, await self._outbox_due(call, unsent))

    async def _after_change(self, call_id: str, due: int | None) -> None:
        """Re-schedule the timer after an RPC's change. A failure is logged, not
        answered: the change was made, and the timer in place finishes it."""
        try:
            await self._set_timer(call_id, due)
        except BrokerUnavailable as exc:
            log.warning("call %s: timer not re-scheduled: %s", call_id, exc)

    async def _set_timer(self, call_id: str, due: int | None) -> None:
        """Re-schedule the call's timer, or let it go (``due`` None)."""
        if due is None:
            await self.timers.cancel(call_id)
        else:
            await self.timers.schedule(call_id, due)

    async def _outbox_due(self, call: Call, unsent: tuple[OutboxEntry, ...]) -> int | None:
        """When the timer must look at an outbox that still holds ``unsent``
        (None if empty). Such a call is kept from expiring meanwhile."""
        if not unsent:
            return None
        with contextlib.suppress(BrokerUnavailable):
            await self.calls.keep(call)
        oldest = min(e.written_ms for e in unsent)
        return max(oldest + OUTBOX_STALE_MS, self.clock() + OUTBOX_RETRY_MS)

    async def _after_lost_race(self, latest: Call | None) -> int | None:
        """A change this timer run tried lost to another one (an RPC's, or
        another run's): when the timer must look at the call (``latest``, as
        read since) again."""
        if latest is None:
            return None
        if latest.state not in TERMINAL_STATES:
            # Not ended: the ring timer against an accept just before the
            # deadline, say. Look again at once.
            return self.clock()
        # Ended by another instance, which may still be appending its records
        # and publishing its events, or die doing so: the timer stays for them.
        due = None
        if latest.unannounced_ms is not None:
            due = max(latest.unannounced_ms + OUTBOX_STALE_MS, self.clock())
        return _earliest(due, await self._outbox_due(latest, latest.outbox))

    async def _ring_timer(self, call: Call) -> int | None:
        if self.clock() < call.ring_deadline_ms:
            return call.ring_deadline_ms

        def decide(c: Call) -> Mapping[str, str] | None:
            if c.state not in (CallState.PENDING, CallState.RINGING):
                return None
            return {"state": CallState.MISSED.value, "ended_at_ms": str(c.ring_deadline_ms)}

        change = await self._update(call.call_id, decide)
        if change is None:
            return await self._after_lost_race(await self.calls.get(call.call_id))
        if change.before.state == CallState.PENDING:
            # An invite whose instance died before the call rang: nobody was
            # told of it, so nobody is told of its end; just free the users.
            for user in call.participants:
                await self.calls.release_busy(user, call.call_id)
            return await self._outbox_due(change.after, change.unsent)
        return await self._finished(change)

    async def _call_timer(self, call_id: str) -> int | None:
        # The clock's steps; then liveness.
        ended = await self._run_clock(call_id)
        if ended is not None:
            return await self._finished(ended)  # the max duration
        call = await self.calls.get(call_id)
        if call is None or call.state != CallState.ACCEPTED:
            return await self._after_lost_race(call)
        return await self._check_liveness(call)

    async def _run_clock(self, call_id: str) -> Change | None:
        """Ticks, warnings and the max duration, one compare-and-set each, in
        time order, until nothing is due. Returns the change that ended the
        call at its maximum, if one did, for the caller to finish."""
        while True:
            at = self.clock()
            change = await self._update(call_id, functools.partial(self._clock_step, at=at), at)
            if change is None:
                return None
            if change.after.state != CallState.ACCEPTED:
                return change
            await self._clock_changed(change, at)

    def _tick_or_end_due(self, c: Call, at: int) -> bool:
        end, tick, _ = self._due_times(c)
        return end <= at or (tick is not None and tick <= at)

    def _due_times(self, c: Call) -> tuple[int, int | None, int | None]:
        """(end, next tick or None, next warning or None) of an accepted call."""
        assert c.accepted_at_ms is not None
        end = c.accepted_at_ms + self.max_ms
        tick: int | None = c.accepted_at_ms + (c.ticks + 1) * self.tick_ms
        if tick is not None and tick > end:
            tick = None  # no tick after the end
        warn = None
        if c.warned < len(self.warnings_ms):
            warn = end - self.warnings_ms[c.warned]
        return end, tick, warn

    def _next_clock_due(self, c: Call) -> int:
        end, tick, warn = self._due_times(c)
        return min(t for t in (end, tick, warn) if t is not None)

    def _clock_step(self, c: Call, at: int) -> Mapping[str, str] | None:
        """The next due change of the call's clock at ``at``, or None."""
        if c.state != CallState.ACCEPTED:
            return None
        end, tick, warn = self._due_times(c)
        if tick is not None and tick <= at:
            return {"ticks": str(c.ticks + 1)}
        if end <= at:
            # Ended at the limit itself, however late the timer ran.
            return _ended(EndReason.MAX_DURATION, end, None)
        if warn is not None and warn <= at:
            # Late (an instance died): only the latest due warning is worth sending.
            warned = c.warned + 1
            while warned < len(self.warnings_ms) and end - self.warnings_ms[warned] <= at:
                warned += 1
            return {"warned": str(warned)}
        return None

    async def _clock_changed(self, change: Change, at: int) -> None:
        """The events of a tick or a warning."""
        before, after = change.before, change.after
        if after.ticks > before.ticks:
            duration = after.ticks * self.tick_ms
            extra: JSONObject = {"minute": after.ticks, "duration_ms": duration}
            await self._publish(after.participants, event_data(EventType.TICK, after, at, extra))
        elif after.warned > before.warned:
            assert after.accepted_at_ms is not None
            remaining_ms = self.warnings_ms[after.warned - 1]
            extra = {
                "remaining_s": remaining_ms / 1000,
                "ends_at_ms": after.accepted_at_ms + self.max_ms,
            }
            await self._publish(after.participants, event_data(EventType.WARNING, after, at, extra))

    async def _check_liveness(self, call: Call) -> int | None:
        """End the call if a participant has been offline for the grace
        period. Returns when the call's timer must look at it again."""
        assert call.accepted_at_ms is not None
        at = self.clock()
        statuses = await asyncio.gather(
            *(self.node.user_presence.status(user) for user in call.participants)
        )
        seen: dict[str, str] = {}
        lost: list[tuple[int, str, int]] = []  # (deadline, user, offline since)
        for user, status in zip(call.participants, statuses, strict=True):
            role = call.role(user)
            assert role is not None
            if status.online:
                seen[f"{role.value}_seen_ms"] = str(at)
                continue
            last_seen = round(status.last_seen * 1000) if status.last_seen is not None else 0
            since = max(last_seen, call.seen_ms(user) or 0, call.accepted_at_ms)
            lost.append((since + self.grace_ms, user, since))
        await self.calls.note_seen(call.call_id, seen)
        next_check = at + self.live_check_ms
        if lost:
            deadline, user, since = min(lost)
            if deadline <= at:
                return await self._lose(call.call_id, user, since, at)
            next_check = min(deadline, next_check)
        return min(self._next_clock_due(call), next_check)

    async def _lose(self, call_id: str, user: str, since: int, at: int) -> int | None:
        def decide(c: Call) -> Mapping[str, str] | None:
            if c.state != CallState.ACCEPTED:
                return None
            return {**_ended(EndReason.PARTICIPANT_LOST, at, user), "lost_since_ms": str(since)}

        change = await self._update(call_id, decide)
        if change is None:
            return await self._after_lost_race(await self.calls.get(call_id))
        return await self._finished(change)

    # --- follow-ups of a winning change ---------------------------------------------

    async def _accepted(self, change: Change) -> None:
        call = change.after
        assert call.accepted_at_ms is not None
        ends_at = call.accepted_at_ms + self.max_ms
        # The call's clock and its place among the active calls in one round
        # trip; then the events and the in-call status, side by side. The
        # accept has happened whatever fails here: the events still go out,
        # and a clock not moved on runs from the ring timer still in place.
        _log_unavailable(
            call,
            "accepted, its clock or active-set entry not written",
            await asyncio.gather(
                self.timers.schedule(
                    call.call_id,
                    min(self._next_clock_due(call), call.accepted_at_ms + self.live_check_ms),
                ),
                self.store.zadd(ACTIVE_KEY, call.call_id, float(ends_at + self.grace_ms + 60_000)),
                return_exceptions=True,
            ),
        )
        self.metrics.ring_to_answer.observe((call.accepted_at_ms - call.created_at_ms) / 1000)
        extra: JSONObject = {
            "media": call.media,
            "accepted_at_ms": call.accepted_at_ms,
            "ends_at_ms": ends_at,
            "tick_ms": self.tick_ms,
        }
        data = event_data(EventType.ACCEPTED, call, call.accepted_at_ms, extra)
        await asyncio.gather(self._publish(call.participants, data), self._show_in_call(call, True))

    async def _show_in_call(self, call: Call, busy: bool) -> bool:
        """Fans see both participants as ``busy`` while the call is accepted
        (handlers.presence). A failure is logged and the call goes on; False
        if one happened (the end's clearing is retried by the call's timer)."""
        failed = False

        async def show(user: str) -> None:
            nonlocal failed
            try:
                # Marked only while the call holds the user's busy flag: an
                # end that came first (it releases the flag) is not undone.
                await set_call_busy(
                    self.node, user, call.call_id, busy, while_key=busy_key(user) if busy else None
                )
            except BrokerUnavailable as exc:
                failed = True
                log.warning(
                    "call %s: in-call status of %s not updated: %s", call.call_id, user, exc
                )

        await _each(show, call.participants)
        return not failed

    async def _leave_call(self, call: Call) -> bool:
        """Clear an ended call's in-call status (other ends never showed it);
        False if that failed."""
        return call.state != CallState.ENDED or await self._show_in_call(call, False)

    async def _finished(self, change: Change) -> int | None:
        """A call reached a terminal state: free everything, tell everyone.
        Returns when the call's timer must look at it again, None to let it
        go: the timer stays while the end's events, its in-call clearing or
        billing records are left to do."""
        call = change.after
        # The busy flags, the active set and the timer in one round trip; the
        # participants hear of the end after their flags are free (their next
        # invite must not find them busy). The timer is set to come back when
        # the events are overdue (should this instance die before them: a
        # ringing call's timer would otherwise wait for the ring deadline).
        # The end has happened whatever fails here: the events still go out,
        # and the call's timer (in place since the invite) frees what is left.
        unfreed = _log_unavailable(
            call,
            "ended, its busy flags or timer not written",
            await asyncio.gather(
                self._free(call),
                self._set_timer(call.call_id, self._overdue(call)),
                return_exceptions=True,
            ),
        )
        self._count_end(call)
        published, cleared = await asyncio.gather(
            self._publish(call.participants, self._end_event(call)), self._leave_call(call)
        )
        due = await self._outbox_due(call, change.unsent)
        if not (published and cleared) or unfreed:
            # The timer tries again (it publishes only the events missing, and
            # frees the participants).
            due = _earliest(due, self.clock() + OUTBOX_RETRY_MS)
        elif due is not None:
            # The timer stays for the billing records only: it need not look
            # for the events (on the common path, the timer gone, no write).
            with contextlib.suppress(BrokerUnavailable):
                await self.calls.mark_announced(call)
        return due

    async def _free(self, call: Call) -> None:
        """Release the participants' busy flags and take an ended call out of
        the active set. Harmless when done already (each only while it holds
        this call)."""
        frees: list[Awaitable[object]] = [
            self.calls.release_busy(user, call.call_id) for user in call.participants
        ]
        if call.state == CallState.ENDED:
            frees.append(self.store.zrem(ACTIVE_KEY, call.call_id))
        await asyncio.gather(*frees)

    def _overdue(self, call: Call) -> int:
        """When a finished call's events, if still unannounced, are overdue."""
        written = call.unannounced_ms if call.unannounced_ms is not None else self.clock()
        return written + OUTBOX_STALE_MS

    def _count_end(self, call: Call) -> None:
        if call.state == CallState.ENDED:
            assert call.reason is not None
            self.metrics.calls.labels(call.reason).inc()
            self.metrics.duration.observe(call.duration_ms(self._end_time(call)) / 1000)
        else:
            self.metrics.calls.labels(call.state.value).inc()

    def _end_time(self, call: Call) -> int:
        return call.ended_at_ms if call.ended_at_ms is not None else self.clock()

    def _end_event(self, call: Call) -> bytes:
        """The data of the participants' event about a finished call."""
        at = self._end_time(call)
        extra: JSONObject = {}
        if call.ended_by is not None:
            # Who hung up, rejected or cancelled; or who was lost.
            who = "lost" if call.reason == EndReason.PARTICIPANT_LOST else "by"
            extra[who] = call.ended_by
        if call.state == CallState.ENDED:
            extra |= {"reason": call.reason, "duration_ms": call.duration_ms(at)}
            extra["accepted_at_ms"] = call.accepted_at_ms
            extra["ended_at_ms"] = at
            if call.lost_since_ms is not None:
                extra["lost_since_ms"] = call.lost_since_ms
        return event_data(_TERMINAL_EVENT[call.state], call, at, extra)

    async def _settle_end(self, call: Call) -> int | None:
        """The timer of a finished call: what its end left undone (by a dead
        instance, or one that failed), if anything. Returns when to look
        again, or None."""
        now = self.clock()
        due: int | None = None
        if call.unannounced_ms is not None:
            ready = self._overdue(call)
            if now < ready:
                due = ready  # its winner is publishing them (or died doing so)
            elif now - call.unannounced_ms > ANNOUNCE_GIVE_UP_MS:
                log.error(
                    "call %s: end's events not published after %d s, given up",
                    call.call_id,
                    ANNOUNCE_GIVE_UP_MS // 1000,
                )
                await self.calls.mark_announced(call)
            elif not await self._announce_left_over(call):
                due = now + OUTBOX_RETRY_MS
        # The end's instance may have died before freeing the participants, or
        # failed to clear their in-call status: again, harmless if done (each
        # only while it holds this call). Freed first: an in-call mark written
        # late is refused once the busy flags are gone.
        await self._free(call)
        if not await self._leave_call(call):
            due = _earliest(due, now + OUTBOX_RETRY_MS)
        return due

    async def _announce_left_over(self, call: Call) -> bool:
        """Publish the end's event to the participants whose personal channel
        does not hold it yet (its instance died, or failed, before); then
        clear the mark. False if something failed (the timer tries again)."""
        if not await self._publish(call.participants, self._end_event(call), missing_in=call):
            return False
        try:
            await self.calls.mark_announced(call)
        except BrokerUnavailable as exc:
            log.debug("call %s: end's events published, mark not cleared: %s", call.call_id, exc)
        return True

    async def _holds_event(self, channel: str, call: Call) -> bool:
        """Whether the channel's latest publications hold the event of the
        call's current revision (the end's own, ``seq`` = ``rev``). Without
        history nothing can tell: False (published, at least once)."""
        kept = self.node.channel_options(channel).history
        if not kept.enabled:
            return False
        page = await self.node.broker.history(
            channel, since=None, limit=_EVENTS_LOOKED_AT, reverse=True, history=kept
        )
        marker = call.call_id.encode()
        for pub in page.publications:
            if marker not in (pub.data if pub.body is None else pub.body):
                continue  # another call's event, or not a call event
            event = publication_data(pub)
            if (
                isinstance(event, dict)
                and event.get("call_id") == call.call_id
                and event.get("seq") == call.rev
            ):
                return True
        return False

    async def _publish(
        self, users: tuple[str, ...], data: bytes, *, missing_in: Call | None = None
    ) -> bool:
        """Publish to the users' personal channels (with history, so a
        reconnecting app recovers it). The state already changed: a failed
        publish is logged, the call goes on (call.state tells the truth);
        False if one failed for a reason that may pass (the broker).
        ``missing_in``: publish, in the place of the instance that ended this
        call, only to the channels that do not hold its end's event yet."""
        failed = False

        async def publish(user: str) -> None:
            nonlocal failed
            channel = personal_channel(user)
            try:
                if missing_in is not None and await self._holds_event(channel, missing_in):
                    return
                await self.node.publish(channel, data)
            except BrokerUnavailable as exc:
                failed = True
                log.warning("call event to %s not published: %s", user, exc)
                return
            except SignalError as exc:
                # A user id that names no channel: no retry can help.
                log.warning("call event to %s not publishable: %s", user, exc)
                return
            if missing_in is not None:
                self.metrics.events_redelivered.inc()
                log.warning(
                    "call %s: end's event published to %s in its instance's place",
                    missing_in.call_id,
                    user,
                )

        await _each(publish, users)
        return not failed

    # --- billing ----------------------------------------------------------------------

    def _billing(self, before: Call, after: Call, at: int) -> list[dict[str, str]]:
        """The billing records of a change (``at``: the invite's or the
        tick's time). Written into the outbox with the change itself."""

        def record(
            kind: RecordType, at_ms: int, duration_ms: int, extra: Mapping[str, str] | None = None
        ) -> dict[str, str]:
            return record_fields(
                kind, after, at_ms, duration_ms=duration_ms, node=self.node.name, extra=extra
            )

        if before.state == CallState.PENDING:
            # Ringing: invited. Missed before it rang (its instance died
            # mid-invite): nobody was told of it, billing neither.
            return [record(RecordType.INVITED, at, 0)] if after.state == CallState.RINGING else []
        if before.state in TERMINAL_STATES:
            return []
        if after.state in TERMINAL_STATES:
            end = after.ended_at_ms
            assert end is not None
            extra: dict[str, str] = {}
            if after.ended_by is not None:
                who = "lost" if after.reason == EndReason.PARTICIPANT_LOST else "by"
                extra[who] = after.ended_by
            if after.state == CallState.ENDED:
                assert after.reason is not None
                extra["reason"] = after.reason
                if after.lost_since_ms is not None:
                    extra["lost_since_ms"] = str(after.lost_since_ms)
            return [record(_TERMINAL_RECORD[after.state], end, after.duration_ms(end), extra)]
        if before.state == CallState.RINGING and after.state == CallState.ACCEPTED:
            assert after.accepted_at_ms is not None
            return [record(RecordType.ACCEPTED, after.accepted_at_ms, 0)]
        if after.state == CallState.ACCEPTED and after.ticks > before.ticks:
            tick = {"minute": str(after.ticks)}
            return [record(RecordType.TICK, at, after.ticks * self.tick_ms, tick)]
        return []

    async def _deliver(self, change: Change) -> Change:
        """Append the change's billing records (and any left behind by
        others), then take them out of the outbox. Never raises for the store:
        what could not be appended stays in the outbox for the timer."""
        if not change.after.outbox:
            return change
        mine = frozenset(e.event_id for e in change.records)
        return dataclasses.replace(change, unsent=await self._flush(change.after, mine))

    async def _flush(self, call: Call, mine: frozenset[str]) -> tuple[OutboxEntry, ...]:
        """Append, in order, the outbox records of ``call`` that are ``mine``
        or stale (their writer would have appended them by now), and remove
        them from the outbox. Returns what the outbox still holds."""
        stale = self.clock() - OUTBOX_STALE_MS
        due = [e for e in call.outbox if e.event_id in mine or e.written_ms <= stale]
        sent: list[str] = []
        for entry in due:
            try:
                await self.billing.append(entry.fields)
            except BrokerUnavailable as exc:
                log.warning(
                    "billing record %s not appended yet, kept in the call's outbox: %s",
                    entry.event_id,
                    exc,
                )
                break  # in order: the next ones wait too
            sent.append(entry.event_id)
            if entry.event_id not in mine:
                self.metrics.billing_redelivered.inc()
                log.warning(
                    "billing record %s appended from the outbox of call %s (left by %s)",
                    entry.event_id,
                    call.call_id,
                    entry.fields.get("node", "?"),
                )
        if not sent:
            return call.outbox
        try:
            after = await self.calls.clear_outbox(call, sent)
        except (BrokerUnavailable, SignalError) as exc:
            # Appended but still in the outbox: appended again later (a
            # duplicate event_id, which consumers skip).
            log.warning("call %s: outbox not cleared: %s", call.call_id, exc)
            return call.outbox
        return after.outbox if after is not None else ()

    # --- views ------------------------------------------------------------------------

    def snapshot(self, call: Call) -> JSONObject:
        """A participant's view of the call (call.state)."""
        at = self.clock()
        lost = call.reason == EndReason.PARTICIPANT_LOST
        view: JSONObject = {
            "call_id": call.call_id,
            "state": call.state.value,
            "from": call.caller,
            "to": call.callee,
            "media": call.media,
            "meta": meta_json(call),
            "seq": call.rev,
            "created_at_ms": call.created_at_ms,
            "ring_deadline_ms": call.ring_deadline_ms,
            "accepted_at_ms": call.accepted_at_ms,
            "ended_at_ms": call.ended_at_ms,
            "reason": call.reason,
            "by": None if lost else call.ended_by,
            "lost": call.ended_by if lost else None,
            "duration_ms": call.duration_ms(at),
            "ticks": call.ticks,
            "server_time_ms": at,
        }
        if call.accepted_at_ms is not None:
            view["ends_at_ms"] = call.accepted_at_ms + self.max_ms
        return view


def _log_unavailable(call: Call, what: str, results: Sequence[object]) -> bool:
    """Log the broker failures among ``results`` (of a change already made, whose
    reply must still say so); True if there was one. Anything else (a bug) is
    raised."""
    failed = False
    for result in results:
        if isinstance(result, BrokerUnavailable):
            log.warning("call %s: %s: %s", call.call_id, what, result)
            failed = True
        elif isinstance(result, BaseException):
            raise result
    return failed


def _participant_role(call: Call, user: str) -> Role:
    """``user``'s role in ``call``; CALL_NOT_FOUND if they have none, or while
    the call is pending (nobody was told of it yet)."""
    role = call.role(user)
    if role is None or call.state == CallState.PENDING:
        raise SignalError(CALL_NOT_FOUND)
    return role


async def _each(action: Callable[[str], Awaitable[None]], users: Sequence[str]) -> None:
    """``action`` for every user, at once: the participants' round trips share
    the loop's writes and reads instead of waiting for each other."""
    if len(users) == 1:
        await action(users[0])
    else:
        await asyncio.gather(*(action(user) for user in users))


def _earliest(a: int | None, b: int | None) -> int | None:
    """The earlier of two due times, either of which may be None (nothing due)."""
    if a is None:
        return b
    return a if b is None else min(a, b)


def _ended(reason: EndReason, at: int, by: str | None) -> dict[str, str]:
    values = {"state": CallState.ENDED.value, "ended_at_ms": str(at), "reason": reason.value}
    if by is not None:
        values["ended_by"] = by
    return values
