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

__all__ = ["setup_logging"]


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
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # websockets logs every handshake at INFO: per-connection, so DEBUG here.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, root.level))
