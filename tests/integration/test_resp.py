"""The lean RESP client (signaling.broker.resp) against real redis-server processes.

Commands (RespClient), pub/sub (RespPubSub), failures (kill, SIGSTOP, restart),
AUTH/SELECT/unix sockets, and the whole StateStore contract of
test_state_store.py re-run through RespClient (its test functions are
imported below and collected here with a ``test_contract_`` prefix, against
this module's ``h``/``rh`` fixtures).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import signal
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import test_state_store as contract
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis import exceptions as rexc
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from signaling.broker.base import BrokerUnavailable
from signaling.broker.resp import RespClient, parse_redis_url
from signaling.broker.resp_pubsub import RespPubSub
from signaling.state.redis import INCR_WINDOW, LuaScript, RedisStateStore, run_script_per_item
from support.processes import RedisProcess

MS = 0.001

# A script that keeps Redis busy (its reply is pending meanwhile).
SPIN = LuaScript(
    """
local t = redis.call('TIME')
local until_us = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000
repeat
  t = redis.call('TIME')
until t[1] * 1000000 + t[2] >= until_us
return 1
"""
)


class ConfiguredRedis(RedisProcess):
    """A RedisProcess with extra arguments (password, unix socket, TLS) whose
    readiness PING authenticates first, over TLS if ``tls``: then ``port`` is
    the TLS port and there is no plain one."""

    def __init__(
        self, data_dir: Path, extra: list[str], password: str | None = None, tls: bool = False
    ) -> None:
        super().__init__(data_dir)
        self.extra = extra
        self.password = password
        self.tls = tls

    @property
    def argv(self) -> list[str]:
        argv = [*super().argv, *self.extra]
        if self.tls:
            at = argv.index("--port")
            argv[at : at + 2] = ["--port", "0", "--tls-port", str(self.port)]
        return argv

    def ping(self, timeout: float = 0.5) -> bool:
        if self.password is None and not self.tls:
            return super().ping(timeout)
        auth = b"" if self.password is None else f"AUTH {self.password}\r\n".encode()
        try:
            with contextlib.ExitStack() as stack:
                sock = stack.enter_context(
                    socket.create_connection((self.host, self.port), timeout=timeout)
                )
                if self.tls:
                    context = ssl.create_default_context()
                    context.check_hostname = False
                    context.verify_mode = ssl.CERT_NONE
                    sock = stack.enter_context(context.wrap_socket(sock))
                sock.sendall(auth + b"PING\r\n")
                data = b""
                while not data.endswith(b"+PONG\r\n") and b"-" not in data[:1]:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    data += chunk
                return data.endswith(b"+PONG\r\n")
        except OSError:
            return False


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def configured_redis(tmp_path: Path) -> Iterator[Callable[..., ConfiguredRedis]]:
    started: list[ConfiguredRedis] = []

    def start(extra: list[str], password: str | None = None, tls: bool = False) -> ConfiguredRedis:
        proc = ConfiguredRedis(tmp_path / "redis-conf", extra, password, tls)
        started.append(proc)
        proc.start()
        return proc

    yield start
    for proc in started:
        proc.stop(grace=5.0)


@pytest.fixture
async def client(redis_server: RedisProcess) -> AsyncIterator[RespClient]:
    c = RespClient(redis_server.url)
    yield c
    await c.close()


@pytest.fixture
async def raw(redis_server: RedisProcess) -> AsyncIterator[Redis]:
    """A redis-py client to look at what RespClient did."""
    r = Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 0))
    yield r
    await r.aclose()


@contextlib.contextmanager
def stopped(server: RedisProcess) -> Iterator[None]:
    """Redis frozen (SIGSTOP): connections stay up, nothing answers."""
    server.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        server.signal(signal.SIGCONT)


# --- replies ----------------------------------------------------------------------------------


async def test_every_reply_type(client: RespClient) -> None:
    assert await client.execute("PING") == b"PONG"  # status
    assert await client.execute("SET", "k", b"\r\n\x00\xff") == b"OK"  # status, not True
    assert await client.execute("GET", "k") == b"\r\n\x00\xff"  # bulk, binary-safe
    assert await client.execute("GET", "missing") is None  # nil
    assert await client.execute("INCRBY", "n", 41) == 41  # integer
    assert await client.execute("SET", "f", 2.5) == b"OK"
    assert await client.execute("INCRBYFLOAT", "f", 0.5) == b"3"
    assert await client.execute("SET", "text", "é☃") == b"OK"
    assert (await client.execute("GET", "text")).decode() == "é☃"
    assert await client.execute("RPUSH", "l", "a", "b", "c") == 3
    assert await client.execute("LRANGE", "l", 0, -1) == [b"a", b"b", b"c"]  # array
    assert await client.execute("LRANGE", "missing", 0, -1) == []  # empty array
    assert await client.execute("HSET", "h", "f1", "v1", "f2", "v2") == 2
    assert await client.execute("HGETALL", "h") == [b"f1", b"v1", b"f2", b"v2"]  # flat
    assert await client.execute("ZADD", "z", 1.5, "m") == 1
    assert await client.execute("ZRANGEBYSCORE", "z", "-inf", "+inf", "WITHSCORES") == [
        b"m",
        b"1.5",
    ]
    # nested arrays, integers and nils inside them
    nested = "return {1, {2, {'x', {}}}, 'y', false}"
    assert await client.execute("EVAL", nested, 0) == [1, [2, [b"x", []]], b"y", None]
    entry_id = await client.execute("XADD", "s", "*", "d", "body")
    assert await client.execute("XRANGE", "s", "-", "+") == [[entry_id, [b"d", b"body"]]]
    with pytest.raises(rexc.ResponseError, match="WRONGTYPE"):  # error
        await client.execute("GET", "l")
    big = bytes(range(256)) * 8192  # 2 MiB: many reads
    assert await client.execute("SET", "big", big) == b"OK"
    assert await client.execute("GET", "big") == big


async def test_an_error_fails_only_its_own_command(client: RespClient) -> None:
    await client.execute("SET", "s", "v")
    calls = [client.execute("INCR", "n") for _ in range(5)]
    calls.append(client.execute("HGET", "s", "field"))  # WRONGTYPE mid-batch
    calls += [client.execute("INCR", "n") for _ in range(5)]
    calls.append(client.execute("NOSUCHCOMMAND"))
    calls.append(client.execute("GET", "s"))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert results[:5] == [1, 2, 3, 4, 5]
    assert type(results[5]) is rexc.ResponseError
    assert results[6:11] == [6, 7, 8, 9, 10]
    assert isinstance(results[11], rexc.ResponseError)
    assert results[12] == b"v"
    assert client.batches == 2  # the SET, then everything else in one write


async def test_execute_many_returns_errors_in_place(client: RespClient) -> None:
    await client.execute("SET", "s", "v")
    results = await client.execute_many(
        [
            ("GET", "s"),
            ("HGET", "s", "f"),
            ("EVALSHA", "0" * 40, 0),
            ("SET", "k", None),
            ("DEL", "s"),
        ]
    )
    assert results[0] == b"v"
    assert type(results[1]) is rexc.ResponseError
    assert type(results[2]) is rexc.NoScriptError
    assert isinstance(results[3], TypeError)  # refused before sending
    assert results[4] == 1
    assert await client.execute_many([]) == []


# --- pipelining -------------------------------------------------------------------------------


# One value per item naming its key and argument, after the shared one.
ECHO_ITEMS = LuaScript(
    """
local out = {}
for i = 1, #KEYS do
  out[i] = ARGV[1] .. ':' .. KEYS[i] .. '=' .. ARGV[i + 1]
end
return out
"""
)


async def test_a_script_per_item_answers_each_item_in_its_place(client: RespClient) -> None:
    items = [([f"k{i}"], [str(i)]) for i in range(11)]
    # Standalone: consecutive items, max_items per call. (The first run loads
    # the script: EVALSHA, NOSCRIPT, then EVAL.)
    got = await run_script_per_item(client, ECHO_ITEMS, items, ["t"], max_items=4)
    assert got == [f"t:k{i}={i}".encode() for i in range(11)]
    # As on a cluster: items grouped by "slot" (here i % 3), at most 2 per call.
    batches = client.batches
    got = await run_script_per_item(
        client, ECHO_ITEMS, items, ["s"], slot_of=lambda key: int(key[1:]) % 3, max_items=2
    )
    assert got == [f"s:k{i}={i}".encode() for i in range(11)]
    assert client.batches == batches + 1  # every call in one write
    assert await run_script_per_item(client, ECHO_ITEMS, [], ["t"]) == []


async def test_concurrent_commands_share_writes_and_keep_order(client: RespClient) -> None:
    await client.execute("PING")
    batches, commands = client.batches, client.commands
    results = await asyncio.gather(*(client.execute("INCR", "n") for _ in range(1000)))
    assert results == list(range(1, 1001))  # replies in order
    assert client.commands - commands == 1000
    assert client.batches - batches <= 3  # one write per loop iteration
    # Mixed callers: each gets its own reply.
    keys = [f"k{i}" for i in range(300)]
    await asyncio.gather(*(client.execute("SET", k, k.upper()) for k in keys))
    values = await asyncio.gather(*(client.execute("GET", k) for k in keys))
    assert values == [k.upper().encode() for k in keys]
    assert client.in_flight == 0 and client.pending == 0


async def test_back_pressure_bounds_pending_commands(redis_server: RedisProcess) -> None:
    client = RespClient(redis_server.url, max_pending=50)
    seen: list[int] = []
    stop = False

    def sample() -> None:
        seen.append(client.pending)
        if not stop:
            asyncio.get_running_loop().call_soon(sample)

    try:
        await client.connect()
        sample()
        results = await asyncio.gather(*(client.execute("INCR", "n") for _ in range(3000)))
        stop = True
        assert sorted(results) == list(range(1, 3001))
        assert max(seen) <= 50
    finally:
        await client.close()


async def test_a_stalled_redis_pauses_writers_instead_of_buffering(
    redis_server: RedisProcess,
) -> None:
    """Redis frozen: once the socket buffers fill, the transport pauses and new
    commands wait; nothing is lost when it thaws."""
    client = RespClient(redis_server.url, reply_timeout_s=30)
    await client.connect()
    value = b"x" * (1 << 20)
    with stopped(redis_server):
        tasks = [asyncio.ensure_future(client.execute("SET", f"k{i}", value)) for i in range(64)]
        await asyncio.sleep(200 * MS)
        conn = client._conn
        assert conn is not None and not conn.ready  # paused by the transport
        late = asyncio.ensure_future(client.execute("SET", "late", "v"))
        await asyncio.sleep(100 * MS)
        assert not late.done()
        assert client.pending == 64  # the late command waits outside the buffer
    assert set(await asyncio.gather(*tasks)) == {b"OK"}
    assert await late == b"OK"
    assert await client.execute("DBSIZE") == 65
    await client.close()


# --- scripts ----------------------------------------------------------------------------------


async def test_evalsha_falls_back_to_eval(client: RespClient, raw: Redis) -> None:
    assert await raw.script_exists(INCR_WINDOW.sha1) == [False]
    with pytest.raises(rexc.NoScriptError):
        await client.execute("EVALSHA", INCR_WINDOW.sha1, 1, "w", 1000)
    assert await client.run_script(INCR_WINDOW, ["w"], [1000]) == 1  # EVAL
    assert await raw.script_exists(INCR_WINDOW.sha1) == [True]
    assert await client.run_script(INCR_WINDOW, ["w"], [1000]) == 2  # EVALSHA
    await raw.script_flush()
    results = await asyncio.gather(
        *(client.run_script(INCR_WINDOW, ["w"], [1000]) for _ in range(5))
    )
    assert sorted(results) == [3, 4, 5, 6, 7]
    with pytest.raises(rexc.ResponseError):  # a script error is the caller's
        await client.run_script(LuaScript("return redis.call('NOPE')"), [], [])


# --- connecting -------------------------------------------------------------------------------


async def test_auth_select_and_acl_user(configured_redis: Callable[..., ConfiguredRedis]) -> None:
    server = configured_redis(["--requirepass", "s3cret"], password="s3cret")
    base = f"{server.host}:{server.port}"
    client = RespClient(f"redis://:s3cret@{base}/3")
    assert await client.execute("SET", "k", "in-db-3") == b"OK"
    assert await client.execute("CLIENT", "INFO") is not None
    raw3 = Redis.from_url(f"redis://:s3cret@{base}/3")
    raw0 = Redis.from_url(f"redis://:s3cret@{base}/0")
    assert await raw3.get("k") == b"in-db-3"
    assert await raw0.get("k") is None
    await raw0.execute_command("ACL", "SETUSER", "alice", "on", ">pw", "~*", "&*", "+@all")
    alice = RespClient(f"redis://alice:pw@{base}/0")
    assert await alice.execute("ACL", "WHOAMI") == b"alice"

    for url in (f"redis://:wrong@{base}/0", f"redis://alice:nope@{base}/0"):
        bad = RespClient(url)
        with pytest.raises(BrokerUnavailable) as info:
            await bad.connect()
        assert isinstance(info.value.__cause__, rexc.AuthenticationError)
        await bad.close()
    anonymous = RespClient(f"redis://{base}/0")
    with pytest.raises(rexc.AuthenticationError):  # NOAUTH
        await anonymous.execute("GET", "k")
    for c in (client, alice, anonymous):
        await c.close()
    await raw3.aclose()
    await raw0.aclose()


async def test_unix_socket(
    configured_redis: Callable[..., ConfiguredRedis], tmp_path: Path
) -> None:
    path = tmp_path / "redis.sock"
    configured_redis(["--unixsocket", str(path), "--unixsocketperm", "700"])
    client = RespClient(f"unix://{path}?db=2")
    assert await client.execute("SET", "k", "v") == b"OK"
    assert await client.execute("CLIENT", "INFO") is not None
    assert await client.execute("GET", "k") == b"v"
    messages: list[bytes] = []
    ps = RespPubSub(parse_redis_url(f"unix://{path}"), on_message=lambda c, d: messages.append(d))
    await ps.connect()
    ps.subscribe("c")
    await ps.ping()
    assert await client.execute("PUBLISH", "c", "hi") == 1
    await ps.ping()
    assert messages == [b"hi"]
    ps.close()
    await client.close()


async def test_tls(configured_redis: Callable[..., ConfiguredRedis], tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    tls_args = ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls_args += ["--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no"]
    server = configured_redis([*tls_args, "--requirepass", "pw"], password="pw", tls=True)
    base = f"rediss://:pw@127.0.0.1:{server.port}/1"
    verified = RespClient(f"{base}?ssl_ca_certs={cert}")  # hostname (IP) checked too
    assert await verified.execute("SET", "k", "v") == b"OK"
    unverified = RespClient(f"{base}?ssl_cert_reqs=none")
    assert await unverified.execute("GET", "k") == b"v"
    default = RespClient(base)  # system CAs: the self-signed certificate is refused
    with pytest.raises(BrokerUnavailable) as info:
        await default.connect()
    assert isinstance(info.value.__cause__, ssl.SSLError)
    messages: list[bytes] = []
    ps = RespPubSub(
        parse_redis_url(f"{base}?ssl_ca_certs={cert}"), on_message=lambda c, d: messages.append(d)
    )
    await ps.connect()
    ps.subscribe("c")
    await ps.ping()
    assert await verified.execute("PUBLISH", "c", "over tls") == 1
    await ps.ping()
    assert messages == [b"over tls"]
    ps.close()
    for c in (verified, unverified, default):
        await c.close()


async def test_unreachable_redis_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens once closed
    client = RespClient(f"redis://127.0.0.1:{port}/0")
    start = time.monotonic()
    with pytest.raises(BrokerUnavailable):
        await client.connect()
    # Concurrent commands share one attempt; right after a failed one, commands
    # fail without connecting (a jittered window, growing while it fails).
    results = await asyncio.gather(
        *(client.execute("PING") for _ in range(50)), return_exceptions=True
    )
    assert all(isinstance(r, BrokerUnavailable) for r in results)
    for _ in range(200):
        with pytest.raises(BrokerUnavailable):
            await client.execute("PING")
    assert client.connect_failures <= 10  # of 251 commands
    await asyncio.sleep(0.05)
    with pytest.raises(BrokerUnavailable):
        await client.execute("PING")
    assert client.connect_failures >= 2  # tried again after the window
    assert time.monotonic() - start < 2.0
    assert client.connects == 0
    await client.close()


async def test_killed_redis_fails_pending_and_new_commands_then_recovers(
    client: RespClient, redis_server: RedisProcess
) -> None:
    assert await client.execute("SET", "k", "v") == b"OK"
    busy = asyncio.ensure_future(client.execute("EVAL", SPIN.source, 0, 2000))
    queued = [asyncio.ensure_future(client.execute("INCR", "n")) for _ in range(10)]
    await asyncio.sleep(100 * MS)  # written; Redis is inside the script
    assert not busy.done()
    redis_server.kill()
    with pytest.raises(BrokerUnavailable):
        await busy
    for task in queued:
        with pytest.raises(BrokerUnavailable):
            await task
    for _ in range(3):
        with pytest.raises(BrokerUnavailable):
            await client.execute("GET", "k")
    with pytest.raises(BrokerUnavailable):
        await client.run_script(INCR_WINDOW, ["w"], [1000])
    redis_server.restart()
    assert await client.execute("GET", "k") is None  # restarted empty
    assert await client.run_script(INCR_WINDOW, ["w"], [1000]) == 1  # NOSCRIPT -> EVAL
    assert client.connects == 2
    results = await asyncio.gather(*(client.execute("INCR", "m") for _ in range(100)))
    assert results == list(range(1, 101))


async def test_frozen_redis_times_out_pending_commands(redis_server: RedisProcess) -> None:
    """A peer that accepts nothing (SIGSTOP, or a half-open TCP connection)
    fails pending commands after reply_timeout_s instead of holding them."""
    client = RespClient(redis_server.url, reply_timeout_s=0.4)
    await client.connect()
    with stopped(redis_server):
        start = time.monotonic()
        with pytest.raises(BrokerUnavailable) as info:
            await client.execute("PING")
        assert 0.25 < time.monotonic() - start < 2.0
        assert "no reply" in str(info.value)
    assert await client.execute("PING") == b"PONG"  # a new connection
    assert client.connects == 2
    await client.close()


async def test_a_cancelled_caller_does_not_shift_replies(client: RespClient) -> None:
    await client.execute("SET", "a", "A")
    await client.execute("SET", "b", "B")
    busy = asyncio.ensure_future(client.execute("EVAL", SPIN.source, 0, 200))
    first = asyncio.ensure_future(client.execute("GET", "a"))
    second = asyncio.ensure_future(client.execute("GET", "b"))
    await asyncio.sleep(50 * MS)
    first.cancel()
    busy.cancel()
    assert await second == b"B"
    assert await client.execute("GET", "a") == b"A"


async def test_close_drains_then_refuses(client: RespClient, redis_server: RedisProcess) -> None:
    await client.connect()
    tasks = [asyncio.ensure_future(client.execute("INCR", "n")) for _ in range(100)]
    await asyncio.sleep(0)
    await client.close()
    assert sorted(await asyncio.gather(*tasks)) == list(range(1, 101))
    with pytest.raises(BrokerUnavailable):
        await client.execute("PING")
    # Closed while connecting: the waiting commands fail, nothing hangs.
    other = RespClient(redis_server.url)
    waiting = asyncio.ensure_future(other.execute("PING"))
    await asyncio.sleep(0)
    await other.close()
    with pytest.raises(BrokerUnavailable):
        await waiting


# --- pub/sub ----------------------------------------------------------------------------------


class Subscriber:
    """A RespPubSub and everything its callbacks saw."""

    def __init__(self, url: str) -> None:
        self.messages: list[tuple[bytes, bytes]] = []
        self.subscribed: list[bytes] = []
        self.unsubscribed: list[bytes] = []
        self.lost: list[Exception] = []
        self.waiter: tuple[int, asyncio.Future[None]] | None = None
        self.ps = RespPubSub(
            parse_redis_url(url),
            on_message=self.on_message,
            on_subscribed=self.subscribed.append,
            on_unsubscribed=self.unsubscribed.append,
            on_lost=self.lost.append,
        )

    def on_message(self, channel: bytes, data: bytes) -> None:
        self.messages.append((channel, data))
        if self.waiter is not None and len(self.messages) >= self.waiter[0]:
            self.waiter[1].set_result(None)
            self.waiter = None

    async def wait_for(self, count: int, timeout: float = 10.0) -> None:
        if len(self.messages) < count:
            future = asyncio.get_running_loop().create_future()
            self.waiter = (count, future)
            await asyncio.wait_for(future, timeout)


@pytest.fixture
async def sub(redis_server: RedisProcess) -> AsyncIterator[Subscriber]:
    s = Subscriber(redis_server.url)
    await s.ps.connect()
    yield s
    s.ps.close()


async def test_pubsub_confirms_and_delivers_in_order(sub: Subscriber, client: RespClient) -> None:
    await sub.ps.ping()  # before subscribe mode: +PONG
    sub.ps.subscribe("a", "b")
    sub.ps.subscribe(b"c")
    await sub.ps.ping()  # in subscribe mode: ["pong", ""], after the confirmations
    assert sub.subscribed == [b"a", b"b", b"c"]
    assert sub.ps.subscriptions == 3
    for i in range(100):
        await client.execute("PUBLISH", "abc"[i % 3], f"m{i}")
    await sub.wait_for(100)
    assert sub.messages == [(("abc"[i % 3]).encode(), f"m{i}".encode()) for i in range(100)]


async def test_pubsub_delivers_ten_thousand_messages(sub: Subscriber, client: RespClient) -> None:
    sub.ps.subscribe("bulk")
    await sub.ps.ping()
    body = b"\x00\r\n" + b"p" * 200
    receivers = await asyncio.gather(
        *(client.execute("PUBLISH", "bulk", b"%d:" % i + body) for i in range(10_000))
    )
    assert set(receivers) == {1}
    await sub.wait_for(10_000)
    assert [d for _, d in sub.messages] == [b"%d:" % i + body for i in range(10_000)]


async def test_pubsub_unsubscribe(sub: Subscriber, client: RespClient) -> None:
    sub.ps.subscribe("a", "b")
    await sub.ps.ping()
    sub.ps.unsubscribe("a")
    await sub.ps.ping()
    assert sub.unsubscribed == [b"a"] and sub.ps.subscriptions == 1
    assert await client.execute("PUBLISH", "a", "x") == 0
    assert await client.execute("PUBLISH", "b", "y") == 1
    await sub.wait_for(1)
    sub.ps.unsubscribe()  # all
    await sub.ps.ping()  # out of subscribe mode again: +PONG
    assert sub.unsubscribed == [b"a", b"b"] and sub.ps.subscriptions == 0
    assert sub.messages == [(b"b", b"y")]


async def test_pubsub_many_channels_in_one_iteration(sub: Subscriber) -> None:
    names = [f"ch{i}" for i in range(1300)]
    for name in names:
        sub.ps.subscribe(name)
    await sub.ps.ping()
    assert sub.subscribed == [n.encode() for n in names]
    assert sub.ps.batches <= 3  # one write (plus the ping's)


async def test_pubsub_handler_errors_do_not_stop_delivery(
    redis_server: RedisProcess, client: RespClient
) -> None:
    got: list[bytes] = []

    def on_message(channel: bytes, data: bytes) -> None:
        if data == b"bad":
            raise RuntimeError("handler bug")
        got.append(data)

    ps = RespPubSub(parse_redis_url(redis_server.url), on_message=on_message)
    await ps.connect()
    ps.subscribe("c")
    await ps.ping()
    for data in ("1", "bad", "2"):
        await client.execute("PUBLISH", "c", data)
    await ps.ping()
    assert got == [b"1", b"2"]
    ps.close()


async def test_pubsub_connection_lost(sub: Subscriber, redis_server: RedisProcess) -> None:
    sub.ps.subscribe("a")
    await sub.ps.ping()
    redis_server.kill()
    await asyncio.wait_for(sub.ps.wait_closed(), 5)
    assert len(sub.lost) == 1 and sub.ps.closed
    with pytest.raises(BrokerUnavailable):
        await sub.ps.ping()
    sub.ps.subscribe("b")  # a no-op once closed


async def test_pubsub_ping_times_out_on_a_frozen_redis(
    sub: Subscriber, redis_server: RedisProcess
) -> None:
    sub.ps.subscribe("a")
    await sub.ps.ping()
    with stopped(redis_server):
        with pytest.raises(BrokerUnavailable):
            await sub.ps.ping(timeout_s=0.3)
        assert sub.ps.closed and len(sub.lost) == 1


async def test_pubsub_close_is_not_a_loss(sub: Subscriber) -> None:
    sub.ps.subscribe("a")
    await sub.ps.ping()
    sub.ps.close()
    await sub.ps.wait_closed()
    assert sub.lost == []


async def test_pubsub_connect_fails_with_broker_unavailable(
    configured_redis: Callable[..., ConfiguredRedis],
) -> None:
    server = configured_redis(["--requirepass", "pw"], password="pw")
    ps = RespPubSub(
        parse_redis_url(f"redis://:wrong@{server.host}:{server.port}"), on_message=lambda c, d: None
    )
    with pytest.raises(BrokerUnavailable):
        await ps.connect()
    assert ps.closed


# --- the StateStore contract through RespClient -------------------------------------------


@contextlib.asynccontextmanager
async def _resp_harness(server: RedisProcess) -> AsyncIterator[contract.RedisHarness]:
    executor = RespClient(server.url)
    raw = Redis.from_url(server.url, retry=Retry(NoBackoff(), 0))
    store = RedisStateStore(executor, prefix=f"t{uuid.uuid4().hex[:8]}:")
    try:
        yield contract.RedisHarness(store, executor, raw, server, BrokerUnavailable)
    finally:
        await executor.close()
        await raw.aclose()


@pytest.fixture
async def h(redis_server: RedisProcess) -> AsyncIterator[contract.Harness]:
    async with _resp_harness(redis_server) as r:
        yield contract.Harness(r.store, redis=r)


@pytest.fixture
async def rh(redis_server: RedisProcess) -> AsyncIterator[contract.RedisHarness]:
    async with _resp_harness(redis_server) as r:
        yield r


def _import_contract() -> dict[str, Any]:
    return {
        f"test_contract_{name.removeprefix('test_')}": test
        for name, test in vars(contract).items()
        if name.startswith("test_") and callable(test)
    }


globals().update(_import_contract())


async def test_a_server_turned_replica_drops_the_connection(
    client: RespClient, redis_server: RedisProcess, redis_factory: Callable[..., RedisProcess]
) -> None:
    """READONLY: the server we are connected to is a replica now (a failover
    behind a name or a virtual IP that kept the connection open). The
    command fails as temporary, and the connection goes, so that the next
    command connects again (to wherever the primary now is) instead of
    answering READONLY for ever."""
    other = redis_factory()
    admin = Redis.from_url(redis_server.url, retry=Retry(NoBackoff(), 0))
    try:
        assert await client.execute("SET", "k", "1") in (b"OK", "OK")
        connects = client.connects
        await admin.execute_command("REPLICAOF", "127.0.0.1", str(other.port))
        with pytest.raises(BrokerUnavailable, match="read-only"):
            await client.execute("SET", "k", "2")
        await admin.execute_command("REPLICAOF", "NO", "ONE")  # the primary is back
        for _ in range(50):  # the reconnect waits out its backoff
            with contextlib.suppress(BrokerUnavailable):
                assert await client.execute("SET", "k", "3") in (b"OK", "OK")
                break
            await asyncio.sleep(0.05)
        assert client.connects == connects + 1
    finally:
        await admin.aclose()
