"""The ``call.*`` RPC methods: request parsing and replies (docs/calls.md).

Every method takes a JSON object. ``call.invite`` takes ``{"callee", "media",
"meta"?}``; every other method takes ``{"call_id"}``. Anything else is
CALL_BAD_REQUEST (1000). Refusals are the codes of
:mod:`handlers.calls.errors`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson

from handlers.calls.errors import CALL_BAD_REQUEST
from handlers.calls.service import CallService
from handlers.calls.state import CALL_ID_RE, Call
from signaling.errors import SignalError
from signaling.node import RpcContext, RpcHandler
from signaling.values import JSON, JSONObject

__all__ = ["MAX_META_BYTES", "MEDIA", "handlers"]

MEDIA = frozenset({"video", "audio"})
# The invite's meta, as compact JSON: small, it rides in call.incoming.
MAX_META_BYTES = 1024


def _object(data: JSON) -> JSONObject:
    if not isinstance(data, dict):
        raise SignalError(CALL_BAD_REQUEST)
    return data


def _call_id(data: JSON) -> str:
    call_id = _object(data).get("call_id")
    if not isinstance(call_id, str) or not CALL_ID_RE.fullmatch(call_id):
        raise SignalError(CALL_BAD_REQUEST)
    return call_id


def _state_reply(call: Call) -> JSONObject:
    return {"call_id": call.call_id, "state": call.state.value}


def handlers(service: CallService) -> dict[str, RpcHandler]:
    """The RPC methods, by name, bound to ``service``."""

    async def invite(ctx: RpcContext, data: JSON) -> JSON:
        """``{"callee", "media", "meta"?}`` -> ``{"call_id", "state": "ringing"}``."""
        request = _object(data)
        callee = request.get("callee")
        media = request.get("media")
        meta = request.get("meta")
        if (
            not isinstance(callee, str)
            # A user id the server can push to (a valid personal channel).
            or ctx.node.policy.personal_channel(callee) is None
            or not isinstance(media, str)
            or media not in MEDIA
            or not (meta is None or isinstance(meta, dict))
        ):
            raise SignalError(CALL_BAD_REQUEST)
        try:
            meta_text = "" if meta is None else orjson.dumps(meta).decode()
        except orjson.JSONEncodeError:
            # Nested deeper than orjson writes (it reads deeper than it writes).
            raise SignalError(CALL_BAD_REQUEST) from None
        if len(meta_text.encode()) > MAX_META_BYTES:
            raise SignalError(CALL_BAD_REQUEST)
        call = await service.invite(ctx.user, callee, media, meta_text)
        return _state_reply(call)

    async def accept(ctx: RpcContext, data: JSON) -> JSON:
        call = await service.accept(ctx.user, _call_id(data))
        return {**_state_reply(call), "accepted_at_ms": call.accepted_at_ms}

    async def reject(ctx: RpcContext, data: JSON) -> JSON:
        return _state_reply(await service.reject(ctx.user, _call_id(data)))

    async def cancel(ctx: RpcContext, data: JSON) -> JSON:
        return _state_reply(await service.cancel(ctx.user, _call_id(data)))

    async def end(ctx: RpcContext, data: JSON) -> JSON:
        call = await service.end(ctx.user, _call_id(data))
        assert call.ended_at_ms is not None
        return {**_state_reply(call), "duration_ms": call.duration_ms(call.ended_at_ms)}

    def token_method(renew: bool) -> Callable[[RpcContext, JSON], Awaitable[JSON]]:
        async def method(ctx: RpcContext, data: JSON) -> JSON:
            """``{"call_id"}`` -> ``{"app_id", "channel", "uid", "token", "expires_at"}``."""
            grant = await service.grant(ctx.user, _call_id(data), renew=renew)
            return {
                "app_id": grant.app_id,
                "channel": grant.channel,
                "uid": grant.uid,
                "token": grant.token,
                "expires_at": grant.expires_at,
            }

        return method

    async def state(ctx: RpcContext, data: JSON) -> JSON:
        """``{"call_id"}`` -> the call; ``{}`` -> the caller's live call (ringing
        or accepted), or ``{"call_id": null, "state": null}`` (e.g. an app
        opened by a push, which does not know the call id yet)."""
        if "call_id" not in _object(data):
            call = await service.current_call(ctx.user)
            return {"call_id": None, "state": None} if call is None else service.snapshot(call)
        return service.snapshot(await service.participant_call(ctx.user, _call_id(data)))

    return {
        "call.invite": invite,
        "call.accept": accept,
        "call.reject": reject,
        "call.cancel": cancel,
        "call.end": end,
        "call.join": token_method(renew=False),
        "call.renew_token": token_method(renew=True),
        "call.state": state,
    }
