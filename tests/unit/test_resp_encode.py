"""The RESP client's pure parts: command encoding, URLs, error replies, and the
reply parsing of a connection fed bytes through a fake transport (no socket)."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import hiredis
import pytest
from redis import exceptions as rexc
from redis._parsers.encoders import Encoder

from signaling.broker.base import BrokerUnavailable
from signaling.broker.resp import (
    RedisAddress,
    RespConnection,
    _reply_error,
    encode_command,
    encode_command_py,
    parse_redis_url,
)
from signaling.broker.resp_pubsub import RespPubSub

# --- encoding -------------------------------------------------------------------------------

ARGS: list[tuple[Any, ...]] = [
    ("PING",),
    ("SET", "k", "v"),
    ("SET", b"k\r\n\x00\xff", "é☃", 0, -1, 2**70, 1.5, 0.1, 1e-3, 1.7e12, 1e300),
    ("ZADD", "z", float("inf"), "m", float("-inf"), "n", -0.0, "o"),
    ("X", "", b""),
    ("EVALSHA", "a" * 40, 2, "{k}1", "{k}2", b"body" * 1000),
]


@pytest.mark.parametrize("args", ARGS)
def test_encode_matches_redis_py_and_python_fallback(args: tuple[Any, ...]) -> None:
    # redis-py's own encoder (what the AutoPipeline sent) is the reference.
    encoder = Encoder("utf-8", "strict", decode_responses=False)
    parts = [encoder.encode(a) for a in args]
    expected = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    assert encode_command(args) == expected
    assert encode_command(list(args)) == expected
    assert encode_command_py(args) == expected


def test_encode_parses_back_as_the_arguments() -> None:
    reader = hiredis.Reader()
    reader.feed(encode_command(("SET", "é", b"\r\n", 7, 2.5)))
    assert reader.gets() == [b"SET", "é".encode(), b"\r\n", b"7", b"2.5"]


def test_encode_takes_bytearray_and_memoryview_through_the_fallback() -> None:
    assert encode_command(("A", bytearray(b"xy"), memoryview(b"z"))) == encode_command(
        ("A", b"xy", b"z")
    )


@pytest.mark.parametrize("bad", [None, True, False, object(), ["list"]])
def test_encode_refuses_other_types(bad: Any) -> None:
    with pytest.raises(TypeError):
        encode_command(("SET", "k", bad))
    with pytest.raises(TypeError):
        encode_command_py(("SET", "k", bad))


# --- URLs --------------------------------------------------------------------------------------


def test_parse_url_forms() -> None:
    assert parse_redis_url("redis://localhost") == RedisAddress(host="localhost")
    a = parse_redis_url("redis://:p%40ss@h:7000/3")
    assert (a.host, a.port, a.username, a.password, a.db, a.tls) == (
        "h",
        7000,
        None,
        "p@ss",
        3,
        False,
    )
    assert a.handshake() == [("AUTH", "p@ss"), ("SELECT", 3)]
    b = parse_redis_url("rediss://alice:pw@h:6380/0?db=5&ssl_cert_reqs=none")
    assert (b.username, b.password, b.db, b.tls) == ("alice", "pw", 5, True)
    assert b.handshake() == [("AUTH", "alice", "pw"), ("SELECT", 5)]
    context = b.ssl_context()
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert not context.check_hostname
    strict = parse_redis_url("rediss://h").ssl_context()
    assert strict is not None and strict.verify_mode == ssl.CERT_REQUIRED and strict.check_hostname
    u = parse_redis_url("unix://:pw@/run/redis.sock?db=2")
    assert (u.path, u.password, u.db) == ("/run/redis.sock", "pw", 2)
    assert parse_redis_url("redis://h/0").handshake() == []
    assert "pw" not in repr(b)  # the password stays out of logs


@pytest.mark.parametrize(
    "url",
    ["http://h", "redis://h/x", "redis://h:port", "rediss://h?ssl_cert_reqs=maybe", "unix://"],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        parse_redis_url(url)


# --- error replies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "cls"),
    [
        ("NOSCRIPT No matching script. Please use EVAL.", rexc.NoScriptError),
        ("WRONGTYPE Operation against a key holding the wrong kind of value", rexc.ResponseError),
        ("ERR unknown command 'NOPE'", rexc.ResponseError),
        ("READONLY You can't write against a read only replica.", rexc.ReadOnlyError),
        ("OOM command not allowed when used memory > 'maxmemory'.", rexc.OutOfMemoryError),
        ("NOAUTH Authentication required.", rexc.AuthenticationError),
        ("WRONGPASS invalid username-password pair", rexc.AuthenticationError),
        ("NOPERM this user has no permissions", rexc.NoPermissionError),
        ("EXECABORT Transaction discarded", rexc.ExecAbortError),
        ("LOADING Redis is loading the dataset in memory", BrokerUnavailable),
    ],
)
def test_error_replies_map_like_redis_py(message: str, cls: type[Exception]) -> None:
    error = _reply_error(message)
    assert type(error) is cls
    if isinstance(error, rexc.ResponseError) and not message.startswith("WRONGTYPE"):
        assert str(error) == message.split(" ", 1)[1]  # redis-py drops the code


# --- parsing through a fake transport ------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.protocol: asyncio.BaseProtocol | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        if not self.closed and self.protocol is not None:
            self.closed = True
            self.protocol.connection_lost(None)


def _connected(conn: RespConnection | RespPubSub) -> FakeTransport:
    transport = FakeTransport()
    transport.protocol = conn
    conn.connection_made(transport)
    return transport


async def test_replies_resolve_futures_in_order_one_write_per_iteration() -> None:
    conn = RespConnection(RedisAddress(), reply_timeout_s=None)
    transport = _connected(conn)
    futures = [conn.execute("CMD", i) for i in range(8)]
    await asyncio.sleep(0)
    assert len(transport.written) == 1  # auto-pipelined
    assert transport.written[0] == b"".join(encode_command(("CMD", i)) for i in range(8))
    assert conn.in_flight == 1 and conn.pending == 8
    wire = (
        b"+OK\r\n-WRONGTYPE bad\r\n:42\r\n$5\r\nhe\r\nl\r\n$-1\r\n"
        b"*2\r\n*1\r\n:1\r\n$0\r\n\r\n*0\r\n"
    )
    for i in range(len(wire)):  # byte by byte: partial replies wait for the rest
        conn.data_received(wire[i : i + 1])
    conn.data_received(b"*-1\r\n")
    results: list[Any] = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == b"OK"
    assert type(results[1]) is rexc.ResponseError
    assert results[2:] == [42, b"he\r\nl", None, [[1], b""], [], None]
    assert conn.in_flight == 0 and conn.pending == 0 and conn.batches == 1 and conn.commands == 8


async def test_connection_loss_fails_pending_and_later_commands() -> None:
    conn = RespConnection(RedisAddress(), reply_timeout_s=None)
    transport = _connected(conn)
    first, second = conn.execute("GET", "a"), conn.execute("GET", "b")
    await asyncio.sleep(0)
    conn.data_received(b"$1\r\nx\r\n")
    transport.abort()
    assert await first == b"x"
    with pytest.raises(BrokerUnavailable):
        await second
    with pytest.raises(BrokerUnavailable):
        conn.execute("GET", "c")


async def test_unexpected_reply_or_garbage_drops_the_connection() -> None:
    conn = RespConnection(RedisAddress(), reply_timeout_s=None)
    transport = _connected(conn)
    conn.data_received(b"+surprise\r\n")
    assert conn.closed and transport.closed
    conn = RespConnection(RedisAddress(), reply_timeout_s=None)
    transport = _connected(conn)
    future = conn.execute("PING")
    conn.data_received(b"?garbage\r\n")
    assert conn.closed
    with pytest.raises(BrokerUnavailable):
        await future


async def test_cancelled_caller_keeps_the_fifo_aligned() -> None:
    conn = RespConnection(RedisAddress(), reply_timeout_s=None)
    _connected(conn)
    first, second = conn.execute("GET", "a"), conn.execute("GET", "b")
    first.cancel()
    conn.data_received(b"$1\r\na\r\n$1\r\nb\r\n")
    assert await second == b"b"


async def test_back_pressure_flag_follows_pending_and_transport() -> None:
    conn = RespConnection(RedisAddress(), reply_timeout_s=None, max_pending=4)
    _connected(conn)
    conn._opened = True  # as after connect()
    conn._set_ready()
    futures = [conn.execute("PING") for _ in range(4)]
    assert not conn.ready  # at the bound
    conn.data_received(b"+PONG\r\n")
    assert not conn.ready  # 3 left: resumes at half
    conn.data_received(b"+PONG\r\n")
    assert conn.ready
    conn.pause_writing()
    assert not conn.ready
    conn.resume_writing()
    assert conn.ready
    conn.data_received(b"+PONG\r\n+PONG\r\n")
    assert [await f for f in futures] == [b"PONG"] * 4


async def test_pubsub_dispatches_pushes_without_a_queue() -> None:
    got: list[tuple[bytes, bytes]] = []
    confirmed: list[bytes] = []
    lost: list[Exception] = []
    ps = RespPubSub(
        RedisAddress(),
        on_message=lambda c, d: got.append((c, d)),
        on_subscribed=confirmed.append,
        on_lost=lost.append,
    )
    transport = _connected(ps)
    ps._connected = True  # as after connect()
    ps.subscribe("a", b"b")
    ps.subscribe("c")
    ps.unsubscribe("a")
    await asyncio.sleep(0)
    assert transport.written == [
        encode_command(("SUBSCRIBE", "a", b"b", "c")) + encode_command(("UNSUBSCRIBE", "a"))
    ]
    ps.data_received(
        b"*3\r\n$9\r\nsubscribe\r\n$1\r\na\r\n:1\r\n"
        b"*3\r\n$7\r\nmessage\r\n$1\r\na\r\n$2\r\nhi\r\n"
        b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$3\r\n\r\n\x00\r\n"
    )
    assert confirmed == [b"a"] and ps.subscriptions == 1
    assert got == [(b"a", b"hi"), (b"b", b"\r\n\x00")]
    transport.abort()
    assert len(lost) == 1 and isinstance(lost[0], ConnectionResetError)  # EOF
