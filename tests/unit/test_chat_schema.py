"""The chat publication schema (pure): what is accepted, normalized, refused."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from handlers.chat.messages import channel_kind, typing_window
from handlers.chat.schema import (
    MAX_ATTACHMENTS,
    MAX_CLIENT_MSG_ID,
    Attachment,
    ChatMessage,
    Typing,
    delete_event,
    parse_publication,
    read_event,
    slow_mode_event,
    timeout_event,
    viewers_event,
)
from signaling.errors import SignalError

MAX_TEXT = 20


def code_of(data: Any) -> int:
    with pytest.raises(SignalError) as info:
        parse_publication(data, max_text=MAX_TEXT)
    return info.value.value.code


def test_text_message() -> None:
    pub = parse_publication({"type": "message", "text": "hello"}, max_text=MAX_TEXT)
    assert pub == ChatMessage("hello")
    assert orjson.loads(ChatMessage("hello").encode()) == {"type": "message", "text": "hello"}


def test_full_message_roundtrip() -> None:
    data = {
        "type": "message",
        "text": "x" * MAX_TEXT,
        "attachments": [
            {"kind": "image", "ref": "media/a.jpg", "name": "a cat"},
            {"kind": "file", "ref": "f/1"},
        ],
        "client_msg_id": "0f3c-AB_9.z",
    }
    pub = parse_publication(data, max_text=MAX_TEXT)
    assert isinstance(pub, ChatMessage)
    assert pub.attachments == (
        Attachment("image", "media/a.jpg", "a cat"),
        Attachment("file", "f/1"),
    )
    assert orjson.loads(pub.encode()) == data


def test_nulls_are_absent_and_dropped() -> None:
    data = {"type": "message", "text": None, "attachments": [{"kind": "audio", "ref": "v/1"}]}
    pub = parse_publication(data | {"client_msg_id": None}, max_text=MAX_TEXT)
    assert orjson.loads(pub.encode()) == {
        "type": "message",
        "attachments": [{"kind": "audio", "ref": "v/1"}],
    }


def test_text_length_counts_characters_not_bytes() -> None:
    pub = parse_publication({"type": "message", "text": "é" * MAX_TEXT}, max_text=MAX_TEXT)
    assert isinstance(pub, ChatMessage)


def test_typing() -> None:
    assert parse_publication({"type": "typing"}, max_text=MAX_TEXT) == Typing()
    assert Typing().encode() == b'{"type":"typing"}'


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(None, 1100, id="null"),
        pytest.param([], 1100, id="array"),
        pytest.param("hi", 1100, id="string"),
        pytest.param({}, 1100, id="empty-object"),
        pytest.param({"type": "Message", "text": "x"}, 1100, id="type-case"),
        pytest.param({"type": "read", "offset": 1}, 1100, id="server-type-read"),
        pytest.param({"type": "viewers", "count": 1}, 1100, id="server-type-viewers"),
        pytest.param({"type": "message", "text": ["x"]}, 1100, id="text-array"),
        pytest.param({"type": "message", "text": "x", "user": "a"}, 1100, id="user-field"),
        pytest.param({"type": "message", "text": "x", "name": "A"}, 1100, id="name-field"),
        pytest.param({"type": "typing", "active": True}, 1100, id="typing-field"),
        pytest.param({"type": "message", "text": "x" * (MAX_TEXT + 1)}, 1101, id="long"),
        pytest.param({"type": "message"}, 1102, id="nothing"),
        pytest.param({"type": "message", "text": ""}, 1102, id="empty-text"),
        pytest.param({"type": "message", "text": " \n\t"}, 1102, id="whitespace"),
        pytest.param({"type": "message", "attachments": []}, 1102, id="no-attachments"),
        pytest.param({"type": "message", "attachments": {}}, 1103, id="attachments-object"),
        pytest.param({"type": "message", "attachments": ["r"]}, 1103, id="attachment-string"),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image", "ref": ""}]}, 1103, id="empty-ref"
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image", "ref": "a\nb"}]},
            1103,
            id="ref-newline",
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image", "ref": "r" * 257}]},
            1103,
            id="ref-long",
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image", "ref": "r", "name": 1}]},
            1103,
            id="name-type",
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "image", "ref": "r", "url": "u"}]},
            1103,
            id="attachment-unknown-field",
        ),
        pytest.param(
            {"type": "message", "attachments": [{"kind": "gif", "ref": "r"}]}, 1103, id="kind"
        ),
        pytest.param(
            {
                "type": "message",
                "attachments": [{"kind": "file", "ref": "r"}] * (MAX_ATTACHMENTS + 1),
            },
            1103,
            id="too-many",
        ),
        pytest.param({"type": "message", "text": "x", "client_msg_id": ""}, 1104, id="id-empty"),
        pytest.param({"type": "message", "text": "x", "client_msg_id": 7}, 1104, id="id-number"),
        pytest.param(
            {"type": "message", "text": "x", "client_msg_id": "a" * (MAX_CLIENT_MSG_ID + 1)},
            1104,
            id="id-long",
        ),
        pytest.param({"type": "message", "text": "x", "client_msg_id": "a:b"}, 1104, id="id-colon"),
        pytest.param({"type": "message", "text": "x", "client_msg_id": "{a}"}, 1104, id="id-brace"),
    ],
)
def test_refusals(data: Any, code: int) -> None:
    assert code_of(data) == code


def test_schema_error_takes_precedence_over_emptiness() -> None:
    # A wrong type is "invalid", even when the message is also empty.
    assert code_of({"type": "message", "text": 3, "attachments": None}) == 1100


def test_server_events() -> None:
    assert orjson.loads(delete_event(7)) == {"type": "delete", "offset": 7}
    assert orjson.loads(slow_mode_event(30)) == {"type": "slow_mode", "interval_s": 30}
    assert orjson.loads(timeout_event("u", 60)) == {
        "type": "timeout",
        "user": "u",
        "duration_s": 60,
    }
    assert orjson.loads(viewers_event(3, 9)) == {"type": "viewers", "count": 3, "peak": 9}
    assert orjson.loads(read_event("u", 4)) == {"type": "read", "user": "u", "offset": 4}
    # None of them can be published by a client.
    for event in (delete_event(1), slow_mode_event(1), viewers_event(1, 1), read_event("u", 1)):
        assert code_of(orjson.loads(event)) == 1100


@pytest.mark.parametrize(
    ("channel", "kind"),
    [
        ("room:cre", "room"),
        ("dm:#a,b", "dm"),
        ("dm:#b,a", None),
        ("user:#a", None),
        ("status:a", None),
        ("private:x", None),
        ("room:", None),
    ],
)
def test_channel_kind(channel: str, kind: str | None) -> None:
    assert channel_kind(channel) == kind


@pytest.mark.parametrize(
    ("rate", "window"),
    [(2.0, (1.0, 2)), (1.0, (1.0, 1)), (0.5, (2.0, 1)), (0.25, (4.0, 1)), (5.5, (1.0, 5))],
)
def test_typing_window(rate: float, window: tuple[float, int]) -> None:
    assert typing_window(rate) == window
