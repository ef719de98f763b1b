"""Clients that count: what the server acknowledged against what each subscriber got.

For the multi-instance and fault tests (real servers, real redis-server):

* :class:`RawClient` - a raw Centrifuge-protocol (JSON) WebSocket client with a
  background reader. Replies can be handled synchronously, in wire order with the
  pushes, so that no publication falls between a subscribe reply and its state.
* :class:`Subscriber` - an SDK-like logical client on top of it: it reconnects
  (to the next server of its list when one is gone), recovers its personal
  channel through ``connect.subs``, resubscribes with ``recover`` after an
  unsubscribe push >= 2500, retries temporary errors, and records every
  publication it hands to the "application", live or recovered.
* :class:`SdkSubscriber` - the same record for a real centrifuge-python client.
* :class:`Publisher` - publishes numbered publications at a steady pace and
  records each one's outcome: acknowledged, refused (with the error) or unknown
  (the connection ended before the reply).
* :func:`audit` - every acknowledged publication against every subscriber:
  received (live or by recovery), "excused" (the subscriber was told
  ``recovered: false`` for the channel after the publication was acknowledged,
  i.e. it learned it cannot recover; or after it was sent, and then received,
  gap-free from where it started, a publication sent after this one's
  acknowledgement, i.e. this one lies before its new start), or lost; plus
  duplicates and offset-order violations.

Publication data is a chat message whose text is ``"<publisher>:<seq>"``
(:func:`message`): unique, so a duplicate is a publication delivered twice to
the application, whatever its offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

__all__ = [
    "Audit",
    "Closed",
    "Delivery",
    "Harness",
    "Publisher",
    "RawClient",
    "ReadyWatch",
    "SdkSubscriber",
    "Subscriber",
    "audit",
    "cut_pubsub",
    "http_status",
    "message",
    "pub_key",
    "redis_call",
    "wait_until",
]

TIMEOUT = 5.0
Key = tuple[str, int]


def now() -> float:
    return time.monotonic()


def message(publisher: str, n: int) -> dict[str, Any]:
    """Publication data that identifies itself: a chat message (``room:`` and
    ``dm:`` channels only take the chat schema) whose text is ``"<p>:<n>"``."""
    return {"type": "message", "text": f"{publisher}:{n}"}


def pub_key(data: Any) -> Key | None:
    """(publisher, n) of a :func:`message`; None for anything else (e.g. the
    server's live-only viewer counts)."""
    if isinstance(data, dict) and data.get("type") == "message":
        publisher, _, n = str(data.get("text", "")).rpartition(":")
        if publisher and n.isdigit():
            return publisher, int(n)
    return None


async def wait_until(
    check: Callable[[], bool], timeout: float, interval: float = 0.05, what: str = ""
) -> float:
    """Poll ``check`` until true; returns the seconds it took, TimeoutError if never."""
    start = now()
    while not check():
        if now() - start > timeout:
            raise TimeoutError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)
    return now() - start


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get_status(url: str, timeout: float) -> int | None:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        with err:
            return int(err.code)
    except (OSError, ValueError):
        return None


async def http_status(url: str, timeout: float = 1.0) -> int | None:
    """GET ``url`` (no proxy); the status, or None if nothing answered."""
    return await asyncio.to_thread(_get_status, url, timeout)


async def redis_call(port: int, *args: str | bytes, host: str = "127.0.0.1") -> bytes:
    """One command to a redis-server over a fresh connection (RESP); the raw
    reply. For fault injection (``CLIENT KILL TYPE pubsub``) and inspection."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    payload = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), TIMEOUT)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def cut_pubsub(port: int, duration: float, every: float = 0.01) -> int:
    """Keep killing every pub/sub connection of the redis-server on ``port``
    for ``duration`` seconds (instances reconnect within ~50 ms, so one kill
    makes too short a gap); returns how many connections were killed."""
    killed = 0
    end = now() + duration
    while now() < end:
        reply = await redis_call(port, "CLIENT", "KILL", "TYPE", "pubsub")
        if reply.startswith(b":"):
            killed += int(reply[1:])
        await asyncio.sleep(every)
    return killed


# --- raw protocol client ---------------------------------------------------------------


class Closed(Exception):
    """The connection ended before the reply."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code} {reason!r})")
        self.code = code
        self.reason = reason


ReplyHandler = Callable[[dict[str, Any]], None]


class RawClient:
    """Raw protocol client. Pushes go to ``on_push`` and replies to their
    ``on_reply`` callbacks synchronously, in the order the server sent them."""

    def __init__(
        self,
        ws: ClientConnection,
        on_push: Callable[[dict[str, Any]], None] | None = None,
        on_close: Callable[[int | None, str], None] | None = None,
    ) -> None:
        self.ws = ws
        self.on_push = on_push
        self.on_close = on_close
        self.next_id = 1
        self.pushes: list[dict[str, Any]] = []
        self._pending: dict[int, tuple[asyncio.Future[dict[str, Any]], ReplyHandler | None]] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.closed = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="raw-reader")

    @classmethod
    async def open(
        cls,
        url: str,
        on_push: Callable[[dict[str, Any]], None] | None = None,
        on_close: Callable[[int | None, str], None] | None = None,
        timeout: float = TIMEOUT,
    ) -> RawClient:
        ws = await connect(url, open_timeout=timeout, proxy=None, max_size=None)
        return cls(ws, on_push, on_close)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                if not isinstance(frame, str):
                    continue
                for line in frame.split("\n"):
                    if not line.strip():
                        continue
                    msg = orjson.loads(line)
                    if msg == {}:
                        with contextlib.suppress(ConnectionClosed):
                            await self.ws.send("{}")  # pong to the server's ping
                        continue
                    self._dispatch(msg)
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            self.close_code = rcvd.code if rcvd is not None else None
            self.close_reason = rcvd.reason if rcvd is not None else ""
            pending, self._pending = self._pending, {}
            for future, _ in pending.values():
                if not future.done():
                    future.set_exception(Closed(self.close_code, self.close_reason))
                    future.exception()
            self.closed.set()
            if self.on_close is not None:
                self.on_close(self.close_code, self.close_reason)

    def _dispatch(self, msg: dict[str, Any]) -> None:
        cmd_id = msg.get("id")
        if cmd_id:
            entry = self._pending.pop(cmd_id, None)
            if entry is None:
                return
            future, handler = entry
            if handler is not None:
                handler(msg)
            if not future.done():
                future.set_result(msg)
        elif "push" in msg:
            self.pushes.append(msg["push"])
            if self.on_push is not None:
                self.on_push(msg["push"])

    async def send(
        self, method: str, body: dict[str, Any], on_reply: ReplyHandler | None = None
    ) -> asyncio.Future[dict[str, Any]]:
        """Send one command; the future gets its reply (or :class:`Closed`)."""
        cmd_id = self.next_id
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if self.closed.is_set():
            future.set_exception(Closed(self.close_code, self.close_reason))
            future.exception()
            return future
        self._pending[cmd_id] = (future, on_reply)
        try:
            await self.ws.send(orjson.dumps({"id": cmd_id, method: body}).decode())
        except ConnectionClosed:
            self._pending.pop(cmd_id, None)
            if not future.done():
                future.set_exception(Closed(self.close_code, self.close_reason))
                future.exception()
        return future

    async def call(
        self, method: str, body: dict[str, Any], timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Send and wait for the reply: ``{"<method>": {...}}`` or ``{"error": {...}}``."""
        future = await self.send(method, body)
        return await asyncio.wait_for(future, timeout)

    async def wait_push(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT, since: int = 0
    ) -> dict[str, Any]:
        deadline = now() + timeout
        while True:
            for push in self.pushes[since:]:
                if pred(push):
                    return push
            if now() > deadline:
                raise TimeoutError(f"no such push within {timeout}s; pushes: {self.pushes[since:]}")
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._reader, 2)
        if not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader


# --- what subscribers hand to the application ------------------------------------------


@dataclass(frozen=True)
class Delivery:
    channel: str
    key: Key | None
    offset: int
    how: str  # "live" or "recovered"
    at: float


@dataclass
class _ChannelState:
    offset: int = 0
    epoch: str = ""
    subscribed: bool = False
    # Bumped on every (re)subscribe attempt: a stale retry timer does nothing.
    attempt: int = 0


class _Recording:
    """What one subscriber (raw or SDK) recorded, in the audit's terms."""

    name: str
    channels: Sequence[str]

    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        # Per channel: deliveries and "reset" markers (a recovered=false
        # resubscribe) in the order the application saw them.
        self.timeline: dict[str, list[Delivery | str]] = defaultdict(list)
        # (when, channel) of every subscribe that reported recovered=false.
        self.recovered_false: list[tuple[float, str]] = []
        self.anomalies: list[str] = []
        self.events: list[tuple[float, str]] = []

    def note(self, text: str) -> None:
        self.events.append((now(), text))

    def _deliver(self, channel: str, data: Any, offset: int, how: str) -> None:
        d = Delivery(channel, pub_key(data), offset, how, now())
        self.deliveries.append(d)
        self.timeline[channel].append(d)

    def _reset(self, channel: str) -> None:
        self.recovered_false.append((now(), channel))
        self.timeline[channel].append("reset")

    def received(self, channel: str) -> Counter[Key]:
        return Counter(d.key for d in self.deliveries if d.channel == channel and d.key)


# --- the raw SDK-like subscriber ----------------------------------------------------------


class Subscriber(_Recording):
    """A client that behaves like the SDKs when the server tells it to recover.

    ``targets()`` lists the WebSocket URLs to (re)connect to; a reconnect tries
    them starting after the one it was connected to, so it lands on another
    instance when there is one.
    """

    def __init__(
        self,
        name: str,
        user: str,
        token: Callable[[], str],
        targets: Callable[[], Sequence[str]],
        channels: Sequence[str],
        *,
        start_at: int = 0,
        join_leave: bool = False,
    ) -> None:
        super().__init__()
        self.name = name
        self.user = user
        self.token = token
        self.targets = targets
        self.channels = list(channels)
        self.personal = f"user:#{user}"
        self.join_leave = join_leave
        self.state: dict[str, _ChannelState] = {c: _ChannelState() for c in self.channels}
        self.personal_state = _ChannelState()
        self.client: RawClient | None = None
        self.client_id = ""
        self.url = ""
        self._target_index = start_at
        self.disconnects: list[tuple[float, int | None, str]] = []
        self.unsubscribes: list[tuple[float, str, int]] = []
        self.connect_results: list[dict[str, Any]] = []
        self.subscribe_errors: list[tuple[float, str, int]] = []
        self.stray_pubs = 0
        self.client_ids: list[str] = []
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._connected = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------

    async def start(self, timeout: float = 10.0) -> Subscriber:
        """Connect and subscribe everything; returns once all are subscribed."""
        self._supervisor = asyncio.create_task(self._supervise(), name=f"sub-{self.name}")
        await wait_until(self.all_subscribed, timeout, what=f"{self.name} subscribed")
        return self

    def all_subscribed(self) -> bool:
        return (
            self._connected.is_set()
            and self.client is not None
            and not self.client.closed.is_set()
            and all(s.subscribed for s in self.state.values())
        )

    async def stop(self) -> None:
        self._stopping = True
        if self.client is not None:
            await self.client.close()
        for task in [*self._tasks, *([self._supervisor] if self._supervisor else [])]:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # -- connection -----------------------------------------------------------

    async def _supervise(self) -> None:
        delay = 0.05
        while not self._stopping:
            targets = list(self.targets())
            url = targets[self._target_index % len(targets)]
            try:
                await self._connect(url)
            except (OSError, TimeoutError, ConnectionClosed, Closed, _ConnectRefused) as exc:
                self.note(f"connect to {url} failed: {exc!r}")
                self._target_index += 1
                await asyncio.sleep(random.uniform(0.05, delay))
                delay = min(0.5, delay * 2)
                continue
            delay = 0.05
            client = self.client
            assert client is not None
            await client.closed.wait()
            self._connected.clear()
            if self._stopping:
                return
            # Reconnect elsewhere first (the SDK would retry its one URL).
            self._target_index += 1
            await asyncio.sleep(random.uniform(0.02, 0.1))

    async def _connect(self, url: str) -> None:
        client = await RawClient.open(url, self._on_push, self._on_close)
        self.client = client
        self.url = url
        body: dict[str, Any] = {"token": self.token(), "name": "loadcheck"}
        ps = self.personal_state
        if ps.epoch:
            body["subs"] = {
                self.personal: {"recover": True, "offset": ps.offset, "epoch": ps.epoch}
            }
        future = await client.send("connect", body, on_reply=self._on_connect_reply)
        try:
            reply = await asyncio.wait_for(future, TIMEOUT)
        except BaseException:
            await client.close()
            raise
        if "error" in reply:
            await client.close()
            raise _ConnectRefused(reply["error"])
        self._connected.set()
        for channel in self.channels:
            await self._subscribe(client, channel)

    def _on_connect_reply(self, msg: dict[str, Any]) -> None:
        if "error" in msg:
            self.note(f"connect error {msg['error']}")
            return
        result = msg["connect"]
        self.connect_results.append(result)
        self.client_id = result["client"]
        self.client_ids.append(self.client_id)
        self.note(f"connected to {self.url} as {self.client_id}")
        sub = result.get("subs", {}).get(self.personal)
        if sub is not None:
            self._apply_subscribe_result(self.personal, self.personal_state, sub)

    def _on_close(self, code: int | None, reason: str) -> None:
        self.disconnects.append((now(), code, reason))
        self.note(f"disconnected {code} {reason!r}")
        for state in self.state.values():
            state.subscribed = False
        self.personal_state.subscribed = False

    # -- subscriptions -----------------------------------------------------------

    async def _subscribe(self, client: RawClient, channel: str) -> None:
        state = self.state[channel]
        state.attempt += 1
        attempt = state.attempt
        body: dict[str, Any] = {"channel": channel}
        if self.join_leave:
            body["join_leave"] = True
        if state.epoch:
            body |= {"recover": True, "offset": state.offset, "epoch": state.epoch}
        await client.send(
            "subscribe",
            body,
            on_reply=lambda msg: self._on_subscribe_reply(client, channel, attempt, msg),
        )

    def _on_subscribe_reply(
        self, client: RawClient, channel: str, attempt: int, msg: dict[str, Any]
    ) -> None:
        state = self.state[channel]
        if attempt != state.attempt or client is not self.client:
            return
        if "error" in msg:
            error = msg["error"]
            self.subscribe_errors.append((now(), channel, error["code"]))
            self.note(f"subscribe {channel} error {error}")
            if error.get("temporary"):
                self._spawn(self._retry_subscribe(client, channel, attempt))
            else:
                self.anomalies.append(f"subscribe {channel}: permanent error {error}")
            return
        self._apply_subscribe_result(channel, state, msg["subscribe"])

    def _apply_subscribe_result(
        self, channel: str, state: _ChannelState, result: dict[str, Any]
    ) -> None:
        pubs = result.get("publications", [])
        recovered = bool(result.get("recovered"))
        was_recovering = bool(result.get("was_recovering"))
        self.note(
            f"subscribed {channel} recovered={recovered} was_recovering={was_recovering} "
            f"offset={result.get('offset', 0)} epoch={result.get('epoch')} pubs={len(pubs)}"
        )
        if was_recovering and not recovered:
            self._reset(channel)
            state.offset = int(result.get("offset", 0))
            state.epoch = str(result.get("epoch", ""))
            if pubs:
                self.anomalies.append(f"{channel}: publications with recovered=false")
        elif was_recovering:
            if result.get("epoch") != state.epoch:
                self.anomalies.append(f"{channel}: recovered into another epoch {result}")
            for pub in pubs:
                self._check_next(channel, state, int(pub.get("offset", 0)), "recovered")
                self._deliver(channel, pub.get("data"), int(pub.get("offset", 0)), "recovered")
        else:
            state.offset = int(result.get("offset", 0))
            state.epoch = str(result.get("epoch", ""))
        state.subscribed = True

    async def _retry_subscribe(self, client: RawClient, channel: str, attempt: int) -> None:
        await asyncio.sleep(random.uniform(0.05, 0.25))
        if client is self.client and self.state[channel].attempt == attempt:
            with contextlib.suppress(ConnectionClosed):
                await self._subscribe(client, channel)

    def _on_push(self, push: dict[str, Any]) -> None:
        channel = push.get("channel", "")
        if "pub" in push:
            pub = push["pub"]
            offset = int(pub.get("offset", 0))
            state = self.personal_state if channel == self.personal else self.state.get(channel)
            if state is None or not state.subscribed:
                self.stray_pubs += 1  # the SDKs drop these too
                return
            self._check_next(channel, state, offset, "live")
            self._deliver(channel, pub.get("data"), offset, "live")
        elif "unsubscribe" in push:
            code = int(push["unsubscribe"]["code"])
            self.unsubscribes.append((now(), channel, code))
            self.note(f"unsubscribe push {channel} {code}")
            state = self.state.get(channel)
            if state is None:
                return
            state.subscribed = False
            state.attempt += 1
            if code >= 2500 and self.client is not None:
                client = self.client
                self._spawn(self._subscribe_soon(client, channel))
            else:
                self.anomalies.append(f"{channel}: unsubscribed for good ({push})")

    async def _subscribe_soon(self, client: RawClient, channel: str) -> None:
        if client is self.client and not client.closed.is_set():
            with contextlib.suppress(ConnectionClosed):
                await self._subscribe(client, channel)

    def _check_next(self, channel: str, state: _ChannelState, offset: int, how: str) -> None:
        if offset and offset != state.offset + 1:
            self.anomalies.append(
                f"{channel}: {how} publication offset {offset} after {state.offset} "
                f"(epoch {state.epoch}) without a recovery"
            )
        if offset:
            state.offset = offset

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _ConnectRefused(Exception):
    pass


# --- the real SDK -------------------------------------------------------------------------


class SdkSubscriber(_Recording):
    """Records a centrifuge-python client's subscriptions like :class:`Subscriber`."""

    def __init__(self, name: str, client: Any, channels: Sequence[str]) -> None:
        super().__init__()
        self.name = name
        self.client = client
        self.channels = list(channels)
        self.subs: dict[str, Any] = {}

    async def start(self, timeout: float = 10.0) -> SdkSubscriber:
        from centrifuge import SubscriptionEventHandler

        recording = self

        class Handler(SubscriptionEventHandler):
            def __init__(self, channel: str) -> None:
                self.channel = channel
                self.last = 0

            async def on_subscribed(self, ctx: Any) -> None:
                recording.note(f"subscribed {self.channel} {ctx}")
                if ctx.was_recovering and not ctx.recovered:
                    recording._reset(self.channel)
                    self.last = ctx.stream_position.offset if ctx.stream_position else 0
                elif not ctx.was_recovering and ctx.stream_position is not None:
                    self.last = ctx.stream_position.offset

            async def on_unsubscribed(self, ctx: Any) -> None:
                recording.note(f"unsubscribed {self.channel} {ctx}")
                recording.anomalies.append(f"{self.channel}: SDK unsubscribed for good ({ctx})")

            async def on_subscribing(self, ctx: Any) -> None:
                recording.note(f"subscribing {self.channel} {ctx}")

            async def on_error(self, ctx: Any) -> None:
                recording.note(f"error {self.channel} {ctx}")

            async def on_publication(self, ctx: Any) -> None:
                offset = ctx.pub.offset
                if offset and offset != self.last + 1:
                    recording.anomalies.append(
                        f"{self.channel}: SDK publication offset {offset} after {self.last}"
                    )
                if offset:
                    self.last = offset
                recording._deliver(self.channel, ctx.pub.data, offset, "sdk")

        for channel in self.channels:
            sub = self.client.new_subscription(
                channel, events=Handler(channel), recoverable=True, positioned=True
            )
            self.subs[channel] = sub
            await sub.subscribe()
        from centrifuge import SubscriptionState

        await wait_until(
            lambda: all(s.state == SubscriptionState.SUBSCRIBED for s in self.subs.values()),
            timeout,
            what=f"{self.name} SDK subscribed",
        )
        return self


# --- publishers -------------------------------------------------------------------------------


@dataclass
class PubRecord:
    key: Key
    channel: str
    sent: float
    replied: float | None = None
    acked: bool = False
    error: dict[str, Any] | None = None
    closed: bool = False  # the connection ended before the reply


class Publisher:
    """Publishes :func:`message` ``(name, seq)`` round-robin over ``channels`` at
    ``rate`` per second, without waiting for replies; reconnects when its
    connection ends (to the next of ``targets()``)."""

    def __init__(
        self,
        name: str,
        token: Callable[[], str],
        targets: Callable[[], Sequence[str]],
        channels: Sequence[str],
        rate: float,
        *,
        start_at: int = 0,
    ) -> None:
        self.name = name
        self.token = token
        self.targets = targets
        self.channels = list(channels)
        self.rate = rate
        self.records: list[PubRecord] = []
        self.client: RawClient | None = None
        self._target_index = start_at
        self._seq = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self.reconnects = 0

    async def start(self) -> Publisher:
        await self._connect()
        self._task = asyncio.create_task(self._run(), name=f"pub-{self.name}")
        return self

    async def _connect(self) -> None:
        targets = list(self.targets())
        url = targets[self._target_index % len(targets)]
        try:
            client = await RawClient.open(url)
            reply = await client.call("connect", {"token": self.token()})
        except BaseException:
            self._target_index += 1
            raise
        if "error" in reply:
            await client.close()
            self._target_index += 1
            raise Closed(None, f"connect error {reply['error']}")
        self.client = client

    async def _run(self) -> None:
        interval = 1.0 / self.rate
        next_at = now()
        while not self._stop.is_set():
            client = self.client
            if client is None or client.closed.is_set():
                self.client = None
                try:
                    await self._connect()
                    self.reconnects += 1
                except (OSError, TimeoutError, ConnectionClosed, Closed):
                    await asyncio.sleep(0.1)
                next_at = now()
                continue
            self._seq += 1
            channel = self.channels[self._seq % len(self.channels)]
            record = PubRecord((self.name, self._seq), channel, now())
            self.records.append(record)
            future = await client.send(
                "publish", {"channel": channel, "data": message(self.name, self._seq)}
            )
            future.add_done_callback(lambda f, r=record: _settle(r, f))
            next_at += interval
            delay = next_at - now()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            else:
                await asyncio.sleep(0)
                next_at = now()

    async def stop(self, settle_timeout: float = 5.0) -> None:
        """Stop publishing and wait for the outstanding replies."""
        self._stop.set()
        if self._task is not None:
            await self._task
        with contextlib.suppress(TimeoutError):
            await wait_until(
                lambda: all(r.replied is not None or r.closed for r in self.records),
                settle_timeout,
            )

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.client is not None:
            await self.client.close()

    @property
    def acked(self) -> list[PubRecord]:
        return [r for r in self.records if r.acked]


def _settle(record: PubRecord, future: asyncio.Future[dict[str, Any]]) -> None:
    record.replied = now()
    exc = future.exception()
    if exc is not None:
        record.closed = True
        record.replied = None
        return
    reply = future.result()
    if "error" in reply:
        record.error = reply["error"]
    else:
        record.acked = True


# --- readiness ---------------------------------------------------------------------------------


class ReadyWatch:
    """Polls ``/readyz`` (and ``/healthz``) of servers every ``interval``;
    keeps (when, name, readyz status, healthz status)."""

    def __init__(self, servers: dict[str, str], interval: float = 0.1) -> None:
        self.servers = servers  # name -> base URL
        self.interval = interval
        self.samples: list[tuple[float, str, int | None, int | None]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> ReadyWatch:
        self._task = asyncio.create_task(self._run(), name="ready-watch")
        return self

    async def _run(self) -> None:
        while True:
            for name, base in self.servers.items():
                ready = await http_status(base + "/readyz", 0.5)
                health = await http_status(base + "/healthz", 0.5)
                self.samples.append((now(), name, ready, health))
            await asyncio.sleep(self.interval)

    def between(self, name: str, start: float, end: float) -> list[tuple[float, int | None]]:
        return [(t, r) for t, n, r, _ in self.samples if n == name and start <= t <= end]

    def health_between(self, name: str, start: float, end: float) -> list[int | None]:
        return [h for t, n, _, h in self.samples if n == name and start <= t <= end]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


# --- clean-up ----------------------------------------------------------------------------


class Harness:
    """What a test opened (raw clients, subscribers, publishers, SDK clients,
    readiness watches), closed at teardown whether the test passed or not."""

    def __init__(self) -> None:
        self.raw: list[RawClient] = []
        self.subscribers: list[Subscriber] = []
        self.publishers: list[Publisher] = []
        self.sdk: list[Any] = []
        self.watches: list[ReadyWatch] = []

    async def open(self, server: Any) -> RawClient:
        """A raw connection to a ServerProcess, not connected yet."""
        client = await RawClient.open(server.ws_url)
        self.raw.append(client)
        return client

    async def connected(self, server: Any, user: str, **body: Any) -> RawClient:
        """A raw connection that sent connect for ``user`` and got its reply."""
        client = await self.open(server)
        reply = await client.call("connect", {"token": server.token(user), **body})
        assert "connect" in reply, reply
        return client

    def sdk_client(self, server: Any, user: str, **kwargs: Any) -> tuple[Any, Any]:
        """A centrifuge-python client of ``user`` (support.sdk.make_client)."""
        from support.sdk import make_client

        kwargs.setdefault("max_reconnect_delay", 0.3)
        client, events = make_client(server.ws_url, server.token(user), **kwargs)
        self.sdk.append(client)
        return client, events

    def watch(self, servers: dict[str, str]) -> ReadyWatch:
        watch = ReadyWatch(servers).start()
        self.watches.append(watch)
        return watch

    async def close(self) -> None:
        for watch in self.watches:
            await watch.stop()
        for pub in self.publishers:
            await pub.close()
        for sub in self.subscribers:
            await sub.stop()
        for client in self.raw:
            await client.close()
        for sdk in self.sdk:
            await sdk.disconnect()
        # Let the SDK's background close tasks end before the loop goes away.
        deadline = now() + 3
        while now() < deadline and any(getattr(c, "_background_tasks", None) for c in self.sdk):
            await asyncio.sleep(0.02)


# --- the audit -------------------------------------------------------------------------------


@dataclass
class Audit:
    acked: int = 0
    refused: int = 0
    unknown: int = 0  # the connection ended before the reply
    unanswered: int = 0  # no reply at all, connection still open
    expected: int = 0  # (acknowledged publication, subscriber) pairs
    received: int = 0
    received_live: int = 0
    received_recovered: int = 0
    excused: list[tuple[str, Key, str]] = field(default_factory=list)
    lost: list[tuple[str, Key, str]] = field(default_factory=list)
    duplicates: list[tuple[str, Key, int]] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    anomalies: list[str] = field(default_factory=list)
    refused_delivered: int = 0
    recovered_false: int = 0

    def summary(self) -> str:
        return (
            f"acked={self.acked} refused={self.refused} unknown={self.unknown} "
            f"unanswered={self.unanswered} "
            f"expected={self.expected} received={self.received} "
            f"(live={self.received_live} recovered={self.received_recovered}) "
            f"excused={len(self.excused)} lost={len(self.lost)} "
            f"duplicates={len(self.duplicates)} order={len(self.order)} "
            f"anomalies={len(self.anomalies)} recovered_false={self.recovered_false} "
            f"refused_but_delivered={self.refused_delivered}"
        )

    def details(self, limit: int = 15) -> str:
        return (
            f"{self.summary()}\nlost: {self.lost[:limit]}\nduplicates: {self.duplicates[:limit]}"
            f"\norder: {self.order[:limit]}\nanomalies: {self.anomalies[:limit]}"
        )


def audit(publishers: Sequence[Publisher], subscribers: Sequence[_Recording]) -> Audit:
    """Every acknowledged publication against every subscriber of its channel."""
    result = Audit()
    records = [r for p in publishers for r in p.records]
    result.acked = sum(r.acked for r in records)
    result.refused = sum(r.error is not None for r in records)
    result.unknown = sum(r.closed for r in records)
    result.unanswered = sum(r.replied is None and not r.closed for r in records)
    refused_keys = {r.key for r in records if r.error is not None}
    sent_at = {r.key: r.sent for r in records}
    for sub in subscribers:
        result.anomalies += [f"{sub.name}: {a}" for a in sub.anomalies]
        result.recovered_false += len(sub.recovered_false)
        result.received_live += sum(d.how == "live" for d in sub.deliveries)
        result.received_recovered += sum(d.how == "recovered" for d in sub.deliveries)
        for channel in sub.channels:
            got = sub.received(channel)
            result.duplicates += [(sub.name, k, n) for k, n in got.items() if n > 1]
            result.refused_delivered += sum(1 for k in got if k in refused_keys)
            resets = [t for t, c in sub.recovered_false if c == channel]
            restarts = _restarts(resets, sub.timeline[channel], sent_at)
            for record in records:
                if record.channel != channel or not record.acked:
                    continue
                result.expected += 1
                replied = record.replied or 0
                if got[record.key]:
                    result.received += 1
                elif any(t > replied for t in resets) or any(
                    t > record.sent and latest > replied for t, latest in restarts
                ):
                    result.excused.append((sub.name, record.key, channel))
                else:
                    result.lost.append((sub.name, record.key, channel))
            result.order += _order_violations(sub.name, channel, sub.timeline[channel])
    return result


def _restarts(
    resets: list[float], timeline: list[Delivery | str], sent_at: dict[Key, float]
) -> list[tuple[float, float]]:
    """For each recovered=false reset (its time), when the latest publication the
    subscriber then received before the next reset was sent.

    After a reset the subscriber's offsets run on without a gap (a gap is an
    anomaly), so a publication sent after another's acknowledgement, received in
    that run, means the other one, if sent before the reset and not received,
    lies at or before the run's start: the subscriber is not owed it."""
    out: list[tuple[float, float]] = []
    pending = iter(resets)
    current: tuple[float, float] | None = None
    for item in timeline:
        if isinstance(item, str):
            if current is not None:
                out.append(current)
            current = (next(pending), 0.0)
        elif current is not None and item.key in sent_at:
            current = (current[0], max(current[1], sent_at[item.key]))
    if current is not None:
        out.append(current)
    return out


def _order_violations(name: str, channel: str, timeline: list[Delivery | str]) -> list[str]:
    """Within a run of deliveries not separated by a recovered=false reset,
    offsets must increase, and each publisher's sequence numbers too."""
    out: list[str] = []
    last_offset = 0
    last_seq: dict[str, int] = {}
    for item in timeline:
        if isinstance(item, str):
            last_offset = 0
            continue
        if item.offset:
            if item.offset <= last_offset:
                out.append(f"{name} {channel}: offset {item.offset} after {last_offset}")
            last_offset = item.offset
        if item.key is not None:
            publisher, seq = item.key
            if seq <= last_seq.get(publisher, 0):
                out.append(f"{name} {channel}: {item.key} after seq {last_seq[publisher]}")
            last_seq[publisher] = max(seq, last_seq.get(publisher, 0))
    return out
