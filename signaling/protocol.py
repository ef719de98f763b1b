"""The Centrifuge bidirectional client protocol, JSON encoding, without I/O.

Bytes in, typed commands out; typed replies and pushes in, bytes out. Nothing
here touches sockets, clocks or logging (STYLE §2): time comes in as arguments.

Wire rules (``client.proto``; centrifuge ``decode.go``, ``client.go``):

* A frame holds one or more JSON objects separated by a single ``\\n`` (a
  trailing ``\\n`` is allowed). Commands of one frame are handled in order.
* ``{"id": N, "<method>": {...}}`` is a command; ``id`` must be > 0 except for
  ``send``. An empty command ``{}`` is a pong to the server's ping.
* ``bytes`` fields of the schema (``data``, ``info``) are raw JSON, not base64.
* A reply is ``{"id": N, "<method>": {...}}`` or ``{"id": N, "error": {...}}``;
  a push is ``{"push": {"channel": ..., "<type>": {...}}}``; ``{}`` is a ping.

Raw client JSON values exist only inside this module and the values the
commands carry; everything else handles the dataclasses below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from typing import TypeAlias

import orjson

from signaling.errors import ErrorReply
from signaling.values import JSON, JSONObject, record

__all__ = [
    "PING_FRAME",
    "ClientInfo",
    "Command",
    "ConnectRequest",
    "ConnectResult",
    "HistoryRequest",
    "HistoryResult",
    "PingRequest",
    "PongCommand",
    "PresenceRequest",
    "PresenceResult",
    "PresenceStatsRequest",
    "PresenceStatsResult",
    "ProtocolError",
    "Publication",
    "PublishRequest",
    "RefreshRequest",
    "RefreshResult",
    "Request",
    "RpcRequest",
    "SendRequest",
    "StreamPosition",
    "SubRefreshRequest",
    "SubRefreshResult",
    "SubscribeRequest",
    "SubscribeResult",
    "UnknownRequest",
    "UnsubscribeRequest",
    "decode_client_info",
    "decode_frame",
    "encode_client_info",
    "encode_empty_reply",
    "encode_error",
    "encode_join_push",
    "encode_leave_push",
    "encode_pub_push",
    "encode_reply",
    "encode_unsubscribe_push",
    "join_messages",
    "publication_body",
    "publication_data",
    "publication_object",
]

# An empty reply: the server's application-level ping (client.go jsonPingReply).
PING_FRAME = b"{}"

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


class ProtocolError(Exception):
    """A frame that does not follow the protocol: the server answers with
    disconnect 3501 (bad request), as centrifuge does for undecodable input."""


# --------------------------------------------------------------------------
# Values shared by commands, replies and pushes
# --------------------------------------------------------------------------


@record
class StreamPosition:
    """A place in a channel's publication stream: ``offset`` within ``epoch``.

    The epoch changes whenever the stream is lost (broker restart, expiry),
    so an old offset in a new epoch is unrecoverable.
    """

    offset: int
    epoch: str


@record
class ClientInfo:
    """Who a connection is, as shown to others (publications, presence).

    ``conn_info``/``chan_info`` are raw JSON bytes (from the token), embedded
    as-is when encoding.
    """

    user: str
    client: str
    conn_info: bytes | None = None
    chan_info: bytes | None = None


@record
class Publication:
    """One message in a channel. ``data`` is raw JSON bytes, encoded once by
    the publisher; ``offset`` is 0 on channels without history.

    ``body``, when set, is the publication's JSON object already encoded
    without its offset (as it crossed the broker): it is then authoritative
    and the other fields but ``offset`` may be empty. Encoding splices the
    offset in, so a publication from another instance is never re-encoded.
    """

    data: bytes
    info: ClientInfo | None = None
    offset: int = 0
    tags: Mapping[str, str] | None = None
    time_ms: int = 0
    body: bytes | None = None


# --------------------------------------------------------------------------
# Commands (client → server)
# --------------------------------------------------------------------------


@record
class SubscribeRequest:
    channel: str
    token: str = ""
    recover: bool = False
    offset: int = 0
    epoch: str = ""
    data: JSON = None
    positioned: bool = False
    recoverable: bool = False
    join_leave: bool = False
    flag: int = 0


@record
class ConnectRequest:
    token: str = ""
    data: JSON = None
    # Recovery of server-side subscriptions: channel → recover/offset/epoch.
    subs: Mapping[str, SubscribeRequest] = field(default_factory=dict)
    name: str = ""
    version: str = ""


@record
class UnsubscribeRequest:
    channel: str


@record
class PublishRequest:
    channel: str
    data: JSON
    # The data re-encoded compactly: what is stored and fanned out.
    raw_data: bytes


@record
class PresenceRequest:
    channel: str


@record
class PresenceStatsRequest:
    channel: str


@record
class HistoryRequest:
    channel: str
    limit: int = 0
    since: StreamPosition | None = None
    reverse: bool = False


@record
class RpcRequest:
    method: str
    data: JSON = None


@record
class RefreshRequest:
    token: str


@record
class SubRefreshRequest:
    channel: str
    token: str


@record
class SendRequest:
    data: JSON = None


@record
class PingRequest:
    """The schema's explicit ``ping`` command (v2 SDKs use the empty pong)."""


@record
class PongCommand:
    """The empty command ``{}``: the client's answer to a server ping."""


@record
class UnknownRequest:
    """A command whose method this server does not know (error 104)."""

    name: str


Request: TypeAlias = (
    ConnectRequest
    | SubscribeRequest
    | UnsubscribeRequest
    | PublishRequest
    | PresenceRequest
    | PresenceStatsRequest
    | HistoryRequest
    | RpcRequest
    | RefreshRequest
    | SubRefreshRequest
    | SendRequest
    | PingRequest
    | PongCommand
    | UnknownRequest
)


@record
class Command:
    id: int
    request: Request

    @property
    def method(self) -> str:
        """The command's method name, for metrics and logs."""
        return _METHOD_NAMES.get(type(self.request), "unknown")


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def decode_frame(frame: bytes) -> list[Command]:
    """Split a text frame into commands, in order.

    Raises :class:`ProtocolError` on anything malformed: invalid JSON, a line
    that is not an object, fields of the wrong type, a missing id.
    """
    # Exactly one "\n" between messages, zero or one at the end (decode.go).
    if frame.endswith(b"\n"):
        frame = frame[:-1]
    if not frame:
        raise ProtocolError("empty frame")
    return [_decode_command(line) for line in frame.split(b"\n")]


def _decode_command(line: bytes) -> Command:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError("invalid JSON") from exc
    if not isinstance(obj, dict):
        raise ProtocolError("command is not an object")
    cmd_id = obj.get("id", 0)
    if not _is_uint(cmd_id, UINT32_MAX):
        raise ProtocolError("bad command id")

    for key, value in obj.items():
        if key == "id" or value is None:
            continue
        parser = _PARSERS.get(key)
        if parser is None:
            if cmd_id == 0:
                raise ProtocolError("unknown command without id")
            return Command(cmd_id, UnknownRequest(key[:64]))
        if not isinstance(value, dict):
            raise ProtocolError(f"{key} is not an object")
        request = parser(value)
        if cmd_id == 0 and not isinstance(request, SendRequest):
            raise ProtocolError("command without id")
        return Command(cmd_id, request)

    if cmd_id != 0:
        raise ProtocolError("command without method")
    return Command(0, PongCommand())


def _is_uint(value: object, maximum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= maximum


def _str(body: JSONObject, key: str, *, required: bool = False, max_len: int = 4096) -> str:
    value = body.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(f"bad {key}")
    if required and not value:
        raise ProtocolError(f"{key} required")
    return value


def _bool(body: JSONObject, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ProtocolError(f"bad {key}")
    return value


def _uint(body: JSONObject, key: str, maximum: int = UINT64_MAX) -> int:
    value = body.get(key, 0)
    if value is None:
        return 0
    if not _is_uint(value, maximum):
        raise ProtocolError(f"bad {key}")
    assert isinstance(value, int)
    return value


def _int(body: JSONObject, key: str) -> int:
    value = body.get(key, 0)
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"bad {key}")
    return value


def _channel(body: JSONObject) -> str:
    return _str(body, "channel", required=True, max_len=255)


def _parse_subscribe(body: JSONObject) -> SubscribeRequest:
    return SubscribeRequest(
        channel=_channel(body),
        token=_str(body, "token", max_len=16384),
        recover=_bool(body, "recover"),
        offset=_uint(body, "offset"),
        epoch=_str(body, "epoch", max_len=64),
        data=body.get("data"),
        positioned=_bool(body, "positioned"),
        recoverable=_bool(body, "recoverable"),
        join_leave=_bool(body, "join_leave"),
        flag=_int(body, "flag"),
    )


def _parse_connect(body: JSONObject) -> ConnectRequest:
    raw_subs = body.get("subs") or {}
    if not isinstance(raw_subs, dict) or len(raw_subs) > 1024:
        raise ProtocolError("bad subs")
    subs: dict[str, SubscribeRequest] = {}
    for channel, sub in raw_subs.items():
        if not isinstance(sub, dict):
            raise ProtocolError("bad subs")
        subs[channel] = _parse_subscribe({**sub, "channel": channel})
    return ConnectRequest(
        token=_str(body, "token", max_len=16384),
        data=body.get("data"),
        subs=subs,
        name=_str(body, "name", max_len=64),
        version=_str(body, "version", max_len=64),
    )


def _parse_publish(body: JSONObject) -> PublishRequest:
    data = body.get("data")
    if "data" not in body:
        raise ProtocolError("data required")
    try:
        raw = orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        # orjson reads deeper nesting (1024) than it writes (254).
        raise ProtocolError("data nested too deeply") from exc
    return PublishRequest(_channel(body), data, raw)


def _parse_history(body: JSONObject) -> HistoryRequest:
    since_obj = body.get("since")
    since: StreamPosition | None = None
    if since_obj is not None:
        if not isinstance(since_obj, dict):
            raise ProtocolError("bad since")
        since = StreamPosition(_uint(since_obj, "offset"), _str(since_obj, "epoch", max_len=64))
    limit = _int(body, "limit")
    return HistoryRequest(_channel(body), limit, since, _bool(body, "reverse"))


def _parse_rpc(body: JSONObject) -> RpcRequest:
    return RpcRequest(_str(body, "method", max_len=128), body.get("data"))


_PARSERS: dict[str, Callable[[JSONObject], Request]] = {
    "connect": _parse_connect,
    "subscribe": _parse_subscribe,
    "unsubscribe": lambda b: UnsubscribeRequest(_channel(b)),
    "publish": _parse_publish,
    "presence": lambda b: PresenceRequest(_channel(b)),
    "presence_stats": lambda b: PresenceStatsRequest(_channel(b)),
    "history": _parse_history,
    "rpc": _parse_rpc,
    "refresh": lambda b: RefreshRequest(_str(b, "token", required=True, max_len=16384)),
    "sub_refresh": lambda b: SubRefreshRequest(
        _channel(b), _str(b, "token", required=True, max_len=16384)
    ),
    "send": lambda b: SendRequest(b.get("data")),
    "ping": lambda b: PingRequest(),
}

_METHOD_NAMES: dict[type, str] = {
    ConnectRequest: "connect",
    SubscribeRequest: "subscribe",
    UnsubscribeRequest: "unsubscribe",
    PublishRequest: "publish",
    PresenceRequest: "presence",
    PresenceStatsRequest: "presence_stats",
    HistoryRequest: "history",
    RpcRequest: "rpc",
    RefreshRequest: "refresh",
    SubRefreshRequest: "sub_refresh",
    SendRequest: "send",
    PingRequest: "ping",
    PongCommand: "pong",
    UnknownRequest: "unknown",
}


# --------------------------------------------------------------------------
# Results (server → client)
# --------------------------------------------------------------------------


@record
class SubscribeResult:
    recoverable: bool = False
    positioned: bool = False
    epoch: str = ""
    offset: int = 0
    publications: Sequence[Publication] = ()
    recovered: bool = False
    was_recovering: bool = False
    expires: bool = False
    ttl_s: int = 0
    data: JSON = None


@record
class ConnectResult:
    client: str
    version: str
    ping_s: int
    pong: bool
    expires: bool = False
    ttl_s: int = 0
    data: JSON = None
    subs: Mapping[str, SubscribeResult] = field(default_factory=dict)
    node: str = ""
    time_ms: int = 0


@record
class RefreshResult:
    client: str
    version: str
    expires: bool = False
    ttl_s: int = 0


@record
class SubRefreshResult:
    expires: bool = False
    ttl_s: int = 0


@record
class PresenceResult:
    clients: Mapping[str, ClientInfo]


@record
class PresenceStatsResult:
    num_clients: int
    num_users: int


@record
class HistoryResult:
    publications: Sequence[Publication]
    top: StreamPosition


# JSON last: rpc results are plain JSON values.
Result: TypeAlias = (
    "ConnectResult | SubscribeResult | RefreshResult | SubRefreshResult | PresenceResult"
    " | PresenceStatsResult | HistoryResult | JSON"
)


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


def _info_object(info: ClientInfo) -> JSONObject:
    out: dict[str, object] = {"user": info.user, "client": info.client}
    if info.conn_info is not None:
        out["conn_info"] = orjson.Fragment(info.conn_info)
    if info.chan_info is not None:
        out["chan_info"] = orjson.Fragment(info.chan_info)
    return out  # type: ignore[return-value]  # Fragment is JSON for orjson


def encode_client_info(info: ClientInfo) -> bytes:
    """A ClientInfo as JSON (what crosses the broker with presence and
    join/leave)."""
    return orjson.dumps(_info_object(info))


def decode_client_info(raw: bytes) -> ClientInfo:
    """Inverse of :func:`encode_client_info`. Raises ValueError, KeyError."""
    obj = orjson.loads(raw)
    conn_info, chan_info = obj.get("conn_info"), obj.get("chan_info")
    return ClientInfo(
        str(obj["user"]),
        str(obj["client"]),
        None if conn_info is None else orjson.dumps(conn_info),
        None if chan_info is None else orjson.dumps(chan_info),
    )


def publication_object(pub: Publication) -> JSONObject:
    """The JSON object of a Publication, with ``data`` embedded raw."""
    if pub.body is not None:
        return orjson.Fragment(_with_offset(pub.body, pub.offset))  # type: ignore[return-value]
    out: dict[str, object] = {"data": orjson.Fragment(pub.data)}
    if pub.info is not None:
        out["info"] = _info_object(pub.info)
    if pub.offset:
        out["offset"] = pub.offset
    if pub.tags:
        out["tags"] = dict(pub.tags)
    if pub.time_ms:
        out["time"] = pub.time_ms
    return out  # type: ignore[return-value]  # Fragment is JSON for orjson


def publication_body(pub: Publication) -> bytes:
    """The publication's JSON object without its offset, encoded once for
    the broker (see :attr:`Publication.body`)."""
    if pub.body is not None:
        return pub.body
    if pub.offset:
        pub = Publication(pub.data, pub.info, 0, pub.tags, pub.time_ms)
    return orjson.dumps(publication_object(pub))


def publication_data(pub: Publication) -> JSON:
    """The publication's data, decoded: its own, or from the body it came
    with (a publication read back from the Redis broker has only a body)."""
    if pub.body is not None:
        value: JSON = orjson.loads(pub.body).get("data")
        return value
    decoded: JSON = orjson.loads(pub.data)
    return decoded


def _with_offset(body: bytes, offset: int) -> bytes:
    # body is a non-empty JSON object ({"data":...}): splice the offset in front.
    return body if not offset else b'{"offset":%d,%s' % (offset, body[1:])


def _subscribe_object(res: SubscribeResult) -> JSONObject:
    out: JSONObject = {}
    if res.expires:
        out["expires"] = True
        out["ttl"] = res.ttl_s
    if res.recoverable:
        out["recoverable"] = True
    if res.positioned:
        out["positioned"] = True
    if res.epoch:
        out["epoch"] = res.epoch
    if res.offset:
        out["offset"] = res.offset
    if res.publications:
        out["publications"] = [publication_object(p) for p in res.publications]
    if res.recovered:
        out["recovered"] = True
    if res.was_recovering:
        out["was_recovering"] = True
    if res.data is not None:
        out["data"] = res.data
    return out


def _result_object(result: Result) -> JSON:
    if isinstance(result, SubscribeResult):
        return _subscribe_object(result)
    if isinstance(result, ConnectResult):
        out: JSONObject = {"client": result.client, "version": result.version}
        if result.expires:
            out["expires"] = True
            out["ttl"] = result.ttl_s
        if result.data is not None:
            out["data"] = result.data
        if result.subs:
            out["subs"] = {ch: _subscribe_object(s) for ch, s in result.subs.items()}
        out["ping"] = result.ping_s
        if result.pong:
            out["pong"] = True
        if result.node:
            out["node"] = result.node
        if result.time_ms:
            out["time"] = result.time_ms
        return out
    if isinstance(result, RefreshResult):
        out = {"client": result.client, "version": result.version}
        if result.expires:
            out["expires"] = True
            out["ttl"] = result.ttl_s
        return out
    if isinstance(result, SubRefreshResult):
        return {"expires": True, "ttl": result.ttl_s} if result.expires else {}
    if isinstance(result, PresenceResult):
        return {"presence": {cid: _info_object(i) for cid, i in result.clients.items()}}
    if isinstance(result, PresenceStatsResult):
        return {"num_clients": result.num_clients, "num_users": result.num_users}
    if isinstance(result, HistoryResult):
        hist: JSONObject = {"publications": [publication_object(p) for p in result.publications]}
        if result.top.epoch:
            hist["epoch"] = result.top.epoch
        if result.top.offset:
            hist["offset"] = result.top.offset
        return hist
    return result


def encode_reply(cmd_id: int, method: str, result: Result) -> bytes:
    """``{"id": N, "<method>": {...}}``. For ``rpc`` pass the reply data as
    ``result`` (it is wrapped into ``{"data": ...}``)."""
    body = {"data": result} if method == "rpc" else _result_object(result)
    return orjson.dumps({"id": cmd_id, method: body})


def encode_empty_reply(cmd_id: int, method: str) -> bytes:
    """``{"id": N, "<method>": {}}``: the reply of publish, unsubscribe and ping,
    one per publication, formatted without the JSON encoder (a quarter of
    :func:`encode_reply`'s time). ``method`` is one of the protocol's names."""
    return b'{"id":%d,"%s":{}}' % (cmd_id, method.encode("ascii"))


def encode_error(cmd_id: int, error: ErrorReply) -> bytes:
    err: JSONObject = {"code": error.code, "message": error.message}
    if error.temporary:
        err["temporary"] = True
    return orjson.dumps({"id": cmd_id, "error": err})


def encode_pub_push(channel: str, pub: Publication) -> bytes:
    """The ``pub`` push of one publication: built once, sent to every subscriber."""
    if pub.body is not None:
        return b'{"push":{"channel":%s,"pub":%s}}' % (
            orjson.dumps(channel),
            _with_offset(pub.body, pub.offset),
        )
    return orjson.dumps({"push": {"channel": channel, "pub": publication_object(pub)}})


def encode_join_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "join": {"info": _info_object(info)}}})


def encode_leave_push(channel: str, info: ClientInfo) -> bytes:
    return orjson.dumps({"push": {"channel": channel, "leave": {"info": _info_object(info)}}})


def encode_unsubscribe_push(channel: str, code: int, reason: str) -> bytes:
    """Server-side unsubscribe. Codes < 2500 keep the client unsubscribed;
    >= 2500 make it resubscribe (centrifuge ``unsubscribe.go``)."""
    body = {"code": code, "reason": reason}
    return orjson.dumps({"push": {"channel": channel, "unsubscribe": body}})


def join_messages(messages: Sequence[bytes]) -> bytes:
    """Several replies or pushes in one frame, newline-delimited."""
    if len(messages) == 1:
        return messages[0]
    return b"\n".join(messages)
