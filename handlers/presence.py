"""Users' online state and availability, across instances.

A user is **online** while any connection of theirs is open on any instance
(the core's :attr:`Node.user_presence` records) and goes **offline**
``offline_grace_s`` after the last one closes, so a page reload or a network
blip does not flash "offline". Their **availability** is what they chose with
``user.set_status`` (``available``, ``busy``, ``away``, ``dnd``), except that
while they are in a call it is ``busy`` (:func:`set_call_busy`, called by the
calls handler). The effective status is ``offline``, ``busy`` (in a call) or
the chosen one, in that order.

Every change of (online, effective status) is published to ``status:<user>``
(one publication kept in history), so a fan's app follows a creator without
polling; ``user.status`` answers for up to 100 users at once.

How "offline after the grace" works on many instances, with store keys
(hash tags keep one user's keys in one Redis Cluster slot):

* ``presence:offline-due`` (sorted set user -> due time): when a user's last
  connection on a node closes, that node schedules a check; every node pops
  due checks (atomically: each is taken once) and publishes ``offline`` if the
  user is not online anywhere by then.
* An instance killed outright closes nothing. Each node therefore keeps a
  heartbeat in ``presence:nodes`` (member node -> expiry) and the users it
  holds in ``presence:node-users:{<node>}``. A node whose heartbeat expired is
  popped by one survivor, which drops the dead node's online records of its
  users and schedules their checks at once: they go offline within about
  :func:`node_ttl_s` of the kill.
* A node that was only late (a long pause) finds ``presence:reaped:{<node>}``
  and publishes its users online again; the core restores their records on
  its next refresh.
* ``presence:last:{<user>}`` holds the last published (online, status), so
  that only changes are published.

Calls integration: ``await set_call_busy(node, user, call_id, True)`` when
the user's call is accepted (or starts ringing, as the calls handler prefers)
and ``await set_call_busy(node, user, call_id, False)`` when it ends. The
flag holds the call's id, so clearing it is safe to retry; it expires by
itself ``call_max_duration_s`` (plus a margin) after it was set, should the
end never be reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Literal

import orjson

from handlers.channels import status_channel
from handlers.chat.args import bad_request, check_user, object_args
from signaling.broker.base import BrokerUnavailable
from signaling.errors import ERROR_LIMIT_EXCEEDED, SignalError
from signaling.node import ConnectionEvent, Node, RpcContext
from signaling.state.base import KeyWrite
from signaling.values import JSON, JSONObject, record

__all__ = [
    "AVAILABILITIES",
    "MAX_STATUS_USERS",
    "NODES_KEY",
    "OFFLINE_DUE_KEY",
    "Availability",
    "PresenceTracker",
    "StatusView",
    "node_ttl_s",
    "publish_if_changed",
    "refresh_status",
    "register",
    "set_call_busy",
    "set_status",
    "status_view",
]

log = logging.getLogger("handlers.presence")

Availability = Literal["available", "busy", "away", "dnd"]
_AVAILABILITIES: Final[dict[str, Availability]] = {
    "available": "available",
    "busy": "busy",
    "away": "away",
    "dnd": "dnd",
}
AVAILABILITIES: Final = frozenset(_AVAILABILITIES)
MAX_STATUS_USERS: Final = 100
# A chosen availability is forgotten after this long without being set again.
CHOSEN_TTL_S: Final = 30 * 86400.0
# How long a dead node's reaped flag waits for it to come back.
_REAPED_FLAG_TTL_S: Final = 86400.0
# Users read per store call when reaping a dead node.
_REAP_BATCH: Final = 500
# A claimed dead node, or a claimed batch of offline checks, comes due again
# after this (seconds) if its claimer never finished it (died, or the store
# failed part-way): nothing claimed is lost. Far longer than the work takes.
_REAP_LEASE_S: Final = 120.0
_SWEEP_LEASE_S: Final = 30.0
# Users recorded per round of transitions (bounds one round's commands).
_TRANSITIONS_PER_ROUND: Final = 2000
# Status publications in flight at once within a round.
_PUBLISHES_AT_ONCE: Final = 200
# Publications of one status change at most, when other instances keep changing
# it meanwhile (_publish_news).
_SETTLE_ROUNDS: Final = 3

OFFLINE_DUE_KEY: Final = "presence:offline-due"
NODES_KEY: Final = "presence:nodes"


def _chosen_key(user: str) -> str:
    return f"presence:status:{{{user}}}"


def _in_call_key(user: str) -> str:
    return f"presence:in-call:{{{user}}}"


def _last_key(user: str) -> str:
    return f"presence:last:{{{user}}}"


def _node_users_key(node_name: str) -> str:
    return f"presence:node-users:{{{node_name}}}"


def _reaped_key(node_name: str) -> str:
    return f"presence:reaped:{{{node_name}}}"


def node_ttl_s(offline_grace_s: float) -> float:
    """How long a node's heartbeat lives: an instance killed outright has its
    users go offline about this long after the kill. It follows the grace, so
    that a kill and a closed connection look alike to fans; at least 2 s, so
    that a loaded event loop is not taken for a dead node."""
    return max(2.0, offline_grace_s)


@record
class StatusView:
    """What others see of a user (published to ``status:<user>``)."""

    user: str
    online: bool
    chosen: Availability
    in_call: bool
    # Unix seconds of the last time the user went offline, if known.
    last_seen: float | None

    @property
    def status(self) -> str:
        """The effective status: offline, busy (in a call), or the chosen one."""
        if not self.online:
            return "offline"
        return "busy" if self.in_call else self.chosen

    @property
    def signature(self) -> str:
        """What fans see change; publications happen when it does."""
        return f"{int(self.online)}|{self.status}"

    def to_json(self) -> JSONObject:
        return {
            "user": self.user,
            "online": self.online,
            "status": self.status,
            "chosen": self.chosen,
            "in_call": self.in_call,
            "last_seen_ms": (
                None if self.online or self.last_seen is None else int(self.last_seen * 1000)
            ),
        }


# --- the public functions (also for other handlers) ---------------------------------


async def status_view(node: Node, user: str, *, online: bool | None = None) -> StatusView:
    """The user's current view; ``online`` overrides the store's answer when
    the caller knows better (a connection of the user is open right here)."""
    view, _ = await _read_view(node, user, online, (_chosen_key(user), _in_call_key(user)))
    return view


async def _read_view(
    node: Node,
    user: str,
    online: bool | None,
    keys: Sequence[str],
    write: KeyWrite | None = None,
) -> tuple[StatusView, list[str | None]]:
    """The user's view from ``keys`` (their chosen status and in-call keys,
    then any others) and their presence, with ``write`` (key, value or None
    to delete, ttl_s) written first; and the values of ``keys``. One store
    command: the keys share the user's hash tag with their presence."""
    if online:
        # An online user has no last-seen time to show: the presence lookup
        # is skipped (every connection set-up comes here).
        store = node.store
        values = await (store.get_many(keys) if write is None else store.set_and_get(write, keys))
        last_seen = None
    else:
        presence, values = await node.user_presence.status_and_read(user, keys, write)
        online = presence.online if online is None else online
        last_seen = presence.last_seen
    return _view(user, online, values[0], values[1], last_seen), values


def _view(
    user: str, online: bool, chosen: str | None, in_call: str | None, last_seen: float | None
) -> StatusView:
    """A view from the stored values of the user's keys."""
    return StatusView(
        user, online, _AVAILABILITIES.get(chosen or "", "available"), bool(in_call), last_seen
    )


async def publish_if_changed(node: Node, view: StatusView) -> bool:
    """Publish ``view`` to ``status:<user>`` if it differs from the last one
    published; True if published. Calls for one user on one node are
    serialized (two connect hooks racing would both publish); calls on two
    nodes at once may still both publish the same state, which subscribers
    take as a no-op."""
    if node.policy.options(status_channel(view.user)) is None:
        # A user id that cannot name a channel: nobody can follow it.
        return False
    async with _publish_lock(node, view.user):
        return await _publish_news(node, view, await node.store.get(_last_key(view.user)))


async def refresh_status(
    node: Node,
    user: str,
    *,
    online: bool | None = None,
    write: KeyWrite | None = None,
) -> tuple[StatusView, bool]:
    """Read the user's view (``online`` as in :func:`status_view`) and publish
    it if it changed: :func:`status_view` then :func:`publish_if_changed`, with
    the last published state read in the same command as the user's keys.
    ``write``: (key, value or None to delete, ttl_s) of one of the user's keys
    to write first, in that same command. Returns the view and whether it was
    published."""
    keys = (_chosen_key(user), _in_call_key(user), _last_key(user))
    if node.policy.options(status_channel(user)) is None:
        # Nobody can follow this user id: nothing to publish.
        view, _ = await _read_view(node, user, online, keys, write)
        return view, False
    async with _publish_lock(node, user):
        view, values = await _read_view(node, user, online, keys, write)
        return view, await _publish_news(node, view, values[2])


async def _publish_news(node: Node, view: StatusView, last: str | None) -> bool:
    """Publish ``view`` unless ``last`` (the last state published) is the
    same; under the user's publish lock.

    The command that marks the publication as the last one also reads the
    user's state again. Two instances changing it at once (a status chosen on
    two devices, a call accepted while the user picks one) each publish what
    they read, in either order: the one that read first may publish last,
    leaving fans with the older state. Its second read sees the newer state and
    publishes that too (the channel's order is the broker's, so the last word
    is then right), at no extra round trip when nothing changed."""
    if last == view.signature:
        return False
    user = view.user
    keys = (_chosen_key(user), _in_call_key(user))
    for _ in range(_SETTLE_ROUNDS):
        await node.publish(status_channel(user), orjson.dumps(view.to_json()))
        mark = KeyWrite(_last_key(user), view.signature, CHOSEN_TTL_S)
        # Online stays online: "offline" is the sweep's word, after the grace (a
        # connection that closed meanwhile must not flash "offline"); an offline
        # view asks the store, where a connection made meanwhile shows.
        online = True if view.online else None
        now, _ = await _read_view(node, user, online, keys, mark)
        if now.signature == view.signature:
            return True
        view = now
    log.debug("presence: status of %s still moving after %d publications", user, _SETTLE_ROUNDS)
    return True


@contextlib.asynccontextmanager
async def _publish_lock(node: Node, user: str) -> AsyncIterator[None]:
    """Serializes status publishing for one user on one node."""
    lock = _publish_locks.setdefault((id(node), user), asyncio.Lock())
    try:
        async with lock:
            yield
    finally:
        if not lock.locked() and not getattr(lock, "_waiters", None):
            _publish_locks.pop((id(node), user), None)


# One lock per (node, user) while a status publish is in flight.
_publish_locks: dict[tuple[int, str], asyncio.Lock] = {}


async def set_status(
    node: Node, user: str, chosen: Availability, *, online: bool | None = None
) -> StatusView:
    """Record ``user``'s chosen availability and publish the change
    (``online`` as in :func:`status_view`)."""
    write = KeyWrite(_chosen_key(user), chosen, CHOSEN_TTL_S)
    view, _ = await refresh_status(node, user, online=online, write=write)
    return view


async def set_call_busy(
    node: Node, user: str, call_id: str, busy: bool, *, while_key: str | None = None
) -> None:
    """Mark ``user`` in the call ``call_id`` (``busy=True``: their status is
    ``busy``) or out of it, and publish the change. For the calls handler;
    safe to call from any instance, and twice: out of a call clears the mark
    only while it is that call's (a late retry leaves the next call's).
    ``while_key``: a key of the user's own (their hash tag) that must still
    hold ``call_id`` for the mark to be written: the call's busy flag, which
    its end releases before clearing the mark, so that a mark written late
    (an accept racing a hang-up) never outlives the call.

    Raises:
        BrokerUnavailable: the store or broker cannot be reached.
    """
    ttl = node.settings.call_max_duration_s + 300.0
    key = _in_call_key(user)
    if busy:
        guard = None if while_key is None else (while_key, call_id)
        write = KeyWrite(key, call_id, ttl, guard=guard)
    else:
        write = KeyWrite(key, None, only_if=call_id)
    # A connection of theirs here: online, without asking the store.
    online = True if node.user_connection_count(user) else None
    await refresh_status(node, user, online=online, write=write)


# --- RPC methods ------------------------------------------------------------------------


async def rpc_set_status(ctx: RpcContext, data: JSON) -> JSON:
    """``user.set_status {status}``: ``available``, ``busy``, ``away`` or
    ``dnd``. Returns the caller's view. Errors: 107 unknown status."""
    args = object_args(data)
    value = args.get("status")
    chosen = _AVAILABILITIES.get(value) if isinstance(value, str) else None
    if chosen is None:
        raise bad_request()
    # The caller is connected here, whatever the store says yet.
    view = await set_status(ctx.node, ctx.user, chosen, online=True)
    return view.to_json()


async def rpc_status(ctx: RpcContext, data: JSON) -> JSON:
    """``user.status {users: [id, ...]}``: ``{"statuses": {id: view}}`` for up
    to 100 users. Errors: 106 more than 100, 107 malformed."""
    args = object_args(data)
    users = args.get("users")
    if not isinstance(users, list):
        raise bad_request()
    if len(users) > MAX_STATUS_USERS:
        raise SignalError(ERROR_LIMIT_EXCEEDED)
    ids = list(dict.fromkeys(check_user(u) for u in users))
    views = await asyncio.gather(*(status_view(ctx.node, u) for u in ids))
    statuses: JSONObject = {view.user: view.to_json() for view in views}
    return {"statuses": statuses}


# --- online/offline tracking ------------------------------------------------------------------


class PresenceTracker:
    """Connection hooks and the background loops of one node.

    Users' transitions are recorded in batches: the hooks only note the user,
    and one loop records every user noted since its last round with a few
    commands for all of them (one ZADD and one ZREM per sorted set) and one
    read per user going online. Before, each transition was a task, a
    per-user lock and four round trips: ≈ 9 % of a connection's set-up in a
    reconnect storm. A user who connects and leaves within one round is
    recorded by the final count only (the flap is never published)."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self._store = node.store
        grace = node.settings.offline_grace_s
        self._grace_s = grace
        self._node_ttl_s = node_ttl_s(grace)
        self._heartbeat_s = self._node_ttl_s / 4
        # Offline checks are polled this often: a small fraction of the grace.
        self._tick_s = min(1.0, max(0.05, grace / 4))
        # Users with a connection on this node, as last recorded.
        self._local: set[str] = set()
        # Users whose connection count reached 1 or 0 since the last round.
        self._noted: set[str] = set()
        self._noted_event = asyncio.Event()
        # Users whose last transition failed to reach the store.
        self._pending: set[str] = set()
        # Set by the heartbeat when siblings took this node for dead.
        self._resync_due = False
        # When the loop next looks for nodes that stopped beating (monotonic).
        self._next_reap = 0.0

    def register(self) -> None:
        node = self._node
        node.on_connect.append(self.on_connect)
        node.on_disconnect.append(self.on_disconnect)
        # Separate loops: a sweep of thousands of due users (after a restart)
        # must not hold the heartbeat back, or siblings take this node for dead.
        node.run_in_background(self.run_heartbeat, "presence-heartbeat")
        node.run_in_background(self.run, "presence-loop")
        node.run_in_background(self.run_transitions, "presence-transitions")
        node.on_close.append(self.flush)

    async def on_connect(self, event: ConnectionEvent) -> None:
        """First connection of a user on this node."""
        if event.user_connections == 1:
            self._note(event.user)

    async def on_disconnect(self, event: ConnectionEvent) -> None:
        """Last connection of a user on this node closed."""
        if event.user_connections == 0:
            self._note(event.user)

    def _note(self, user: str) -> None:
        self._noted.add(user)
        self._noted_event.set()

    async def run_transitions(self) -> None:
        """Record noted users' transitions, one round after the other."""
        while True:
            await self._noted_event.wait()
            self._noted_event.clear()
            await self.record_transitions()

    async def flush(self) -> None:
        """Record every user noted so far (the node is closing)."""
        while self._noted:
            await self.record_transitions()

    async def record_transitions(self) -> None:
        """One round: record where each noted user stands on this node now
        (rounds run one at a time, so a user's records keep their order). On
        a store failure the users are retried by the loop, or nobody would
        ever see them change."""
        users = self._noted
        if len(users) > _TRANSITIONS_PER_ROUND:
            batch = set(itertools.islice(users, _TRANSITIONS_PER_ROUND))
            users -= batch
            self._noted_event.set()  # the rest in the next round
        else:
            batch, self._noted = users, set()
        if not batch:
            return
        try:
            await self._record(batch)
        except Exception as exc:
            if isinstance(exc, BrokerUnavailable):
                log.warning("presence: %d users not recorded, will retry: %s", len(batch), exc)
            else:
                log.exception("presence: recording %d users failed, will retry", len(batch))
            self._pending |= batch

    async def _record(self, users: set[str]) -> None:
        """List the users online here as this node's (their offline checks
        cancelled) and publish "online" where it is news; schedule an
        offline check after the grace for the others."""
        node, store = self._node, self._store
        online = [user for user in users if node.user_connection_count(user)]
        offline = [user for user in users if not node.user_connection_count(user)]
        self._local.update(online)
        self._local.difference_update(offline)
        now = time.time()
        mine = _node_users_key(node.name)
        writes: list[Awaitable[object]] = []
        if online:
            writes += (
                store.zadd_members(mine, [(user, now) for user in online]),
                store.zrem_members(OFFLINE_DUE_KEY, online),
            )
        if offline:
            due = now + self._grace_s
            writes += (
                store.zadd_members(OFFLINE_DUE_KEY, [(user, due) for user in offline]),
                store.zrem_members(mine, offline),
            )
        # One read per user going online: their own keys and the last state
        # published (one hash tag, one command).
        reads = store.get_groups([(_chosen_key(u), _in_call_key(u), _last_key(u)) for u in online])
        done: list[Any] = await asyncio.gather(reads, *writes)
        values: list[list[str | None]] = done[0]
        changed = []
        for user, (chosen, in_call, last) in zip(online, values, strict=True):
            view = _view(user, True, chosen, in_call, None)
            if last != view.signature:
                changed.append(view)
        # Only news is published; publish_if_changed reads the last state
        # again under its lock (another hook may have published meanwhile).
        for start in range(0, len(changed), _PUBLISHES_AT_ONCE):
            some = changed[start : start + _PUBLISHES_AT_ONCE]
            await asyncio.gather(*(publish_if_changed(node, view) for view in some))

    async def run_heartbeat(self) -> None:
        """Keep this node listed as alive, every quarter of its TTL."""
        await self._repeat(self.beat, self._heartbeat_s, "heartbeat")

    async def run(self) -> None:
        """Republish after being taken for dead, reap dead nodes, retry failed
        transitions, publish due offline transitions."""
        await self._repeat(self._tick, self._tick_s, "loop")

    async def _repeat(self, step: Callable[[], Awaitable[None]], every_s: float, what: str) -> None:
        # Nobody would ever go offline (or stay listed alive) without these
        # loops: a failed round is logged and the next one comes.
        while True:
            try:
                await step()
            except BrokerUnavailable as exc:
                log.warning("presence %s: broker unavailable: %s", what, exc)
            except Exception:
                log.exception("presence %s failed; carrying on", what)
            await asyncio.sleep(every_s)

    async def beat(self) -> None:
        """One heartbeat; notes (for :meth:`run`) if this node was taken for dead."""
        store, me = self._store, self._node.name
        if await store.get(_reaped_key(me)):
            await store.delete(_reaped_key(me))
            self._resync_due = True
        await store.zadd(NODES_KEY, me, time.time() + self._node_ttl_s)

    async def _tick(self) -> None:
        await self._resync_if_due()
        if time.monotonic() >= self._next_reap:
            self._next_reap = time.monotonic() + self._heartbeat_s
            await self.reap_dead_nodes()
        if self._pending:
            self._noted |= self._pending
            self._pending.clear()
            self._noted_event.set()
        await self.sweep()

    async def heartbeat(self) -> None:
        """One round of both loops' node work, for a caller driving the
        tracker by hand: beat, resync if this node was taken for dead, reap
        the nodes that stopped beating."""
        await self.beat()
        await self._resync_if_due()
        await self.reap_dead_nodes()

    async def _resync_if_due(self) -> None:
        if self._resync_due:
            self._resync_due = False
            await self._resync()

    async def reap_dead_nodes(self) -> None:
        me = self._node.name
        now = time.time()
        lease = now + _REAP_LEASE_S
        for dead, _ in await self._store.zpop_due(NODES_KEY, now, 10, lease=lease):
            if dead != me:
                await self._reap(dead)
            # Done (a node that came back and beat meanwhile keeps its entry).
            await self._store.zrem_scored(NODES_KEY, [(dead, lease)])

    async def _reap(self, dead: str) -> None:
        """Take over a dead node's users: drop its online records of them and
        check them now. Each batch leaves the node's set once done: a reap cut
        short is taken up again where it stopped (the node's lease)."""
        store = self._store
        log.info("presence: node %s stopped heartbeating; checking its users", dead)
        await store.set(_reaped_key(dead), "1", _REAPED_FLAG_TTL_S)
        users_key = _node_users_key(dead)
        while users := await store.zrange_by_score(users_key, -math.inf, math.inf, _REAP_BATCH):
            now = time.time()
            forget = self._node.user_presence.forget_node
            await asyncio.gather(*(forget(u, dead) for u, _ in users))
            await store.zadd_members(OFFLINE_DUE_KEY, [(u, now) for u, _ in users])
            await store.zrem_scored(users_key, users)

    async def _resync(self) -> None:
        """This node was taken for dead: its users are recorded again in the
        next round, which lists them as this node's and publishes them online
        (others published them offline)."""
        log.warning("presence: node %s was taken for dead; republishing its users", self._node.name)
        for user in self._local:
            self._note(user)

    async def sweep(self) -> None:
        """Publish ``offline`` for due users who are online nowhere."""
        node = self._node
        now = time.time()
        lease = now + _SWEEP_LEASE_S
        due = await self._store.zpop_due(OFFLINE_DUE_KEY, now, 200, lease=lease)
        for user, _ in due:
            if node.user_connection_count(user):
                continue
            view = await status_view(node, user)
            if not view.online:
                # A connection elsewhere that published "online" between our
                # read and our publish is seen by _publish_news's second read.
                await publish_if_changed(node, view)
        # Done: a check scheduled anew meanwhile (another disconnect) stays.
        await self._store.zrem_scored(OFFLINE_DUE_KEY, [(user, lease) for user, _ in due])


def register(node: Node) -> None:
    node.register_rpc("user.set_status", rpc_set_status)
    node.register_rpc("user.status", rpc_status)
    PresenceTracker(node).register()
