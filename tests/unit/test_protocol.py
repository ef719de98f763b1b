"""The sans-I/O protocol module: frames in, commands out; results and pushes in, bytes out."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from signaling.errors import ERROR_INTERNAL, ERROR_METHOD_NOT_FOUND, ErrorReply
from signaling.protocol import (
    PING_FRAME,
    ClientInfo,
    Command,
    ConnectRequest,
    ConnectResult,
    HistoryRequest,
    HistoryResult,
    PingRequest,
    PongCommand,
    PresenceRequest,
    PresenceResult,
    PresenceStatsRequest,
    PresenceStatsResult,
    ProtocolError,
    Publication,
    PublishRequest,
    RefreshRequest,
    RefreshResult,
    RpcRequest,
    SendRequest,
    StreamPosition,
    SubRefreshRequest,
    SubRefreshResult,
    SubscribeRequest,
    SubscribeResult,
    UnknownRequest,
    UnsubscribeRequest,
    decode_frame,
    encode_client_info,
    encode_empty_reply,
    encode_error,
    encode_join_push,
    encode_leave_push,
    encode_pub_push,
    encode_reply,
    encode_unsubscribe_push,
    join_messages,
    publication_body,
    publication_data,
    publication_object,
)

UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def _one(frame: bytes) -> Command:
    commands = decode_frame(frame)
    assert len(commands) == 1
    return commands[0]


def _loads(data: bytes) -> Any:
    return orjson.loads(data)


# ---------------------------------------------------------------------------
# Framing
# ---------------------------------------------------------------------------


def test_decode_single_command() -> None:
    cmd = _one(b'{"id":1,"subscribe":{"channel":"room:42"}}')
    assert cmd == Command(1, SubscribeRequest(channel="room:42"))
    assert cmd.method == "subscribe"


def test_decode_several_commands_keeps_order() -> None:
    # What centrifuge-js batches into its first frame: connect then subscribes.
    frame = (
        b'{"connect":{"token":"tok","name":"js"},"id":1}\n'
        b'{"subscribe":{"channel":"room:a","flag":1},"id":2}\n'
        b'{"subscribe":{"channel":"room:b","flag":1},"id":3}\n'
        b"{}"
    )
    commands = decode_frame(frame)
    assert [c.id for c in commands] == [1, 2, 3, 0]
    assert [c.method for c in commands] == ["connect", "subscribe", "subscribe", "pong"]
    assert commands[0].request == ConnectRequest(token="tok", name="js")
    assert commands[1].request == SubscribeRequest(channel="room:a", flag=1)
    assert commands[2].request == SubscribeRequest(channel="room:b", flag=1)
    assert commands[3].request == PongCommand()


def test_decode_trailing_newline_is_allowed() -> None:
    assert decode_frame(b'{"id":7,"ping":{}}\n') == [Command(7, PingRequest())]
    assert decode_frame(b'{"id":1,"ping":{}}\n{"id":2,"ping":{}}\n') == [
        Command(1, PingRequest()),
        Command(2, PingRequest()),
    ]


def test_decode_json_with_whitespace_like_centrifuge_python() -> None:
    frame = b'{"id": 1, "connect": {"token": "eyJ.x.y", "name": "python"}}'
    assert _one(frame) == Command(1, ConnectRequest(token="eyJ.x.y", name="python"))
    frame = b'  {\t"id" : 2 ,\r "subscribe" : { "channel" : "room:1" , "flag" : 1 } }  '
    assert _one(frame) == Command(2, SubscribeRequest(channel="room:1", flag=1))


def test_decode_ignores_null_method_fields_and_takes_first_method() -> None:
    cmd = _one(b'{"id":3,"connect":null,"presence":{"channel":"room:x"}}')
    assert cmd == Command(3, PresenceRequest("room:x"))
    cmd = _one(b'{"id":3,"presence":{"channel":"room:x"},"history":{"channel":"room:y"}}')
    assert cmd.request == PresenceRequest("room:x")


def test_decode_id_bounds() -> None:
    assert _one(b'{"id":%d,"ping":{}}' % UINT32_MAX).id == UINT32_MAX
    with pytest.raises(ProtocolError):
        decode_frame(b'{"id":%d,"ping":{}}' % (UINT32_MAX + 1))


# ---------------------------------------------------------------------------
# Every command kind
# ---------------------------------------------------------------------------


def test_decode_connect_with_subs() -> None:
    frame = orjson.dumps(
        {
            "id": 1,
            "connect": {
                "token": "tkn",
                "data": {"hello": [1, 2]},
                "name": "js",
                "version": "5.8.0",
                "subs": {
                    "user:#42": {"recover": True, "offset": 17, "epoch": "abcd"},
                    "room:9": {},
                },
            },
        }
    )
    cmd = _one(frame)
    assert cmd.id == 1
    req = cmd.request
    assert isinstance(req, ConnectRequest)
    assert req.token == "tkn"
    assert req.data == {"hello": [1, 2]}
    assert req.name == "js"
    assert req.version == "5.8.0"
    assert dict(req.subs) == {
        "user:#42": SubscribeRequest(channel="user:#42", recover=True, offset=17, epoch="abcd"),
        "room:9": SubscribeRequest(channel="room:9"),
    }


def test_decode_connect_minimal() -> None:
    assert _one(b'{"id":1,"connect":{}}') == Command(1, ConnectRequest())


def test_decode_subscribe_all_fields() -> None:
    frame = orjson.dumps(
        {
            "id": 5,
            "subscribe": {
                "channel": "chat:r",
                "token": "subtok",
                "recover": True,
                "offset": 12,
                "epoch": "e1",
                "data": {"k": "v"},
                "positioned": True,
                "recoverable": True,
                "join_leave": True,
                "flag": 3,
            },
        }
    )
    assert _one(frame) == Command(
        5,
        SubscribeRequest(
            channel="chat:r",
            token="subtok",
            recover=True,
            offset=12,
            epoch="e1",
            data={"k": "v"},
            positioned=True,
            recoverable=True,
            join_leave=True,
            flag=3,
        ),
    )


def test_decode_subscribe_offset_full_uint64() -> None:
    frame = b'{"id":1,"subscribe":{"channel":"c","offset":%d}}' % UINT64_MAX
    req = _one(frame).request
    assert isinstance(req, SubscribeRequest)
    assert req.offset == UINT64_MAX


def test_decode_subscribe_nulls_mean_defaults() -> None:
    frame = b'{"id":1,"subscribe":{"channel":"c","recover":null,"offset":null,"epoch":null}}'
    assert _one(frame).request == SubscribeRequest(channel="c")


def test_decode_unsubscribe() -> None:
    assert _one(b'{"id":4,"unsubscribe":{"channel":"room:1"}}') == Command(
        4, UnsubscribeRequest("room:1")
    )


def test_decode_publish_raw_data_is_compact_json_of_data() -> None:
    frame = b'{"id": 9, "publish": {"channel": "room:1", "data": {"text": "hi", "n": [1, 2.5]}}}'
    cmd = _one(frame)
    req = cmd.request
    assert isinstance(req, PublishRequest)
    assert cmd.method == "publish"
    assert req.channel == "room:1"
    assert req.data == {"text": "hi", "n": [1, 2.5]}
    assert req.raw_data == b'{"text":"hi","n":[1,2.5]}'
    assert orjson.loads(req.raw_data) == req.data


@pytest.mark.parametrize(
    ("data_json", "raw"),
    [(b"null", b"null"), (b'"s"', b'"s"'), (b"0", b"0"), (b"[ ]", b"[]"), (b"true", b"true")],
)
def test_decode_publish_scalar_data(data_json: bytes, raw: bytes) -> None:
    req = _one(b'{"id":1,"publish":{"channel":"c","data":' + data_json + b"}}").request
    assert isinstance(req, PublishRequest)
    assert req.raw_data == raw


def test_decode_presence_and_stats() -> None:
    assert _one(b'{"id":2,"presence":{"channel":"room:1"}}') == Command(
        2, PresenceRequest("room:1")
    )
    cmd = _one(b'{"id":3,"presence_stats":{"channel":"room:1"}}')
    assert cmd == Command(3, PresenceStatsRequest("room:1"))
    assert cmd.method == "presence_stats"


def test_decode_history_with_since_limit_reverse() -> None:
    frame = (
        b'{"id":6,"history":{"channel":"room:1","limit":10,'
        b'"since":{"offset":3,"epoch":"ep"},"reverse":true}}'
    )
    assert _one(frame) == Command(
        6, HistoryRequest("room:1", limit=10, since=StreamPosition(3, "ep"), reverse=True)
    )


def test_decode_history_defaults_and_negative_limit() -> None:
    assert _one(b'{"id":6,"history":{"channel":"c"}}').request == HistoryRequest("c")
    req = _one(b'{"id":6,"history":{"channel":"c","limit":-1}}').request
    assert isinstance(req, HistoryRequest)
    assert req.limit == -1
    assert req.since is None
    assert req.reverse is False


def test_decode_rpc() -> None:
    cmd = _one(b'{"rpc":{"method":"echo","data":{"x":1}},"id":4}')
    assert cmd == Command(4, RpcRequest("echo", {"x": 1}))
    assert _one(b'{"id":4,"rpc":{"method":"noargs"}}').request == RpcRequest("noargs", None)


def test_decode_refresh_and_sub_refresh() -> None:
    assert _one(b'{"id":8,"refresh":{"token":"new"}}') == Command(8, RefreshRequest("new"))
    cmd = _one(b'{"id":9,"sub_refresh":{"channel":"private:x","token":"st"}}')
    assert cmd == Command(9, SubRefreshRequest("private:x", "st"))
    assert cmd.method == "sub_refresh"


def test_decode_send_without_id() -> None:
    cmd = _one(b'{"send":{"data":{"a":1}}}')
    assert cmd == Command(0, SendRequest({"a": 1}))
    assert cmd.method == "send"
    # With an id it is still a send.
    assert _one(b'{"id":3,"send":{"data":2}}') == Command(3, SendRequest(2))


def test_decode_ping() -> None:
    cmd = _one(b'{"id":11,"ping":{}}')
    assert cmd == Command(11, PingRequest())
    assert cmd.method == "ping"


@pytest.mark.parametrize("frame", [b"{}", b"{}\n", b" { } ", b'{"id":0}'])
def test_decode_empty_command_is_pong(frame: bytes) -> None:
    cmd = _one(frame)
    assert cmd == Command(0, PongCommand())
    assert cmd.method == "pong"


def test_decode_unknown_method_with_id() -> None:
    cmd = _one(b'{"id":12,"frobnicate":{"x":1}}')
    assert cmd == Command(12, UnknownRequest("frobnicate"))
    assert cmd.method == "unknown"
    # Not even an object body matters for an unknown method: it is answered with 104.
    assert _one(b'{"id":12,"whatever":5}').request == UnknownRequest("whatever")
    # The name is bounded.
    long_name = "m" * 500
    req = _one(orjson.dumps({"id": 1, long_name: {}})).request
    assert isinstance(req, UnknownRequest)
    assert req.name == "m" * 64


# ---------------------------------------------------------------------------
# Malformed input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(b"", id="empty-frame"),
        pytest.param(b"\n", id="only-newline"),
        pytest.param(b"\n\n", id="double-newline"),
        pytest.param(b'{"id":1,"ping":{}}\n\n', id="two-trailing-newlines"),
        pytest.param(b'{"id":1,"ping":{}}\n\n{"id":2,"ping":{}}', id="blank-line-between"),
        pytest.param(b"{", id="invalid-json"),
        pytest.param(b'{"id":1,"ping":{}}{"id":2,"ping":{}}', id="no-separator"),
        pytest.param(b"\xff\xfe", id="not-utf8"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'[{"id":1,"ping":{}}]', id="array-of-commands"),
        pytest.param(b'"str"', id="string"),
        pytest.param(b"1", id="number"),
        pytest.param(b"null", id="null"),
        pytest.param(b'{"id":1,"subscribe":[]}', id="array-body"),
        pytest.param(b'{"id":1,"subscribe":"room:1"}', id="string-body"),
        pytest.param(b'{"id":1,"connect":true}', id="bool-body"),
        pytest.param(b'{"id":-1,"ping":{}}', id="id-negative"),
        pytest.param(b'{"id":1.0,"ping":{}}', id="id-float"),
        pytest.param(b'{"id":1.5,"ping":{}}', id="id-float-fraction"),
        pytest.param(b'{"id":true,"ping":{}}', id="id-bool"),
        pytest.param(b'{"id":"1","ping":{}}', id="id-string"),
        pytest.param(b'{"id":null,"ping":{}}', id="id-null"),
        pytest.param(b'{"id":4294967296,"ping":{}}', id="id-too-big"),
        pytest.param(b'{"id":99999999999999999999999,"ping":{}}', id="id-huge"),
        pytest.param(b'{"subscribe":{"channel":"c"}}', id="missing-id-subscribe"),
        pytest.param(b'{"id":0,"connect":{}}', id="zero-id-connect"),
        pytest.param(b'{"ping":{}}', id="missing-id-ping"),
        pytest.param(b'{"frobnicate":{}}', id="unknown-method-no-id"),
        pytest.param(b'{"id":5}', id="id-without-method"),
        pytest.param(b'{"id":5,"ping":null}', id="only-null-method"),
        pytest.param(b'{"id":1,"subscribe":{}}', id="subscribe-missing-channel"),
        pytest.param(b'{"id":1,"subscribe":{"channel":""}}', id="subscribe-empty-channel"),
        pytest.param(b'{"id":1,"subscribe":{"channel":5}}', id="subscribe-channel-int"),
        pytest.param(
            b'{"id":1,"subscribe":{"channel":"' + b"c" * 256 + b'"}}', id="channel-too-long"
        ),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","offset":"1"}}', id="offset-str"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","offset":-1}}', id="offset-neg"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","offset":1.0}}', id="offset-float"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","offset":true}}', id="offset-bool"),
        pytest.param(
            b'{"id":1,"subscribe":{"channel":"c","offset":18446744073709551616}}',
            id="offset-over-uint64",
        ),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","recover":"yes"}}', id="recover-str"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","recover":1}}', id="recover-int"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","epoch":5}}', id="epoch-int"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","flag":"1"}}', id="flag-str"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","flag":1.5}}', id="flag-float"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","flag":true}}', id="flag-bool"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","join_leave":1}}', id="join-leave-int"),
        pytest.param(b'{"id":1,"subscribe":{"channel":"c","token":7}}', id="token-int"),
        pytest.param(b'{"id":1,"connect":{"token":1}}', id="connect-token-int"),
        pytest.param(b'{"id":1,"connect":{"subs":[1]}}', id="connect-subs-array"),
        pytest.param(b'{"id":1,"connect":{"subs":{"c":1}}}', id="connect-sub-not-object"),
        pytest.param(b'{"id":1,"connect":{"subs":{"":{}}}}', id="connect-sub-empty-channel"),
        pytest.param(
            b'{"id":1,"connect":{"subs":{"c":{"offset":"2"}}}}', id="connect-sub-offset-str"
        ),
        pytest.param(b'{"id":1,"connect":{"name":"' + b"n" * 65 + b'"}}', id="name-too-long"),
        pytest.param(b'{"id":1,"unsubscribe":{}}', id="unsubscribe-missing-channel"),
        pytest.param(b'{"id":1,"publish":{"channel":"c"}}', id="publish-missing-data"),
        pytest.param(b'{"id":1,"publish":{"data":1}}', id="publish-missing-channel"),
        pytest.param(b'{"id":1,"presence":{}}', id="presence-missing-channel"),
        pytest.param(b'{"id":1,"presence_stats":{"channel":null}}', id="stats-null-channel"),
        pytest.param(b'{"id":1,"history":{}}', id="history-missing-channel"),
        pytest.param(b'{"id":1,"history":{"channel":"c","limit":"5"}}', id="history-limit-str"),
        pytest.param(b'{"id":1,"history":{"channel":"c","limit":1.5}}', id="history-limit-float"),
        pytest.param(b'{"id":1,"history":{"channel":"c","since":5}}', id="history-since-int"),
        pytest.param(
            b'{"id":1,"history":{"channel":"c","since":{"offset":"1"}}}', id="since-offset-str"
        ),
        pytest.param(
            b'{"id":1,"history":{"channel":"c","since":{"epoch":1}}}', id="since-epoch-int"
        ),
        pytest.param(b'{"id":1,"history":{"channel":"c","reverse":"true"}}', id="reverse-str"),
        pytest.param(b'{"id":1,"rpc":{"method":1}}', id="rpc-method-int"),
        pytest.param(b'{"id":1,"refresh":{}}', id="refresh-missing-token"),
        pytest.param(b'{"id":1,"refresh":{"token":""}}', id="refresh-empty-token"),
        pytest.param(b'{"id":1,"sub_refresh":{"token":"t"}}', id="sub-refresh-no-channel"),
        pytest.param(b'{"id":1,"sub_refresh":{"channel":"c"}}', id="sub-refresh-no-token"),
        pytest.param(b'{"send":[]}', id="send-array-body"),
        pytest.param(b'{"id":1,"ping":{}}\n{"id":2,"subscribe":{}}', id="second-line-bad"),
        pytest.param(b'{"id":1,"ping":{}}\n[]', id="second-line-array"),
    ],
)
def test_decode_malformed_raises_protocol_error(frame: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_frame(frame)


def test_decode_deeply_nested_publish_data_raises_protocol_error() -> None:
    # orjson parses up to 1024 levels of nesting but serializes only 254: the
    # re-encoding of publish data must not leak anything but ProtocolError
    # (the session maps only ProtocolError to 3501 bad request).
    depth = 300
    frame = b'{"id":1,"publish":{"channel":"room:1","data":' + b"[" * depth + b"]" * depth + b"}}"
    with pytest.raises(ProtocolError):
        decode_frame(frame)


# ---------------------------------------------------------------------------
# Property-style: random input never raises anything but ProtocolError
# ---------------------------------------------------------------------------

_SEED_FRAMES = [
    b'{"id":1,"connect":{"token":"t","name":"js","subs":{"user:#1":{"recover":true,"offset":1}}}}',
    b'{"id":2,"subscribe":{"channel":"room:1","flag":1,"recover":true,"offset":3,"epoch":"ab"}}',
    b'{"id":3,"publish":{"channel":"room:1","data":{"text":"hi","n":[1,2,{"x":null}]}}}',
    b'{"id":4,"history":{"channel":"room:1","limit":-1,"since":{"offset":1,"epoch":"e"}}}',
    b'{"id":5,"rpc":{"method":"echo","data":[1,"2",3.5]}}\n{}\n{"send":{"data":1}}',
    b'{"id":6,"sub_refresh":{"channel":"private:x","token":"abc"}}',
]
_ALPHABET = b'{}[]":,\n 0123456789-.eE+tfnaulrsid\\'


def _mutate(rng: random.Random, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(3)
        pos = rng.randrange(len(data) + 1)
        if op == 0 and data:
            del data[min(pos, len(data) - 1)]
        elif op == 1:
            data.insert(pos, rng.choice(_ALPHABET))
        elif data:
            data[min(pos, len(data) - 1)] = rng.randrange(256)
    return bytes(data)


def test_decode_random_input_only_raises_protocol_error() -> None:
    rng = random.Random(20240611)
    decoded = 0
    for i in range(4000):
        if i % 2:
            frame = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
        else:
            frame = _mutate(rng, rng.choice(_SEED_FRAMES))
        try:
            commands = decode_frame(frame)
        except ProtocolError:
            continue
        decoded += 1
        assert commands
        assert all(isinstance(c, Command) for c in commands)
    # The mutations keep some frames valid, so the success path runs too.
    assert decoded > 0


# ---------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------

INFO = ClientInfo(user="42", client="c-1")
INFO_FULL = ClientInfo(user="42", client="c-1", conn_info=b'{"name":"Ann"}', chan_info=b"[1,2]")


def test_ping_frame_is_empty_object() -> None:
    assert PING_FRAME == b"{}"


def test_encode_error_non_temporary_omits_temporary() -> None:
    raw = encode_error(7, ERROR_METHOD_NOT_FOUND)
    assert _loads(raw) == {"id": 7, "error": {"code": 104, "message": "method not found"}}


def test_encode_error_temporary() -> None:
    assert _loads(encode_error(3, ERROR_INTERNAL)) == {
        "id": 3,
        "error": {"code": 100, "message": "internal server error", "temporary": True},
    }
    assert _loads(encode_error(4, ErrorReply(1001, "custom", temporary=False))) == {
        "id": 4,
        "error": {"code": 1001, "message": "custom"},
    }


def test_encode_reply_empty_results() -> None:
    assert _loads(encode_reply(3, "publish", {})) == {"id": 3, "publish": {}}
    assert _loads(encode_reply(4, "unsubscribe", {})) == {"id": 4, "unsubscribe": {}}
    assert _loads(encode_reply(5, "ping", {})) == {"id": 5, "ping": {}}


@pytest.mark.parametrize("method", ["publish", "unsubscribe", "ping"])
@pytest.mark.parametrize("cmd_id", [1, 77, UINT32_MAX])
def test_the_formatted_empty_reply_is_the_encoders_bytes(method: str, cmd_id: int) -> None:
    assert encode_empty_reply(cmd_id, method) == encode_reply(cmd_id, method, {})


def test_the_broker_body_leaves_the_offset_out() -> None:
    # The broker assigns the offset: the body it carries has none, whatever
    # offset the publication held.
    data = b'{"text":"hi"}'
    fresh = Publication(data, INFO, 0, {"k": "v"}, 1700000000000)
    placed = Publication(data, INFO, 9, {"k": "v"}, 1700000000000)
    assert publication_body(placed) == publication_body(fresh)
    assert _loads(publication_body(fresh)) == {
        "data": {"text": "hi"},
        "info": _loads(encode_client_info(INFO)),
        "tags": {"k": "v"},
        "time": 1700000000000,
    }
    assert publication_body(Publication(b"", None, 3, body=b'{"data":1}')) == b'{"data":1}'


def test_a_publications_data_reads_the_same_from_its_body() -> None:
    data = b'{"type":"call.ended","seq":4}'
    fresh = Publication(data, INFO, 0, None, 1700000000000)
    # As read back from the Redis broker: only the offset and the body.
    crossed = Publication(b"", None, 7, body=publication_body(fresh))
    assert (
        publication_data(fresh)
        == publication_data(crossed)
        == {
            "type": "call.ended",
            "seq": 4,
        }
    )


def test_encode_pub_push_embeds_raw_data_and_info_offset() -> None:
    pub = Publication(data=b'{"text":"hello"}', info=INFO, offset=5)
    raw = encode_pub_push("room:1", pub)
    assert b'"data":{"text":"hello"}' in raw  # raw JSON, not a string or base64
    assert b"\n" not in raw
    assert _loads(raw) == {
        "push": {
            "channel": "room:1",
            "pub": {
                "data": {"text": "hello"},
                "info": {"user": "42", "client": "c-1"},
                "offset": 5,
            },
        }
    }


def test_encode_pub_push_minimal_omits_defaults() -> None:
    assert _loads(encode_pub_push("c", Publication(data=b"[1,2]"))) == {
        "push": {"channel": "c", "pub": {"data": [1, 2]}}
    }


def test_encode_pub_push_with_tags_time_and_full_info() -> None:
    pub = Publication(data=b"1", info=INFO_FULL, offset=1, tags={"k": "v"}, time_ms=1700)
    assert _loads(encode_pub_push("c", pub))["push"]["pub"] == {
        "data": 1,
        "info": {"user": "42", "client": "c-1", "conn_info": {"name": "Ann"}, "chan_info": [1, 2]},
        "offset": 1,
        "tags": {"k": "v"},
        "time": 1700,
    }


def test_publication_object_round_trip() -> None:
    obj = publication_object(Publication(data=b'{"a":1}', offset=2))
    assert _loads(orjson.dumps(obj)) == {"data": {"a": 1}, "offset": 2}


def test_encode_join_leave_pushes() -> None:
    assert _loads(encode_join_push("room:1", INFO)) == {
        "push": {"channel": "room:1", "join": {"info": {"user": "42", "client": "c-1"}}}
    }
    assert _loads(encode_leave_push("room:1", INFO_FULL)) == {
        "push": {
            "channel": "room:1",
            "leave": {
                "info": {
                    "user": "42",
                    "client": "c-1",
                    "conn_info": {"name": "Ann"},
                    "chan_info": [1, 2],
                }
            },
        }
    }


def test_encode_unsubscribe_push() -> None:
    assert _loads(encode_unsubscribe_push("room:1", 2000, "server unsubscribe")) == {
        "push": {"channel": "room:1", "unsubscribe": {"code": 2000, "reason": "server unsubscribe"}}
    }


def test_encode_connect_result_minimal() -> None:
    res = ConnectResult(client="c-1", version="v1", ping_s=25, pong=True)
    assert _loads(encode_reply(1, "connect", res)) == {
        "id": 1,
        "connect": {"client": "c-1", "version": "v1", "ping": 25, "pong": True},
    }


def test_encode_connect_result_without_pong_keeps_ping() -> None:
    res = ConnectResult(client="c-1", version="v1", ping_s=0, pong=False)
    assert _loads(encode_reply(1, "connect", res)) == {
        "id": 1,
        "connect": {"client": "c-1", "version": "v1", "ping": 0},
    }


def test_encode_connect_result_full() -> None:
    res = ConnectResult(
        client="c-1",
        version="v1",
        ping_s=10,
        pong=True,
        expires=True,
        ttl_s=300,
        data={"welcome": True},
        subs={
            "user:#42": SubscribeResult(
                recoverable=True, positioned=True, epoch="ep", offset=3, recovered=True
            ),
            "room:1": SubscribeResult(),
        },
        node="n1",
        time_ms=123,
    )
    assert _loads(encode_reply(1, "connect", res)) == {
        "id": 1,
        "connect": {
            "client": "c-1",
            "version": "v1",
            "expires": True,
            "ttl": 300,
            "data": {"welcome": True},
            "subs": {
                "user:#42": {
                    "recoverable": True,
                    "positioned": True,
                    "epoch": "ep",
                    "offset": 3,
                    "recovered": True,
                },
                "room:1": {},
            },
            "ping": 10,
            "pong": True,
            "node": "n1",
            "time": 123,
        },
    }


def test_encode_subscribe_result_omits_defaults() -> None:
    assert _loads(encode_reply(2, "subscribe", SubscribeResult())) == {"id": 2, "subscribe": {}}


def test_encode_subscribe_result_recovered() -> None:
    res = SubscribeResult(
        recoverable=True,
        positioned=True,
        epoch="abcd",
        offset=1,
        publications=[Publication(b'{"n":2}', INFO, 2), Publication(b'{"n":3}', None, 3)],
        recovered=True,
        was_recovering=True,
        expires=True,
        ttl_s=60,
        data={"x": 1},
    )
    assert _loads(encode_reply(2, "subscribe", res)) == {
        "id": 2,
        "subscribe": {
            "expires": True,
            "ttl": 60,
            "recoverable": True,
            "positioned": True,
            "epoch": "abcd",
            "offset": 1,
            "publications": [
                {"data": {"n": 2}, "info": {"user": "42", "client": "c-1"}, "offset": 2},
                {"data": {"n": 3}, "offset": 3},
            ],
            "recovered": True,
            "was_recovering": True,
            "data": {"x": 1},
        },
    }


def test_encode_subscribe_result_not_recovered_keeps_was_recovering() -> None:
    res = SubscribeResult(recoverable=True, epoch="e2", offset=9, was_recovering=True)
    body = _loads(encode_reply(2, "subscribe", res))["subscribe"]
    assert body == {"recoverable": True, "epoch": "e2", "offset": 9, "was_recovering": True}
    assert "recovered" not in body


def test_encode_history_result() -> None:
    res = HistoryResult(
        publications=[Publication(b'"a"', None, 4), Publication(b'"b"', INFO, 5)],
        top=StreamPosition(5, "ep"),
    )
    assert _loads(encode_reply(6, "history", res)) == {
        "id": 6,
        "history": {
            "publications": [
                {"data": "a", "offset": 4},
                {"data": "b", "info": {"user": "42", "client": "c-1"}, "offset": 5},
            ],
            "epoch": "ep",
            "offset": 5,
        },
    }


def test_encode_history_result_empty_stream() -> None:
    res = HistoryResult(publications=(), top=StreamPosition(0, ""))
    assert _loads(encode_reply(6, "history", res)) == {"id": 6, "history": {"publications": []}}


def test_encode_presence_results() -> None:
    res = PresenceResult({"c-1": INFO, "c-2": ClientInfo("7", "c-2", conn_info=b'{"a":1}')})
    assert _loads(encode_reply(3, "presence", res)) == {
        "id": 3,
        "presence": {
            "presence": {
                "c-1": {"user": "42", "client": "c-1"},
                "c-2": {"user": "7", "client": "c-2", "conn_info": {"a": 1}},
            }
        },
    }
    assert _loads(encode_reply(4, "presence_stats", PresenceStatsResult(3, 2))) == {
        "id": 4,
        "presence_stats": {"num_clients": 3, "num_users": 2},
    }


def test_encode_refresh_results() -> None:
    assert _loads(encode_reply(8, "refresh", RefreshResult("c-1", "v", True, 120))) == {
        "id": 8,
        "refresh": {"client": "c-1", "version": "v", "expires": True, "ttl": 120},
    }
    assert _loads(encode_reply(8, "refresh", RefreshResult("c-1", "v"))) == {
        "id": 8,
        "refresh": {"client": "c-1", "version": "v"},
    }
    assert _loads(encode_reply(9, "sub_refresh", SubRefreshResult(True, 30))) == {
        "id": 9,
        "sub_refresh": {"expires": True, "ttl": 30},
    }
    assert _loads(encode_reply(9, "sub_refresh", SubRefreshResult())) == {
        "id": 9,
        "sub_refresh": {},
    }


@pytest.mark.parametrize("data", [{"echo": {"x": 1}, "user": "42"}, [1, 2], "s", 0, None])
def test_encode_rpc_wraps_data(data: Any) -> None:
    assert _loads(encode_reply(4, "rpc", data)) == {"id": 4, "rpc": {"data": data}}


def test_join_messages() -> None:
    a = encode_reply(1, "publish", {})
    b = encode_pub_push("c", Publication(b"1", None, 1))
    assert join_messages([a]) is a
    frame = join_messages([a, b, PING_FRAME])
    assert frame == a + b"\n" + b + b"\n{}"
    assert [_loads(line) for line in frame.split(b"\n")] == [
        {"id": 1, "publish": {}},
        {"push": {"channel": "c", "pub": {"data": 1, "offset": 1}}},
        {},
    ]
