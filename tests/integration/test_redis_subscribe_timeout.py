"""A subscribe that Redis does not confirm in time fails as a temporary error,
for every connection waiting on it, and a later one succeeds again."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable

import pytest

from signaling.broker import redis_pubsub
from signaling.broker.base import BrokerUnavailable
from signaling.broker.redis import RedisBroker
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
