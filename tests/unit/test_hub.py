"""Hub bookkeeping and fan-out with plain fake subscribers (no network)."""

from __future__ import annotations

import re
from collections.abc import Callable

import orjson
import pytest

from signaling.hub import SYNC_BUFFER_MAX, Hub, namespace_of
from signaling.protocol import ClientInfo, Publication

INFO = ClientInfo(user="42", client="c-joiner")


class FakeSub:
    def __init__(self, name: str = "") -> None:
        self.name = name
        self.frames: list[bytes] = []
        self.overflows: list[str] = []
        self.on_deliver: Callable[[], object] | None = None
        self.on_overflow: Callable[[], object] | None = None

    def deliver(self, frame: bytes) -> None:
        self.frames.append(frame)
        if self.on_deliver is not None:
            self.on_deliver()

    def lost_position(self, channel: str) -> None:
        self.overflows.append(channel)
        if self.on_overflow is not None:
            self.on_overflow()


class CountingEncoder:
    """A frame encoder that wraps the payload and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []

    def __call__(self, payload: bytes) -> bytes:
        self.calls.append(payload)
        return b"FRAME:" + payload


def _payload(frame: bytes) -> object:
    assert frame.startswith(b"FRAME:")
    return orjson.loads(frame[len(b"FRAME:") :])


def _offsets(sub: FakeSub) -> list[int]:
    """The offsets of the publications a subscriber got, in order."""
    return [int(m) for frame in sub.frames for m in re.findall(rb'"offset":(\d+)', frame)]


def _pub(n: int, offset: int | None = None) -> Publication:
    return Publication(data=orjson.dumps({"n": n}), offset=n if offset is None else offset)


@pytest.fixture
def encoder() -> CountingEncoder:
    return CountingEncoder()


@pytest.fixture
def hub(encoder: CountingEncoder) -> Hub:
    return Hub(encoder)


def _live(hub: Hub, channel: str, client_id: str, *, join_leave: bool = False) -> FakeSub:
    sub = FakeSub(client_id)
    hub.add(channel, client_id, sub, join_leave=join_leave)
    assert hub.go_live(channel, client_id) == []
    return sub


# --- bookkeeping ------------------------------------------------------------


def test_first_and_last_subscriber_booleans(hub: Hub) -> None:
    assert hub.add("room:1", "a", FakeSub(), join_leave=False) is True
    assert hub.add("room:1", "b", FakeSub(), join_leave=False) is False
    assert hub.add("room:2", "a", FakeSub(), join_leave=False) is True
    assert hub.has_channel("room:1")
    assert sorted(hub.channels()) == ["room:1", "room:2"]
    assert hub.num_subscribers("room:1") == 2

    hub.go_live("room:1", "a")  # one live, one syncing: both count
    assert hub.num_subscribers("room:1") == 2

    assert hub.remove("room:1", "a") is False
    assert hub.num_subscribers("room:1") == 1
    assert hub.remove("room:1", "b") is True
    assert not hub.has_channel("room:1")
    assert hub.num_subscribers("room:1") == 0
    assert hub.channels() == ["room:2"]

    # Removing again, or from an unknown channel, is not "last".
    assert hub.remove("room:1", "b") is False
    assert hub.remove("nope", "a") is False
    # The channel is "first" again after it emptied.
    assert hub.add("room:1", "c", FakeSub(), join_leave=False) is True


def test_channels_by_namespace_follow_the_first_and_last_subscriber(hub: Hub) -> None:
    assert (namespace_of("room:a"), namespace_of("dm:#1,2"), namespace_of("#42")) == (
        "room",
        "dm",
        "",
    )
    hub.add("room:a", "x", FakeSub(), join_leave=False)
    hub.add("room:a", "y", FakeSub(), join_leave=False)
    hub.add("room:b", "x", FakeSub(), join_leave=False)
    hub.add("dm:#1,2", "x", FakeSub(), join_leave=False)
    hub.add("#42", "x", FakeSub(), join_leave=False)
    assert sorted(hub.channels("room")) == ["room:a", "room:b"]
    assert hub.channels("dm") == ["dm:#1,2"]
    assert hub.channels("") == ["#42"]
    assert hub.channels("private") == []

    hub.remove("room:a", "x")  # one subscriber left: still listed
    assert sorted(hub.channels("room")) == ["room:a", "room:b"]
    hub.remove("room:a", "y")
    hub.remove("room:b", "x")
    assert hub.channels("room") == []
    hub.add("room:b", "z", FakeSub(), join_leave=False)  # back after it emptied
    assert hub.channels("room") == ["room:b"]
    assert sorted(hub.channels()) == ["#42", "dm:#1,2", "room:b"]


def test_remove_unknown_client_keeps_channel(hub: Hub) -> None:
    _live(hub, "room:1", "a")
    assert hub.remove("room:1", "zzz") is False
    assert hub.has_channel("room:1")


def test_remove_syncing_subscriber_last(hub: Hub) -> None:
    hub.add("room:1", "a", FakeSub(), join_leave=True)
    assert hub.remove("room:1", "a") is True
    assert not hub.has_channel("room:1")
    assert hub.go_live("room:1", "a") == []


def test_go_live_unknown_is_empty(hub: Hub) -> None:
    assert hub.go_live("nope", "a") == []
    _live(hub, "room:1", "a")
    # Already live: nothing more to return, and it stays live.
    assert hub.go_live("room:1", "a") == []
    hub.on_publication("room:1", _pub(1), "ep")
    assert hub.num_subscribers("room:1") == 1


# --- fan-out ----------------------------------------------------------------


def test_fan_out_encodes_once_and_shares_bytes(encoder: CountingEncoder) -> None:
    delivered: list[int] = []
    hub = Hub(encoder, on_delivered=delivered.append)
    subs = [_live(hub, "room:1", f"c{i}") for i in range(100)]

    hub.on_publication("room:1", _pub(1), "ep")

    assert len(encoder.calls) == 1
    first = subs[0].frames[0]
    assert all(len(s.frames) == 1 for s in subs)
    assert all(s.frames[0] is first for s in subs)
    assert _payload(first) == {
        "push": {"channel": "room:1", "pub": {"data": {"n": 1}, "offset": 1}}
    }
    assert delivered == [100]


def test_publication_to_other_channel_or_unknown_channel(
    hub: Hub, encoder: CountingEncoder
) -> None:
    a = _live(hub, "room:1", "a")
    b = _live(hub, "room:2", "b")
    hub.on_publication("room:2", _pub(1), "ep")
    hub.on_publication("room:unknown", _pub(1), "ep")
    assert a.frames == []
    assert len(b.frames) == 1
    assert len(encoder.calls) == 1


def test_no_encoding_without_live_subscribers(hub: Hub, encoder: CountingEncoder) -> None:
    hub.add("room:1", "a", FakeSub(), join_leave=False)  # syncing only
    hub.on_publication("room:1", _pub(1), "ep")
    assert encoder.calls == []


def test_removed_subscriber_gets_nothing(hub: Hub) -> None:
    a = _live(hub, "room:1", "a")
    b = _live(hub, "room:1", "b")
    hub.on_publication("room:1", _pub(1), "ep")
    hub.remove("room:1", "a")
    hub.on_publication("room:1", _pub(2), "ep")
    assert len(a.frames) == 1
    assert [_payload(f)["push"]["pub"]["offset"] for f in b.frames] == [1, 2]  # type: ignore[index]


def test_syncing_subscriber_gets_buffer_not_live(hub: Hub) -> None:
    live = _live(hub, "room:1", "live")
    syncing = FakeSub()
    hub.add("room:1", "s", syncing, join_leave=False)

    pubs = [_pub(i) for i in range(1, 6)]
    for p in pubs:
        hub.on_publication("room:1", p, "ep")

    assert syncing.frames == []
    assert len(live.frames) == 5
    buffered = hub.go_live("room:1", "s")
    assert buffered == pubs
    assert all(b is p for b, p in zip(buffered, pubs, strict=True))

    # Live from now on, and the buffer is not returned twice.
    hub.on_publication("room:1", _pub(6), "ep")
    assert len(syncing.frames) == 1
    assert _payload(syncing.frames[0])["push"]["pub"]["offset"] == 6  # type: ignore[index]
    assert hub.go_live("room:1", "s") == []


def test_each_syncing_subscriber_has_its_own_buffer(hub: Hub) -> None:
    hub.add("room:1", "s1", FakeSub(), join_leave=False)
    hub.on_publication("room:1", _pub(1), "ep")
    hub.add("room:1", "s2", FakeSub(), join_leave=False)
    hub.on_publication("room:1", _pub(2), "ep")
    assert [p.offset for p in hub.go_live("room:1", "s2")] == [2]
    assert [p.offset for p in hub.go_live("room:1", "s1")] == [1, 2]


def test_sync_buffer_overflow_calls_lost_position(hub: Hub) -> None:
    sub = FakeSub()
    hub.add("room:1", "s", sub, join_leave=False)
    for i in range(1, SYNC_BUFFER_MAX + 1):
        hub.on_publication("room:1", _pub(i), "ep")
    assert sub.overflows == []
    hub.on_publication("room:1", _pub(SYNC_BUFFER_MAX + 1), "ep")
    assert sub.overflows == ["room:1"]
    # The buffer stays bounded.
    assert len(hub.go_live("room:1", "s")) == SYNC_BUFFER_MAX


def test_lost_position_that_removes_the_subscriber_is_safe(hub: Hub) -> None:
    # A connection told it is hopelessly behind closes itself; if that
    # unsubscribes it from the hub synchronously, the fan-out must go on.
    live = _live(hub, "room:1", "live")
    subs = []
    for name in ("s1", "s2", "s3"):
        sub = FakeSub(name)
        hub.add("room:1", name, sub, join_leave=False)
        subs.append(sub)
    subs[0].on_overflow = lambda: hub.remove("room:1", "s1")
    for i in range(1, SYNC_BUFFER_MAX + 1):
        hub.on_publication("room:1", _pub(i), "ep")

    hub.on_publication("room:1", _pub(SYNC_BUFFER_MAX + 1), "ep")

    assert subs[0].overflows == ["room:1"]
    assert subs[1].overflows == ["room:1"]
    assert subs[2].overflows == ["room:1"]
    assert len(live.frames) == SYNC_BUFFER_MAX + 1
    assert hub.num_subscribers("room:1") == 3


def test_deliver_removing_another_subscriber_does_not_break_fan_out(hub: Hub) -> None:
    subs = [_live(hub, "room:1", f"c{i}") for i in range(10)]
    # c2's delivery closes c5 and c7 (slow clients), mid-iteration.
    subs[2].on_deliver = lambda: (hub.remove("room:1", "c5"), hub.remove("room:1", "c7"))

    hub.on_publication("room:1", _pub(1), "ep")

    for i, sub in enumerate(subs):
        if i not in (5, 7):
            assert len(sub.frames) == 1, i
    assert hub.num_subscribers("room:1") == 8

    subs[2].on_deliver = None
    hub.on_publication("room:1", _pub(2), "ep")
    assert len(subs[5].frames) <= 1
    assert len(subs[7].frames) <= 1
    for i, sub in enumerate(subs):
        if i not in (5, 7):
            assert len(sub.frames) == 2, i


def test_deliver_removing_itself_does_not_break_fan_out(hub: Hub) -> None:
    subs = [_live(hub, "room:1", f"c{i}") for i in range(5)]
    subs[0].on_deliver = lambda: hub.remove("room:1", "c0")
    hub.on_publication("room:1", _pub(1), "ep")
    assert all(len(s.frames) == 1 for s in subs)
    hub.on_publication("room:1", _pub(2), "ep")
    assert len(subs[0].frames) == 1
    assert all(len(s.frames) == 2 for s in subs[1:])


def test_subscriber_added_after_snapshot_receives_next_publication(hub: Hub) -> None:
    a = _live(hub, "room:1", "a")
    hub.on_publication("room:1", _pub(1), "ep")
    b = _live(hub, "room:1", "b")
    hub.on_publication("room:1", _pub(2), "ep")
    assert len(a.frames) == 2
    assert len(b.frames) == 1


# --- join / leave -----------------------------------------------------------


def test_join_leave_only_to_live_join_leave_subscribers(
    encoder: CountingEncoder,
) -> None:
    delivered: list[int] = []
    hub = Hub(encoder, on_delivered=delivered.append)
    jl1 = _live(hub, "room:1", "jl1", join_leave=True)
    jl2 = _live(hub, "room:1", "jl2", join_leave=True)
    plain = _live(hub, "room:1", "plain", join_leave=False)
    syncing = FakeSub()
    hub.add("room:1", "syncing", syncing, join_leave=True)

    hub.on_join("room:1", INFO)
    hub.on_leave("room:1", INFO)

    assert plain.frames == []
    assert syncing.frames == []
    assert len(encoder.calls) == 2
    for sub in (jl1, jl2):
        assert [_payload(f) for f in sub.frames] == [
            {"push": {"channel": "room:1", "join": {"info": {"user": "42", "client": "c-joiner"}}}},
            {
                "push": {
                    "channel": "room:1",
                    "leave": {"info": {"user": "42", "client": "c-joiner"}},
                }
            },
        ]
    assert jl1.frames[0] is jl2.frames[0]
    assert delivered == [2, 2]

    # Once live, the syncing subscriber that asked for join/leave gets them.
    hub.go_live("room:1", "syncing")
    hub.on_join("room:1", INFO)
    assert len(syncing.frames) == 1
    assert plain.frames == []


def test_join_leave_stop_after_remove_and_unknown_channel(
    hub: Hub, encoder: CountingEncoder
) -> None:
    jl = _live(hub, "room:1", "jl", join_leave=True)
    _live(hub, "room:1", "other")
    hub.remove("room:1", "jl")
    hub.on_join("room:1", INFO)
    hub.on_leave("room:unknown", INFO)
    assert jl.frames == []
    assert encoder.calls == []


def test_removed_while_syncing_does_not_get_join_leave_later(hub: Hub) -> None:
    _live(hub, "room:1", "keep")
    sub = FakeSub()
    hub.add("room:1", "s", sub, join_leave=True)
    hub.remove("room:1", "s")
    assert hub.go_live("room:1", "s") == []
    hub.on_join("room:1", INFO)
    assert sub.frames == []


# --- counters and positions -------------------------------------------------


def test_on_delivered_counts_recipients(encoder: CountingEncoder) -> None:
    delivered: list[int] = []
    hub = Hub(encoder, on_delivered=delivered.append)
    for i in range(3):
        _live(hub, "room:1", f"a{i}")
    _live(hub, "room:2", "b")
    hub.add("room:2", "syncing", FakeSub(), join_leave=False)

    hub.on_publication("room:1", _pub(1), "ep")
    hub.on_publication("room:2", _pub(1), "ep")
    hub.remove("room:1", "a0")
    hub.on_publication("room:1", _pub(2), "ep")
    assert delivered == [3, 1, 2]


def test_position_tracking(hub: Hub) -> None:
    assert hub.position("room:1") is None
    sub = FakeSub()
    hub.add("room:1", "s", sub, join_leave=False)  # syncing counts as local
    assert hub.position("room:1") is None  # unknown until a top or a publication

    hub.on_publication("room:1", _pub(1), "ep1")
    assert hub.position("room:1") == (1, "ep1")
    hub.on_publication("room:1", _pub(2), "ep1")
    assert hub.position("room:1") == (2, "ep1")
    # Publications without offset (no history) leave the position alone.
    hub.on_publication("room:1", _pub(99, offset=0), "")
    assert hub.position("room:1") == (2, "ep1")
    # A duplicate (offset already seen) is dropped.
    hub.go_live("room:1", "s")
    hub.on_publication("room:1", _pub(2), "ep1")
    assert sub.frames == [] and hub.position("room:1") == (2, "ep1")

    # Publications for channels without local subscribers are not tracked.
    hub.on_publication("room:2", _pub(5), "x")
    assert hub.position("room:2") is None

    hub.remove("room:1", "s")
    assert hub.position("room:1") is None


def test_note_position_only_when_unknown(hub: Hub) -> None:
    hub.add("room:1", "s", FakeSub(), join_leave=False)
    hub.note_position("room:1", 7, "ep")
    assert hub.position("room:1") == (7, "ep")
    hub.note_position("room:1", 3, "other")
    assert hub.position("room:1") == (7, "ep")


@pytest.mark.parametrize(
    ("offset", "epoch"), [(9, "ep"), (8, "new-epoch")], ids=["offset-gap", "epoch-change"]
)
def test_gap_makes_subscribers_recover_and_is_not_delivered(
    hub: Hub, offset: int, epoch: str
) -> None:
    live, syncing = FakeSub("live"), FakeSub("syncing")
    hub.add("room:1", "a", live, join_leave=False)
    hub.go_live("room:1", "a")
    hub.add("room:1", "b", syncing, join_leave=False)
    hub.note_position("room:1", 7, "ep")
    hub.on_publication("room:1", _pub(offset), epoch)
    assert live.frames == []
    assert live.overflows == ["room:1"] and syncing.overflows == ["room:1"]
    assert hub.position("room:1") is None and hub.gaps == 1


def test_after_a_gap_nothing_more_reaches_the_subscribers_told(hub: Hub) -> None:
    # Told to recover from their last position: a later publication reaching
    # them before they resubscribe would move that position past the gap.
    live, syncing = _live(hub, "room:1", "a"), FakeSub("syncing")
    hub.add("room:1", "b", syncing, join_leave=False)
    hub.on_publication("room:1", _pub(1), "ep")
    hub.on_publication("room:1", _pub(3), "ep")  # 2 is missing: a gap
    hub.on_publication("room:1", _pub(4), "ep")
    hub.on_publication("room:1", _pub(5), "ep")
    assert _offsets(live) == [1]
    assert live.overflows == ["room:1"] and syncing.overflows == ["room:1"]
    assert hub.go_live("room:1", "b") == []  # nothing buffered after the gap either
    assert syncing.frames == []
    # They are still the channel's until their sessions remove them: the
    # broker subscription stays until the last one leaves.
    assert not hub.remove("room:1", "a")
    assert hub.remove("room:1", "b")
    assert not hub.has_channel("room:1")


def test_after_a_gap_a_resubscriber_gets_what_follows_its_position(hub: Hub) -> None:
    told = _live(hub, "room:1", "a")
    hub.on_publication("room:1", _pub(1), "ep")
    hub.on_publication("room:1", _pub(3), "ep")  # a gap
    other = _live(hub, "room:1", "b")  # subscribed after the gap
    hub.on_publication("room:1", _pub(4), "ep")
    assert len(told.frames) == 1
    assert _offsets(other) == [4]


def test_a_publication_at_the_position_still_reaches_syncing_subscribers(hub: Hub) -> None:
    # One subscriber's stream read saw publication 6 before pub/sub brought it
    # here (its reply said 6, so the node's position is 6); another, still
    # syncing, read the stream before 6 was written and needs it from here.
    first_read = FakeSub("first")
    hub.add("room:1", "early", first_read, join_leave=False)
    later = _live(hub, "room:1", "late")
    hub.note_position("room:1", 6, "ep")
    hub.on_publication("room:1", _pub(6), "ep")
    assert later.frames == []  # the live one has it already
    assert [p.offset for p in hub.go_live("room:1", "early")] == [6]
    hub.on_publication("room:1", _pub(7), "ep")
    assert len(later.frames) == 1 and len(first_read.frames) == 1


def test_a_subscriber_whose_reply_is_ahead_of_the_node_gets_each_publication_once(
    encoder: CountingEncoder,
) -> None:
    # Its stream read saw 6 and 7 before pub/sub brought them here: live at
    # once, it would get them again from the node's fan-out.
    delivered: list[int] = []
    hub = Hub(encoder, on_delivered=delivered.append)
    live = _live(hub, "room:1", "a")
    hub.on_publication("room:1", _pub(5), "ep")
    ahead = FakeSub("ahead")
    hub.add("room:1", "b", ahead, join_leave=True)
    assert hub.go_live("room:1", "b", 7, "ep") == []
    for n in (6, 7, 8):
        hub.on_publication("room:1", _pub(n), "ep")
    assert _offsets(live) == [5, 6, 7, 8]
    assert _offsets(ahead) == [8]
    hub.on_join("room:1", INFO)  # live now, with the join/leave it asked for
    assert ahead.frames[-1].startswith(b"FRAME:") and b'"join"' in ahead.frames[-1]
    assert sum(delivered) == 4 + 1 + 1  # the live one's four, then 8 and the join to "b"


def test_a_subscriber_ahead_goes_live_when_the_position_reaches_its_reply() -> None:
    encoder = CountingEncoder()
    hub = Hub(encoder)
    _live(hub, "room:1", "a")
    hub.on_publication("room:1", _pub(5), "ep")
    ahead = FakeSub("ahead")
    hub.add("room:1", "b", ahead, join_leave=False)
    assert hub.go_live("room:1", "b", 6, "ep") == []
    hub.on_publication("room:1", _pub(6), "ep")  # caught up: live from here
    hub.on_publication("room:1", _pub(7), "ep")
    assert _offsets(ahead) == [7]
    # Another epoch in the reply than the node's: live at once (the next
    # publication finds the gap for everyone).
    other = FakeSub("other")
    hub.add("room:1", "c", other, join_leave=False)
    assert hub.go_live("room:1", "c", 9, "new-epoch") == []
    hub.on_publication("room:1", _pub(8), "ep")
    assert _offsets(other) == [8]


def test_a_subscriber_ahead_gets_the_live_only_publications_of_its_wait() -> None:
    # Typing and read receipts (offset 0) are in no reply and no history: what
    # came while it waited for the position must reach it when it goes live.
    hub = Hub(CountingEncoder())
    live = _live(hub, "room:1", "a")
    hub.on_publication("room:1", _pub(5), "ep")
    ahead = FakeSub("ahead")
    hub.add("room:1", "b", ahead, join_leave=False)
    assert hub.go_live("room:1", "b", 6, "ep") == []
    hub.on_publication("room:1", _pub(100, offset=0), "ep")  # while it waits
    hub.on_publication("room:1", _pub(6), "ep")  # caught up
    hub.on_publication("room:1", _pub(101, offset=0), "ep")
    hub.on_publication("room:1", _pub(7), "ep")

    def numbers(sub: FakeSub) -> list[int]:
        return [int(n) for frame in sub.frames for n in re.findall(rb'"n":(\d+)', frame)]

    assert numbers(ahead) == [100, 101, 7]
    assert numbers(live) == [5, 100, 6, 101, 7]


def test_a_subscriber_ahead_leaves_and_is_told_of_a_gap_like_any_syncing_one(hub: Hub) -> None:
    _live(hub, "room:1", "a")
    hub.on_publication("room:1", _pub(5), "ep")
    gone, told = FakeSub("gone"), FakeSub("told")
    hub.add("room:1", "b", gone, join_leave=False)
    hub.add("room:1", "c", told, join_leave=False)
    assert hub.go_live("room:1", "b", 7, "ep") == []
    assert hub.go_live("room:1", "c", 7, "ep") == []
    assert not hub.remove("room:1", "b")
    hub.on_publication("room:1", _pub(6), "ep")
    hub.on_publication("room:1", _pub(8), "ep")  # 7 is missing: a gap
    assert told.overflows == ["room:1"] and gone.overflows == []
    assert gone.frames == [] and told.frames == []


# --- deferred fan-out (the server's mode: written at the end of the iteration) ----


class Deferred:
    """Collects what the hub schedules; run() is the loop reaching the end of
    the iteration."""

    def __init__(self) -> None:
        self.calls: list[Callable[[], None]] = []

    def __call__(self, callback: Callable[[], None]) -> None:
        self.calls.append(callback)

    def run(self) -> None:
        calls, self.calls = self.calls, []
        for callback in calls:
            callback()


def test_deferred_fan_out_writes_a_run_of_one_channel_once_per_subscriber(
    encoder: CountingEncoder,
) -> None:
    deferred, delivered = Deferred(), []
    hub = Hub(encoder, on_delivered=delivered.append, defer=deferred)
    room = [_live(hub, "room:1", f"r{i}") for i in range(3)]
    other = _live(hub, "room:2", "o")
    for n in (1, 2, 3):
        hub.on_publication("room:1", _pub(n), "ep")
    hub.on_publication("room:2", _pub(1), "ep")
    hub.on_publication("room:1", _pub(4), "ep")
    # Nothing written before the end of the iteration, and one flush scheduled.
    assert all(not s.frames for s in [*room, other]) and len(deferred.calls) == 1
    deferred.run()
    assert len(encoder.calls) == 5  # still once per publication
    for sub in room:
        # The run of three in one write, then the one after room:2's.
        assert len(sub.frames) == 2
        first, second = sub.frames
        assert first.count(b"FRAME:") == 3 and second.count(b"FRAME:") == 1
        assert b'"offset":1' in first and b'"offset":3' in first
        assert b'"offset":4' in second
        assert first is room[0].frames[0]  # the same bytes for every subscriber
    assert [_payload(f) for f in other.frames] == [
        {"push": {"channel": "room:2", "pub": {"data": {"n": 1}, "offset": 1}}}
    ]
    assert delivered == [9, 1, 3]  # frames written, counted per subscriber
    # The next iteration starts afresh.
    hub.on_publication("room:1", _pub(5), "ep")
    assert len(deferred.calls) == 1
    deferred.run()
    assert all(len(s.frames) == 3 for s in room)


def test_deferred_fan_out_uses_who_was_subscribed_when_it_arrived(
    encoder: CountingEncoder,
) -> None:
    deferred = Deferred()
    hub = Hub(encoder, defer=deferred)
    early = _live(hub, "room:1", "early")
    hub.on_publication("room:1", _pub(1), "ep")
    late = _live(hub, "room:1", "late")  # live after publication 1 arrived
    hub.on_publication("room:1", _pub(2), "ep")
    deferred.run()
    assert [f.count(b"FRAME:") for f in early.frames] == [1, 1]  # two snapshots
    assert [_payload(f) for f in late.frames] == [
        {"push": {"channel": "room:1", "pub": {"data": {"n": 2}, "offset": 2}}}
    ]


def test_a_gap_writes_what_came_before_it_first(encoder: CountingEncoder) -> None:
    deferred = Deferred()
    hub = Hub(encoder, defer=deferred)
    sub = _live(hub, "room:1", "a")
    order: list[str] = []
    sub.on_deliver = lambda: order.append("frame")
    sub.on_overflow = lambda: order.append("recover")
    hub.on_publication("room:1", _pub(1), "ep")
    hub.on_publication("room:1", _pub(3), "ep")  # 2 is missing: a gap
    assert order == ["frame", "recover"]
    deferred.run()  # nothing left to write
    assert len(sub.frames) == 1
