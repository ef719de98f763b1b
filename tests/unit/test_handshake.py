"""The upgrade fast path accepts only what websockets accepts, and answers alike."""

from __future__ import annotations

import pytest
from websockets.http11 import Request
from websockets.server import ServerProtocol

from signaling.handshake import parse_plain_upgrade, protobuf_requested, switching_protocols

PATH = "/connection/websocket"
# RFC 6455 1.3's worked example.
KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="

BASE = [
    "Host: 127.0.0.1:8000",
    "Upgrade: websocket",
    "Connection: Upgrade",
    f"Sec-WebSocket-Key: {KEY}",
    "Sec-WebSocket-Version: 13",
]


def request(*headers: str, line: str = f"GET {PATH} HTTP/1.1", base: bool = True) -> bytes:
    fields = [*BASE, *headers] if base else list(headers)
    return "\r\n".join([line, *fields, "", ""]).encode("latin-1")


def without(name: str) -> list[str]:
    return [h for h in BASE if not h.lower().startswith(name.lower() + ":")]


def websockets_accepts(data: bytes, origins: list[str | None] | None = None) -> bool:
    """What websockets' own server protocol answers (101 or not)."""
    protocol = ServerProtocol(origins=origins)  # type: ignore[arg-type]
    protocol.receive_data(data)
    requests = [e for e in protocol.events_received() if isinstance(e, Request)]
    if not requests:
        return False
    return protocol.accept(requests[0]).status_code == 101


def test_accepts_the_plain_request_and_computes_the_rfc_accept_key() -> None:
    frame = b"\x81\x83abcd\x00\x00\x00"
    upgrade = parse_plain_upgrade(
        request("Origin: https://app.example") + frame, PATH, None, extensions_ignored=True
    )
    assert upgrade is not None
    assert upgrade.accept == ACCEPT
    assert upgrade.path == PATH
    assert upgrade.rest == frame
    assert upgrade.headers["sec-websocket-key"] == KEY
    assert upgrade.headers["Sec-WebSocket-Key"] == KEY  # any case
    assert "ORIGIN" in upgrade.headers and "x-missing" not in upgrade.headers
    assert upgrade.headers.get("x-missing") is None


def test_the_101_is_what_a_client_checks() -> None:
    response = switching_protocols(ACCEPT)
    assert response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"\r\nUpgrade: websocket\r\n" in response
    assert b"\r\nConnection: Upgrade\r\n" in response
    assert response.endswith(b"\r\nSec-WebSocket-Accept: " + ACCEPT + b"\r\n\r\n")


def test_values_keep_inner_whitespace_and_lose_the_outer() -> None:
    upgrade = parse_plain_upgrade(
        request("X-A: \t a \t b" + " " * 3000, "X-B:"), PATH, None, extensions_ignored=True
    )
    assert upgrade is not None
    assert upgrade.headers["x-a"] == "a \t b"
    assert upgrade.headers["x-b"] == ""


def test_repeated_fields_read_joined() -> None:
    upgrade = parse_plain_upgrade(
        request("X-Forwarded-For: 10.0.0.1", "x-forwarded-for: 10.0.0.2"),
        PATH,
        None,
        extensions_ignored=True,
    )
    assert upgrade is not None
    assert upgrade.headers["X-Forwarded-For"] == "10.0.0.1, 10.0.0.2"


ACCEPTED = {
    "query string": request(line=f"GET {PATH}?v=2&t=x HTTP/1.1"),
    "connection list": request(
        *without("Connection"), "Connection: keep-alive, , Upgrade", base=False
    ),
    "lower-case upgrade": request(*without("Upgrade"), "Upgrade: WebSocket", base=False),
    "content-length 0": request("Content-Length: 0"),
    "extension offer ignored": request("Sec-WebSocket-Extensions: permessage-deflate"),
    "tab around value": request("X-A:\tvalue\t"),
}

# Each one is left to websockets (None), whatever websockets then answers.
DECLINED = {
    "incomplete": request()[:-2],
    "post": request(line=f"POST {PATH} HTTP/1.1"),
    "http/1.0": request(line=f"GET {PATH} HTTP/1.0"),
    "other path": request(line="GET /other HTTP/1.1"),
    "path prefix": request(line=f"GET {PATH}x HTTP/1.1"),
    "extra on request line": request(line=f"GET {PATH} HTTP/1.1 x"),
    "control char in target": request(line=f"GET {PATH}?a\x7fb HTTP/1.1"),
    "bare LF in a value": request("X-A: 1\nX-B: 2"),
    "no key": request(*without("Sec-WebSocket-Key"), base=False),
    "two keys": request(f"Sec-WebSocket-Key: {KEY}"),
    "short key": request(*without("Sec-WebSocket-Key"), "Sec-WebSocket-Key: AAAA", base=False),
    "key not base64": request(*without("Sec-WebSocket-Key"), "Sec-WebSocket-Key: ???", base=False),
    "version 8": request(*without("Sec-WebSocket-Version"), "Sec-WebSocket-Version: 8", base=False),
    "no connection upgrade": request(*without("Connection"), "Connection: keep-alive", base=False),
    "bad connection token": request(*without("Connection"), "Connection: Upgrade, a b", base=False),
    "upgrade to h2c": request(*without("Upgrade"), "Upgrade: h2c", base=False),
    "two upgrades": request("Upgrade: websocket"),
    "subprotocol": request("Sec-WebSocket-Protocol: centrifuge-protobuf"),
    "body": request("Content-Length: 5"),
    "chunked": request("Transfer-Encoding: chunked"),
    "bad header name": request("X A: 1"),
    "no colon": request("X-A"),
    "control char in value": request("X-A: a\x01b"),
    "two origins": request("Origin: https://a.example", "Origin: https://b.example"),
    "too many fields": request(*[f"X-{i}: {i}" for i in range(130)]),
}


@pytest.mark.parametrize("name", ACCEPTED)
def test_accepted_requests_are_accepted_by_websockets_too(name: str) -> None:
    data = ACCEPTED[name]
    assert parse_plain_upgrade(data, PATH, None, extensions_ignored=True) is not None
    assert websockets_accepts(data)


@pytest.mark.parametrize("name", DECLINED)
def test_unusual_requests_are_left_to_websockets(name: str) -> None:
    assert parse_plain_upgrade(DECLINED[name], PATH, None, extensions_ignored=True) is None


def test_extension_offer_goes_to_websockets_when_compression_is_on() -> None:
    data = request("Sec-WebSocket-Extensions: permessage-deflate")
    assert parse_plain_upgrade(data, PATH, None, extensions_ignored=False) is None
    assert parse_plain_upgrade(request(), PATH, None, extensions_ignored=False) is not None


def test_origin_allow_list() -> None:
    origins: list[str | None] = ["https://app.example", None]
    allowed = request("Origin: https://app.example")
    other = request("Origin: https://evil.example")
    assert parse_plain_upgrade(allowed, PATH, origins, extensions_ignored=True) is not None
    assert parse_plain_upgrade(request(), PATH, origins, extensions_ignored=True) is not None
    assert parse_plain_upgrade(other, PATH, origins, extensions_ignored=True) is None
    assert not websockets_accepts(other, origins)
    assert websockets_accepts(allowed, origins)


def test_the_fast_path_is_never_looser_than_websockets() -> None:
    """Every request of this file that the fast path accepts, websockets does."""
    for data in [*ACCEPTED.values(), *DECLINED.values()]:
        if parse_plain_upgrade(data, PATH, None, extensions_ignored=True) is not None:
            assert websockets_accepts(data), data


def test_websockets_answers_the_same_accept_key() -> None:
    protocol = ServerProtocol()
    protocol.receive_data(request())
    (event,) = protocol.events_received()
    assert isinstance(event, Request)
    response = protocol.accept(event)
    assert response.status_code == 101
    assert response.headers["Sec-WebSocket-Accept"].encode() == ACCEPT


@pytest.mark.parametrize(
    ("path", "subprotocols", "expected"),
    [
        ("/connection/websocket", None, False),
        ("/connection/websocket?format=protobuf", None, True),
        ("/connection/websocket?cf_protocol=protobuf", None, True),
        ("/connection/websocket?format=json", None, False),
        # As in Centrifuge, either parameter or the subprotocol can ask for it.
        ("/connection/websocket?format=json&cf_protocol=protobuf", None, True),
        ("/connection/websocket?format=json", "centrifuge-protobuf", True),
        ("/connection/websocket", "centrifuge-protobuf", True),
        ("/connection/websocket", "chat, centrifuge-protobuf", True),
        ("/connection/websocket", "centrifuge-json", False),
        # Both offered: Centrifuge selects JSON, its first.
        ("/connection/websocket", "centrifuge-protobuf, centrifuge-json", False),
        ("/connection/websocket", "something-else", False),
    ],
)
def test_protobuf_requested(path: str, subprotocols: str | None, expected: bool) -> None:
    assert protobuf_requested(path, subprotocols) is expected
