"""``calls``: a call storm at C call setups per second (issue 4's wire contract).

One call: the caller's rpc ``call.invite`` {"callee", "media"} → {"call_id"}; the
callee receives ``call.incoming`` in its ``user:#<id>`` channel (invite-to-ring is
measured from sending the invite to that push); the callee's rpc ``call.accept``
{"call_id"}; both rpc ``call.join`` → {"app_id", "channel", "uid", "token",
"expires_at"}; the caller's rpc ``call.end``. Caller and callee of a pair live in the
same worker (so invite-to-ring is timed on one clock) but, given several URLs, are
connected to different instances.

A server without these RPCs answers ``method not found (104)``: the run stops at once
and says so, instead of reporting a storm of failures.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

from loadtest.client import CentrifugeClient, Client, ConnectionClosedError, ServerError
from loadtest.scenarios.base import Scenario
from loadtest.stats import Histogram

__all__ = ["JOIN_FIELDS", "Calls"]

METHOD_NOT_FOUND = 104
JOIN_FIELDS = ("app_id", "channel", "uid", "token", "expires_at")
_CALL_TIMEOUT_S = 10.0


class Calls(Scenario):
    name = "calls"

    def build(self) -> None:
        s = self.s
        self.pairs: list[tuple[CentrifugeClient, CentrifugeClient]] = []
        for k in range(max(1, s.connections // 2)):
            if k % self.plan.count != self.plan.index:
                continue
            caller_gid, callee_gid = 2 * k, 2 * k + 1
            caller = self.new_client(caller_gid, self.user_id("a", caller_gid), url_index=k)
            callee = self.new_client(callee_gid, self.user_id("b", callee_gid), url_index=k + 1)
            assert isinstance(caller, CentrifugeClient) and isinstance(callee, CentrifugeClient)
            if s.tokens:
                caller.user = token_subject(caller.token)
                callee.user = token_subject(callee.token)
            self.pairs.append((caller, callee))
            self.clients += [caller, callee]
        self.ring = Histogram()  # invite sent → call.incoming at the callee
        self.setup_time = Histogram()  # invite sent → both join replies
        self.completed = 0
        self.failed = 0
        self.started = 0
        self.no_idle_pair = 0
        self._ringing: dict[str, asyncio.Future[float]] = {}
        self._early: dict[str, float] = {}  # call.incoming that beat the invite reply
        self._tasks: set[asyncio.Task[None]] = set()

    async def open_client(self, client: Client) -> None:
        assert isinstance(client, CentrifugeClient)
        await client.open(self.opener, self.s.connect_timeout_s)

    # --- Sink: call events arrive in the personal channel --------------------------------

    def on_pub(self, client: Client, channel: str, pub: dict[str, Any]) -> None:
        data = pub.get("data")
        if not isinstance(data, dict) or data.get("type") != "call.incoming":
            return
        call_id = str(data.get("call_id", ""))
        now = time.perf_counter()
        waiter = self._ringing.pop(call_id, None)
        if waiter is None:
            self._early[call_id] = now
        elif not waiter.done():
            waiter.set_result(now)

    # --- the storm -------------------------------------------------------------------------

    async def run(self, deadline: float, stop: asyncio.Event) -> None:
        idle = deque(p for p in self.pairs if p[0].connected and p[1].connected)
        rate = self.s.rate * len(self.pairs) / max(1, self.s.connections // 2)

        def start_one() -> None:
            if self.fatal is not None:
                stop.set()
                return
            if not idle:
                self.no_idle_pair += 1
                return
            pair = idle.popleft()
            task = asyncio.create_task(self._call(pair, idle))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        await self.pace(rate, deadline, stop, start_one)
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=_CALL_TIMEOUT_S)

    async def _call(
        self,
        pair: tuple[CentrifugeClient, CentrifugeClient],
        idle: deque[tuple[CentrifugeClient, CentrifugeClient]],
    ) -> None:
        caller, callee = pair
        self.started += 1
        stage = "call.invite"
        started = time.perf_counter()
        call_id = ""
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                invited = await caller.rpc("call.invite", {"callee": callee.user, "media": "video"})
                call_id = str(invited.get("call_id", ""))
                if not call_id:
                    raise ValueError("call.invite reply has no call_id")
                stage = "call.incoming"
                rang_at = self._early.pop(call_id, None)
                if rang_at is None:
                    waiter = asyncio.get_running_loop().create_future()
                    self._ringing[call_id] = waiter
                    rang_at = await waiter
                ring_us = int((rang_at - started) * 1e6)
                self.ring.add(ring_us)
                self.rec.latency(ring_us)
                stage = "call.accept"
                await callee.rpc("call.accept", {"call_id": call_id})
                stage = "call.join"
                joins = await asyncio.gather(
                    caller.rpc("call.join", {"call_id": call_id}),
                    callee.rpc("call.join", {"call_id": call_id}),
                )
                for reply in joins:
                    absent = [f for f in JOIN_FIELDS if f not in reply]
                    if absent:
                        raise ValueError(f"call.join reply lacks {', '.join(absent)}")
                self.setup_time.add(int((time.perf_counter() - started) * 1e6))
                stage = "call.end"
                await caller.rpc("call.end", {"call_id": call_id})
            self.completed += 1
        except ServerError as exc:
            self.failed += 1
            self.rec.errors[f"{stage} {exc.code}"] += 1
            if exc.code == METHOD_NOT_FOUND:
                self.fatal = (
                    f"the server has no call RPCs: {stage} answered method not found "
                    f"({METHOD_NOT_FOUND}) - the calls scenario needs issue 4 (call.invite, "
                    "call.accept, call.join, call.end) on the server"
                )
        except (TimeoutError, ConnectionClosedError, ValueError) as exc:
            self.failed += 1
            label = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
            self.rec.errors[f"{stage} {label}"] += 1
        finally:
            self._ringing.pop(call_id, None)
            if caller.connected and callee.connected:
                idle.append(pair)

    def result(self) -> dict[str, Any]:
        return {
            "pairs": len(self.pairs),
            "calls_started": self.started,
            "calls_completed": self.completed,
            "calls_failed": self.failed,
            "no_idle_pair": self.no_idle_pair,
            "ring": self.ring.to_wire(),
            "setup": self.setup_time.to_wire(),
        }


def token_subject(token: str) -> str:
    """The ``sub`` claim of a JWT, unverified (the tool only needs the user id)."""
    import base64

    import orjson

    payload = token.split(".")[1]
    claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return str(claims.get("sub", ""))
