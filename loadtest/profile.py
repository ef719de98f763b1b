"""``--profile``: where the server's busy CPU goes, from py-spy's native stacks.

py-spy samples each server process's stacks, Python and native frames together,
during the measured phase. A server waiting for work sits in its event loop's
poll (``epoll_pwait``), and without ``--native`` py-spy counts that wait as
activity on this machine's interpreters: two earlier profiles read the loop's
waiting as "58 % of the time in the event loop's C code" (docs/benchmarks.md,
§ Eighteenth run). So the stacks are native, and a sample whose innermost frame
is a wait is left out: what remains is the time the server was busy.

The busy samples are summed three ways:

- by the innermost frame: our Python, a system call (``write()``, ``read()``...),
  or native code by binary (libc, the event loop, asyncio's C part...);
- by the loop callback that led there: the first frame of the server's own code
  (``signaling/``, ``handlers/``; the baseline's ``loadtest/``) below the frames
  every sample shares (start-up, the event loop's run), e.g. a command's task
  or a socket's ``data_received``;
- by our own function, for the time spent in it and not in what it called
  (native code and system calls included), and inclusive.

py-spy pauses the process for each native sample, so a profiled run's CPU and
latency figures are disturbed (the report says so): read its shares.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from loadtest.procstat import cpu_seconds

__all__ = [
    "OWN_CODE",
    "ProfileSummary",
    "ServerProfiler",
    "find_py_spy",
    "summarize",
]

# Frames of the code under test (py-spy prints paths relative to sys.path).
OWN_CODE = ("signaling/", "handlers/", "loadtest/")
# Innermost frames that mean "waiting", not working: the event loop's poll and
# the blocking calls of idle threads.
WAITS = frozenset(
    {
        "epoll_pwait",
        "epoll_pwait2",
        "epoll_wait",
        "poll",
        "ppoll",
        "select",
        "pselect",
        "pselect6",
        "nanosleep",
        "clock_nanosleep",
        "pthread_cond_wait",
        "pthread_cond_timedwait",
        "pthread_cond_clockwait",
        "sem_wait",
        "sem_timedwait",
        "sem_clockwait",
        "__futex_abstimed_wait_common",
        "__futex_abstimed_wait_common64",
        "accept",
        "accept4",
    }
)
# System calls named as such in the innermost-frame shares.
SYSCALLS = frozenset(
    {"write", "writev", "send", "sendto", "sendmsg", "read", "readv", "recv", "recvfrom", "recvmsg"}
)
DEFAULT_RATE_HZ = 200
TOP = 12  # rows kept per table in the report


# --- reading py-spy's raw output ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Frame:
    name: str
    where: str  # "file.py:12", "libc.so.6", "object.h:537", "?"

    @property
    def python(self) -> bool:
        path = self.where.rsplit(":", 1)[0]
        return path.endswith(".py") or path.startswith("<")

    @property
    def own(self) -> bool:
        return self.python and self.where.startswith(OWN_CODE)

    @property
    def function(self) -> str:
        """``name (file)``: the frame without its line number."""
        path = self.where.rsplit(":", 1)[0] if self.python else self.where
        return f"{self.name} ({path})"


def parse_frame(text: str) -> Frame:
    name, sep, rest = text.rpartition(" (")
    if not sep or not rest.endswith(")"):
        return Frame(text, "?")
    return Frame(name, rest[:-1])


def read_raw(lines: Iterable[str]) -> list[tuple[list[Frame], int]]:
    """py-spy's ``--format raw``: one stack per line, outermost frame first,
    frames separated by ``;``, then a space and the sample count."""
    stacks = []
    for line in lines:
        line = line.rstrip("\n")
        stack, sep, count = line.rpartition(" ")
        if not sep or not stack or not count.isdigit():
            continue
        stacks.append(([parse_frame(f) for f in stack.split(";")], int(count)))
    return stacks


# --- summing ---------------------------------------------------------------------------


@dataclass(slots=True)
class ProfileSummary:
    rate_hz: int
    pids: list[int]
    samples: int = 0
    waiting: int = 0
    busy: int = 0
    innermost: Counter[str] = field(default_factory=Counter)
    callbacks: Counter[str] = field(default_factory=Counter)
    own_self: Counter[str] = field(default_factory=Counter)
    own_inclusive: Counter[str] = field(default_factory=Counter)
    raw_dir: str | None = None
    errors: list[str] = field(default_factory=list)

    def share(self, count: int) -> float:
        return round(100.0 * count / self.busy, 1) if self.busy else 0.0

    def table(self, counter: Counter[str], top: int = TOP) -> list[list[Any]]:
        return [[label, self.share(n)] for label, n in counter.most_common(top)]

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": "py-spy --native",
            "rate_hz": self.rate_hz,
            "pids": self.pids,
            "samples": self.samples,
            "waiting_samples": self.waiting,
            "busy_samples": self.busy,
            # Shares of the busy samples, in percent.
            "innermost": self.table(self.innermost),
            "callbacks": self.table(self.callbacks),
            "own_self": self.table(self.own_self),
            "own_inclusive": self.table(self.own_inclusive),
            "raw_dir": self.raw_dir,
            "errors": self.errors,
        }


def summarize(
    per_process: Sequence[Sequence[tuple[list[Frame], int]]], rate_hz: int, pids: list[int]
) -> ProfileSummary:
    """Sum each process's stacks (see the module docstring)."""
    out = ProfileSummary(rate_hz, pids)
    for stacks in per_process:
        for frames, count in stacks:
            out.samples += count
            if not frames or frames[-1].name in WAITS:
                out.waiting += count
                continue
            out.busy += count
            out.innermost[_innermost_label(frames[-1])] += count
            entry = callback_entry(frames)
            if entry is None:
                out.callbacks[f"loop only: {frames[-1].name}"] += count
                continue
            out.callbacks[frames[entry].function] += count
            # Our frames from the callback on (not the start-up's, which every
            # sample shares).
            own = [f.function for f in frames[entry:] if f.own]
            if own:
                out.own_self[own[-1]] += count
            for function in set(own):
                out.own_inclusive[function] += count
    return out


def callback_entry(frames: Sequence[Frame]) -> int | None:
    """Where the first frame of our code that the event loop called sits: past the
    start-up (the first run of our frames: ``__main__``, the CLI, the server's
    run) and the loop's own frames after it (asyncio, uvloop, their C code).
    None when the sample is in the loop itself."""
    i, n = 0, len(frames)
    while i < n and not frames[i].own:  # the interpreter's start, runpy
        i += 1
    while i < n and frames[i].own:  # our start-up
        i += 1
    while i < n and not frames[i].own:  # the event loop
        i += 1
    return i if i < n else None


def _innermost_label(frame: Frame) -> str:
    if frame.python:
        return "Python (own code)" if frame.own else "Python (libraries)"
    if frame.name in SYSCALLS:
        return f"{frame.name}()"
    where = frame.where.rsplit(":", 1)[0]
    if ".so" in where:
        where = where.split(".so")[0]
    return f"native: {os.path.basename(where).split('.cpython')[0]}"


# --- running py-spy --------------------------------------------------------------------


def find_py_spy() -> str | None:
    """py-spy next to this interpreter (a venv's bin) or on PATH."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


class ServerProfiler:
    """One ``py-spy record --native`` per server process, from :meth:`start`
    until :meth:`finish` interrupts them (py-spy writes its stacks on SIGINT)."""

    def __init__(self, executable: str, pids: Sequence[int], rate_hz: int = DEFAULT_RATE_HZ):
        self.executable = executable
        self.pids = list(pids)
        self.rate_hz = rate_hz
        self.dir = Path(tempfile.mkdtemp(prefix="loadtest-profile-"))
        self._procs: list[tuple[int, subprocess.Popen[bytes], IO[bytes]]] = []
        # py-spy's own CPU seconds until finish(): the tool's, not other processes'.
        self.cpu_s = 0.0

    def _out(self, pid: int) -> Path:
        return self.dir / f"stacks-{pid}.txt"

    def start(self) -> None:
        for pid in self.pids:
            log = open(self.dir / f"py-spy-{pid}.log", "wb")  # noqa: SIM115 - closed in finish()
            argv = [
                self.executable,
                "record",
                "--pid",
                str(pid),
                "--native",
                "--format",
                "raw",
                "--rate",
                str(self.rate_hz),
                "--output",
                str(self._out(pid)),
            ]
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self._procs.append((pid, proc, log))

    def finish(self, timeout_s: float = 15.0) -> ProfileSummary:
        """Stop sampling, wait for py-spy to write, and sum what it wrote."""
        self.cpu_s = sum(cpu_seconds(proc.pid) or 0.0 for _, proc, _ in self._procs)
        for _, proc, _ in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
        per_process = []
        errors = []
        for pid, proc, log in self._procs:
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                errors.append(f"py-spy on {pid} did not stop in {timeout_s:.0f}s")
            log.close()
            out = self._out(pid)
            if out.is_file() and out.stat().st_size:
                with out.open(encoding="utf-8", errors="replace") as f:
                    per_process.append(read_raw(f))
            else:
                errors.append(f"py-spy on {pid} wrote nothing: {self._log_tail(pid)}")
        summary = summarize(per_process, self.rate_hz, self.pids)
        summary.raw_dir = str(self.dir)
        summary.errors = errors
        return summary

    def abort(self) -> None:
        for _, proc, log in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()

    def _log_tail(self, pid: int) -> str:
        path = self.dir / f"py-spy-{pid}.log"
        try:
            lines = [x for x in path.read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return "no log"
        # Its first error line says why (py-spy 0.4.3: "Failed to find python version
        # from target process" on this machine's interpreters; 0.4.1-0.4.2 attach).
        errors = [x for x in lines if x.startswith("Error")]
        return (errors or lines or ["no output"])[0][:200]
