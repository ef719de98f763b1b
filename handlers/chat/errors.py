"""Chat error replies (the application band 1100-1149 is chat's).

Each refusal of a chat publication or moderation request has its own code,
so clients branch on codes, never on messages. Protocol codes are used
where they already say it: 103 permission denied (not a member, not a
moderator), 106 limit exceeded, 107 bad request (malformed RPC arguments).
The codes are documented in ``docs/chat.md`` (§ Error codes).
"""

from __future__ import annotations

from signaling.errors import ErrorReply

__all__ = [
    "ERROR_CHAT_BAD_ATTACHMENT",
    "ERROR_CHAT_BAD_CLIENT_MSG_ID",
    "ERROR_CHAT_BANNED",
    "ERROR_CHAT_EMPTY",
    "ERROR_CHAT_INVALID",
    "ERROR_CHAT_SLOW_MODE",
    "ERROR_CHAT_TEXT_TOO_LONG",
    "ERROR_CHAT_TIMED_OUT",
]

# --- schema (publication data) ------------------------------------------------
# Not a JSON object, missing or unknown "type", a field of the wrong type, or
# a field the schema does not have (sender fields included: they come from
# the token, never from the client).
ERROR_CHAT_INVALID = ErrorReply(1100, "invalid chat message")
ERROR_CHAT_TEXT_TOO_LONG = ErrorReply(1101, "text too long")
# Neither text (other than whitespace) nor attachments.
ERROR_CHAT_EMPTY = ErrorReply(1102, "empty message")
ERROR_CHAT_BAD_ATTACHMENT = ErrorReply(1103, "invalid attachment")
ERROR_CHAT_BAD_CLIENT_MSG_ID = ErrorReply(1104, "invalid client_msg_id")

# --- live-room moderation -------------------------------------------------------
# Barred from the room: subscribe and publish refused until the bar expires.
ERROR_CHAT_BANNED = ErrorReply(1110, "banned from this room")
# Timed out: may read, may not publish until the timeout expires.
ERROR_CHAT_TIMED_OUT = ErrorReply(1111, "timed out in this room")
# Slow mode: the previous message was sent less than the interval ago.
ERROR_CHAT_SLOW_MODE = ErrorReply(1112, "slow mode: wait before sending again")
