"""The platform's channel policy: namespaces, ids, who may subscribe and publish."""

from __future__ import annotations

import pytest

from handlers.channels import (
    PlatformChannelPolicy,
    dm_channel,
    dm_members,
    personal_channel,
    room_owner,
    status_channel,
)
from signaling.broker.base import HistoryOptions
from signaling.channels import ChannelOptions

POLICY = PlatformChannelPolicy(history_size=50, history_ttl_s=300.0)
HISTORY = HistoryOptions(size=50, ttl_s=300.0)


# --- options per namespace ----------------------------------------------------


def test_room_options() -> None:
    assert POLICY.options("room:42") == ChannelOptions(
        history=HISTORY, presence=True, join_leave=True
    )
    opts = POLICY.options("room:42")
    assert opts is not None
    assert opts.client_publish is True
    assert opts.token_required is False
    assert opts.recoverable is True


def test_dm_options() -> None:
    assert POLICY.options("dm:#1,2") == ChannelOptions(
        history=HISTORY, presence=True, join_leave=True
    )


def test_user_options() -> None:
    opts = POLICY.options("user:#42")
    assert opts == ChannelOptions(history=HISTORY, client_publish=False)
    assert opts is not None
    assert opts.presence is False
    assert opts.join_leave is False
    assert opts.token_required is False
    assert opts.recoverable is True


def test_private_options() -> None:
    opts = POLICY.options("private:vip-show")
    assert opts == ChannelOptions(history=HISTORY, presence=True, token_required=True)
    assert opts is not None
    assert opts.join_leave is False


def test_status_options() -> None:
    opts = POLICY.options("status:42")
    # The latest state only, kept as long as other history.
    assert opts == ChannelOptions(history=HistoryOptions(1, 300.0), client_publish=False)
    assert opts is not None
    assert opts.presence is False and opts.join_leave is False and opts.token_required is False
    assert opts.recoverable is True
    no_history = PlatformChannelPolicy(history_size=0, history_ttl_s=300.0)
    opts = no_history.options("status:42")
    assert opts is not None and opts.recoverable is False


def test_history_options_follow_policy_settings() -> None:
    policy = PlatformChannelPolicy(history_size=0, history_ttl_s=0)
    opts = policy.options("room:1")
    assert opts is not None
    assert opts.history == HistoryOptions(0, 0)
    assert opts.recoverable is False


@pytest.mark.parametrize(
    "channel",
    [
        "room:abc_DEF-1.x@y",
        "room:" + "a" * 64,
        "dm:#alice,bob",
        "user:#u-1",
        "user:#" + "9" * 64,
        "private:name",
        "status:u-1",
        "status:" + "s" * 64,
    ],
)
def test_valid_channels(channel: str) -> None:
    assert POLICY.options(channel) is not None


@pytest.mark.parametrize(
    "channel",
    [
        pytest.param("", id="empty"),
        pytest.param("room", id="no-colon"),
        pytest.param("chat:1", id="unknown-namespace"),
        pytest.param("Room:1", id="namespace-case"),
        pytest.param("room:", id="room-empty-id"),
        pytest.param("room:" + "a" * 65, id="room-too-long"),
        pytest.param("room:a b", id="room-space"),
        pytest.param("room:a:b", id="room-colon"),
        pytest.param("room:a#b", id="room-hash"),
        pytest.param("room:a,b", id="room-comma"),
        pytest.param("room:é", id="room-non-ascii"),
        pytest.param("room:a\n", id="room-newline"),
        pytest.param("dm:#", id="dm-empty"),
        pytest.param("dm:#alice", id="dm-one-member"),
        pytest.param("dm:#alice,", id="dm-empty-second"),
        pytest.param("dm:#,alice", id="dm-empty-first"),
        pytest.param("dm:#alice,alice", id="dm-same-member-twice"),
        pytest.param("dm:#bob,alice", id="dm-not-sorted"),
        pytest.param("dm:#a,b,c", id="dm-three-members"),
        pytest.param("dm:alice,bob", id="dm-no-hash"),
        pytest.param("dm:#alice,b b", id="dm-bad-char"),
        pytest.param("dm:#alice," + "b" * 65, id="dm-member-too-long"),
        pytest.param("user:#", id="user-empty"),
        pytest.param("user:42", id="user-no-hash"),
        pytest.param("user:#4 2", id="user-space"),
        pytest.param("user:#" + "9" * 65, id="user-too-long"),
        pytest.param("user:#1,2", id="user-comma"),
        pytest.param("private:", id="private-empty"),
        pytest.param("private:a/b", id="private-slash"),
        pytest.param("private:" + "p" * 65, id="private-too-long"),
        pytest.param("status:", id="status-empty"),
        pytest.param("status:#1", id="status-hash"),
        pytest.param("status:a,b", id="status-comma"),
        pytest.param("status:" + "s" * 65, id="status-too-long"),
    ],
)
def test_invalid_channels(channel: str) -> None:
    assert POLICY.options(channel) is None


# --- permissions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("user", "channel", "subscribe", "publish"),
    [
        # room: anyone authenticated may read and write.
        ("alice", "room:bob", True, True),
        ("bob", "room:bob", True, True),
        # dm: only the two members, whatever the order.
        ("alice", "dm:#alice,bob", True, True),
        ("bob", "dm:#alice,bob", True, True),
        ("carol", "dm:#alice,bob", False, False),
        ("alice", "dm:#alice,alice", False, False),
        ("alice", "dm:#alice", False, False),
        ("alice", "dm:#alice,bob,carol", False, False),
        # user: only its owner reads; nobody publishes (server only).
        ("alice", "user:#alice", True, False),
        ("alice", "user:#bob", False, False),
        ("alice", "user:#alice2", False, False),
        # status: anyone authenticated reads anyone's; nobody publishes (server only).
        ("alice", "status:bob", True, False),
        ("alice", "status:alice", True, False),
        # private: needs a subscription token; read-only for clients.
        ("alice", "private:show", False, False),
        # unknown namespaces: nothing.
        ("alice", "chat:1", False, False),
        ("alice", "", False, False),
    ],
)
def test_permission_matrix(user: str, channel: str, subscribe: bool, publish: bool) -> None:
    assert POLICY.can_subscribe(user, channel) is subscribe
    assert POLICY.can_publish(user, channel) is publish


def test_user_prefix_does_not_grant_others_channel() -> None:
    # "user:#1" must not match "user:#12" or "user:#1,2".
    assert not POLICY.can_subscribe("1", "user:#12")
    assert not POLICY.can_subscribe("1", "user:#1,2")
    assert not POLICY.can_subscribe("12", "user:#1")


def test_dm_membership_is_exact() -> None:
    assert not POLICY.can_subscribe("ali", "dm:#alice,bob")
    assert not POLICY.can_publish("alice,bob", "dm:#alice,bob")


def test_anonymous_user() -> None:
    assert POLICY.can_subscribe("", "room:1")
    assert not POLICY.can_subscribe("", "dm:#alice,bob")
    assert not POLICY.can_publish("", "user:#")
    assert not POLICY.can_subscribe("", "status:bob")
    assert POLICY.personal_channel("") is None


# --- personal and dm channels ------------------------------------------------------


def test_personal_channel() -> None:
    assert personal_channel("42") == "user:#42"
    assert POLICY.personal_channel("42") == "user:#42"
    channel = POLICY.personal_channel("u_1.a@b-c")
    assert channel == "user:#u_1.a@b-c"
    assert POLICY.options(channel) is not None
    assert POLICY.can_subscribe("u_1.a@b-c", channel)
    assert not POLICY.can_publish("u_1.a@b-c", channel)


@pytest.mark.parametrize("user", ["", "a b", "a,b", "a#b", "a:b", "x" * 65, "ü"])
def test_personal_channel_invalid_user(user: str) -> None:
    assert POLICY.personal_channel(user) is None


def test_dm_channel_is_canonical() -> None:
    assert dm_channel("bob", "alice") == "dm:#alice,bob"
    assert dm_channel("alice", "bob") == "dm:#alice,bob"
    channel = dm_channel("7", "12")
    assert channel == "dm:#12,7"  # string order: both sides compute the same name
    assert POLICY.options(channel) is not None
    assert POLICY.can_subscribe("7", channel)
    assert POLICY.can_subscribe("12", channel)


# --- helpers of the chat and presence handlers ---------------------------------------


def test_status_channel() -> None:
    assert status_channel("42") == "status:42"
    assert POLICY.options(status_channel("u_1.a@b-c")) is not None


@pytest.mark.parametrize(
    ("channel", "owner"),
    [
        ("room:cre", "cre"),
        ("room:u_1.a@b-c", "u_1.a@b-c"),
        ("room:", None),
        ("room:a b", None),
        ("dm:#a,b", None),
        ("status:cre", None),
        ("rooms:cre", None),
    ],
)
def test_room_owner(channel: str, owner: str | None) -> None:
    assert room_owner(channel) == owner


@pytest.mark.parametrize(
    ("channel", "members"),
    [
        ("dm:#alice,bob", ("alice", "bob")),
        ("dm:#bob,alice", None),
        ("dm:#alice", None),
        ("room:alice", None),
        ("dm:alice,bob", None),
    ],
)
def test_dm_members(channel: str, members: tuple[str, str] | None) -> None:
    assert dm_members(channel) == members
