"""How a pub/sub shard matches Redis's subscribe confirmations to the
SUBSCRIBEs it sent: in order, one each (no Redis here: the confirmations are
handed in by the test)."""

from __future__ import annotations

import asyncio

import pytest

from signaling.broker import redis_pubsub
from signaling.broker.base import BrokerUnavailable
from signaling.broker.redis_pubsub import _Shard


class FakeShard(_Shard):
    """Connected, and records what it would send."""

    def __init__(self) -> None:
        super().__init__(
            label="fake",
            control=None,
            wanted=list,
            on_message=lambda name, data: None,
            on_reconnected=lambda: None,
        )
        self.ready = True
        self.sent: list[tuple[bool, str]] = []

    def _connected(self) -> bool:
        return True

    def _send_subscribe(self, subscribe: bool, name: str) -> None:
        self.sent.append((subscribe, name))


async def test_concurrent_subscribes_share_one_subscribe() -> None:
    shard = FakeShard()
    waiters = [asyncio.ensure_future(shard.subscribe("x")) for _ in range(3)]
    await asyncio.sleep(0)
    assert shard.sent == [(True, "x")]
    shard._confirmed("x")
    await asyncio.gather(*waiters)


async def subscribe_unsubscribe_subscribe(
    shard: FakeShard,
) -> tuple[asyncio.Future[None], asyncio.Future[None]]:
    """A subscribe of x waiting, an unsubscribe of x, a subscribe of x again:
    the two subscribes' waits."""
    first = asyncio.ensure_future(shard.subscribe("x"))
    await asyncio.sleep(0)
    shard.unsubscribe("x")
    second = asyncio.ensure_future(shard.subscribe("x"))
    await asyncio.sleep(0)
    return first, second


async def test_a_subscribe_after_an_unsubscribe_sends_its_own() -> None:
    shard = FakeShard()
    first, second = await subscribe_unsubscribe_subscribe(shard)
    assert shard.sent == [(True, "x"), (False, "x"), (True, "x")]
    shard._confirmed("x")  # the first SUBSCRIBE's
    await first
    assert not second.done()
    shard._confirmed("x")
    await second


async def test_a_late_confirmation_is_not_taken_for_a_later_subscribe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_pubsub, "SUBSCRIBE_TIMEOUT_S", 0.01)
    shard = FakeShard()
    with pytest.raises(BrokerUnavailable):
        await shard.subscribe("x")
    shard.unsubscribe("x")
    monkeypatch.setattr(redis_pubsub, "SUBSCRIBE_TIMEOUT_S", 5.0)
    later = asyncio.ensure_future(shard.subscribe("x"))
    await asyncio.sleep(0)
    assert shard.sent == [(True, "x"), (False, "x"), (True, "x")]
    shard._confirmed("x")  # the timed-out SUBSCRIBE's, late
    await asyncio.sleep(0)
    assert not later.done()
    shard._confirmed("x")
    await later
    assert shard._confirm == {}
    assert shard._joinable == {}


async def test_a_lost_connection_fails_every_pending_subscribe() -> None:
    shard = FakeShard()
    first, second = await subscribe_unsubscribe_subscribe(shard)
    shard._lost()
    for waiter in (first, second):
        with pytest.raises(BrokerUnavailable):
            await waiter
