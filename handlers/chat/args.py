"""RPC arguments: small checked readers over the decoded request data.

Every malformed argument is the protocol's 107 bad request; these helpers
raise it so that handlers read like their happy path.
"""

from __future__ import annotations

from typing import Final

from signaling.errors import ERROR_BAD_REQUEST, SignalError
from signaling.values import JSON, JSONObject

__all__ = [
    "MAX_USER_ID",
    "arg_int",
    "arg_optional_int",
    "arg_str",
    "arg_user",
    "bad_request",
    "check_user",
    "object_args",
]

# Longest user id accepted as an argument (ids come from tokens).
MAX_USER_ID: Final = 128
# Larger integers lose precision in JavaScript clients.
_MAX_SAFE_INT: Final = 2**53 - 1


def bad_request() -> SignalError:
    return SignalError(ERROR_BAD_REQUEST)


def object_args(data: JSON) -> JSONObject:
    """The request data as an object, or 107."""
    if not isinstance(data, dict):
        raise bad_request()
    return data


def arg_str(args: JSONObject, name: str, max_length: int) -> str:
    value = args.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= max_length:
        raise bad_request()
    return value


def arg_user(args: JSONObject, name: str = "user") -> str:
    return check_user(args.get(name))


def check_user(value: JSON) -> str:
    """A user id: printable, no surrounding spaces, 1-128 characters, no braces
    (it goes into store keys, where braces would move a key out of its Redis
    Cluster hash tag)."""
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= MAX_USER_ID
        or not value.isprintable()
        or value != value.strip()
        or "{" in value
        or "}" in value
    ):
        raise bad_request()
    return value


def arg_int(args: JSONObject, name: str, low: int, high: int = _MAX_SAFE_INT) -> int:
    """An integer in [low, high]. Whole floats (``5.0``) are accepted: some
    JSON encoders write them."""
    value = args.get(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise bad_request()
    return value


def arg_optional_int(
    args: JSONObject, name: str, low: int, high: int = _MAX_SAFE_INT
) -> int | None:
    """Like :func:`arg_int`, or None when absent or null."""
    if args.get(name) is None:
        return None
    return arg_int(args, name, low, high)
