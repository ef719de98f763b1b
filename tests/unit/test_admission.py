"""Admission control: upgrades are refused while connects take too long."""

from __future__ import annotations

from signaling.admission import ADMIT_FLOOR, ConnectAdmission


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def take(admission: ConnectAdmission, clock: Clock, seconds: float, count: int = 200) -> None:
    """``count`` connects, one after another, each taking ``seconds``."""
    for _ in range(count):
        started = admission.begin()
        clock.now += seconds
        admission.end(started)


def crowd(admission: ConnectAdmission, count: int) -> list[float]:
    return [admission.begin() for _ in range(count)]


def test_fast_connects_admit_every_upgrade_up_to_the_hard_cap() -> None:
    clock = Clock()
    admission = ConnectAdmission(5000, 3.0, clock=clock)
    take(admission, clock, 0.2)
    crowd(admission, 4999)
    assert admission.refusal() is None
    admission.begin()
    assert admission.refusal() == "connecting"


def test_slow_connects_refuse_upgrades_beyond_the_floor() -> None:
    clock = Clock()
    admission = ConnectAdmission(0, 3.0, clock=clock)
    take(admission, clock, 4.0)
    assert admission.latency_s > 3.0
    started = crowd(admission, ADMIT_FLOOR - 1)
    assert admission.refusal() is None  # too few in progress to make a queue
    started.append(admission.begin())
    assert admission.refusal() == "connect_wait"
    # Back under the floor, upgrades are admitted, and fast connects bring the
    # average down again.
    admission.end(started.pop())
    assert admission.refusal() is None
    take(admission, clock, 0.01)
    admission.begin()
    assert admission.refusal() is None


def test_the_average_follows_recent_connects() -> None:
    clock = Clock()
    admission = ConnectAdmission(0, 3.0, clock=clock)
    take(admission, clock, 0.01, count=1000)
    take(admission, clock, 6.0, count=40)
    assert admission.latency_s > 3.0
    take(admission, clock, 0.01, count=40)
    assert admission.latency_s < 3.0


def test_nothing_finishing_while_crowded_refuses() -> None:
    # A broker that stopped answering: connects pile up and none finishes, so
    # the average (of connects that did finish) cannot tell.
    clock = Clock()
    admission = ConnectAdmission(0, 3.0, clock=clock)
    clock.now += 600  # idle for ten minutes: not a stall
    crowd(admission, ADMIT_FLOOR)
    assert admission.refusal() is None
    clock.now += 2.9
    assert admission.refusal() is None
    clock.now += 0.2
    assert admission.refusal() == "connect_wait"


def test_both_limits_off_admit_everything() -> None:
    clock = Clock()
    admission = ConnectAdmission(0, 0.0, clock=clock)
    take(admission, clock, 60.0)
    crowd(admission, 100_000)
    assert admission.refusal() is None


def test_the_hard_cap_is_also_asked_at_connect_time() -> None:
    admission = ConnectAdmission(max_connecting=2, max_wait_s=0)
    assert not admission.at_cap()
    started = [admission.begin(), admission.begin()]
    assert admission.at_cap()
    admission.end(started[0])
    assert not admission.at_cap()
    assert not ConnectAdmission(max_connecting=0, max_wait_s=0).at_cap()  # no cap
