"""Example billing consumer: reads the call-events stream with a consumer group.

The signaling server appends one entry per call transition and per billed
tick to a Redis Stream (docs/calls.md, "Billing stream"). The platform's
billing service reads it with a consumer group, so that

* each entry is delivered to one consumer of the group (run several for
  throughput or availability: same ``--group``, distinct ``--consumer``);
* an entry stays pending until acknowledged (XACK): a consumer that crashes
  before acknowledging gets it again when it restarts (it first re-reads its
  own pending entries), and entries left by a consumer that never comes back
  are claimed by another after ``--claim-idle-ms`` (XAUTOCLAIM);
* the handler must therefore be idempotent: deduplicate on ``event_id``
  (``<call_id>-<seq>``, unique and stable), e.g. with a unique index.

The server itself delivers at least once: it may append one record twice
(an instance died after appending a record and before marking it sent, so
another instance appended it again from the call's outbox). Both copies
carry the same ``event_id``. :func:`deduplicated` skips such a copy when it
reaches this process within a bounded window of recent ids; the unique index
on ``event_id`` in the billing database remains the guarantee (a copy may
reach another consumer of the group, or this one after a restart).

Usage::

    python examples/billing_consumer.py --redis-url redis://localhost:6379/0 \\
        --stream sig:signal:call-events --group billing --consumer billing-1

The stream key is the server's Redis prefix (``SIGNAL_REDIS_PREFIX``, default
``sig:``) followed by ``SIGNAL_CALL_EVENTS_STREAM`` (default
``signal:call-events``). Needs redis-py >= 4.2 and Redis >= 6.2.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import redis

__all__ = [
    "Handler",
    "claim_stale",
    "deduplicated",
    "drain",
    "ensure_group",
    "main",
    "run",
]

log = logging.getLogger("billing_consumer")

# handle(entry id, fields) -> None; raise to leave the entry pending (retried).
Handler = Callable[[str, Mapping[str, str]], None]


def deduplicated(handle: Handler, capacity: int = 100_000) -> Handler:
    """``handle`` for entries whose ``event_id`` was not handled among the last
    ``capacity`` ones; a repeated one is skipped (and acknowledged). An id
    counts as handled once ``handle`` returned: a failed entry is retried."""
    recent: OrderedDict[str, None] = OrderedDict()

    def handle_once(entry_id: str, fields: Mapping[str, str]) -> None:
        event_id = fields.get("event_id")
        if event_id is not None and event_id in recent:
            recent.move_to_end(event_id)
            log.info("entry %s repeats event %s; skipped", entry_id, event_id)
            return
        handle(entry_id, fields)
        if event_id is not None:
            recent[event_id] = None
            if len(recent) > capacity:
                recent.popitem(last=False)

    return handle_once


def ensure_group(client: redis.Redis, stream: str, group: str, start: str = "0") -> None:
    """Create the consumer group (and the stream) if missing.

    ``start`` "0" reads everything still in the stream on first start; "$"
    only what is appended afterwards.
    """
    try:
        client.xgroup_create(stream, group, id=start, mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _decode(fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in fields.items()
    }


def _entry_id(raw: bytes | str) -> str:
    return raw.decode() if isinstance(raw, bytes) else raw


def _handle_all(
    client: redis.Redis,
    stream: str,
    group: str,
    entries: list[tuple[bytes | str, Mapping[bytes | str, bytes | str]]],
    handle: Handler,
) -> int:
    done = 0
    for raw_id, fields in entries:
        entry_id = _entry_id(raw_id)
        if not fields:
            # Trimmed from the stream (MAXLEN) while pending: nothing to bill.
            client.xack(stream, group, entry_id)
            continue
        try:
            handle(entry_id, _decode(fields))
        except Exception:
            # Left pending: this consumer re-reads it on restart, another claims it.
            log.exception("entry %s failed; left pending", entry_id)
            continue
        client.xack(stream, group, entry_id)
        done += 1
    return done


def _read(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    start: str,
    count: int,
    block_ms: int | None,
) -> list[tuple[bytes | str, Mapping[bytes | str, bytes | str]]]:
    # [[stream, [(id, fields), ...]]] with RESP2, redis-py's default protocol
    # (its type hints cover every protocol, hence the Any).
    reply: Any = client.xreadgroup(group, consumer, {stream: start}, count=count, block=block_ms)
    return list(reply[0][1]) if reply else []


def claim_stale(
    client: redis.Redis, stream: str, group: str, consumer: str, handle: Handler, idle_ms: int
) -> int:
    """Take over entries another consumer left pending for ``idle_ms``, and
    handle them. Returns how many were handled."""
    handled = 0
    cursor = "0-0"
    while True:
        reply = client.xautoclaim(stream, group, consumer, idle_ms, start_id=cursor, count=100)
        cursor = _entry_id(reply[0])
        handled += _handle_all(client, stream, group, list(reply[1]), handle)
        if cursor == "0-0":
            return handled


def drain(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    handle: Handler,
    *,
    count: int = 100,
    block_ms: int | None = None,
) -> int:
    """Handle this consumer's own pending entries, then whatever new entries
    are there (waiting up to ``block_ms`` for the first, None = no wait).
    Returns how many entries were handled."""
    handled = 0
    # Own pending entries first (delivered before a crash, never acknowledged).
    # An entry that keeps failing stays pending; stop when a pass makes no progress.
    while True:
        entries = _read(client, stream, group, consumer, "0", count, None)
        done = _handle_all(client, stream, group, entries, handle)
        handled += done
        if not entries or done == 0:
            break
    while True:
        entries = _read(client, stream, group, consumer, ">", count, block_ms)
        if not entries:
            return handled
        handled += _handle_all(client, stream, group, entries, handle)
        block_ms = None


def run(
    client: redis.Redis,
    stream: str,
    group: str,
    consumer: str,
    handle: Handler,
    stop: threading.Event,
    *,
    claim_idle_ms: int = 60_000,
) -> None:
    """Consume until ``stop`` is set."""
    ensure_group(client, stream, group)
    while not stop.is_set():
        claim_stale(client, stream, group, consumer, handle, claim_idle_ms)
        drain(client, stream, group, consumer, handle, block_ms=2000)


def print_entry(entry_id: str, fields: Mapping[str, str]) -> None:
    """The example's handler: one JSON line per event. A real one records the
    event in the billing database, keyed by ``event_id`` (a unique index:
    idempotent whatever reaches it twice)."""
    print(json.dumps({"entry": entry_id, **fields}, sort_keys=True), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--stream", default="sig:signal:call-events")
    parser.add_argument("--group", default="billing")
    parser.add_argument("--consumer", default="billing-1")
    parser.add_argument("--claim-idle-ms", type=int, default=60_000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    client = redis.Redis.from_url(args.redis_url)
    try:
        run(
            client,
            args.stream,
            args.group,
            args.consumer,
            deduplicated(print_entry),
            stop,
            claim_idle_ms=args.claim_idle_ms,
        )
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
