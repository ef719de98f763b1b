"""History pages on a real Redis match the embedded broker's (tests/unit/
test_memory_broker.py): forward and backward, from a position and not, with
and without a limit. Backward from a position, the publication at the
position itself is not in the page (XREVRANGE's end bound needs its
sequence part for that)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from signaling.broker.base import Broker, HistoryOptions
from signaling.broker.memory import MemoryBroker
from signaling.broker.redis import RedisBroker
from signaling.protocol import Publication, StreamPosition
from support.handlers import LeaveRecorder
from support.processes import RedisProcess

HISTORY = HistoryOptions(100, 300)


@pytest.fixture(params=["memory", "redis"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    if request.param == "memory":
        chosen: Broker = MemoryBroker()
    else:
        server: RedisProcess = request.getfixturevalue("redis_server")
        chosen = RedisBroker(server.url)
    chosen.bind(LeaveRecorder())
    await chosen.start()
    try:
        yield chosen
    finally:
        await chosen.close()


async def offsets(
    broker: Broker,
    *,
    since: StreamPosition | None = None,
    limit: int = -1,
    reverse: bool = False,
) -> list[int]:
    page = await broker.history(
        "room:h", since=since, limit=limit, reverse=reverse, history=HISTORY
    )
    return [p.offset for p in page.publications]


async def test_history_pages_in_both_directions(broker: Broker) -> None:
    for n in range(5):
        top = await broker.publish("room:h", Publication(b'{"n":%d}' % n), HISTORY)
    at = lambda offset: StreamPosition(offset, top.epoch)  # noqa: E731
    assert await offsets(broker) == [1, 2, 3, 4, 5]
    assert await offsets(broker, reverse=True) == [5, 4, 3, 2, 1]
    assert await offsets(broker, limit=2, reverse=True) == [5, 4]
    assert await offsets(broker, since=at(2)) == [3, 4, 5]
    assert await offsets(broker, since=at(2), limit=2) == [3, 4]
    assert await offsets(broker, since=at(5)) == []
    assert await offsets(broker, since=at(4), reverse=True) == [3, 2, 1]
    assert await offsets(broker, since=at(4), reverse=True, limit=1) == [3]
    assert await offsets(broker, since=at(1), reverse=True) == []
    assert await offsets(broker, since=at(0), reverse=True) == []
