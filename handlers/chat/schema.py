"""The data schema of chat publications in ``room:`` and ``dm:`` channels.

Pure (no I/O): decoded JSON in, typed values out; a violation raises
:class:`~signaling.errors.SignalError` with one of the chat codes of
:mod:`handlers.chat.errors`. What clients may publish:

* ``{"type": "message", "text": str, "attachments": [attachment...],
  "client_msg_id": str}`` - ``text`` at most ``chat_max_text`` characters;
  ``attachments`` at most :data:`MAX_ATTACHMENTS` references
  ``{"kind": "image"|"video"|"audio"|"file", "ref": str, "name": str}``
  (``name`` optional); ``client_msg_id`` 1-64 of ``A-Z a-z 0-9 - _ .``.
  Text, attachments and client_msg_id are each optional (null = absent), but
  a message needs text other than whitespace or an attachment.
* ``{"type": "typing"}`` - a typing indicator, delivered live only.

Any other field is refused, sender fields included: who sent a publication
is the publication's ``info`` (user id, and the display name from the token),
never the data. Types the server publishes (``delete``, ``slow_mode``,
``timeout``, ``viewers``, ``read``) are built here too and are refused from
clients like any unknown type.
"""

from __future__ import annotations

from typing import Final, Literal

import orjson

from handlers.chat.errors import (
    ERROR_CHAT_BAD_ATTACHMENT,
    ERROR_CHAT_BAD_CLIENT_MSG_ID,
    ERROR_CHAT_EMPTY,
    ERROR_CHAT_INVALID,
    ERROR_CHAT_TEXT_TOO_LONG,
)
from signaling.errors import SignalError
from signaling.values import JSON, JSONObject, record

__all__ = [
    "ATTACHMENT_KINDS",
    "MAX_ATTACHMENTS",
    "MAX_CLIENT_MSG_ID",
    "Attachment",
    "ChatMessage",
    "ClientPublication",
    "Typing",
    "delete_event",
    "parse_publication",
    "read_event",
    "slow_mode_event",
    "timeout_event",
    "viewers_event",
]

AttachmentKind = Literal["image", "video", "audio", "file"]
_KINDS: Final[dict[str, AttachmentKind]] = {
    "image": "image",
    "video": "video",
    "audio": "audio",
    "file": "file",
}
ATTACHMENT_KINDS: Final = frozenset(_KINDS)
MAX_ATTACHMENTS: Final = 10
MAX_REF_LENGTH: Final = 256
MAX_NAME_LENGTH: Final = 200
MAX_CLIENT_MSG_ID: Final = 64
# No ":" or braces: the id is part of a store key (see handlers.chat.messages).
_CLIENT_MSG_ID_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_."
)
_MESSAGE_FIELDS: Final = frozenset({"type", "text", "attachments", "client_msg_id"})
_ATTACHMENT_FIELDS: Final = frozenset({"kind", "ref", "name"})


@record
class Attachment:
    """A reference to media uploaded elsewhere (the platform's storage)."""

    kind: AttachmentKind
    ref: str
    name: str | None = None

    def to_json(self) -> JSONObject:
        out: JSONObject = {"kind": self.kind, "ref": self.ref}
        if self.name is not None:
            out["name"] = self.name
        return out


@record
class ChatMessage:
    text: str | None
    attachments: tuple[Attachment, ...] = ()
    client_msg_id: str | None = None

    def encode(self) -> bytes:
        """The normalized data that is published (no unknown fields, no nulls)."""
        out: JSONObject = {"type": "message"}
        if self.text is not None:
            out["text"] = self.text
        if self.attachments:
            out["attachments"] = [a.to_json() for a in self.attachments]
        if self.client_msg_id is not None:
            out["client_msg_id"] = self.client_msg_id
        return orjson.dumps(out)


@record
class Typing:
    def encode(self) -> bytes:
        return b'{"type":"typing"}'


ClientPublication = ChatMessage | Typing


def parse_publication(data: JSON, *, max_text: int) -> ClientPublication:
    """Validate a client's publication data.

    Args:
        data: the decoded publication data.
        max_text: the longest text allowed, in characters (``chat_max_text``).

    Raises:
        SignalError: 1100 invalid (shape, type, unknown field), 1101 text too
            long, 1102 empty, 1103 bad attachment, 1104 bad client_msg_id.
    """
    if not isinstance(data, dict):
        raise SignalError(ERROR_CHAT_INVALID)
    kind = data.get("type")
    if kind == "typing":
        if len(data) != 1:
            raise SignalError(ERROR_CHAT_INVALID)
        return Typing()
    if kind != "message" or not _MESSAGE_FIELDS.issuperset(data):
        raise SignalError(ERROR_CHAT_INVALID)
    text = data.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise SignalError(ERROR_CHAT_INVALID)
        if len(text) > max_text:
            raise SignalError(ERROR_CHAT_TEXT_TOO_LONG)
    attachments = _parse_attachments(data.get("attachments"))
    client_msg_id = _parse_client_msg_id(data.get("client_msg_id"))
    if (text is None or not text.strip()) and not attachments:
        raise SignalError(ERROR_CHAT_EMPTY)
    return ChatMessage(text, attachments, client_msg_id)


def _parse_attachments(value: JSON) -> tuple[Attachment, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > MAX_ATTACHMENTS:
        raise SignalError(ERROR_CHAT_BAD_ATTACHMENT)
    return tuple(_parse_attachment(item) for item in value)


def _parse_attachment(item: JSON) -> Attachment:
    if not isinstance(item, dict) or not _ATTACHMENT_FIELDS.issuperset(item):
        raise SignalError(ERROR_CHAT_BAD_ATTACHMENT)
    kind, ref, name = item.get("kind"), item.get("ref"), item.get("name")
    checked_kind = _KINDS.get(kind) if isinstance(kind, str) else None
    if checked_kind is None:
        raise SignalError(ERROR_CHAT_BAD_ATTACHMENT)
    if not _printable(ref, MAX_REF_LENGTH):
        raise SignalError(ERROR_CHAT_BAD_ATTACHMENT)
    if name is not None and not _printable(name, MAX_NAME_LENGTH):
        raise SignalError(ERROR_CHAT_BAD_ATTACHMENT)
    assert isinstance(ref, str)  # _printable checked it; narrows for mypy
    return Attachment(checked_kind, ref, name if isinstance(name, str) else None)


def _printable(value: JSON, max_length: int) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= max_length
        and value.isprintable()
        and bool(value.strip())
    )


def _parse_client_msg_id(value: JSON) -> str | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_CLIENT_MSG_ID
        or not _CLIENT_MSG_ID_CHARS.issuperset(value)
    ):
        raise SignalError(ERROR_CHAT_BAD_CLIENT_MSG_ID)
    return value


# --- what the server publishes -------------------------------------------------------


def delete_event(offset: int) -> bytes:
    """Tombstone: clients hide the publication at ``offset`` of the channel."""
    return orjson.dumps({"type": "delete", "offset": offset})


def slow_mode_event(interval_s: int) -> bytes:
    """Slow mode changed (0: off)."""
    return orjson.dumps({"type": "slow_mode", "interval_s": interval_s})


def timeout_event(user: str, duration_s: int) -> bytes:
    """``user`` may not publish for ``duration_s`` (0: the timeout was lifted)."""
    return orjson.dumps({"type": "timeout", "user": user, "duration_s": duration_s})


def viewers_event(count: int, peak: int) -> bytes:
    """Distinct users in the room now, and the most seen since it went live."""
    return orjson.dumps({"type": "viewers", "count": count, "peak": peak})


def read_event(user: str, offset: int) -> bytes:
    """``user`` has read the conversation up to ``offset``."""
    return orjson.dumps({"type": "read", "user": user, "offset": offset})
