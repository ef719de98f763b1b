"""Raw WebSocket frames against a real server process: every refusal gets the
protocol's error or disconnect code, and the server and other clients carry on."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from support.processes import ServerProcess

TIMEOUT = 5.0


class Raw:
    """A raw protocol client: sends commands, reads replies and pushes."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.next_id = 1
        self.inbox: list[dict[str, Any]] = []

    @classmethod
    async def open(cls, server: ServerProcess, **kwargs: Any) -> Raw:
        ws = await connect(server.ws_url, open_timeout=TIMEOUT, **kwargs)
        return cls(ws)

    async def send(self, *commands: dict[str, Any]) -> list[int]:
        ids = []
        lines = []
        for cmd in commands:
            cmd = dict(cmd)
            if "id" not in cmd:
                cmd["id"] = self.next_id
                self.next_id += 1
            ids.append(cmd["id"])
            lines.append(orjson.dumps(cmd))
        await self.ws.send(b"\n".join(lines).decode())
        return ids

    async def _fill(self) -> None:
        frame = await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        assert isinstance(frame, str)
        for line in frame.strip().split("\n"):
            msg = orjson.loads(line)
            if msg == {}:
                await self.ws.send("{}")  # answer the server's ping
                continue
            self.inbox.append(msg)

    async def reply(self, cmd_id: int) -> dict[str, Any]:
        while True:
            for msg in self.inbox:
                if msg.get("id") == cmd_id:
                    self.inbox.remove(msg)
                    return msg
            await self._fill()

    async def push(self, kind: str = "pub") -> dict[str, Any]:
        while True:
            for msg in self.inbox:
                if "push" in msg and kind in msg["push"]:
                    self.inbox.remove(msg)
                    return msg["push"]
            await self._fill()

    async def call(self, method: str, body: dict[str, Any]) -> dict[str, Any]:
        (cmd_id,) = await self.send({method: body})
        return await self.reply(cmd_id)

    async def closed_with(self) -> tuple[int | None, str]:
        try:
            while True:
                await asyncio.wait_for(self.ws.recv(), TIMEOUT)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            return (rcvd.code, rcvd.reason) if rcvd else (None, "")

    async def close(self) -> None:
        await self.ws.close()


async def connected(server: ServerProcess, user: str, **claims: Any) -> Raw:
    client = await Raw.open(server)
    reply = await client.call("connect", {"token": server.token(user, **claims)})
    assert "connect" in reply, reply
    return client


# Rooms also carry the server's viewer counts; keep them out of these tests.
QUIET = {"SIGNAL_VIEWER_COUNT_INTERVAL_S": "3600"}


def msg(text: str) -> dict[str, str]:
    """A chat message publication (handlers/chat schema)."""
    return {"type": "message", "text": text}


@pytest.fixture
async def srv(server_factory: Any) -> ServerProcess:
    return await server_factory(
        {"SIGNAL_COMMANDS_PER_SECOND": "1000", "SIGNAL_COMMAND_BURST": "1000", **QUIET},
        name="raw",
    )


# --- connect and auth ----------------------------------------------------------------


async def test_connect_reply_and_personal_channel(srv: ServerProcess) -> None:
    client = await Raw.open(srv)
    reply = await client.call("connect", {"token": srv.token("alice")})
    result = reply["connect"]
    assert result["client"] and result["ping"] == 25 and result["pong"] is True
    assert result["expires"] is True and 3500 < result["ttl"] <= 3600
    sub = result["subs"]["user:#alice"]
    assert sub["recoverable"] is True and sub["positioned"] is True and sub["epoch"]
    await client.close()


async def test_connect_and_subscribe_batched_in_one_frame(srv: ServerProcess) -> None:
    client = await Raw.open(srv)
    ids = await client.send(
        {"connect": {"token": srv.token("bob"), "name": "js"}},
        {"subscribe": {"channel": "room:c1", "flag": 1}},
        {"subscribe": {"channel": "room:c2"}},
    )
    replies = [await client.reply(i) for i in ids]
    assert "connect" in replies[0]
    assert replies[1]["subscribe"]["recoverable"] is True
    assert "subscribe" in replies[2]
    await client.close()


@pytest.mark.parametrize(
    "token",
    ["", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0."],
    ids=["empty", "garbage", "three-parts", "alg-none"],
)
async def test_invalid_token_closes_with_3500(srv: ServerProcess, token: str) -> None:
    client = await Raw.open(srv)
    await client.send({"connect": {"token": token}})
    assert await client.closed_with() == (3500, "invalid token")


async def test_wrong_secret_closes_with_3500(srv: ServerProcess) -> None:
    import jwt

    client = await Raw.open(srv)
    token = jwt.encode({"sub": "eve", "exp": int(time.time()) + 60}, "w" * 40, algorithm="HS256")
    await client.send({"connect": {"token": token}})
    assert (await client.closed_with())[0] == 3500


async def test_expired_token_gets_error_109_to_refresh(srv: ServerProcess) -> None:
    client = await Raw.open(srv)
    reply = await client.call("connect", {"token": srv.token("alice", ttl_s=-60)})
    assert reply["error"]["code"] == 109
    # The connection is still usable for a connect with a fresh token.
    reply = await client.call("connect", {"token": srv.token("alice")})
    assert "connect" in reply
    await client.close()


async def test_command_before_connect_is_bad_request(srv: ServerProcess) -> None:
    client = await Raw.open(srv)
    await client.send({"subscribe": {"channel": "room:x"}})
    assert await client.closed_with() == (3501, "bad request")


async def test_connect_twice_is_bad_request(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    await client.send({"connect": {"token": srv.token("alice")}})
    assert (await client.closed_with())[0] == 3501


async def test_refresh_extends_and_rejects_other_user(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    reply = await client.call("refresh", {"token": srv.token("alice", ttl_s=7200)})
    assert reply["refresh"]["expires"] is True and reply["refresh"]["ttl"] > 3600
    await client.send({"refresh": {"token": srv.token("mallory")}})
    assert (await client.closed_with())[0] == 3500


async def test_a_refresh_with_an_expired_token_closes_with_3005_that_sdks_retry(
    srv: ServerProcess,
) -> None:
    """An error reply to a refresh that is not temporary ends the SDKs'
    connection for good (centrifuge-js _refreshError); an expired token there
    (a cached one, or a refresh delayed past its exp) closes with 3005, after
    which they reconnect and fetch a new token on the connect's 109."""
    client = await connected(srv, "alice")
    await client.send({"refresh": {"token": srv.token("alice", ttl_s=-60)}})
    assert await client.closed_with() == (3005, "connection expired")


async def test_stale_connection_closed_with_3502(server_factory: Any) -> None:
    srv = await server_factory({"SIGNAL_CONNECT_TIMEOUT_S": "0.5"}, name="stale")
    client = await Raw.open(srv)
    assert await client.closed_with() == (3502, "stale")


async def test_connects_refused_one_after_another_do_not_keep_a_socket_open(
    server_factory: Any,
) -> None:
    """A connect in time gives the server as long again to answer (3004 past
    that), once: a client sending connect after connect, each refused (an
    expired token), is closed within twice the timeout, not kept for ever."""
    srv = await server_factory({"SIGNAL_CONNECT_TIMEOUT_S": "0.5"}, name="connect-again")
    client = await Raw.open(srv)
    started = time.monotonic()
    expired = srv.token("late", ttl_s=-60)
    for _ in range(20):  # 2 s of connects, 0.1 s apart
        try:
            (cmd,) = await client.send({"connect": {"token": expired}})
            assert (await client.reply(cmd))["error"]["code"] == 109
        except ConnectionClosed:
            break
        await asyncio.sleep(0.1)
    assert await client.closed_with() == (3004, "internal server error")
    assert time.monotonic() - started < 2.0  # twice the timeout, and a margin


async def test_connection_limit_per_user(server_factory: Any) -> None:
    srv = await server_factory({"SIGNAL_MAX_CONNECTIONS_PER_USER": "2"}, name="limit")
    first = await connected(srv, "alice")
    second = await connected(srv, "alice")
    third = await Raw.open(srv)
    await third.send({"connect": {"token": srv.token("alice")}})
    assert (await third.closed_with())[0] == 3504
    other = await connected(srv, "bob")  # other users are unaffected
    for c in (first, second, other):
        await c.close()


async def test_connection_limit_per_user_holds_for_concurrent_connects(
    server_factory: Any, redis_factory: Any
) -> None:
    # On Redis a connect awaits its personal channel's subscribe between the
    # limit check and being counted: connects sent together must not all pass.
    redis = redis_factory()
    env = {"REDIS_URL": redis.url, "SIGNAL_MAX_CONNECTIONS_PER_USER": "2"}
    srv = await server_factory(env, name="limit-concurrent")
    clients = [await Raw.open(srv) for _ in range(6)]
    for client in clients:
        await client.send({"id": 1, "connect": {"token": srv.token("alice")}})

    async def outcome(client: Raw) -> str:
        try:
            return "connected" if "connect" in await client.reply(1) else "error"
        except ConnectionClosed as exc:
            return str(exc.rcvd.code if exc.rcvd else None)

    outcomes = await asyncio.gather(*(outcome(c) for c in clients))
    assert sorted(outcomes) == ["3504"] * 4 + ["connected"] * 2, outcomes
    for client in clients:
        await client.close()


class SlowJwks:
    """A JWKS endpoint that answers after ``delay_s``: connect commands with RS256
    tokens stay in progress on the server until it does."""

    def __init__(self, key: rsa.RSAPrivateKey, delay_s: float) -> None:
        self.key = key
        jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1"}
        body = json.dumps({"keys": [{**jwk, "alg": "RS256", "use": "sig"}]}).encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                time.sleep(delay_s)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks.json"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


# A JWKS needs an audience; the servers' tokens (ServerProcess.token) then carry it.
JWKS_ENV = {"SIGNAL_JWT_ALGORITHMS": "HS256,RS256", "SIGNAL_JWT_AUDIENCE": "digis-test"}


@contextlib.asynccontextmanager
async def slow_key_server(
    server_factory: Any, env: dict[str, str], name: str, delay_s: float
) -> AsyncIterator[tuple[Any, rsa.RSAPrivateKey]]:
    """A server that verifies RS256 tokens with keys fetched from a JWKS URL
    answering after ``delay_s`` (a connect with such a token stays in
    progress), and the key that signs them."""
    jwks = SlowJwks(rsa.generate_private_key(public_exponent=65537, key_size=2048), delay_s)
    try:
        srv = await server_factory(
            {**JWKS_ENV, "SIGNAL_JWT_JWKS_URL": jwks.url, **env},
            name=name,
        )
        yield srv, jwks.key
    finally:
        jwks.close()


async def send_slow_connects(
    srv: Any, key: rsa.RSAPrivateKey, count: int
) -> tuple[list[Raw], list[int]]:
    """``count`` connections, each with a connect that waits for the slow keys."""
    exp = int(time.time()) + 600
    waiting = [await Raw.open(srv) for _ in range(count)]
    ids = []
    for i, client in enumerate(waiting):
        claims = {"sub": f"w{i}", "exp": exp, "aud": JWKS_ENV["SIGNAL_JWT_AUDIENCE"]}
        token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": "k1"})
        ids += await client.send({"connect": {"token": token}})
    return waiting, ids


async def test_upgrades_refused_with_503_while_too_many_connects_are_in_progress(
    server_factory: Any,
) -> None:
    from websockets.exceptions import InvalidStatus

    env = {"SIGNAL_MAX_CONNECTING": "2"}
    async with slow_key_server(server_factory, env, "connecting", 2.0) as (srv, key):
        # Upgraded sockets that have not sent connect cost nothing: not counted.
        idle = [await Raw.open(srv) for _ in range(3)]
        # Two connects waiting for the (slow) key fetch fill the limit.
        waiting, ids = await send_slow_connects(srv, key, 2)
        await asyncio.sleep(0.5)
        with pytest.raises(InvalidStatus) as refused:
            await Raw.open(srv)
        assert refused.value.response.status_code == 503
        # A socket upgraded before the cap filled finds it when it connects:
        # a temporary refusal, not a third connect in progress.
        (late,) = await idle[0].send({"connect": {"token": srv.token("late")}})
        assert (await idle[0].reply(late))["error"] == {
            "code": 111,
            "message": "too many requests",
            "temporary": True,
        }
        # Plain HTTP is not affected.
        assert await srv.aget("/readyz") == (200, b"ready\n")
        # Once the keys arrive both connects complete, and upgrades are admitted again.
        for client, cmd_id in zip(waiting, ids, strict=True):
            assert "connect" in await client.reply(cmd_id)
        newcomer = await connected(srv, "bob")
        _, body = await srv.aget("/metrics")
        assert metric_value(body, "signal_limit_refusals_total", limit="connecting") == 2
        for c in (*idle, *waiting, newcomer):
            await c.close()


async def test_upgrades_refused_with_503_while_a_new_connect_would_wait_too_long(
    server_factory: Any,
) -> None:
    # Connects in progress that do not finish (their key fetch hangs): past the
    # floor, with none finished for longer than SIGNAL_MAX_CONNECT_WAIT_S, upgrades
    # are refused, by the wait and not by the count cap.
    from websockets.exceptions import InvalidStatus

    from signaling.admission import ADMIT_FLOOR

    env = {"SIGNAL_MAX_CONNECT_WAIT_S": "1"}
    async with slow_key_server(server_factory, env, "connect-wait", 3.0) as (srv, key):
        waiting, ids = await send_slow_connects(srv, key, ADMIT_FLOOR)
        await asyncio.sleep(0.2)
        await (await Raw.open(srv)).close()  # crowded, but not for long: admitted
        await asyncio.sleep(1.3)
        with pytest.raises(InvalidStatus) as refused:
            await Raw.open(srv)
        assert refused.value.response.status_code == 503
        for client, cmd_id in zip(waiting, ids, strict=True):
            assert "connect" in await client.reply(cmd_id)
        newcomer = await connected(srv, "bob")
        _, body = await srv.aget("/metrics")
        assert metric_value(body, "signal_limit_refusals_total", limit="connect_wait") == 1
        assert metric_value(body, "signal_limit_refusals_total", limit="connecting") == 0
        for c in (*waiting, newcomer):
            await c.close()


async def test_a_client_asking_for_protobuf_is_refused_at_the_upgrade_with_a_reason(
    server: ServerProcess,
) -> None:
    """The Swift, Kotlin and Dart SDKs (and centrifuge-js's protobuf build) ask
    for the protobuf format: by subprotocol, or by query on the plain upgrade
    the fast path answers. They get a 400 that says why, not an upgrade whose
    first binary frame ends the connection with a code the SDKs never retry."""
    from websockets.exceptions import InvalidStatus

    attempts: list[tuple[str, list[Any] | None]] = [
        (server.ws_url, ["centrifuge-protobuf"]),
        (server.ws_url + "?format=protobuf", None),
        (server.ws_url + "?cf_protocol=protobuf", None),
    ]
    for url, subprotocols in attempts:
        with pytest.raises(InvalidStatus) as refused:
            await connect(url, open_timeout=TIMEOUT, subprotocols=subprotocols)
        assert refused.value.response.status_code == 400
        assert b"protobuf" in refused.value.response.body
    # JSON, asked for or not, is served.
    for url, subprotocols in [(server.ws_url, ["centrifuge-json"]), (server.ws_url, None)]:
        ws = await connect(url, open_timeout=TIMEOUT, subprotocols=subprotocols)
        client = Raw(ws)
        reply = await client.call("connect", {"token": server.token("alice")})
        assert "connect" in reply, reply
        await client.close()
    # One warning for the operator, not one per attempt.
    assert server.log_text().count("asks for the protobuf format") == 1


# --- malformed input -----------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        '{"id": 1, "connect": ',
        "[1,2,3]",
        '{"id": -1, "rpc": {}}',
        '{"id": 1, "publish": 5}',
        "\n\n",
    ],
    ids=["truncated-json", "array", "negative-id", "body-not-object", "blank-lines"],
)
async def test_malformed_frames_close_with_3501(srv: ServerProcess, frame: str) -> None:
    client = await connected(srv, "alice")
    await client.ws.send(frame)
    assert (await client.closed_with())[0] == 3501
    # The server carries on.
    other = await connected(srv, "bob")
    assert "rpc" in await other.call("rpc", {"method": "server.info"})
    await other.close()


async def test_binary_frame_is_bad_request(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    await client.ws.send(b"\x00\x01")
    assert (await client.closed_with())[0] == 3501


async def test_unknown_command_gets_104_and_connection_stays(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    reply = await client.call("teleport", {"to": "mars"})
    assert reply["error"] == {"code": 104, "message": "method not found"}
    reply = await client.call("rpc", {"method": "no.such.method"})
    assert reply["error"]["code"] == 104
    assert "rpc" in await client.call("rpc", {"method": "server.info"})
    await client.close()


async def test_send_command_without_handler_is_3508(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    await client.ws.send('{"send": {"data": {"x": 1}}}')
    assert (await client.closed_with())[0] == 3508


async def test_unsolicited_pong_is_bad_request(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    await client.ws.send("{}")
    assert (await client.closed_with())[0] == 3501


async def test_oversized_frame_closes_with_1009(server_factory: Any) -> None:
    srv = await server_factory(
        {"SIGNAL_MAX_FRAME_BYTES": "4096", "SIGNAL_MAX_PUBLICATION_BYTES": "2048"}, name="size"
    )
    client = await connected(srv, "alice")
    big = {"publish": {"channel": "room:x", "data": {"text": "x" * 5000}}, "id": 9}
    await client.ws.send(orjson.dumps(big).decode())
    assert (await client.closed_with())[0] == 1009


async def test_oversized_publication_gets_106(server_factory: Any) -> None:
    srv = await server_factory(
        {"SIGNAL_MAX_FRAME_BYTES": "65536", "SIGNAL_MAX_PUBLICATION_BYTES": "1024"}, name="pub"
    )
    client = await connected(srv, "alice")
    reply = await client.call("publish", {"channel": "room:x", "data": msg("x" * 2000)})
    assert reply["error"]["code"] == 106
    reply = await client.call("publish", {"channel": "room:x", "data": msg("ok")})
    assert reply == {"id": reply["id"], "publish": {}}
    await client.close()


# --- channels and permissions ----------------------------------------------------------


async def test_channel_permissions(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")

    async def code(method: str, body: dict[str, Any]) -> int | None:
        reply = await client.call(method, body)
        return reply["error"]["code"] if "error" in reply else None

    assert await code("subscribe", {"channel": "chat:x"}) == 102
    assert await code("subscribe", {"channel": "room:"}) == 102
    assert await code("subscribe", {"channel": "user:#bob"}) == 103
    assert await code("subscribe", {"channel": "dm:#bob,carol"}) == 103
    assert await code("subscribe", {"channel": "private:vip"}) == 103
    assert await code("subscribe", {"channel": "dm:#alice,bob"}) is None
    assert await code("subscribe", {"channel": "dm:#alice,bob"}) == 105
    assert await code("publish", {"channel": "user:#alice", "data": {}}) == 103
    assert await code("publish", {"channel": "user:#bob", "data": {}}) == 103
    assert await code("publish", {"channel": "dm:#bob,carol", "data": {}}) == 103
    assert await code("history", {"channel": "dm:#bob,carol", "limit": 10}) == 103
    assert await code("presence", {"channel": "dm:#bob,carol"}) == 103
    assert await code("presence", {"channel": "user:#alice"}) == 108
    await client.close()


async def test_subscription_limit(server_factory: Any) -> None:
    srv = await server_factory({"SIGNAL_MAX_SUBSCRIPTIONS": "3"}, name="subs")
    client = await connected(srv, "alice")  # user:#alice is one
    assert "subscribe" in await client.call("subscribe", {"channel": "room:a"})
    assert "subscribe" in await client.call("subscribe", {"channel": "room:b"})
    reply = await client.call("subscribe", {"channel": "room:c"})
    assert reply["error"]["code"] == 106
    await client.close()


async def test_private_channel_needs_subscription_token(srv: ServerProcess) -> None:
    import jwt

    client = await connected(srv, "alice")
    good = jwt.encode(
        {"sub": "alice", "channel": "private:vip", "exp": int(time.time()) + 60},
        srv.secret,
        algorithm="HS256",
    )
    stolen = jwt.encode(
        {"sub": "bob", "channel": "private:vip", "exp": int(time.time()) + 60},
        srv.secret,
        algorithm="HS256",
    )
    reply = await client.call("subscribe", {"channel": "private:vip", "token": stolen})
    assert reply["error"]["code"] == 103
    reply = await client.call("subscribe", {"channel": "private:vip", "token": good})
    assert reply["subscribe"]["expires"] is True
    await client.close()


async def test_sender_identity_comes_from_token(srv: ServerProcess) -> None:
    alice = await connected(srv, "alice", name="Alice")
    bob = await connected(srv, "bob")
    await bob.call("subscribe", {"channel": "room:c"})
    # Sender fields inside the data are refused by the chat schema...
    spoof = {**msg("hi"), "info": {"user": "admin"}, "user": "admin"}
    reply = await alice.call("publish", {"channel": "room:c", "data": spoof})
    assert reply["error"]["code"] >= 1000
    # ...and an "info" next to the data in the command is ignored.
    reply = await alice.call(
        "publish", {"channel": "room:c", "data": msg("hi"), "info": {"user": "admin"}}
    )
    assert "publish" in reply
    push = await bob.push("pub")
    pub = push["pub"]
    assert push["channel"] == "room:c"
    assert pub["info"]["user"] == "alice"
    assert pub["info"]["conn_info"] == {"name": "Alice"}
    assert pub["data"] == msg("hi")
    assert pub["offset"] == 1
    await alice.close()
    await bob.close()


async def test_history_since_and_unrecoverable(srv: ServerProcess) -> None:
    client = await connected(srv, "alice")
    sub = (await client.call("subscribe", {"channel": "room:h"}))["subscribe"]
    for i in range(5):
        await client.call("publish", {"channel": "room:h", "data": msg(str(i))})
    hist = (await client.call("history", {"channel": "room:h", "limit": 2}))["history"]
    assert [p["data"]["text"] for p in hist["publications"]] == ["0", "1"]
    assert hist["offset"] == 5 and hist["epoch"] == sub["epoch"]
    body = {"channel": "room:h", "limit": 10, "since": {"offset": 3, "epoch": sub["epoch"]}}
    hist = (await client.call("history", body))["history"]
    assert [p["offset"] for p in hist["publications"]] == [4, 5]
    body = {"channel": "room:h", "limit": 2, "reverse": True}
    hist = (await client.call("history", body))["history"]
    assert [p["offset"] for p in hist["publications"]] == [5, 4]
    body = {"channel": "room:h", "limit": 10, "since": {"offset": 3, "epoch": "other"}}
    assert (await client.call("history", body))["error"]["code"] == 112
    await client.close()


async def test_history_since_a_position_whose_stream_expired_is_unrecoverable(
    server_factory: Any, redis_factory: Any
) -> None:
    """On Redis the stream expires with the history TTL while the channel's
    position lives on: what followed ``since`` is gone, and an empty page
    would pass for "nothing missed"."""
    redis = redis_factory()
    env = {"REDIS_URL": redis.url, "SIGNAL_HISTORY_TTL_S": "1"}
    srv = await server_factory(env, name="history-expired")
    client = await connected(srv, "alice")
    sub = (await client.call("subscribe", {"channel": "room:e"}))["subscribe"]
    for i in range(3):
        await client.call("publish", {"channel": "room:e", "data": msg(str(i))})
    since = {"offset": 1, "epoch": sub["epoch"]}
    body = {"channel": "room:e", "limit": 10, "since": since}
    page = (await client.call("history", body))["history"]
    assert [p["offset"] for p in page["publications"]] == [2, 3]
    await asyncio.sleep(1.3)
    assert (await client.call("history", body))["error"]["code"] == 112
    # At the top nothing is missing: an empty page, as before the expiry.
    at_top = {**body, "since": {"offset": 3, "epoch": sub["epoch"]}}
    assert (await client.call("history", at_top))["history"]["offset"] == 3
    # No publications asked for: just the position.
    assert "history" in await client.call("history", {**body, "limit": 0})
    await client.close()


async def test_recover_on_resubscribe(srv: ServerProcess) -> None:
    reader = await connected(srv, "alice")
    sub = (await reader.call("subscribe", {"channel": "room:r"}))["subscribe"]
    await reader.close()
    writer = await connected(srv, "bob")
    for i in range(3):
        await writer.call("publish", {"channel": "room:r", "data": msg(str(i))})
    reader = await connected(srv, "alice")
    offset = sub.get("offset", 0)  # zero values are omitted on the wire
    body = {"channel": "room:r", "recover": True, "offset": offset, "epoch": sub["epoch"]}
    result = (await reader.call("subscribe", body))["subscribe"]
    assert result["recovered"] is True and result["was_recovering"] is True
    assert [p["data"]["text"] for p in result["publications"]] == ["0", "1", "2"]
    body = {"channel": "room:s", "recover": True, "offset": 7, "epoch": "gone"}
    result = (await reader.call("subscribe", body))["subscribe"]
    assert result.get("recovered") is not True and result["was_recovering"] is True
    body = {"channel": "room:t", "recover": True, "offset": 7, "epoch": "gone", "flag": 2}
    assert (await reader.call("subscribe", body))["error"]["code"] == 112
    await reader.close()
    await writer.close()


async def test_join_and_leave_pushes(srv: ServerProcess) -> None:
    watcher = await connected(srv, "alice")
    await watcher.call("subscribe", {"channel": "room:j", "join_leave": True})
    guest = await connected(srv, "bob")
    await guest.call("subscribe", {"channel": "room:j"})
    join = await watcher.push("join")
    assert join["channel"] == "room:j" and join["join"]["info"]["user"] == "bob"
    stats = (await watcher.call("presence_stats", {"channel": "room:j"}))["presence_stats"]
    assert stats == {"num_clients": 2, "num_users": 2}
    await guest.close()
    leave = await watcher.push("leave")
    assert leave["leave"]["info"]["user"] == "bob"
    await watcher.close()


# --- limits: rate and slow clients -------------------------------------------------------


async def test_rate_limit_errors_then_disconnect(server_factory: Any) -> None:
    srv = await server_factory(
        {"SIGNAL_COMMANDS_PER_SECOND": "5", "SIGNAL_COMMAND_BURST": "5"}, name="rate"
    )
    client = await connected(srv, "alice")  # the first frame's connect: no token
    ids = await client.send(*[{"rpc": {"method": "server.info"}} for _ in range(8)])
    replies = [await client.reply(i) for i in ids]
    codes = [r["error"]["code"] if "error" in r else 0 for r in replies]
    assert codes.count(111) >= 3 and codes.count(0) >= 3
    assert all(r["error"]["temporary"] for r in replies if "error" in r)
    # Keep hammering: a whole burst beyond the limit ends the connection.
    await client.send(*[{"rpc": {"method": "server.info"}} for _ in range(20)])
    assert (await client.closed_with())[0] == 3013
    _, body = await srv.aget("/metrics")
    assert metric_value(body, "signal_rate_limit_disconnects_total") == 1


async def test_a_reconnect_batch_of_subscriptions_is_not_rate_limited(
    server_factory: Any,
) -> None:
    """The SDKs send a connect and every subscription they restore in one
    frame: more subscriptions than the burst must all go through (they did
    not: the ones past the burst got 111 at every reconnect), and the limit
    holds for what follows."""
    srv = await server_factory(
        {"SIGNAL_COMMANDS_PER_SECOND": "5", "SIGNAL_COMMAND_BURST": "5", **QUIET}, name="batch"
    )
    client = await Raw.open(srv)
    subscribes = [{"subscribe": {"channel": f"room:r{i}"}} for i in range(20)]
    # Other commands in that frame draw on the limit as ever.
    rpcs = [{"rpc": {"method": "server.info"}} for _ in range(8)]
    ids = await client.send({"connect": {"token": srv.token("alice")}}, *subscribes, *rpcs)
    replies = [await client.reply(i) for i in ids]
    assert "connect" in replies[0], replies[0]
    assert all("subscribe" in r for r in replies[1:21]), [r for r in replies if "error" in r]
    codes = [r["error"]["code"] if "error" in r else 0 for r in replies[21:]]
    assert codes.count(111) >= 3, codes
    # Only the first frame goes free: a later subscribe is refused like the rest.
    reply = await client.call("subscribe", {"channel": "room:later"})
    assert reply["error"]["code"] == 111, reply
    await client.close()


async def test_a_fast_publisher_is_slowed_down_not_disconnected(server_factory: Any) -> None:
    """2,000 publishes sent without waiting (20 frames of 100), no rate limit:
    the commands queue past the point where the server stops reading the
    connection (session.PAUSE_READING_AT, 256); it reads on once the queue is
    worked down. Every publish is acknowledged, in order, and delivered once;
    the connection stays open (this was a 3013 before)."""
    srv = await server_factory({"SIGNAL_COMMANDS_PER_SECOND": "0", **QUIET}, name="fast")
    watcher = await connected(srv, "watcher")
    await watcher.call("subscribe", {"channel": "room:fast"})
    publisher = await connected(srv, "alice")
    ids: list[int] = []
    for batch in range(20):
        publishes = [
            {"publish": {"channel": "room:fast", "data": msg(f"{batch * 100 + i}")}}
            for i in range(100)
        ]
        ids += await publisher.send(*publishes)
    replies = [await publisher.reply(i) for i in ids]
    assert all("publish" in r for r in replies), [r for r in replies if "publish" not in r][:3]
    texts = [(await watcher.push())["pub"]["data"]["text"] for _ in ids]
    assert texts == [str(n) for n in range(2000)]
    assert (await publisher.call("ping", {})) == {"id": ids[-1] + 1, "ping": {}}
    for client in (watcher, publisher):
        await client.close()


async def test_more_commands_at_once_than_the_queue_takes_is_a_flood(
    server_factory: Any,
) -> None:
    """Pausing reads cannot stop commands already read: one (large) frame of
    10,001 pings is more than session.MAX_QUEUED_COMMANDS and ends with 3013."""
    srv = await server_factory(
        {"SIGNAL_COMMANDS_PER_SECOND": "0", "SIGNAL_MAX_FRAME_BYTES": "1048576"}, name="flood"
    )
    client = await connected(srv, "alice")
    await client.send(*[{"ping": {}} for _ in range(10_001)])
    assert (await client.closed_with())[0] == 3013


async def test_slow_client_closed_with_3008(server_factory: Any) -> None:
    srv = await server_factory(
        {
            "SIGNAL_SEND_BUFFER_MAX_BYTES": "65536",
            "SIGNAL_COMMANDS_PER_SECOND": "0",
            "SIGNAL_CHAT_MAX_TEXT": "16000",
            **QUIET,
        },
        name="slow",
    )
    # A client that subscribes and then never reads: raw socket with a tiny buffer.
    slow = await Raw.open(srv, max_queue=1)
    sock = slow.ws.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await slow.call("connect", {"token": srv.token("slowpoke")})
    await slow.call("subscribe", {"channel": "room:flood"})
    slow.ws.transport.pause_reading()

    fast = await connected(srv, "reader")
    await fast.call("subscribe", {"channel": "room:flood"})
    publisher = await connected(srv, "writer")
    payload = msg("y" * 15000)
    # Kernel socket buffers on loopback absorb a few MB before the server's own
    # buffer starts to grow: publish until the server gives up on the client.
    body = b""
    for i in range(1000):
        reply = await publisher.call("publish", {"channel": "room:flood", "data": payload})
        assert "publish" in reply, reply
        await fast.push("pub")  # the reading client keeps up and stays connected
        if i % 20 == 19:
            _, body = await srv.aget("/metrics")
            if metric_value(body, "signal_slow_client_disconnects_total") >= 1:
                break
    assert metric_value(body, "signal_slow_client_disconnects_total") == 1
    # The close frame is stuck behind unread data: the socket goes after the
    # transport's close timeout, and the disconnect is counted then.
    deadline = time.monotonic() + 10
    while metric_value(body, "signal_disconnects_total", code="3008") < 1:
        assert time.monotonic() < deadline, "slow client never fully closed"
        await asyncio.sleep(0.2)
        _, body = await srv.aget("/metrics")
    assert metric_value(body, "websocket_active_connections") == 2
    assert "rpc" in await fast.call("rpc", {"method": "server.info"})
    slow.ws.transport.abort()
    await fast.close()
    await publisher.close()


# --- heartbeats --------------------------------------------------------------------------


async def test_client_that_never_pongs_is_closed_with_3012(server_factory: Any) -> None:
    srv = await server_factory(
        {"SIGNAL_PING_INTERVAL_S": "1", "SIGNAL_PONG_TIMEOUT_S": "0.5"}, name="pong"
    )
    client = await Raw.open(srv)
    await client.send({"connect": {"token": srv.token("alice")}})
    frames = []
    with pytest.raises(ConnectionClosed) as info:
        while True:
            frames.append(await asyncio.wait_for(client.ws.recv(), TIMEOUT))
    assert "{}" in frames  # it was pinged
    assert info.value.rcvd is not None and info.value.rcvd.code == 3012


async def test_client_that_pongs_stays(server_factory: Any) -> None:
    srv = await server_factory(
        {"SIGNAL_PING_INTERVAL_S": "1", "SIGNAL_PONG_TIMEOUT_S": "0.5"}, name="pong-ok"
    )
    client = await connected(srv, "alice")
    deadline = time.monotonic() + 3.5
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client._fill(), 0.5)  # answers pings
    assert "rpc" in await client.call("rpc", {"method": "server.info"})
    await client.close()


# --- operations: metrics, health, shutdown ----------------------------------------------------


def metric_value(body: bytes, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_metrics_count_active_connections(srv: ServerProcess) -> None:
    clients = [await connected(srv, f"user{i}") for i in range(5)]
    _, body = await srv.aget("/metrics")
    assert metric_value(body, "websocket_active_connections") == 5
    assert metric_value(body, "signal_connection_attempts_total", result="ok") == 5
    for c in clients[:3]:
        await c.close()
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        _, body = await srv.aget("/metrics")
        if metric_value(body, "websocket_active_connections") == 2:
            break
        await asyncio.sleep(0.05)
    assert metric_value(body, "websocket_active_connections") == 2
    assert metric_value(body, "signal_commands_total", method="connect", result="ok") == 5
    for c in clients[3:]:
        await c.close()


async def test_health_endpoints(srv: ServerProcess) -> None:
    assert await srv.aget("/healthz") == (200, b"ok\n")
    assert await srv.aget("/readyz") == (200, b"ready\n")
    status, _ = await srv.aget("/nope")
    assert status == 404


async def test_graceful_shutdown_closes_with_3001_and_exits_0(server_factory: Any) -> None:
    srv = await server_factory({"SIGNAL_DRAIN_S": "0.5"}, name="drain")
    clients = [await connected(srv, f"u{i}") for i in range(20)]
    srv.signal(15)
    codes = await asyncio.gather(*(c.closed_with() for c in clients))
    assert {code for code, _ in codes} == {3001}
    assert await srv.await_exit(10) == 0
    assert "draining 20 connections" in srv.log_text()


async def test_a_second_sigterm_does_not_cut_the_drain_short(server_factory: Any) -> None:
    # Heroku signals every process of a dyno and our supervisor forwards the
    # signal too: a worker gets SIGTERM twice and must still drain.
    srv = await server_factory({"SIGNAL_DRAIN_S": "1"}, name="drain-twice")
    clients = [await connected(srv, f"u{i}") for i in range(20)]
    srv.signal(15)
    await asyncio.sleep(0.2)
    srv.signal(15)
    codes = await asyncio.gather(*(c.closed_with() for c in clients))
    assert {code for code, _ in codes} == {3001}
    assert await srv.await_exit(10) == 0
    assert "SIGTERM received while draining" in srv.log_text()


async def test_draining_server_answers_readyz_503_and_refuses_upgrades(
    server_factory: Any,
) -> None:
    from websockets.exceptions import InvalidStatus

    srv = await server_factory({"SIGNAL_DRAIN_S": "3"}, name="drain-ready")
    keep = [await connected(srv, f"u{i}") for i in range(50)]
    srv.signal(15)
    deadline = time.monotonic() + 2
    status = 200
    while status == 200 and time.monotonic() < deadline:
        status, _ = await srv.aget("/readyz")
    assert status == 503
    with pytest.raises(InvalidStatus) as refused:
        await connect(srv.ws_url, open_timeout=TIMEOUT)
    assert refused.value.response.status_code == 503
    codes = await asyncio.gather(*(c.closed_with() for c in keep))
    assert {code for code, _ in codes} == {3001}
    assert await srv.await_exit(15) == 0


async def test_handover_restart_sends_every_reconnect_to_the_successor(
    server_factory: Any,
) -> None:
    """SIGNAL_HANDOVER: a second process listens on the same port while the
    first runs; once the first is told to stop, every new connection is the
    successor's (none refused 503 by the draining one), and the first still
    drains its own clients with 3001."""
    env = {"SIGNAL_HANDOVER": "1", "SIGNAL_DRAIN_S": "3", "SIGNAL_LOG_LEVEL": "INFO", **QUIET}
    old = await server_factory(env, name="handover-old")
    clients = [await connected(old, f"u{i}") for i in range(10)]
    new = await server_factory(env, name="handover-new", port=old.port, secret=old.secret)
    deadline = time.monotonic() + 15
    while "listening on" not in new.log_text():
        assert time.monotonic() < deadline, new.log_text()
        await asyncio.sleep(0.05)
    old.signal(15)
    while "draining 10 connections" not in old.log_text():
        assert time.monotonic() < deadline, old.log_text()
        await asyncio.sleep(0.01)
    # During the old process's drain (3 s): 30 connects, every one accepted.
    joined = [await connected(new, f"n{i}") for i in range(30)]
    assert old.proc is not None and old.proc.poll() is None, "drain over too soon"
    codes = await asyncio.gather(*(c.closed_with() for c in clients))
    assert {code for code, _ in codes} == {3001}
    assert await old.await_exit(15) == 0
    assert "rpc" in await joined[0].call("rpc", {"method": "server.info"})  # still served


# --- token expiry ------------------------------------------------------------------------

EXPIRY_ENV = {
    "SIGNAL_PING_INTERVAL_S": "1",
    "SIGNAL_PONG_TIMEOUT_S": "0.5",
    "SIGNAL_EXPIRED_CLOSE_DELAY_S": "0.5",
    **QUIET,
}


async def test_expired_connection_closed_with_3005(server_factory: Any) -> None:
    srv = await server_factory(EXPIRY_ENV, name="expiry")
    client = await Raw.open(srv)
    reply = await client.call("connect", {"token": srv.token("alice", ttl_s=2)})
    assert reply["connect"]["expires"] is True and reply["connect"]["ttl"] <= 2
    started = time.monotonic()
    # Answer pings while waiting, so that only the expiry can close it.
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            await client._fill()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (3005, "connection expired")
    assert time.monotonic() - started >= 1.5


async def test_refreshed_connection_stays_open(server_factory: Any) -> None:
    srv = await server_factory(EXPIRY_ENV, name="refresh")
    client = await Raw.open(srv)
    await client.call("connect", {"token": srv.token("alice", ttl_s=2)})
    reply = await client.call("refresh", {"token": srv.token("alice", ttl_s=120)})
    assert reply["refresh"]["ttl"] > 60
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(client._fill(), 0.5)
    assert "rpc" in await client.call("rpc", {"method": "server.info"})
    await client.close()


async def test_unreachable_keys_for_a_subscription_or_refresh_token_are_a_temporary_error(
    server_factory: Any,
) -> None:
    """The keys of RS256 tokens come from a JWKS URL that nobody answers: a
    subscribe, sub_refresh or refresh with such a token gets the temporary
    error 100 (the SDKs retry it), not a disconnect, as a connect does."""
    from support.processes import free_port

    url = f"http://127.0.0.1:{free_port()}/jwks.json"  # nothing listens there
    env = {**JWKS_ENV, "SIGNAL_JWT_JWKS_URL": url, **EXPIRY_ENV}
    srv = await server_factory(env, name="keys-unavailable")
    client = await connected(srv, "alice")  # HS256: no keys needed
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    exp = int(time.time()) + 600

    def rs256(**claims: Any) -> str:
        claims = {"sub": "alice", "exp": exp, "aud": JWKS_ENV["SIGNAL_JWT_AUDIENCE"], **claims}
        return jwt.encode(claims, key, "RS256", {"kid": "k1"})

    temporary = {"code": 100, "message": "internal server error", "temporary": True}
    vip = "private:vip"
    reply = await client.call("subscribe", {"channel": vip, "token": rs256(channel=vip)})
    assert reply["error"] == temporary
    reply = await client.call("refresh", {"token": rs256()})
    assert reply["error"] == temporary
    hs_claims = {"sub": "alice", "channel": vip, "exp": exp, "aud": JWKS_ENV["SIGNAL_JWT_AUDIENCE"]}
    hs256 = jwt.encode(hs_claims, srv.secret, "HS256")
    assert "subscribe" in await client.call("subscribe", {"channel": vip, "token": hs256})
    reply = await client.call("sub_refresh", {"channel": vip, "token": rs256(channel=vip)})
    assert reply["error"] == temporary
    # The connection and its subscription carry on.
    assert "rpc" in await client.call("rpc", {"method": "server.info"})
    assert "sub_refresh" in await client.call("sub_refresh", {"channel": vip, "token": hs256})
    await client.close()


async def test_a_subscription_refreshed_to_expire_sooner_ends_then(server_factory: Any) -> None:
    """The pings look at token expiries only when the earliest one is due: a
    sub_refresh that brings a subscription's expiry forward must move that
    time too, or the subscription would outlive its token."""
    import jwt

    srv = await server_factory(EXPIRY_ENV, name="sub-refresh-sooner")
    client = await connected(srv, "alice")

    def token(ttl_s: int) -> str:
        claims = {"sub": "alice", "channel": "private:vip", "exp": int(time.time()) + ttl_s}
        return jwt.encode(claims, srv.secret, algorithm="HS256")

    reply = await client.call("subscribe", {"channel": "private:vip", "token": token(600)})
    assert reply["subscribe"]["ttl"] > 500
    started = time.monotonic()
    reply = await client.call("sub_refresh", {"channel": "private:vip", "token": token(2)})
    assert reply["sub_refresh"]["ttl"] <= 2
    # Bounded: the pings keep the socket busy, so a missed expiry would wait forever.
    push = await asyncio.wait_for(client.push("unsubscribe"), 6)
    assert push["channel"] == "private:vip"
    assert push["unsubscribe"] == {"code": 2501, "reason": "subscription expired"}
    assert time.monotonic() - started < 6
    assert "rpc" in await client.call("rpc", {"method": "server.info"})
    await client.close()


async def test_a_subscription_refreshed_late_within_the_grace_stays(server_factory: Any) -> None:
    """As a connection's, a subscription's expired token leaves it the close
    delay to be refreshed (the SDK asks for a new token when its ttl runs out,
    and its sub_refresh may land just after the expiry)."""
    srv = await server_factory(
        {**EXPIRY_ENV, "SIGNAL_EXPIRED_CLOSE_DELAY_S": "3"}, name="sub-grace"
    )
    client = await connected(srv, "alice")

    def token(ttl_s: int) -> str:
        claims = {"sub": "alice", "channel": "private:vip", "exp": int(time.time()) + ttl_s}
        return jwt.encode(claims, srv.secret, algorithm="HS256")

    async def listen(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(client._fill(), 0.5)

    assert "subscribe" in await client.call(
        "subscribe", {"channel": "private:vip", "token": token(1)}
    )
    await listen(2.5)  # past the token's expiry, within the grace; pings every second
    assert not [m for m in client.inbox if "unsubscribe" in m.get("push", {})]
    reply = await client.call("sub_refresh", {"channel": "private:vip", "token": token(600)})
    assert reply["sub_refresh"]["ttl"] > 500
    await listen(3)  # past the old token's grace
    assert not [m for m in client.inbox if "unsubscribe" in m.get("push", {})]
    await client.close()


async def test_a_sub_refresh_with_an_expired_token_unsubscribes_with_2501_first(
    server_factory: Any,
) -> None:
    """As for the connection's refresh: 109 alone would leave the SDKs'
    subscription unsubscribed for good; the 2501 push before it makes them
    subscribe again with a new token (the reply then finds them no longer
    subscribed, and they ignore it)."""
    import jwt

    srv = await server_factory(EXPIRY_ENV, name="sub-refresh-expired")
    client = await connected(srv, "alice")

    def token(ttl_s: int) -> str:
        claims = {"sub": "alice", "channel": "private:vip", "exp": int(time.time()) + ttl_s}
        return jwt.encode(claims, srv.secret, algorithm="HS256")

    assert "subscribe" in await client.call(
        "subscribe", {"channel": "private:vip", "token": token(600)}
    )
    reply = await client.call("sub_refresh", {"channel": "private:vip", "token": token(-60)})
    assert reply["error"]["code"] == 109
    # Read before the reply was (the reply is taken out of the inbox when found).
    pushes = [m["push"] for m in client.inbox if "unsubscribe" in m.get("push", {})]
    assert pushes == [
        {"channel": "private:vip", "unsubscribe": {"code": 2501, "reason": "subscription expired"}}
    ]
    # Subscribing again with a fresh token works; the connection stayed.
    assert "subscribe" in await client.call(
        "subscribe", {"channel": "private:vip", "token": token(600)}
    )
    await client.close()


async def test_expired_subscription_token_unsubscribes_with_2501(server_factory: Any) -> None:
    import jwt

    srv = await server_factory(EXPIRY_ENV, name="sub-expiry")
    client = await connected(srv, "alice")
    claims = {"sub": "alice", "channel": "private:vip", "exp": int(time.time()) + 2}
    token = jwt.encode(claims, srv.secret, algorithm="HS256")
    reply = await client.call("subscribe", {"channel": "private:vip", "token": token})
    assert reply["subscribe"]["expires"] is True
    push = await client.push("unsubscribe")
    assert push["channel"] == "private:vip"
    assert push["unsubscribe"] == {"code": 2501, "reason": "subscription expired"}
    # The connection itself stays.
    assert "rpc" in await client.call("rpc", {"method": "server.info"})
    await client.close()
