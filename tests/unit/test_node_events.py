"""Connection events on an in-process node: a session's close runs its
channel cleanup, the user's presence and the disconnect hooks in ONE
background task, in that order, each failure logged without stopping the
rest; a cancelled event closes the steps it did not start."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from handlers import app
from signaling.config import Settings
from signaling.metrics import Metrics
from signaling.node import ConnectionEvent, Node
from signaling.protocol import ClientInfo
from signaling.server import build_node
from signaling.session import ClientSession


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    node = build_node(Settings(dev=True, port=0), app, Metrics())
    await node.start()
    yield node
    await node.close()


class FakeSession:
    """What the node reads of a session here: its identity in a set, its id."""

    def __init__(self, client_id: str) -> None:
        self.client_id = client_id


def fake_session(client_id: str) -> ClientSession:
    return cast(ClientSession, FakeSession(client_id))


def background(node: Node) -> set[asyncio.Task[Any]]:
    return set(node._background)


async def settle(tasks: set[asyncio.Task[Any]]) -> None:
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)


async def test_close_runs_cleanup_presence_and_hooks_in_order_in_one_task(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    ran: list[str] = []

    async def failing_hook(event: ConnectionEvent) -> None:
        ran.append(f"failing:{event.user_connections}")
        raise RuntimeError("hook bug")

    async def recording_hook(event: ConnectionEvent) -> None:
        ran.append(f"recording:{event.user_connections}")

    async def cleanup() -> None:
        ran.append("cleanup")

    node.on_disconnect[:] = [failing_hook, recording_hook]
    session = fake_session("c1")
    before = background(node)
    node.session_connected(session, "fan")
    await settle(background(node) - before)
    assert await node.user_presence.is_online("fan")

    before = background(node)
    node.session_closed(session, "fan", cleanup())
    started = background(node) - before
    assert [task.get_name() for task in started] == ["disconnect-event"]
    with caplog.at_level(logging.ERROR, logger="signaling.node"):
        await settle(started)
    # The failing hook did not keep the next one, nor the presence step, from running.
    assert ran == ["cleanup", "failing:0", "recording:0"]
    assert "background task hook-failing_hook failed" in caplog.text
    assert not await node.user_presence.is_online("fan")
    assert node.user_connection_count("fan") == 0


async def test_second_connection_of_a_user_runs_hooks_only(node: Node) -> None:
    events: list[int] = []

    async def hook(event: ConnectionEvent) -> None:
        events.append(event.user_connections)

    node.on_connect[:] = [hook]
    before = background(node)
    node.session_connected(fake_session("c1"), "fan")
    node.session_connected(fake_session("c2"), "fan")
    await settle(background(node) - before)
    assert events == [1, 2]


async def test_cancelled_event_closes_the_steps_it_did_not_start(node: Node) -> None:
    blocked = asyncio.Event()

    async def blocking() -> None:
        blocked.set()
        await asyncio.sleep(3600)

    async def never() -> None:
        raise AssertionError("ran after the cancellation")

    later = never()
    before = background(node)
    node.spawn_steps([("blocking", blocking()), ("later", later)], "event")
    (task,) = background(node) - before
    await blocked.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Closed, not left to be garbage-collected as "never awaited".
    assert inspect.getcoroutinestate(later) == inspect.CORO_CLOSED


async def test_closed_connections_leave_presence_in_rounds(node: Node) -> None:
    """Presence removal and leave pushes of connections closed together go to
    the broker in one round, a few commands for all of them."""
    calls: list[tuple[str, int]] = []
    presence, broker = node.presence, node.broker
    remove, publish = presence.remove_presences, broker.publish_leaves

    async def counted_remove(entries: Any) -> None:
        calls.append(("remove", len(entries)))
        await remove(entries)

    async def counted_publish(leaves: Any) -> None:
        calls.append(("leaves", len(leaves)))
        await publish(leaves)

    infos = [ClientInfo(f"u{i}", f"c{i}") for i in range(100)]
    for info in infos:
        await presence.add_presence("room:cre", info, 60)
    presence.remove_presences = counted_remove  # type: ignore[method-assign]
    broker.publish_leaves = counted_publish  # type: ignore[method-assign]
    before = background(node)
    for info in infos:
        node.leave_presence(info, [("room:cre", True), ("status:cre", False)])
    await settle(background(node) - before)
    # One round: 200 presence entries, 100 leaves (only room:cre has join/leave).
    assert calls == [("remove", 200), ("leaves", 100)]
    assert await presence.presence("room:cre") == {}


async def test_close_lets_queued_connection_work_finish() -> None:
    """A drain's last closes: their events, the leave round they queue and
    the handlers' on_close work are written before the node stops."""
    node = build_node(Settings(dev=True, port=0), app, Metrics())
    await node.start()
    release = asyncio.Event()
    done: list[str] = []

    async def slow_hook(event: ConnectionEvent) -> None:
        await release.wait()
        done.append(f"hook:{event.user}")

    async def flush() -> None:
        done.append("flush")

    node.on_disconnect.append(slow_hook)
    node.on_close.append(flush)
    info = ClientInfo("fan", "c1")
    await node.presence.add_presence("room:cre", info, 60)
    session = fake_session("c1")
    node.session_connected(session, "fan")

    async def leave() -> None:
        node.leave_presence(info, [("room:cre", True)])

    node.session_closed(session, "fan", leave())
    asyncio.get_running_loop().call_later(0.05, release.set)
    await node.close()
    assert done == ["hook:fan", "flush"]
    assert await node.presence.presence("room:cre") == {}


async def test_the_node_loops_outlive_an_error_the_store_answers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is not "unavailable" (Redis answering OOM or READONLY,
    say) is logged and the periodic refresh and position check go on: had
    they stopped, every user here would expire "offline" while connected,
    and lost publications would go unnoticed."""
    from signaling import node as node_module

    monkeypatch.setattr(node_module, "POSITION_CHECK_S", 0.01)
    node = build_node(Settings(dev=True, port=0), app, Metrics())
    node.user_presence.ttl_s = 0.03  # refreshed every 10 ms
    calls = {"refresh": 0, "check": 0}

    async def refresh(users: list[str]) -> None:
        calls["refresh"] += 1
        if calls["refresh"] == 1:
            raise RuntimeError("OOM command not allowed when used memory > 'maxmemory'")

    async def check_positions(confirm_delay_s: float = 1.0) -> None:
        calls["check"] += 1
        if calls["check"] == 1:
            raise RuntimeError("READONLY You can't write against a read only replica")

    monkeypatch.setattr(node.user_presence, "refresh", refresh)
    monkeypatch.setattr(node, "check_positions", check_positions)
    await node.start()
    try:
        for _ in range(200):
            if calls["refresh"] >= 3 and calls["check"] >= 3:
                break
            await asyncio.sleep(0.01)
    finally:
        await node.close()
    assert calls["refresh"] >= 3 and calls["check"] >= 3, calls
    assert "refreshing user presence failed" in caplog.text
    assert "position check failed" in caplog.text
