"""An instance that dies while publishing a call's end, on a real Redis: the
call's timer, run by another instance, publishes the end's event to the
participant who did not get it, and only to them. From Redis a publication
comes back as the body that crossed the broker, which the check must read."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from prometheus_client import CollectorRegistry

from handlers import app
from handlers.calls.metrics import CallMetrics
from handlers.calls.service import CallService
from handlers.channels import personal_channel
from signaling.config import Settings
from signaling.node import Node
from signaling.protocol import publication_data
from support.nodes import started_nodes
from support.processes import RedisProcess

# The handlers' channel policy, none of their hooks or background loops: the
# test runs the call timers itself.
BARE_APP = SimpleNamespace(channel_policy=app.channel_policy, install=lambda node: None)


class Died(Exception):
    pass


class DiesOnTheSecondEnd:
    """A node whose second ``call.ended`` publish kills its instance."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.ends = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)

    async def publish(self, channel: str, data: bytes, **kwargs: Any) -> Any:
        if orjson.loads(data).get("type") == "call.ended":
            self.ends += 1
            if self.ends == 2:
                raise Died
        return await self.node.publish(channel, data, **kwargs)


@pytest.fixture
async def two_nodes(redis_server: RedisProcess) -> AsyncIterator[tuple[Node, Node]]:
    settings = Settings(dev=True, port=0, redis_url=redis_server.url)
    async with started_nodes(settings, BARE_APP, 2) as (a, b):
        yield a, b


async def ends_of(node: Node, user: str, call_id: str) -> int:
    channel = personal_channel(user)
    page = await node.broker.history(
        channel, since=None, limit=-1, reverse=False, history=node.channel_options(channel).history
    )
    events = [publication_data(pub) for pub in page.publications]
    return sum(
        1
        for e in events
        if isinstance(e, dict) and e.get("call_id") == call_id and e.get("type") == "call.ended"
    )


async def test_an_end_half_published_is_completed_once_by_another_instance(
    two_nodes: tuple[Node, Node],
) -> None:
    a, b = two_nodes
    survivor = CallService(b, metrics=CallMetrics(CollectorRegistry()))
    dying = CallService(a, metrics=CallMetrics(CollectorRegistry()))
    dying.node = DiesOnTheSecondEnd(a)  # type: ignore[assignment]
    for user in ("alice", "bob"):
        await b.user_presence.went_online(user)
    call = await survivor.invite("alice", "bob", "video", "")
    await survivor.accept("bob", call.call_id)
    with pytest.raises(Died):
        await dying.end("alice", call.call_id)
    assert sorted([await ends_of(b, u, call.call_id) for u in ("alice", "bob")]) == [0, 1]

    # The survivor's timer loop, as it runs in the server (claim, fire), until
    # the call's timer is gone: about 2 s after the end.
    deadline = time.monotonic() + 15
    while await b.store.zrange_by_score("calls:{timers}", 0, float("inf")):
        assert time.monotonic() < deadline, "the call's timer never went"
        for call_id in await survivor.timers.claim(survivor.clock()):
            await survivor.fire(call_id)
        await asyncio.sleep(0.1)
    assert [await ends_of(b, u, call.call_id) for u in ("alice", "bob")] == [1, 1]
    assert survivor.metrics.events_redelivered._value.get() == 1
    ended = await survivor.calls.get(call.call_id)
    assert ended is not None and ended.unannounced_ms is None
