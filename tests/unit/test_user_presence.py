"""Who is online across instances (signaling/users.py), on the memory store
(the Redis store meets the same contract: tests/integration/test_state_store.py,
``get_many_live``)."""

from __future__ import annotations

import time

from signaling.state.base import KeyWrite
from signaling.state.memory import MemoryStateStore
from signaling.users import UserPresence, UserStatus


async def test_online_while_a_node_holds_the_user_then_last_seen() -> None:
    store = MemoryStateStore()
    here, there = UserPresence(store, "node-a"), UserPresence(store, "node-b")
    assert await here.status("alice") == UserStatus(False, None)  # never seen
    await here.went_online("alice")
    await there.went_online("alice")
    assert await there.status("alice") == UserStatus(True, None)
    await here.went_offline("alice")
    assert await here.is_online("alice")  # node-b still holds her
    before = time.time()
    await there.went_offline("alice")
    status = await here.status("alice")
    assert status.online is False
    # Stamped to the millisecond, rounded: up to half a millisecond ahead.
    assert status.last_seen is not None and before - 1 <= status.last_seen <= time.time() + 0.001


async def test_status_and_read_writes_reads_and_looks_up_presence_together() -> None:
    store = MemoryStateStore()
    presence = UserPresence(store, "node-a")
    chosen, in_call = "presence:status:{bob}", "presence:in-call:{bob}"
    await store.set(chosen, "away")
    write = KeyWrite(in_call, "1", 60)
    status, values = await presence.status_and_read("bob", (chosen, in_call), write)
    assert status == UserStatus(False, None)
    assert values == ["away", "1"]  # the write is read back; seen is not among them
    await presence.went_online("bob")
    status, values = await presence.status_and_read("bob", (in_call,), KeyWrite(in_call, None))
    assert status == UserStatus(True, None)
    assert values == [None]
    assert await store.get(in_call) is None
    # A record whose node stopped refreshing it ages out.
    await store.zadd("online:{bob}", "node-a", time.time() - 1)
    status, values = await presence.status_and_read("bob", ())
    assert status.online is False and values == []
