"""Error replies and disconnects of the Centrifuge client protocol, as values.

An :class:`ErrorReply` fails one command and keeps the connection open; a
:class:`Disconnect` ends the connection (sent as the WebSocket close code).
Codes follow centrifuge ``errors.go`` and ``disconnect.go``:

* error codes 100-199 are the protocol's; 1000+ is free for application use
  (handlers define theirs in their own modules);
* disconnect codes 3000-3499 and 4000-4499 tell the client to reconnect,
  3500-3999 and 4500-4999 are terminal (no automatic reconnect).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "DISCONNECT_BAD_REQUEST",
    "DISCONNECT_CHANNEL_LIMIT",
    "DISCONNECT_CONNECTION_LIMIT",
    "DISCONNECT_EXPIRED",
    "DISCONNECT_FORCE_NO_RECONNECT",
    "DISCONNECT_FORCE_RECONNECT",
    "DISCONNECT_INAPPROPRIATE_PROTOCOL",
    "DISCONNECT_INSUFFICIENT_STATE",
    "DISCONNECT_INTERNAL",
    "DISCONNECT_INVALID_TOKEN",
    "DISCONNECT_NOT_AVAILABLE",
    "DISCONNECT_NO_PONG",
    "DISCONNECT_PERMISSION_DENIED",
    "DISCONNECT_SHUTDOWN",
    "DISCONNECT_SLOW",
    "DISCONNECT_STALE",
    "DISCONNECT_SUBSCRIPTION_EXPIRED",
    "DISCONNECT_TOO_MANY_ERRORS",
    "DISCONNECT_TOO_MANY_REQUESTS",
    "DISCONNECT_WRITE_ERROR",
    "ERROR_ALREADY_SUBSCRIBED",
    "ERROR_BAD_REQUEST",
    "ERROR_EXPIRED",
    "ERROR_INTERNAL",
    "ERROR_LIMIT_EXCEEDED",
    "ERROR_METHOD_NOT_FOUND",
    "ERROR_NOT_AVAILABLE",
    "ERROR_PERMISSION_DENIED",
    "ERROR_TOKEN_EXPIRED",
    "ERROR_TOO_MANY_REQUESTS",
    "ERROR_UNAUTHORIZED",
    "ERROR_UNKNOWN_CHANNEL",
    "ERROR_UNRECOVERABLE_POSITION",
    "Disconnect",
    "ErrorReply",
    "SignalError",
]


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Fails one command; the connection stays open.

    ``temporary`` tells the SDKs to retry with backoff.
    """

    code: int
    message: str
    temporary: bool = False


@dataclass(frozen=True, slots=True)
class Disconnect:
    """Ends the connection with a WebSocket close frame carrying ``code``.

    ``reason`` must stay under 123 bytes (close-frame limit). ``reconnect`` is
    derived from the code range, as both SDKs do.
    """

    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        return not (3500 <= self.code < 4000 or 4500 <= self.code < 5000)


class SignalError(Exception):
    """Raised by handlers and the core to fail a command or end a connection.

    The server converts it at one point: an ``ErrorReply`` becomes an error
    reply, a ``Disconnect`` a close frame.
    """

    def __init__(self, value: ErrorReply | Disconnect) -> None:
        super().__init__(
            f"{value.code} {getattr(value, 'message', None) or getattr(value, 'reason', '')}"
        )
        self.value = value


# --- error replies (client.proto Error; centrifuge errors.go) ---------------
ERROR_INTERNAL = ErrorReply(100, "internal server error", temporary=True)
ERROR_UNAUTHORIZED = ErrorReply(101, "unauthorized")
ERROR_UNKNOWN_CHANNEL = ErrorReply(102, "unknown channel")
ERROR_PERMISSION_DENIED = ErrorReply(103, "permission denied")
ERROR_METHOD_NOT_FOUND = ErrorReply(104, "method not found")
ERROR_ALREADY_SUBSCRIBED = ErrorReply(105, "already subscribed")
ERROR_LIMIT_EXCEEDED = ErrorReply(106, "limit exceeded")
ERROR_BAD_REQUEST = ErrorReply(107, "bad request")
ERROR_NOT_AVAILABLE = ErrorReply(108, "not available")
ERROR_TOKEN_EXPIRED = ErrorReply(109, "token expired")
ERROR_EXPIRED = ErrorReply(110, "expired")
ERROR_TOO_MANY_REQUESTS = ErrorReply(111, "too many requests", temporary=True)
ERROR_UNRECOVERABLE_POSITION = ErrorReply(112, "unrecoverable position")

# --- disconnects (centrifuge disconnect.go) ---------------------------------
# 3000-3499: the client reconnects.
DISCONNECT_SHUTDOWN = Disconnect(3001, "shutdown")
DISCONNECT_INTERNAL = Disconnect(3004, "internal server error")
DISCONNECT_EXPIRED = Disconnect(3005, "connection expired")
DISCONNECT_SUBSCRIPTION_EXPIRED = Disconnect(3006, "subscription expired")
DISCONNECT_SLOW = Disconnect(3008, "slow")
DISCONNECT_WRITE_ERROR = Disconnect(3009, "write error")
DISCONNECT_INSUFFICIENT_STATE = Disconnect(3010, "insufficient state")
DISCONNECT_FORCE_RECONNECT = Disconnect(3011, "force reconnect")
DISCONNECT_NO_PONG = Disconnect(3012, "no pong")
DISCONNECT_TOO_MANY_REQUESTS = Disconnect(3013, "too many requests")
# 3500-3999: terminal, the client does not reconnect by itself.
DISCONNECT_INVALID_TOKEN = Disconnect(3500, "invalid token")
DISCONNECT_BAD_REQUEST = Disconnect(3501, "bad request")
DISCONNECT_STALE = Disconnect(3502, "stale")
DISCONNECT_FORCE_NO_RECONNECT = Disconnect(3503, "force disconnect")
DISCONNECT_CONNECTION_LIMIT = Disconnect(3504, "connection limit")
DISCONNECT_CHANNEL_LIMIT = Disconnect(3505, "channel limit")
DISCONNECT_INAPPROPRIATE_PROTOCOL = Disconnect(3506, "inappropriate protocol")
DISCONNECT_PERMISSION_DENIED = Disconnect(3507, "permission denied")
DISCONNECT_NOT_AVAILABLE = Disconnect(3508, "not available")
DISCONNECT_TOO_MANY_ERRORS = Disconnect(3509, "too many errors")
