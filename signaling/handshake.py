"""The common WebSocket upgrade request, parsed and answered without websockets.

A connection storm (every client reconnecting after a deploy) is mostly
handshakes. websockets parses a request through a generator per line, builds
``Headers``, a ``Request``, a ``Response`` with a Date header, and serializes
it: about a fifth of a connection's set-up CPU. :func:`parse_plain_upgrade`
recognises the request every client SDK sends, in one pass over the bytes, and
:func:`switching_protocols` is the 101 that answers it.

It only ever accepts: any request it is not sure of (split over several reads,
a repeated or malformed field, an extension or subprotocol to negotiate, a
body) is ``None``, and websockets parses it and answers, including with the
right 4xx. So the checks below are websockets' (``ServerProtocol.process_request``
and ``Request.parse``), never looser.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qsl

__all__ = [
    "PROTOBUF_REFUSAL",
    "PlainUpgrade",
    "RequestHeaders",
    "parse_plain_upgrade",
    "protobuf_requested",
    "switching_protocols",
]

# RFC 6455 1.3: the GUID appended to the key before hashing.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# websockets' limits (http11.MAX_LINE_LENGTH, MAX_NUM_HEADERS); a request this
# large is unusual enough to leave to websockets, which answers 414/431.
_MAX_REQUEST_BYTES: Final = 8192
_MAX_HEADERS: Final = 128
# RFC 9110 5.1 token and 5.5 field value, as websockets checks them (the
# request decoded as latin-1: one character per byte).
_TOKEN_CHARS: Final = r"[-!#$%&'*+.^_`|~0-9a-zA-Z]"
_OPTION: Final = re.compile(f"{_TOKEN_CHARS}+")
_FIELD_LINES: Final = re.compile(rf"(?:{_TOKEN_CHARS}+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
# One field line of a checked block: its name and its value (no CR in it).
_FIELD: Final = re.compile(rf"({_TOKEN_CHARS}+):([^\r]*)\r\n")
# A request target without spaces or control characters.
_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
# Fields that must appear once for the fast path (websockets rejects repeats
# of the key, version and origin; a repeated Upgrade is left to it too).
_SINGLE: Final = frozenset(
    {"upgrade", "sec-websocket-key", "sec-websocket-version", "origin", "content-length"}
)
# Fields whose presence sends the request to websockets.
_NEGOTIATED: Final = frozenset({"sec-websocket-protocol", "transfer-encoding"})


# The body of the 400 that answers a client asking for the protobuf format.
PROTOBUF_REFUSAL: Final = (
    b"This server speaks the Centrifuge client protocol in JSON only; the protobuf "
    b"format (centrifuge-protobuf, format=protobuf) is not supported.\n"
)


def protobuf_requested(path: str, subprotocols: str | None) -> bool:
    """Whether an upgrade asks for the Centrifuge protobuf format, as
    Centrifuge reads it: a ``format`` or a ``cf_protocol`` query parameter of
    ``protobuf``, or the subprotocol Centrifuge would select
    (``subprotocols``: the Sec-WebSocket-Protocol value) being
    ``centrifuge-protobuf``: offered without ``centrifuge-json``, which it
    prefers. Such a client (the Swift, Kotlin and Dart SDKs, or centrifuge-js's
    protobuf build) would send binary frames this server cannot read: it is
    refused at the upgrade, with a reason, rather than cut off at its first
    frame."""
    _, _, query = path.partition("?")
    if query and any(
        name in ("format", "cf_protocol") and value == "protobuf"
        for name, value in parse_qsl(query, keep_blank_values=True)
    ):
        return True
    if not subprotocols:
        return False
    offered = {name.strip() for name in subprotocols.split(",")}
    return "centrifuge-protobuf" in offered and "centrifuge-json" not in offered


class RequestHeaders(Mapping[str, str]):
    """Request fields by case-insensitive name; a repeated field reads as its
    values joined with ", " (RFC 9110 5.3), as the transport's view of
    websockets' ``Headers`` does."""

    __slots__ = ("_fields",)

    def __init__(self, fields: dict[str, str]) -> None:
        self._fields = fields  # lower-case names

    def __getitem__(self, key: str) -> str:
        return self._fields[key.lower()]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self._fields

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


@dataclass(frozen=True, slots=True)
class PlainUpgrade:
    """An acceptable upgrade request.

    Attributes:
        path: request target, query string included.
        headers: field names in lower case; repeated fields joined with ", ".
        accept: the ``Sec-WebSocket-Accept`` value for the 101.
        rest: bytes that followed the request (frames sent without waiting).
    """

    path: str
    headers: RequestHeaders
    accept: bytes
    rest: bytes


def parse_plain_upgrade(
    data: bytes,
    websocket_path: str,
    origins: Collection[str | None] | None,
    *,
    extensions_ignored: bool,
) -> PlainUpgrade | None:
    """Parse ``data`` if it starts with a complete, plain, valid upgrade request.

    Args:
        data: the first bytes read from the socket.
        websocket_path: the only path upgraded (the query string is ignored).
        origins: accepted Origin values (``None`` in it: no Origin header);
            ``None`` accepts any.
        extensions_ignored: True when the server negotiates no extension, so
            an offered ``Sec-WebSocket-Extensions`` is ignored, as websockets
            does; False sends such requests to websockets to negotiate.

    Returns:
        The request, or None to let websockets handle it.
    """
    end = data.find(b"\r\n\r\n", 0, _MAX_REQUEST_BYTES)
    if end < 0:
        return None
    line_end = data.find(b"\r\n", 0, end + 2)
    method, _, rest_of_line = data[:line_end].partition(b" ")
    raw_path, _, version = rest_of_line.partition(b" ")
    if method != b"GET" or version != b"HTTP/1.1" or not _TARGET.fullmatch(raw_path):
        return None
    path = raw_path.decode("ascii")
    if path.partition("?")[0] != websocket_path:
        return None
    # The field lines, each with its CRLF, checked whole by one regex, then split.
    block = data[line_end + 2 : end + 2].decode("latin-1")
    if not _FIELD_LINES.fullmatch(block):
        return None
    fields = _FIELD.findall(block)
    if len(fields) > _MAX_HEADERS:
        return None
    headers: dict[str, str] = {}
    for raw_name, raw_value in fields:
        name = raw_name.lower()
        value = raw_value.strip(" \t")
        if name in headers:
            if name in _SINGLE:
                return None
            value = f"{headers[name]}, {value}"
        headers[name] = value
    if not _NEGOTIATED.isdisjoint(headers):
        return None
    if not extensions_ignored and "sec-websocket-extensions" in headers:
        return None
    if headers.get("content-length", "0") != "0":
        return None
    if headers.get("upgrade", "").lower() != "websocket":
        return None
    # A comma-separated list of tokens, empty elements allowed (RFC 9110 5.6.1).
    options = [option.strip(" \t") for option in headers.get("connection", "").split(",")]
    if not all(_OPTION.fullmatch(option) for option in options if option):
        return None
    if "upgrade" not in (option.lower() for option in options):
        return None
    if headers.get("sec-websocket-version") != "13":
        return None
    key = headers.get("sec-websocket-key", "")
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except (binascii.Error, ValueError):
        return None
    if origins is not None and headers.get("origin") not in origins:
        return None
    digest = hashlib.sha1(
        key.encode("ascii") + _GUID
    ).digest()  # RFC 6455 4.2.2: SHA-1 by definition
    accept = base64.b64encode(digest)
    return PlainUpgrade(path, RequestHeaders(headers), accept, data[end + 4 :])


def switching_protocols(accept: bytes) -> bytes:
    """The 101 response to an upgrade whose key hashes to ``accept``.

    No Date header (optional on 1xx, RFC 9110 6.6.1), no extension, no
    subprotocol: :func:`parse_plain_upgrade` only passes requests that need none.
    """
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
    )
