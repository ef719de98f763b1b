"""Logging set-up: one line per event on stdout, plain or JSON.

Log-level contract: ERROR — a bug or a failure that loses work; WARNING — the
server degrades (broker down, a refused start-up value); INFO — lifecycle
(start, listen, drain, stop) and refused connects; DEBUG — per-connection
events. Nothing per message above DEBUG, and never a token or a secret.
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

__all__ = ["Throttle", "setup_logging"]


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str, as_json: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs every handshake at INFO: per-connection, so DEBUG here.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))


class Throttle:
    """Lets at most ``burst`` lines through per ``window_s`` and counts the rest,
    so that a flood of bad clients cannot flood the log. The next line let
    through says how many were suppressed."""

    def __init__(self, logger: logging.Logger, burst: int = 10, window_s: float = 10.0) -> None:
        self._logger = logger
        self._burst = burst
        self._window_s = window_s
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0

    def log(self, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._window_start >= self._window_s:
            self._window_start = now
            self._count = 0
        self._count += 1
        if self._count > self._burst:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d similar lines suppressed)"
            args = (*args, self._suppressed)
            self._suppressed = 0
        self._logger.log(level, msg, *args)
