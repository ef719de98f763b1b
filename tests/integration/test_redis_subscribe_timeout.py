"""A subscribe that Redis does not confirm in time fails as a temporary error,
for every connection waiting on it, and a later one succeeds again; the node
does not stay subscribed to a channel whose first subscriber gave up."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest

from handlers import app
from signaling.broker import redis_pubsub
from signaling.broker.base import BrokerUnavailable
from signaling.broker.redis import RedisBroker
from signaling.config import Settings
from signaling.metrics import Metrics
from signaling.server import build_node
from support.handlers import LeaveRecorder
from support.processes import RedisProcess


async def test_unconfirmed_subscribe_fails_every_waiter_then_recovers(
    redis_factory: Callable[..., RedisProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_pubsub, "SUBSCRIBE_TIMEOUT_S", 0.3)
    redis = redis_factory()
    broker = RedisBroker(redis.url)
    broker.bind(LeaveRecorder())
    await broker.start()
    assert broker.is_ready()
    assert redis.proc is not None
    try:
        os.kill(redis.proc.pid, signal.SIGSTOP)  # connected, but silent
        try:
            waiters = [asyncio.ensure_future(broker.subscribe("user:a")) for _ in range(3)]
            done, _ = await asyncio.wait(waiters, timeout=3)
            assert done == set(waiters)
            for waiter in waiters:
                assert isinstance(waiter.exception(), BrokerUnavailable)
            # A waiter that gave up (cancelled) leaves the others theirs.
            lone = asyncio.ensure_future(broker.subscribe("user:b"))
            other = asyncio.ensure_future(broker.subscribe("user:b"))
            await asyncio.sleep(0.05)
            lone.cancel()
            with pytest.raises(BrokerUnavailable):
                await asyncio.wait_for(other, 3)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        await asyncio.wait_for(broker.subscribe("user:a"), 3)
    finally:
        await broker.close()


class NoDeliveries:
    def deliver(self, frame: bytes) -> None:
        raise AssertionError("nothing is delivered here")

    def lost_position(self, channel: str) -> None:
        raise AssertionError("no position to lose")


async def test_a_first_subscriber_that_gave_up_leaves_no_redis_subscription(
    redis_factory: Callable[..., RedisProcess], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The SUBSCRIBE went out but was not confirmed in time: Redis runs it when
    # it can, so the node must follow it with an UNSUBSCRIBE, or the channel's
    # traffic keeps coming to a node where nobody wants it.
    monkeypatch.setattr(redis_pubsub, "SUBSCRIBE_TIMEOUT_S", 0.3)
    redis = redis_factory()
    assert redis.proc is not None
    node = build_node(Settings(dev=True, port=0, redis_url=redis.url), app, Metrics())
    await node.start()
    try:
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(BrokerUnavailable):
                await node.add_subscriber("room:gone", "c1", NoDeliveries(), join_leave=False)
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert not node.hub.has_channel("room:gone")
        # A confirmed subscribe on the same connection: Redis has run what
        # was sent before it.
        await asyncio.wait_for(node.broker.subscribe("room:kept"), 3)
        broker = node.broker
        assert isinstance(broker, RedisBroker)
        names = await broker.executor.execute("PUBSUB", "CHANNELS", "*room:*")
        assert isinstance(names, list)
        assert any(b"room:kept" in n for n in names)
        assert not any(b"room:gone" in n for n in names)
    finally:
        await node.close()
