"""A lean RESP2 client for the hot path on a standalone Redis.

Why not redis-py here: for a 2-member room a publication costs far more CPU in
redis-py (command packing, ``Pipeline.execute`` with its retry and timeout
wrappers, a task per pipeline, ``PubSub.get_message`` per message) than in
Redis itself (PERFORMANCE-NOTES §Redis). This module keeps only what the
broker needs: ``asyncio.Protocol`` connections whose replies ``hiredis``
parses, and no task per command or per message. Redis Cluster keeps redis-py.

* :class:`RespClient` runs commands (the broker's
  :class:`~signaling.state.redis.RedisExecutor`) over ONE connection. Every
  command issued during one loop iteration is written with one
  ``transport.write`` on the next (auto-pipelining); replies resolve futures
  in FIFO order from ``data_received``. When the connection is gone, the next
  command reconnects (jittered backoff); a command is never retried, because
  it may have run.
* :class:`~signaling.broker.resp_pubsub.RespPubSub` (its own module) is one
  connection in subscribe mode on the same base, :class:`BaseRespConnection`.

Errors: a Redis error reply raises redis-py's exception classes
(:class:`redis.exceptions.ResponseError`, ``NoScriptError`` for NOSCRIPT ...),
so callers written against redis-py keep working; it fails only its own
command. A lost, refused or timed-out connection raises
:class:`~signaling.broker.base.BrokerUnavailable`.

Replies are RESP2 as hiredis returns them, the same as redis-py's RESP2
replies without ``decode_responses`` and before its response callbacks:
status and bulk strings are ``bytes`` (``SET`` gives ``b"OK"``, not True),
integers ``int``, nil ``None``, arrays ``list`` (``HGETALL`` and
``WITHSCORES`` are flat lists). Error replies nested in an array (a script's
``redis.error_reply`` in a table) stay in the list as exception instances.

Not for blocking commands (BLPOP, XREAD BLOCK, WAIT): one connection is
shared, and a reply that does not come within ``reply_timeout_s`` is treated
as a dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, cast

import hiredis
from redis import exceptions as rexc

from signaling.broker.base import BrokerUnavailable
from signaling.broker.redis_url import RedisAddress, parse_redis_url
from signaling.state.redis import LuaScript, RedisArg

__all__ = [
    "NEED_MORE",
    "BaseRespConnection",
    "RedisAddress",
    "RespClient",
    "RespConnection",
    "encode_command",
    "encode_command_py",
    "parse_redis_url",
]

log = logging.getLogger("signaling.redis")

CONNECT_TIMEOUT_S: Final = 2.0
# A command whose reply has not come after this long means a dead connection
# (a half-open TCP connection would otherwise hold every command for ~15 min).
REPLY_TIMEOUT_S: Final = 10.0
# Commands written or buffered but not answered; beyond it new commands wait
# (back-pressure) instead of growing memory or failing.
MAX_PENDING: Final = 100_000
# After a failed connect, RespClient fails commands at once for a jittered
# window before it tries again; the window doubles per failure in a row. It
# starts small, so that a restarted Redis is noticed at once.
RETRY_MIN_S: Final = 0.01
RETRY_MAX_S: Final = 1.0
# TCP keepalive: idle seconds before probing, probe interval, probes.
KEEPALIVE: Final = (30, 10, 3)


# --- encoding ---------------------------------------------------------------------------


def encode_command(args: Sequence[RedisArg]) -> bytes:
    """``args`` as a RESP2 array of bulk strings (what Redis expects).

    str is UTF-8; bytes as is; int and float as ASCII text (floats by repr,
    like redis-py). hiredis's C packer does the work; the Python fallback
    exists for argument types it refuses (it rejects ``bytearray``, say) and
    for the error message.

    Raises:
        TypeError: an argument is not str, bytes, int or float (bool and None
            included: redis-py refuses them too).
    """
    try:
        return _pack(args if type(args) is tuple else tuple(args))
    except TypeError:
        return encode_command_py(args)


# hiredis's stub types the argument as a 1-tuple; it takes any length.
_pack: Callable[[tuple[RedisArg, ...]], bytes] = hiredis.pack_command  # type: ignore[assignment]


def encode_command_py(args: Sequence[RedisArg | bytearray | memoryview]) -> bytes:
    """Pure-Python :func:`encode_command` (same output)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data: bytes
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, bool):
            raise TypeError("a Redis argument cannot be a bool (pass an int or a str)")
        elif isinstance(arg, int):
            data = b"%d" % arg
        elif isinstance(arg, float):
            data = repr(arg).encode()
        elif isinstance(arg, bytearray | memoryview):
            data = bytes(arg)
        else:
            raise TypeError(f"a Redis argument cannot be {type(arg).__name__}")
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


# --- replies ----------------------------------------------------------------------------

# Error prefixes redis-py maps to its own classes (redis/_parsers/base.py);
# the rest are ResponseError with the full message ("WRONGTYPE ...").
_ERROR_CLASSES: Final[dict[str, type[rexc.ResponseError]]] = {
    "NOSCRIPT": rexc.NoScriptError,
    "READONLY": rexc.ReadOnlyError,
    "OOM": rexc.OutOfMemoryError,
    "EXECABORT": rexc.ExecAbortError,
    "NOPERM": rexc.NoPermissionError,
    "ERR": rexc.ResponseError,
}
_AUTH_ERRORS: Final = ("NOAUTH", "WRONGPASS")


def _reply_error(message: str) -> Exception:
    """An error reply as the exception redis-py would raise (hiredis calls it)."""
    code, _, rest = message.partition(" ")
    if code == "LOADING":
        # Redis is up but loading its dataset: temporary, like a lost
        # connection (redis-py raises a ConnectionError subclass, which the
        # AutoPipeline turned into BrokerUnavailable).
        return BrokerUnavailable(f"redis: {message}")
    cls = _ERROR_CLASSES.get(code)
    if cls is not None:
        return cls(rest)
    if code in _AUTH_ERRORS:
        return rexc.AuthenticationError(rest)
    return rexc.ResponseError(message)


class _NeedMore:
    """hiredis's "no complete reply yet" marker (a nil reply is None)."""


NEED_MORE: Final = _NeedMore()
"""What ``BaseRespConnection._reader.gets()`` returns until a reply is complete."""


def _new_reader() -> hiredis.Reader:
    return hiredis.Reader(
        protocolError=hiredis.ProtocolError,
        replyError=_reply_error,
        notEnoughData=NEED_MORE,
    )


# --- one connection ---------------------------------------------------------------------


class _Counters(Protocol):
    batches: int
    commands: int


class BaseRespConnection(asyncio.Protocol):
    """What both connection kinds share: connect and handshake, one write per
    loop iteration, replies to a FIFO of futures, failure of all of them when
    the connection is lost. One lifetime: reconnecting is a new object.

    Args:
        address: where to connect.
        counters: gets ``batches`` (writes) and ``commands`` (commands
            written) added; the connection itself by default.
    """

    def __init__(self, address: RedisAddress, counters: _Counters | None = None) -> None:
        self.address = address
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._reader = _new_reader()
        # Futures of written or buffered commands, in the order of their replies.
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._wbuf: list[bytes] = []
        self._queued = 0  # commands ever queued
        self._flush_scheduled = False
        self._paused = False
        self.closed = False
        self._closing = False  # close() called: the loss is ours
        # Why the connection ended (None: closed by us, or EOF).
        self.lost_reason: Exception | None = None
        self._closed_waiter: asyncio.Future[None] = self._loop.create_future()
        self.batches = 0
        self.commands = 0
        self._counters: _Counters = self if counters is None else counters

    # --- connecting -------------------------------------------------------------------

    async def _open(self, timeout_s: float, ssl_context: ssl.SSLContext | None) -> None:
        """Connect, then AUTH/SELECT, all within ``timeout_s``.

        Raises:
            BrokerUnavailable: refused, unreachable, timed out, or AUTH/SELECT
                failed (the cause is chained).
        """
        address = self.address
        try:
            async with asyncio.timeout(timeout_s):
                if address.path is not None:
                    await self._loop.create_unix_connection(lambda: self, address.path)
                else:
                    await self._loop.create_connection(
                        lambda: self,
                        address.host,
                        address.port,
                        ssl=ssl_context,
                        server_hostname=address.host if ssl_context is not None else None,
                    )
                replies = [self._request(args) for args in address.handshake()]
                for reply in replies:
                    await reply
        except (OSError, TimeoutError, rexc.RedisError) as exc:
            self.abort()
            raise BrokerUnavailable(f"redis {address} unavailable: {exc!r}") from exc
        except BaseException:  # BrokerUnavailable, or cancelled (RespClient.close)
            self.abort()
            raise

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                idle, interval, count = KEEPALIVE
                if hasattr(socket, "TCP_KEEPIDLE"):  # Linux; macOS has only SO_KEEPALIVE here
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
        if self._wbuf and not self._flush_scheduled:
            self._schedule_flush()

    # --- writing ----------------------------------------------------------------------

    def _request(self, args: Sequence[RedisArg]) -> asyncio.Future[Any]:
        """Queue one command whose reply goes to the FIFO; returns its future."""
        if self.closed:
            raise BrokerUnavailable(f"redis connection lost: {self.lost_reason!r}")
        data = encode_command(args)
        future: asyncio.Future[Any] = self._loop.create_future()
        self._pending.append(future)
        self._queued += 1
        self._wbuf.append(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return future

    def _schedule_flush(self) -> None:
        self._flush_scheduled = True
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        buf = self._wbuf
        if not buf or transport is None or self.closed:
            return
        self._wbuf = []
        counters = self._counters
        counters.batches += 1
        counters.commands += len(buf)
        transport.write(buf[0] if len(buf) == 1 else b"".join(buf))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False

    # --- ending -----------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        """Drop the connection because of ``exc``: pending commands fail and
        ``closed`` is set now, not on the next loop iteration."""
        if self.lost_reason is None:
            self.lost_reason = exc
        transport = self._transport
        self._lost(self.lost_reason)
        if transport is not None:
            transport.abort()

    def close(self) -> None:
        """Close after writing what is buffered; replies still to come are
        not read (their commands fail with BrokerUnavailable)."""
        self._closing = True
        if self._flush_scheduled:
            self._flush()
        if self._transport is not None:
            self._transport.close()
        else:
            self._lost(None)

    def abort(self) -> None:
        """Close at once, dropping unsent data; pending commands fail."""
        self._closing = True
        transport = self._transport
        self._lost(None)
        if transport is not None:
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is None and not self._closing:
            exc = ConnectionResetError("redis closed the connection")
        self._lost(exc)

    def _lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self.lost_reason is None:
            self.lost_reason = exc
        self._transport = None
        self._wbuf = []
        reason = self.lost_reason
        error = BrokerUnavailable(
            "redis connection closed" if reason is None else f"redis connection lost: {reason!r}"
        )
        pending, self._pending = self._pending, deque()
        for future in pending:
            if not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a gathered or cancelled waiter may be gone
        if not self._closed_waiter.done():
            self._closed_waiter.set_result(None)
        self._on_lost(reason)

    def _on_lost(self, exc: Exception | None) -> None:
        """Hook for subclasses, called once."""

    async def wait_closed(self) -> None:
        await asyncio.shield(self._closed_waiter)


class RespConnection(BaseRespConnection):
    """One connection running commands, auto-pipelined.

    :meth:`execute` is synchronous: it buffers the command and returns the
    future of its reply; every command buffered in one loop iteration goes out
    in one write on the next.

    Args:
        address: where to connect (then :meth:`connect`).
        reply_timeout_s: no reply for this long drops the connection (None:
            never).
        max_pending: at this many unanswered commands ``ready`` turns False
            until half of them are answered.
        on_lost: called once when an open connection is lost, with the reason
            (None when closed by us).
        counters: see :class:`BaseRespConnection`.
    """

    def __init__(
        self,
        address: RedisAddress,
        *,
        reply_timeout_s: float | None = REPLY_TIMEOUT_S,
        max_pending: int = MAX_PENDING,
        on_lost: Callable[[Exception | None], None] | None = None,
        counters: _Counters | None = None,
    ) -> None:
        super().__init__(address, counters)
        self._lost_callback = on_lost
        # False while closed, paused by the transport, or over max_pending:
        # callers then wait on _writable (RespClient does).
        self.ready = False
        self._writable = asyncio.Event()
        self._max_pending = max_pending
        self._resume_below = max_pending // 2
        self._reply_timeout_s = reply_timeout_s
        self._watch_head: asyncio.Future[Any] | None = None
        self._watch_ticks = 0
        self._watch_timer: asyncio.TimerHandle | None = None
        self._opened = False
        # Command count at the end of each write not fully answered (in_flight).
        self._batch_ends: deque[int] = deque()

    async def connect(
        self,
        *,
        timeout_s: float = CONNECT_TIMEOUT_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Connect and AUTH/SELECT (TCP, TLS and handshake together within
        ``timeout_s``); ``ssl_context`` defaults to the address's.

        Raises:
            BrokerUnavailable: refused, unreachable, timed out, or AUTH or
                SELECT failed; the cause is chained.
        """
        if ssl_context is None:
            ssl_context = self.address.ssl_context()
        await self._open(timeout_s, ssl_context)
        if self.closed:  # accepted, then closed at once (maxclients)
            raise BrokerUnavailable(f"redis {self.address} closed the connection")
        self._opened = True
        self._set_ready()
        if self._reply_timeout_s is not None:
            self._watch_timer = self._loop.call_later(self._reply_timeout_s / 4, self._watch)

    def execute(self, *args: RedisArg) -> asyncio.Future[Any]:
        """Queue one command; the future gets its reply or its error.

        Raises:
            BrokerUnavailable: the connection is closed (also set on the
                future of every pending command when it is lost).
            TypeError: a bad argument (nothing is queued).
        """
        future = self._request(args)
        if len(self._pending) >= self._max_pending:
            self._block()
        return future

    @property
    def pending(self) -> int:
        """Commands buffered or awaiting their replies."""
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        """Writes (pipelines) with replies still to come."""
        answered = self._queued - len(self._pending)
        ends = self._batch_ends
        while ends and ends[0] <= answered:
            ends.popleft()
        return len(ends)

    async def wait_ready(self) -> None:
        """Return once commands may be queued again (or the connection closed)."""
        while not self.ready and not self.closed:
            await self._writable.wait()

    # --- internals --------------------------------------------------------------------

    def _flush(self) -> None:
        if self._wbuf and not self.closed:
            # Everything queued so far goes out in this write.
            self._batch_ends.append(self._queued)
            _ = self.in_flight  # prunes answered writes: the deque stays short
        super()._flush()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        pending = self._pending
        try:
            reply = reader.gets()
            while reply is not NEED_MORE:
                if not pending:
                    self._fail(BrokerUnavailable("redis sent a reply nobody asked for"))
                    return
                future = pending.popleft()
                if isinstance(reply, rexc.ReadOnlyError):
                    # This server became a replica (a failover behind a DNS
                    # name or a virtual IP that kept our connection to it):
                    # temporary for the caller, and a new connection finds
                    # the primary where this one never would.
                    lost = BrokerUnavailable(f"redis is read-only (a replica now): {reply}")
                    if not future.done():
                        future.set_exception(lost)
                    self._fail(lost)
                    return
                if not future.done():  # done: its caller was cancelled
                    if isinstance(reply, Exception):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
                reply = reader.gets()
        except hiredis.ProtocolError as exc:
            self._fail(BrokerUnavailable(f"redis protocol error: {exc}"))
            return
        if not self.ready and len(pending) <= self._resume_below:
            self._maybe_ready()

    def _block(self) -> None:
        self.ready = False
        self._writable.clear()

    def _maybe_ready(self) -> None:
        if self._opened and not self._paused and not self.closed:
            self._set_ready()

    def _set_ready(self) -> None:
        self.ready = True
        self._writable.set()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._block()

    def resume_writing(self) -> None:
        super().resume_writing()
        if len(self._pending) < self._max_pending:
            self._maybe_ready()

    def _on_lost(self, exc: Exception | None) -> None:
        self.ready = False
        self._writable.set()  # wake waiters: they see `closed`
        self._batch_ends.clear()
        if self._watch_timer is not None:
            self._watch_timer.cancel()
        if self._opened and self._lost_callback is not None:
            self._lost_callback(None if self._closing else exc)

    def _watch(self) -> None:
        """Every quarter of reply_timeout_s: the same oldest command four
        ticks in a row means no reply for ~reply_timeout_s, a dead peer."""
        assert self._reply_timeout_s is not None
        head = self._pending[0] if self._pending else None
        if head is not None and head is self._watch_head:
            self._watch_ticks += 1
            if self._watch_ticks >= 4:
                self._fail(TimeoutError(f"no reply from redis in {self._reply_timeout_s}s"))
                return
        else:
            self._watch_head = head
            self._watch_ticks = 0
        self._watch_timer = self._loop.call_later(self._reply_timeout_s / 4, self._watch)


# --- the executor -----------------------------------------------------------------------


class RespClient:
    """:class:`~signaling.state.redis.RedisExecutor` over one auto-pipelined
    :class:`RespConnection` to a standalone Redis.

    The connection opens on first use (or :meth:`connect`). Once it is lost,
    every pending command fails with BrokerUnavailable (a command is never
    sent twice: it may have run), and the next command opens a new one;
    commands issued meanwhile wait for that one attempt (at most
    ``connect_timeout_s``) and fail with it. After a failed attempt, commands
    fail at once, without connecting, for a jittered window (up to 10 ms,
    doubling per failure in a row up to 1 s), so a Redis that is down costs
    a refused publish, not a wait, and is not hammered.

    Args:
        url: ``redis://``, ``rediss://`` or ``unix://`` (:func:`parse_redis_url`).
        connect_timeout_s: TCP + TLS + AUTH/SELECT, per attempt.
        reply_timeout_s: no reply for this long drops the connection.
        max_pending: unanswered commands beyond which new ones wait.

    Raises:
        ValueError: a malformed URL.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        reply_timeout_s: float | None = REPLY_TIMEOUT_S,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.address = parse_redis_url(url)
        self._ssl_context = self.address.ssl_context()
        self._connect_timeout_s = connect_timeout_s
        self._reply_timeout_s = reply_timeout_s
        self._max_pending = max_pending
        self._conn: RespConnection | None = None
        self._connecting: asyncio.Task[RespConnection] | None = None
        self._retry_window_s = RETRY_MIN_S
        self._retry_at = 0.0  # loop time; no attempt before it
        self._last_error: BrokerUnavailable | None = None  # of the last attempt
        self._closing = False
        # Counters (signaling.metrics reads them): writes sent, each carrying
        # every command of one loop iteration; commands sent; connections
        # made; connect attempts failed.
        self.batches = 0
        self.commands = 0
        self.connects = 0
        self.connect_failures = 0

    # --- gauges ----------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Writes whose replies have not all come."""
        conn = self._conn
        return conn.in_flight if conn is not None and not conn.closed else 0

    @property
    def pending(self) -> int:
        """Commands buffered or awaiting their replies."""
        conn = self._conn
        return conn.pending if conn is not None and not conn.closed else 0

    # --- RedisExecutor -------------------------------------------------------------

    async def execute(self, *args: RedisArg) -> Any:
        """One command; its reply (see the module docstring for shapes).

        Raises:
            BrokerUnavailable: no connection, or it was lost before the reply.
            redis.exceptions.ResponseError: an error reply (subclasses as in
                redis-py: NoScriptError, ReadOnlyError ...); LOADING raises
                BrokerUnavailable.
            TypeError: a bad argument (nothing was sent).
        """
        conn = self._conn
        if conn is None or not conn.ready:
            conn = await self._ready_connection()
        return await conn.execute(*args)

    async def run_script(
        self, script: LuaScript, keys: Sequence[str], args: Sequence[RedisArg]
    ) -> Any:
        """EVALSHA, then EVAL if Redis does not know the script (restart,
        failover, SCRIPT FLUSH). Raises as :meth:`execute`."""
        conn = self._conn
        if conn is None or not conn.ready:
            conn = await self._ready_connection()
        try:
            return await conn.execute("EVALSHA", script.sha1, len(keys), *keys, *args)
        except rexc.NoScriptError:
            return await self.execute("EVAL", script.source, len(keys), *keys, *args)

    async def execute_many(self, commands: Sequence[Sequence[RedisArg]]) -> list[Any]:
        """Several commands in one write; each result is the reply or the
        exception that command failed with (nothing is raised for them).

        Raises:
            BrokerUnavailable: no connection to send them on.
        """
        conn = self._conn
        if conn is None or not conn.ready:
            conn = await self._ready_connection()
        futures: list[asyncio.Future[Any] | Exception] = []
        for args in commands:
            try:
                futures.append(conn.execute(*args))
            except (TypeError, UnicodeError) as exc:
                futures.append(exc)
        results: list[Any] = []
        try:
            for future in futures:
                if isinstance(future, Exception):
                    results.append(future)
                    continue
                try:
                    results.append(await future)
                except Exception as exc:
                    results.append(exc)
        except asyncio.CancelledError:
            for future in futures:
                if isinstance(future, asyncio.Future):
                    future.cancel()
            raise
        return results

    # --- lifecycle -------------------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (start-up checks) instead of on first use.

        Raises:
            BrokerUnavailable: see :meth:`RespConnection.connect`.
        """
        await self._ready_connection()

    async def close(self, drain_timeout_s: float = 1.0) -> None:
        """Wait up to ``drain_timeout_s`` for pending replies, then close.
        Commands issued afterwards raise BrokerUnavailable."""
        self._closing = True
        if self._connecting is not None:
            self._connecting.cancel()
        conn = self._conn
        if conn is None or conn.closed:
            return
        deadline = asyncio.get_running_loop().time() + drain_timeout_s
        while conn.pending and not conn.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        conn.close()
        await conn.wait_closed()

    # --- connecting ------------------------------------------------------------------

    async def _ready_connection(self) -> RespConnection:
        """The open connection once it accepts commands; opens one if needed
        (one attempt shared by every waiter)."""
        if self._closing:
            raise BrokerUnavailable("redis client closed")
        conn = self._conn
        if conn is None or conn.closed:
            task = self._connecting
            if task is None:
                if asyncio.get_running_loop().time() < self._retry_at:
                    raise BrokerUnavailable(f"redis unavailable: {self._last_error}")
                task = asyncio.get_running_loop().create_task(
                    self._open_connection(), name="redis-connect"
                )
                task.add_done_callback(self._connect_done)
                self._connecting = task
            # Shielded: a cancelled caller does not cancel the others' attempt.
            try:
                conn = await asyncio.shield(task)
            except asyncio.CancelledError:
                task_now = asyncio.current_task()
                if task.cancelled() and (task_now is None or not task_now.cancelling()):
                    raise BrokerUnavailable("redis client closed") from None  # by close()
                raise
        if not conn.ready:
            await conn.wait_ready()  # back-pressure; also ends when it closes
            if conn.closed:
                raise BrokerUnavailable(f"redis connection lost: {conn.lost_reason!r}")
        return conn

    def _connect_done(self, task: asyncio.Task[RespConnection]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have been cancelled

    async def _open_connection(self) -> RespConnection:
        if self._closing:
            raise BrokerUnavailable("redis client closed")
        conn = RespConnection(
            self.address,
            reply_timeout_s=self._reply_timeout_s,
            max_pending=self._max_pending,
            on_lost=self._lost,
            counters=self,
        )
        try:
            await conn.connect(timeout_s=self._connect_timeout_s, ssl_context=self._ssl_context)
        except BrokerUnavailable as exc:
            if self._last_error is None:  # once per outage, not per attempt
                log.warning("redis %s: connect failed: %s", self.address, exc.__cause__ or exc)
            self._last_error = exc
            self.connect_failures += 1
            # Full jitter: instances do not retry in lockstep.
            window = random.uniform(0, self._retry_window_s)
            self._retry_at = asyncio.get_running_loop().time() + window
            self._retry_window_s = min(RETRY_MAX_S, self._retry_window_s * 2)
            raise
        if self._closing:
            conn.abort()
            raise BrokerUnavailable("redis client closed")
        self._retry_window_s = RETRY_MIN_S
        self._last_error = None
        if self._conn is not None:
            log.info("redis %s: reconnected", self.address)
        self._conn = conn
        self.connects += 1
        return conn

    def _lost(self, exc: Exception | None) -> None:
        if not self._closing:
            log.warning("redis %s: connection lost: %r", self.address, exc)
