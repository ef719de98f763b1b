"""Helpers around the real centrifuge-python SDK: event recorders and client set-up."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from centrifuge import (
    Client,
    ClientEventHandler,
    ClientState,
    ConnectedContext,
    ConnectingContext,
    DisconnectedContext,
    ErrorContext,
    JoinContext,
    LeaveContext,
    PublicationContext,
    ServerJoinContext,
    ServerLeaveContext,
    ServerPublicationContext,
    ServerSubscribedContext,
    ServerSubscribingContext,
    ServerUnsubscribedContext,
    SubscribedContext,
    SubscribingContext,
    SubscriptionErrorContext,
    SubscriptionEventHandler,
    UnsubscribedContext,
)

__all__ = ["ClientEvents", "Event", "Recorder", "SubEvents", "make_client"]


@dataclass
class Event:
    kind: str
    ctx: Any
    at: float


class Recorder:
    """Keeps every event in order; tests wait for the next one matching a predicate."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._changed = asyncio.Event()

    def _record(self, kind: str, ctx: Any) -> None:
        self.events.append(Event(kind, ctx, time.monotonic()))
        self._changed.set()

    def mark(self) -> int:
        """Position to wait from: only events after this are considered."""
        return len(self.events)

    def of(self, kind: str, since: int = 0) -> list[Any]:
        return [e.ctx for e in self.events[since:] if e.kind == kind]

    def kinds(self, since: int = 0) -> list[str]:
        return [e.kind for e in self.events[since:]]

    async def wait_for(
        self,
        kind: str,
        pred: Callable[[Any], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 5.0,
    ) -> Any:
        """First ``kind`` event at index >= ``since`` matching ``pred``."""
        deadline = asyncio.get_running_loop().time() + timeout
        index = since
        while True:
            while index < len(self.events):
                ev = self.events[index]
                index += 1
                if ev.kind == kind and (pred is None or pred(ev.ctx)):
                    return ev.ctx
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(
                    f"no {kind!r} event within {timeout}s; events since {since}: "
                    f"{[(e.kind, e.ctx) for e in self.events[since:]]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def wait_count(
        self,
        kind: str,
        count: int,
        pred: Callable[[Any], bool] | None = None,
        *,
        since: int = 0,
        timeout: float = 5.0,
    ) -> list[Any]:
        """Wait until ``count`` matching ``kind`` events (from ``since``) were seen."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            found = [c for c in self.of(kind, since) if pred is None or pred(c)]
            if len(found) >= count:
                return found[:count]
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(
                    f"{len(found)}/{count} {kind!r} events within {timeout}s; events: "
                    f"{[(e.kind, e.ctx) for e in self.events[since:]]}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)


class ClientEvents(ClientEventHandler, Recorder):
    """Client-level events, including server-side subscription events."""

    def __init__(self) -> None:
        Recorder.__init__(self)

    async def on_connecting(self, ctx: ConnectingContext) -> None:
        self._record("connecting", ctx)

    async def on_connected(self, ctx: ConnectedContext) -> None:
        self._record("connected", ctx)

    async def on_disconnected(self, ctx: DisconnectedContext) -> None:
        self._record("disconnected", ctx)

    async def on_error(self, ctx: ErrorContext) -> None:
        self._record("error", ctx)

    async def on_subscribed(self, ctx: ServerSubscribedContext) -> None:
        self._record("subscribed", ctx)

    async def on_subscribing(self, ctx: ServerSubscribingContext) -> None:
        self._record("subscribing", ctx)

    async def on_unsubscribed(self, ctx: ServerUnsubscribedContext) -> None:
        self._record("unsubscribed", ctx)

    async def on_publication(self, ctx: ServerPublicationContext) -> None:
        self._record("publication", ctx)

    async def on_join(self, ctx: ServerJoinContext) -> None:
        self._record("join", ctx)

    async def on_leave(self, ctx: ServerLeaveContext) -> None:
        self._record("leave", ctx)


class SubEvents(SubscriptionEventHandler, Recorder):
    """Events of one client-side subscription."""

    def __init__(self) -> None:
        Recorder.__init__(self)

    async def on_subscribing(self, ctx: SubscribingContext) -> None:
        self._record("subscribing", ctx)

    async def on_subscribed(self, ctx: SubscribedContext) -> None:
        self._record("subscribed", ctx)

    async def on_unsubscribed(self, ctx: UnsubscribedContext) -> None:
        self._record("unsubscribed", ctx)

    async def on_publication(self, ctx: PublicationContext) -> None:
        self._record("publication", ctx)

    async def on_join(self, ctx: JoinContext) -> None:
        self._record("join", ctx)

    async def on_leave(self, ctx: LeaveContext) -> None:
        self._record("leave", ctx)

    async def on_error(self, ctx: SubscriptionErrorContext) -> None:
        self._record("error", ctx)


def make_client(url: str, token: str, **kwargs: Any) -> tuple[Client, ClientEvents]:
    """A real SDK client with recorded events, direct connection (no proxy from env),
    fast reconnects."""
    events = ClientEvents()
    kwargs.setdefault("min_reconnect_delay", 0.05)
    kwargs.setdefault("max_reconnect_delay", 0.5)
    kwargs.setdefault("timeout", 5.0)
    client = Client(url, events=events, token=token, proxy=None, **kwargs)
    return client, events


def is_connected(client: Client) -> bool:
    return client.state == ClientState.CONNECTED
