"""Two instances changing one user's status at once, on a real Redis: whatever
order their publications land in, ``status:<user>`` ends on the newer state
(handlers.presence._publish_news reads the state again after publishing)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from handlers import app
from handlers.presence import set_status, status_view
from signaling.config import Settings
from signaling.node import Node
from support.nodes import started_nodes
from support.processes import RedisProcess


@pytest.fixture
async def two_nodes(redis_server: RedisProcess) -> AsyncIterator[tuple[Node, Node]]:
    settings = Settings(dev=True, port=0, redis_url=redis_server.url, viewer_count_interval_s=60.0)
    async with started_nodes(settings, app, 2) as (a, b):
        yield a, b


async def latest(node: Node, channel: str) -> Any:
    page = await node.broker.history(
        channel, since=None, limit=-1, reverse=False, history=node.channel_options(channel).history
    )
    pub = page.publications[-1]
    # From Redis a publication comes as the body that crossed the broker.
    return orjson.loads(pub.body)["data"] if pub.body else orjson.loads(pub.data)


async def test_the_channel_ends_on_the_newer_state_whatever_lands_last(
    two_nodes: tuple[Node, Node], monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = two_nodes
    await a.user_presence.went_online("cre")
    # Instance a has written "busy" and read it back; its publication is held
    # until instance b has written "away", read it and published it.
    entered, release = asyncio.Event(), asyncio.Event()
    publish = a.publish

    async def held_publish(channel: str, data: bytes, **kwargs: Any) -> Any:
        if channel == "status:cre" and not release.is_set():
            entered.set()
            await release.wait()
        return await publish(channel, data, **kwargs)

    monkeypatch.setattr(a, "publish", held_publish)
    first = asyncio.create_task(set_status(a, "cre", "busy", online=True))
    await asyncio.wait_for(entered.wait(), 5)
    await set_status(b, "cre", "away", online=True)
    assert (await latest(b, "status:cre"))["status"] == "away"
    release.set()
    await asyncio.wait_for(first, 5)  # a's "busy" lands after b's "away"...

    # ... and a, reading again, publishes "away" after it.
    assert (await latest(b, "status:cre"))["status"] == "away"
    assert (await status_view(b, "cre")).status == "away"
    # What is marked as published is what fans saw last: setting "away" once
    # more publishes nothing new.
    before = await latest(b, "status:cre")
    await set_status(b, "cre", "away", online=True)
    assert await latest(b, "status:cre") == before
