"""The ping wheel, driven by calling ``tick(now)`` directly (no event loop)."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable, Iterator

import pytest

from signaling.heartbeat import Heartbeat


class FakeConn:
    def __init__(self, name: str) -> None:
        self.name = name
        self.pings: list[int] = []
        self.checks: list[int] = []
        self.on_check: Callable[[], None] | None = None
        self.on_ping: Callable[[], None] | None = None

    def send_ping(self, now: float) -> None:
        self.pings.append(int(now))
        if self.on_ping is not None:
            self.on_ping()

    def check_pong(self, now: float) -> None:
        self.checks.append(int(now))
        if self.on_check is not None:
            self.on_check()

    def __repr__(self) -> str:
        return f"FakeConn({self.name})"


@pytest.fixture(autouse=True)
def _seeded_random() -> Iterator[None]:
    # Slots are chosen with the module-level random; make runs reproducible
    # and leave the global generator as it was.
    state = random.getstate()
    random.seed(1234)
    yield
    random.setstate(state)


def _run(hb: Heartbeat, start: int, ticks: int) -> int:
    for now in range(start, start + ticks):
        hb.tick(float(now))
    return start + ticks


def test_each_conn_pinged_once_per_interval() -> None:
    interval, timeout = 5, 2
    hb = Heartbeat(ping_interval_s=interval, pong_timeout_s=timeout)
    conns = [FakeConn(str(i)) for i in range(50)]
    for c in conns:
        hb.add(c)
    assert len(hb) == 50

    # The first interval pings everybody exactly once.
    _run(hb, 1, interval)
    assert all(len(c.pings) == 1 for c in conns)
    # Pings are spread over the slots, not all at once.
    assert len({c.pings[0] for c in conns}) > 1

    _run(hb, 1 + interval, 5 * interval)
    for c in conns:
        assert len(c.pings) == 6, c
        gaps = {b - a for a, b in zip(c.pings, c.pings[1:], strict=False)}
        assert gaps == {interval}, c


def test_check_pong_follows_each_ping_after_timeout() -> None:
    interval, timeout = 5, 2
    hb = Heartbeat(ping_interval_s=interval, pong_timeout_s=timeout)
    conns = [FakeConn(str(i)) for i in range(20)]
    for c in conns:
        hb.add(c)
    end = _run(hb, 1, 6 * interval)

    for c in conns:
        expected = [p + timeout for p in c.pings if p + timeout < end]
        # A check for a slot also happens before its first ping when the
        # wheel passes the slot's check position first; those come earlier.
        assert [t for t in c.checks if t > c.pings[0]] == expected, c
        assert len(c.checks) - len(expected) <= 1, c


def test_fractional_timeout_rounds_up() -> None:
    hb = Heartbeat(ping_interval_s=10, pong_timeout_s=2.5)
    c = FakeConn("a")
    hb.add(c)
    end = _run(hb, 1, 30)
    assert len(c.pings) == 3
    assert [t for t in c.checks if t > c.pings[0]] == [p + 3 for p in c.pings if p + 3 < end]


def test_removal_stops_calls() -> None:
    hb = Heartbeat(ping_interval_s=4, pong_timeout_s=1)
    a, b = FakeConn("a"), FakeConn("b")
    hb.add(a)
    hb.add(b)
    _run(hb, 1, 8)
    pings_before, checks_before = len(a.pings), len(a.checks)
    assert pings_before == 2

    hb.remove(a)
    hb.remove(a)  # idempotent
    assert len(hb) == 1
    _run(hb, 9, 12)
    assert len(a.pings) == pings_before
    assert len(a.checks) == checks_before
    assert len(b.pings) == 5


def test_remove_unknown_is_noop() -> None:
    hb = Heartbeat(ping_interval_s=4, pong_timeout_s=1)
    hb.remove(FakeConn("never-added"))
    assert len(hb) == 0
    _run(hb, 1, 8)


def test_check_that_removes_itself_during_tick_is_safe() -> None:
    interval, timeout = 3, 1
    hb = Heartbeat(ping_interval_s=interval, pong_timeout_s=timeout)
    conns = [FakeConn(str(i)) for i in range(30)]
    for c in conns:
        hb.add(c)
    # Every connection fails its pong check and closes (removes itself).
    for c in conns:
        c.on_check = lambda c=c: hb.remove(c)

    _run(hb, 1, 4 * interval)

    assert len(hb) == 0
    for c in conns:
        assert len(c.checks) == 1, c
        assert len(c.pings) <= 1, c


def test_send_ping_that_removes_itself_during_tick_is_safe() -> None:
    hb = Heartbeat(ping_interval_s=2, pong_timeout_s=1)
    conns = [FakeConn(str(i)) for i in range(10)]
    for c in conns:
        hb.add(c)
        c.on_ping = lambda c=c: hb.remove(c)
    _run(hb, 1, 6)
    assert len(hb) == 0
    assert all(len(c.pings) == 1 for c in conns)


def test_check_that_removes_another_conn_prevents_its_ping() -> None:
    hb = Heartbeat(ping_interval_s=2, pong_timeout_s=1)
    checker, victim = FakeConn("checker"), FakeConn("victim")
    hb.add(checker)
    hb.add(victim)
    # Force the layout: victim is pinged the tick checker is checked.
    hb.remove(checker)
    hb.remove(victim)
    hb._slots[0].add(checker)
    hb._where[checker] = 0
    hb._slots[1].add(victim)
    hb._where[victim] = 1
    checker.on_check = lambda: hb.remove(victim)

    hb.tick(1.0)  # index 1: checks slot 0 first, then pings slot 1
    assert checker.checks == [1]
    assert victim.pings == []
    assert len(hb) == 1
    _run(hb, 2, 6)
    assert victim.pings == []
    assert victim.checks == []
    assert checker.pings == [2, 4, 6]
    assert checker.checks == [1, 3, 5, 7]


def test_len_counts_added() -> None:
    hb = Heartbeat(ping_interval_s=25, pong_timeout_s=10)
    conns = [FakeConn(str(i)) for i in range(7)]
    for c in conns:
        hb.add(c)
    assert len(hb) == 7
    hb.remove(conns[0])
    assert len(hb) == 6


def test_sub_second_interval_pings_every_tick() -> None:
    hb = Heartbeat(ping_interval_s=0.5, pong_timeout_s=0.2)
    c = FakeConn("a")
    hb.add(c)
    _run(hb, 1, 4)
    assert c.pings == [1, 2, 3, 4]


# The wheel's tick in the stall tests: long beside a loaded machine's jitter.
TICK = 0.05


async def six_ticks_with_a_stall(
    monkeypatch: pytest.MonkeyPatch, stall_s: float
) -> list[tuple[float, float]]:
    """The wheel's own loop, ticking every TICK s, stalled ``stall_s`` after
    the second tick: each tick's (time passed to it, loop time it ran at),
    counted from before the start."""
    from signaling import heartbeat as heartbeat_module

    monkeypatch.setattr(heartbeat_module, "TICK_S", TICK)
    hb = Heartbeat(ping_interval_s=10, pong_timeout_s=5)
    loop = asyncio.get_running_loop()
    start = loop.time()
    seen: list[tuple[float, float]] = []

    def tick(now: float) -> None:
        seen.append((now - start, loop.time() - start))
        if len(seen) == 2:
            time.sleep(stall_s)

    monkeypatch.setattr(hb, "tick", tick)
    hb.start()
    try:
        while len(seen) < 6:
            await asyncio.sleep(0.01)
    finally:
        hb.stop()
    return seen[:6]


async def test_a_late_tick_gives_its_pings_the_deadline_of_when_it_was_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each tick passes its scheduled time, whatever the loop's lateness: a
    ping sent late must not push its pong's deadline past the check that
    comes ``pong_lag`` ticks later on time."""
    seen = await six_ticks_with_a_stall(monkeypatch, TICK * 0.4)  # less than a tick
    steps = [round(given / TICK, 6) for given, _ in seen]
    assert steps == pytest.approx([1, 2, 3, 4, 5, 6], abs=0.01), steps


async def test_a_loop_stalled_for_several_ticks_starts_again_without_a_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Missed ticks are not run back to back after a long stall: each would
    ping one slot and check another pinged a moment before in the same
    burst, whose pongs could not have come yet (3012 to a share of clients)."""
    seen = await six_ticks_with_a_stall(monkeypatch, TICK * 5)
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(seen[2:])]
    assert min(gaps) > TICK * 0.9, gaps  # a tick's interval apart, not a burst
