"""Error replies of the call methods (the 1000 band, free for handlers).

Every refusal of a ``call.*`` RPC is one of these constants; docs/calls.md
lists them with when each is sent. None is ``temporary``: the SDKs would
retry a temporary error by themselves, and re-sending an invite or an accept
is the app's decision, not the SDK's. Failures of the shared store are not
call errors: they answer the core's 100 (internal, temporary).
"""

from __future__ import annotations

from signaling.errors import ErrorReply

__all__ = [
    "CALL_BAD_REQUEST",
    "CALL_BUSY",
    "CALL_CALLEE_BUSY",
    "CALL_NOT_CONFIGURED",
    "CALL_NOT_FOUND",
    "CALL_RATE_LIMITED",
    "CALL_SELF",
    "CALL_WRONG_ROLE",
    "CALL_WRONG_STATE",
    "CODES",
]

# The request's data is not what the method takes (see docs/calls.md, wire contract).
CALL_BAD_REQUEST = ErrorReply(1000, "invalid call request")
# call.join / call.renew_token on a server without AGORA_APP_ID and AGORA_APP_CERTIFICATE.
CALL_NOT_CONFIGURED = ErrorReply(1001, "calls not configured")
# No such call, or the caller of the method is not one of its two participants:
# an outsider cannot tell the two apart.
CALL_NOT_FOUND = ErrorReply(1002, "call not found")
# call.invite with oneself as the callee.
CALL_SELF = ErrorReply(1003, "cannot call yourself")
# call.invite while the caller is already ringing or in a call.
CALL_BUSY = ErrorReply(1004, "already in a call")
# call.invite while the callee is already ringing or in a call.
CALL_CALLEE_BUSY = ErrorReply(1005, "callee busy")
# More than call_invites_per_minute invites by this caller in the current minute.
CALL_RATE_LIMITED = ErrorReply(1006, "too many call invites")
# The call's state does not allow the method (answered twice, cancelled after
# the answer, joined before it, lost a race...). The message names the state.
CALL_WRONG_STATE = ErrorReply(1007, "call state does not allow this")
# The method is the other participant's (only the callee accepts or rejects,
# only the caller cancels).
CALL_WRONG_ROLE = ErrorReply(1008, "not allowed for your role in the call")

CODES: tuple[ErrorReply, ...] = (
    CALL_BAD_REQUEST,
    CALL_NOT_CONFIGURED,
    CALL_NOT_FOUND,
    CALL_SELF,
    CALL_BUSY,
    CALL_CALLEE_BUSY,
    CALL_RATE_LIMITED,
    CALL_WRONG_STATE,
    CALL_WRONG_ROLE,
)
