"""The live progress line (stderr): one line rewritten in place on a terminal, a new
line every few seconds otherwise (CI logs, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from loadtest.config import RunSettings

__all__ = ["ProgressLine"]

_PLAIN_EVERY_S = 5.0


class ProgressLine:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self._last_plain = 0.0
        self._last_totals: tuple[int, int] | None = None
        self._last_time = 0.0
        self._dirty = False

    def show(
        self,
        settings: RunSettings,
        target: str,
        workers: list[dict[str, Any]],
        *,
        client_cpu: float,
        server_cpu: float | None,
        server_core: float | None,
        saturated: bool,
        measuring: bool,
        elapsed: float | None,
    ) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        connected = sum(w.get("connected", 0) for w in workers)
        deliveries = sum(w.get("deliveries", 0) for w in workers)
        acked = sum(w.get("pub_acked", 0) for w in workers)
        rates = ""
        if self._last_totals is not None and now > self._last_time:
            span = now - self._last_time
            d_rate = (deliveries - self._last_totals[0]) / span
            p_rate = (acked - self._last_totals[1]) / span
            rates = f" pub {p_rate:,.0f}/s dlv {d_rate:,.0f}/s"
        self._last_totals = (deliveries, acked)
        self._last_time = now
        p99s = [w["p99_ms"] for w in workers if w.get("p99_ms") is not None]
        errors = sum(w.get("errors", 0) for w in workers)
        disconnects = sum(w.get("disconnects", 0) for w in workers)
        phase = f"{elapsed:5.1f}/{settings.duration_s:.0f}s" if elapsed is not None else "setup"
        parts = [
            f"[{settings.scenario} {target}] {phase}",
            f"conn {connected:,}",
            rates.strip() or None,
            f"p99 {max(p99s):.1f}ms" if p99s and measuring else None,
            f"err {errors} disc {disconnects}" if errors or disconnects else None,
            f"client cpu {client_cpu * 100:.0f}%" + (" SATURATED" if saturated else ""),
            f"server cpu {server_cpu * 100:.0f}%" if server_cpu is not None else None,
            f"server core {server_core * 100:.0f}%" if server_core is not None else None,
        ]
        recon = sum(w.get("reconnected", 0) for w in workers)
        if recon:
            parts.append(f"reconnected {recon:,}")
        line = " | ".join(p for p in parts if p)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
            self._dirty = True
        elif now - self._last_plain >= _PLAIN_EVERY_S:
            self._last_plain = now
            self.stream.write(line + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self._dirty:
            self.stream.write("\n")
            self.stream.flush()
            self._dirty = False
        self._last_totals = None

    def message(self, text: str) -> None:
        self.done()
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()
