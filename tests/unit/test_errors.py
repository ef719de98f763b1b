"""Error replies and disconnects: codes, reconnect semantics, close-frame limits."""

from __future__ import annotations

import pytest

import signaling.errors as errors
from signaling.errors import (
    DISCONNECT_BAD_REQUEST,
    DISCONNECT_INSUFFICIENT_STATE,
    DISCONNECT_NO_PONG,
    DISCONNECT_SHUTDOWN,
    DISCONNECT_SLOW,
    ERROR_INTERNAL,
    ERROR_UNRECOVERABLE_POSITION,
    Disconnect,
    ErrorReply,
    SignalError,
)

DISCONNECTS: dict[str, Disconnect] = {
    name: value for name, value in vars(errors).items() if name.startswith("DISCONNECT_")
}
ERRORS: dict[str, ErrorReply] = {
    name: value for name, value in vars(errors).items() if name.startswith("ERROR_")
}


def test_constants_are_found_and_exported() -> None:
    assert len(DISCONNECTS) >= 20
    assert len(ERRORS) == 13
    assert all(isinstance(v, Disconnect) for v in DISCONNECTS.values())
    assert all(isinstance(v, ErrorReply) for v in ERRORS.values())
    assert set(DISCONNECTS) | set(ERRORS) <= set(errors.__all__)


@pytest.mark.parametrize(
    ("code", "reconnect"),
    [
        (3000, True),
        (3001, True),
        (3008, True),
        (3012, True),
        (3499, True),
        (3500, False),
        (3501, False),
        (3999, False),
        (4000, True),
        (4499, True),
        (4500, False),
        (4999, False),
        (5000, True),
    ],
)
def test_disconnect_reconnect_by_code(code: int, reconnect: bool) -> None:
    assert Disconnect(code, "x").reconnect is reconnect


def test_named_disconnects_reconnect() -> None:
    assert DISCONNECT_SHUTDOWN.code == 3001
    assert DISCONNECT_SHUTDOWN.reconnect
    assert DISCONNECT_SLOW.code == 3008
    assert DISCONNECT_SLOW.reconnect
    assert DISCONNECT_NO_PONG.code == 3012
    assert DISCONNECT_NO_PONG.reconnect
    assert DISCONNECT_INSUFFICIENT_STATE.code == 3010
    assert DISCONNECT_INSUFFICIENT_STATE.reconnect
    assert DISCONNECT_BAD_REQUEST.code == 3501
    assert not DISCONNECT_BAD_REQUEST.reconnect
    assert errors.DISCONNECT_INVALID_TOKEN.code == 3500
    assert not errors.DISCONNECT_INVALID_TOKEN.reconnect


@pytest.mark.parametrize("name", sorted(DISCONNECTS))
def test_disconnect_reason_fits_close_frame(name: str) -> None:
    value = DISCONNECTS[name]
    assert value.reason
    assert len(value.reason.encode()) < 123


@pytest.mark.parametrize("name", sorted(DISCONNECTS))
def test_disconnect_codes_in_protocol_ranges(name: str) -> None:
    # Close codes below 3000 belong to the WebSocket protocol itself.
    assert 3000 <= DISCONNECTS[name].code < 5000


def test_disconnect_codes_unique() -> None:
    codes = [d.code for d in DISCONNECTS.values()]
    assert len(codes) == len(set(codes))


def test_error_codes_unique_and_in_protocol_range() -> None:
    codes = [e.code for e in ERRORS.values()]
    assert len(codes) == len(set(codes))
    assert sorted(codes) == list(range(100, 113))


def test_only_internal_and_rate_limit_errors_are_temporary() -> None:
    temporary = {name for name, e in ERRORS.items() if e.temporary}
    assert temporary == {"ERROR_INTERNAL", "ERROR_TOO_MANY_REQUESTS"}
    assert ERROR_INTERNAL.code == 100
    assert errors.ERROR_TOO_MANY_REQUESTS.code == 111


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("ERROR_METHOD_NOT_FOUND", 104),
        ("ERROR_ALREADY_SUBSCRIBED", 105),
        ("ERROR_TOKEN_EXPIRED", 109),
        ("ERROR_UNRECOVERABLE_POSITION", 112),
        ("ERROR_UNKNOWN_CHANNEL", 102),
        ("ERROR_PERMISSION_DENIED", 103),
    ],
)
def test_error_codes_match_centrifuge(name: str, code: int) -> None:
    assert ERRORS[name].code == code


def test_signal_error_carries_value() -> None:
    err = SignalError(ERROR_UNRECOVERABLE_POSITION)
    assert err.value is ERROR_UNRECOVERABLE_POSITION
    assert "112" in str(err)
    dis = SignalError(DISCONNECT_SLOW)
    assert dis.value is DISCONNECT_SLOW
    assert "3008" in str(dis)
    with pytest.raises(SignalError) as info:
        raise SignalError(DISCONNECT_BAD_REQUEST)
    assert isinstance(info.value.value, Disconnect)
    assert info.value.value.code == 3501


def test_values_are_immutable() -> None:
    with pytest.raises(AttributeError):
        DISCONNECT_SLOW.code = 1  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ERROR_INTERNAL.temporary = False  # type: ignore[misc]
