"""The embedded broker: offsets, epochs, bounded history (size, TTL), presence."""

from __future__ import annotations

import asyncio

import pytest

from signaling.broker.base import META_TTL_S, HistoryOptions, UnrecoverablePosition
from signaling.broker.memory import MemoryBroker
from signaling.protocol import ClientInfo, Publication, StreamPosition

HISTORY = HistoryOptions(size=100, ttl_s=60.0)
NO_HISTORY = HistoryOptions()
INFO = ClientInfo(user="42", client="c-1")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Recorder:
    def __init__(self) -> None:
        self.pubs: list[tuple[str, Publication, str]] = []
        self.joins: list[tuple[str, ClientInfo]] = []
        self.leaves: list[tuple[str, ClientInfo]] = []

    def on_publication(self, channel: str, pub: Publication, epoch: str) -> None:
        self.pubs.append((channel, pub, epoch))

    def on_join(self, channel: str, info: ClientInfo) -> None:
        self.joins.append((channel, info))

    def on_leave(self, channel: str, info: ClientInfo) -> None:
        self.leaves.append((channel, info))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def broker(clock: FakeClock, recorder: Recorder) -> MemoryBroker:
    b = MemoryBroker(clock=clock)
    b.bind(recorder)
    return b


def _pub(n: int) -> Publication:
    return Publication(data=b'{"n":%d}' % n, info=INFO)


async def _publish_n(broker: MemoryBroker, channel: str, n: int, opts: HistoryOptions) -> str:
    epoch = ""
    for i in range(1, n + 1):
        pos = await broker.publish(channel, _pub(i), opts)
        epoch = pos.epoch
    return epoch


async def _history(
    broker: MemoryBroker,
    channel: str,
    *,
    since: StreamPosition | None = None,
    limit: int = -1,
    reverse: bool = False,
    opts: HistoryOptions = HISTORY,
) -> tuple[list[int], StreamPosition]:
    page = await broker.history(channel, since=since, limit=limit, reverse=reverse, history=opts)
    return [p.offset for p in page.publications], page.top


# --- offsets and delivery ----------------------------------------------------


async def test_offsets_increase_from_one_in_one_epoch(
    broker: MemoryBroker, recorder: Recorder
) -> None:
    positions = [await broker.publish("room:1", _pub(i), HISTORY) for i in range(1, 6)]
    assert [p.offset for p in positions] == [1, 2, 3, 4, 5]
    epochs = {p.epoch for p in positions}
    assert len(epochs) == 1
    (epoch,) = epochs
    assert epoch

    assert [(c, p.offset, e) for c, p, e in recorder.pubs] == [
        ("room:1", i, epoch) for i in range(1, 6)
    ]
    # The delivered publication keeps data, info and time of what was published.
    _, delivered, _ = recorder.pubs[0]
    assert delivered.data == b'{"n":1}'
    assert delivered.info == INFO


async def test_incoming_offset_is_ignored_with_history(broker: MemoryBroker) -> None:
    pos = await broker.publish("room:1", Publication(data=b"1", offset=77), HISTORY)
    assert pos.offset == 1


async def test_channels_have_independent_streams(broker: MemoryBroker) -> None:
    a = await broker.publish("room:a", _pub(1), HISTORY)
    await broker.publish("room:a", _pub(2), HISTORY)
    b = await broker.publish("room:b", _pub(1), HISTORY)
    assert a.offset == 1
    assert b.offset == 1
    assert a.epoch != b.epoch


async def test_publish_before_bind_fails(clock: FakeClock) -> None:
    broker = MemoryBroker(clock=clock)
    with pytest.raises(RuntimeError):
        await broker.publish("room:1", _pub(1), HISTORY)


async def test_no_history_publishes_with_offset_zero_and_delivers(
    broker: MemoryBroker, recorder: Recorder
) -> None:
    pos = await broker.publish("room:1", _pub(1), NO_HISTORY)
    assert pos == StreamPosition(0, "")
    assert len(recorder.pubs) == 1
    channel, pub, epoch = recorder.pubs[0]
    assert (channel, pub.offset, epoch) == ("room:1", 0, "")
    assert pub.data == b'{"n":1}'
    # Nothing is kept.
    assert await _history(broker, "room:1", opts=NO_HISTORY) == ([], StreamPosition(0, ""))


async def test_no_history_ignores_incoming_offset(broker: MemoryBroker, recorder: Recorder) -> None:
    # Broker contract: "pub.offset is ignored"; a channel without history has
    # no offsets, so what is delivered carries offset 0.
    pos = await broker.publish("room:1", Publication(data=b"1", offset=5), NO_HISTORY)
    assert pos.offset == 0
    assert recorder.pubs[0][1].offset == 0


@pytest.mark.parametrize(
    "opts", [HistoryOptions(size=0, ttl_s=60), HistoryOptions(size=10, ttl_s=0)]
)
async def test_half_configured_history_is_disabled(
    broker: MemoryBroker, recorder: Recorder, opts: HistoryOptions
) -> None:
    assert not opts.enabled
    assert await broker.publish("room:1", _pub(1), opts) == StreamPosition(0, "")
    assert recorder.pubs[0][1].offset == 0


async def test_join_leave_are_delivered(broker: MemoryBroker, recorder: Recorder) -> None:
    await broker.publish_join("room:1", INFO)
    await broker.publish_leave("room:1", INFO)
    assert recorder.joins == [("room:1", INFO)]
    assert recorder.leaves == [("room:1", INFO)]


async def test_batched_leaves_and_presence_removal(
    broker: MemoryBroker, recorder: Recorder
) -> None:
    other = ClientInfo("bob", "c-b1")
    for channel, info in (("room:1", INFO), ("room:1", other), ("room:2", other)):
        await broker.add_presence(channel, info, 60)
    await broker.remove_presences([("room:1", INFO.client), ("room:2", other.client)])
    assert await broker.presence("room:1") == {other.client: other}
    assert await broker.presence("room:2") == {}
    await broker.publish_leaves([("room:1", INFO), ("room:2", other)])
    assert recorder.leaves == [("room:1", INFO), ("room:2", other)]


# --- history -----------------------------------------------------------------


async def test_history_forward_reverse_and_limits(broker: MemoryBroker) -> None:
    epoch = await _publish_n(broker, "room:1", 5, HISTORY)
    top = StreamPosition(5, epoch)

    assert await _history(broker, "room:1") == ([1, 2, 3, 4, 5], top)
    assert await _history(broker, "room:1", reverse=True) == ([5, 4, 3, 2, 1], top)
    assert await _history(broker, "room:1", limit=2) == ([1, 2], top)
    assert await _history(broker, "room:1", limit=2, reverse=True) == ([5, 4], top)
    assert await _history(broker, "room:1", limit=0) == ([], top)
    assert await _history(broker, "room:1", limit=100) == ([1, 2, 3, 4, 5], top)


async def test_history_since(broker: MemoryBroker) -> None:
    epoch = await _publish_n(broker, "room:1", 5, HISTORY)
    top = StreamPosition(5, epoch)

    assert await _history(broker, "room:1", since=StreamPosition(2, epoch)) == ([3, 4, 5], top)
    assert await _history(broker, "room:1", since=StreamPosition(2, epoch), limit=2) == (
        [3, 4],
        top,
    )
    assert await _history(broker, "room:1", since=StreamPosition(5, epoch)) == ([], top)
    assert await _history(broker, "room:1", since=StreamPosition(0, epoch)) == (
        [1, 2, 3, 4, 5],
        top,
    )
    assert await _history(broker, "room:1", since=StreamPosition(4, epoch), reverse=True) == (
        [3, 2, 1],
        top,
    )
    assert await _history(
        broker, "room:1", since=StreamPosition(4, epoch), reverse=True, limit=1
    ) == ([3], top)
    assert await _history(broker, "room:1", since=StreamPosition(2, epoch), limit=0) == ([], top)


async def test_history_returns_stored_publications(broker: MemoryBroker) -> None:
    await broker.publish("room:1", Publication(b'{"a":1}', INFO, time_ms=5), HISTORY)
    page = await broker.history("room:1", since=None, limit=-1, reverse=False, history=HISTORY)
    assert list(page.publications) == [Publication(b'{"a":1}', INFO, 1, None, 5)]


async def test_history_since_wrong_epoch_is_unrecoverable(broker: MemoryBroker) -> None:
    epoch = await _publish_n(broker, "room:1", 3, HISTORY)
    with pytest.raises(UnrecoverablePosition):
        await _history(broker, "room:1", since=StreamPosition(1, epoch + "x"))
    # Even a "top only" request checks the epoch.
    with pytest.raises(UnrecoverablePosition):
        await _history(broker, "room:1", since=StreamPosition(3, "other"), limit=0)


async def test_history_of_new_channel_creates_epoch_kept_by_publish(broker: MemoryBroker) -> None:
    offsets, top = await _history(broker, "room:new", limit=0)
    assert offsets == []
    assert top.offset == 0
    assert top.epoch
    pos = await broker.publish("room:new", _pub(1), HISTORY)
    assert pos == StreamPosition(1, top.epoch)
    # Recovering from the empty top in that epoch works.
    assert await _history(broker, "room:new", since=top) == ([1], pos)


async def test_size_bound_trims_oldest(broker: MemoryBroker) -> None:
    opts = HistoryOptions(size=3, ttl_s=60)
    epoch = await _publish_n(broker, "room:1", 5, opts)
    top = StreamPosition(5, epoch)
    assert await _history(broker, "room:1", opts=opts) == ([3, 4, 5], top)
    assert await _history(broker, "room:1", opts=opts, reverse=True) == ([5, 4, 3], top)
    # Trimmed positions are in the epoch: no error, the caller sees the gap.
    assert await _history(broker, "room:1", opts=opts, since=StreamPosition(1, epoch)) == (
        [3, 4, 5],
        top,
    )


async def test_ttl_bound_drops_old_entries(broker: MemoryBroker, clock: FakeClock) -> None:
    opts = HistoryOptions(size=100, ttl_s=10)
    epoch = (await broker.publish("room:1", _pub(1), opts)).epoch  # expires at +10
    clock.advance(4)
    await broker.publish("room:1", _pub(2), opts)  # expires at +14
    clock.advance(4)
    await broker.publish("room:1", _pub(3), opts)  # expires at +18
    top = StreamPosition(3, epoch)

    clock.advance(1.999)  # t = +9.999
    assert await _history(broker, "room:1", opts=opts) == ([1, 2, 3], top)
    clock.advance(0.001)  # t = +10: the first entry's TTL is over
    assert await _history(broker, "room:1", opts=opts) == ([2, 3], top)
    clock.advance(4)  # t = +14
    assert await _history(broker, "room:1", opts=opts) == ([3], top)
    # Same epoch throughout: the stream is still alive.
    assert (await broker.publish("room:1", _pub(4), opts)) == StreamPosition(4, epoch)


async def test_a_stream_quiet_past_its_history_keeps_its_epoch_and_offsets(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    """As on Redis: the publications go with their TTL, the epoch and offset
    counter stay (for META_TTL_S), so the subscribers of a quiet channel keep
    their position instead of being made to recover."""
    opts = HistoryOptions(size=100, ttl_s=10)
    epoch = await _publish_n(broker, "room:1", 3, opts)
    clock.advance(11)
    broker.sweep()
    assert await broker.positions(["room:1"]) == {"room:1": StreamPosition(3, epoch)}
    assert await _history(broker, "room:1", opts=opts) == ([], StreamPosition(3, epoch))
    # A client at 3 recovers (nothing missed); one at 2 missed an expired one.
    offsets, _ = await _history(broker, "room:1", opts=opts, since=StreamPosition(3, epoch))
    assert offsets == []
    pos = await broker.publish("room:1", _pub(1), opts)
    assert pos == StreamPosition(4, epoch)


async def test_idle_stream_past_its_meta_lifetime_gets_new_epoch(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    opts = HistoryOptions(size=100, ttl_s=10)
    old = await _publish_n(broker, "room:1", 3, opts)
    clock.advance(META_TTL_S)

    offsets, top = await _history(broker, "room:1", opts=opts)
    assert offsets == []
    assert top.offset == 0
    assert top.epoch and top.epoch != old
    with pytest.raises(UnrecoverablePosition):
        await _history(broker, "room:1", opts=opts, since=StreamPosition(3, old))


async def test_idle_stream_past_its_meta_lifetime_publish_restarts_offsets(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    opts = HistoryOptions(size=100, ttl_s=10)
    old = await _publish_n(broker, "room:1", 3, opts)
    clock.advance(META_TTL_S + 1)
    pos = await broker.publish("room:1", _pub(1), opts)
    assert pos.offset == 1
    assert pos.epoch != old


async def test_publishing_keeps_stream_alive_past_its_meta_lifetime(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    opts = HistoryOptions(size=100, ttl_s=10)
    epoch = (await broker.publish("room:1", _pub(1), opts)).epoch
    for _ in range(3):
        clock.advance(META_TTL_S - 1)
        pos = await broker.publish("room:1", _pub(1), opts)
        assert pos.epoch == epoch
    assert pos.offset == 4


async def test_sweep_drops_idle_streams_and_expired_entries(
    broker: MemoryBroker, clock: FakeClock
) -> None:
    opts = HistoryOptions(size=100, ttl_s=10)
    old_a = await _publish_n(broker, "room:a", 2, opts)
    clock.advance(META_TTL_S - 8)
    epoch_b = (await broker.publish("room:b", _pub(1), opts)).epoch
    clock.advance(5)
    await broker.publish("room:b", _pub(2), opts)
    clock.advance(6)  # a idle past META_TTL_S; b's first entry 11 s old (past its TTL)

    broker.sweep()

    # Memory is actually released: a's stream is gone, b keeps its live entry.
    streams = broker._streams
    assert set(streams) == {"room:b"}
    assert [p.offset for p, _ in streams["room:b"].entries] == [2]
    assert await _history(broker, "room:b", opts=opts) == ([2], StreamPosition(2, epoch_b))
    offsets, top = await _history(broker, "room:a", opts=opts)
    assert (offsets, top.offset) == ([], 0)
    assert top.epoch != old_a


async def test_sweep_keeps_fresh_streams(broker: MemoryBroker, clock: FakeClock) -> None:
    opts = HistoryOptions(size=100, ttl_s=10)
    epoch = await _publish_n(broker, "room:1", 2, opts)
    clock.advance(9)
    broker.sweep()
    assert await _history(broker, "room:1", opts=opts) == ([1, 2], StreamPosition(2, epoch))


# --- presence ----------------------------------------------------------------


async def test_presence_add_remove_stats(broker: MemoryBroker) -> None:
    a1 = ClientInfo("alice", "c-a1")
    a2 = ClientInfo("alice", "c-a2", conn_info=b'{"d":"phone"}')
    b1 = ClientInfo("bob", "c-b1")
    assert await broker.presence("room:1") == {}
    assert await broker.presence_stats("room:1") == (0, 0)

    for info in (a1, a2, b1):
        await broker.add_presence("room:1", info, 60)
    await broker.add_presence("room:2", b1, 60)

    assert await broker.presence("room:1") == {"c-a1": a1, "c-a2": a2, "c-b1": b1}
    assert await broker.presence_stats("room:1") == (3, 2)
    assert await broker.presence_stats("room:2") == (1, 1)

    # Adding the same client again does not double count.
    await broker.add_presence("room:1", a1, 60)
    assert await broker.presence_stats("room:1") == (3, 2)

    await broker.remove_presence("room:1", "c-b1")
    assert await broker.presence_stats("room:1") == (2, 1)
    assert await broker.presence_stats("room:2") == (1, 1)
    await broker.remove_presence("room:1", "c-unknown")
    await broker.remove_presence("room:unknown", "c-a1")
    await broker.remove_presence("room:1", "c-a1")
    await broker.remove_presence("room:1", "c-a2")
    assert await broker.presence("room:1") == {}
    assert await broker.presence_stats("room:1") == (0, 0)


async def test_presence_returns_a_copy(broker: MemoryBroker) -> None:
    info = ClientInfo("alice", "c-a1")
    await broker.add_presence("room:1", info, 60)
    snapshot = await broker.presence("room:1")
    snapshot.clear()
    assert await broker.presence("room:1") == {"c-a1": info}


async def test_lifecycle(broker: MemoryBroker) -> None:
    assert broker.is_ready()
    await broker.start()
    await broker.subscribe("room:1")
    await broker.unsubscribe("room:1")
    await broker.close()
    await asyncio.sleep(0)  # let the sweeper's cancellation run
    await broker.close()  # idempotent
