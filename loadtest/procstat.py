"""What ``/proc`` says about a process: CPU seconds, RSS, who listens on a port.

Server cost is read from the kernel rather than from the server's own metrics so that
any server (ours, the baseline, a peer) is measured the same way: utime + stime from
``/proc/PID/stat`` and VmRSS from ``/proc/PID/status``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Interpreter",
    "ProcSample",
    "alive",
    "cpu_seconds",
    "cpu_ticks",
    "cpu_times",
    "discover_listeners",
    "interpreter",
    "interpreters",
    "machine_busy_seconds",
    "machine_steal_seconds",
    "rss_kib",
    "sample",
    "with_descendants",
]

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_TCP_LISTEN = "0A"


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` in seconds; None if the process is gone."""
    times = cpu_times(pid)
    return None if times is None else times[0] + times[1]


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(utime, stime) of ``pid`` in seconds: its own code, and the kernel's work
    for it (system calls; on loopback also the receiver's TCP work, billed to
    the sender). None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / _CLK_TCK, int(fields[12]) / _CLK_TCK


def cpu_ticks(cpus: Iterable[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of the given CPUs since boot, from /proc/stat.

    Busy here includes irq and softirq time: on loopback, the receiving side's TCP
    work runs in softirq on the sending CPU and is billed to no process, so a server
    core can be saturated while the server process shows 60 %.
    """
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            fields = line.split()
            if fields[0] not in wanted:
                continue
            values = [int(v) for v in fields[1:9]]
            total += sum(values)
            busy += sum(values) - values[3] - values[4]  # minus idle and iowait
    return busy, total


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (everything but idle and iowait).

    Minus what the run's own processes used, this is what others used meanwhile: a
    test suite running beside a benchmark shows up here, not as a mystery spike.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    # user nice system idle iowait irq softirq steal. Only user, nice and system:
    # process CPU (utime/stime) is made of those, while irq and softirq time (the
    # loopback's TCP work, much of it caused by this very run) belongs to no process.
    busy = sum(int(fields[i]) for i in (0, 1, 2))
    return busy / _CLK_TCK


def machine_steal_seconds() -> float:
    """CPU seconds the hypervisor gave to other guests while this one's CPUs had
    work ("steal", /proc/stat), all CPUs, since boot.

    On a shared host this is the noise no process list shows: a run whose
    figures drift from the last one's with nothing else running here often had
    its CPUs taken away.
    """
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    return int(fields[7]) / _CLK_TCK if len(fields) > 7 else 0.0


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds and RSS summed over a set of processes at one moment."""

    cpu_s: float
    rss_kib: int
    alive: int
    system_s: float = 0.0  # the part of cpu_s spent in the kernel (stime)


def sample(pids: Iterable[int]) -> ProcSample:
    cpu = system = 0.0
    rss = 0
    alive = 0
    for pid in pids:
        times = cpu_times(pid)
        r = rss_kib(pid)
        if times is None or r is None:
            continue
        cpu += times[0] + times[1]
        system += times[1]
        rss += r
        alive += 1
    return ProcSample(cpu, rss, alive, system)


@dataclass(frozen=True, slots=True)
class Interpreter:
    """The executable a process runs, and the libpython shared library it has
    loaded: None when there is none (libpython linked into the executable, as in
    Debian's ``/usr/bin/python3.11``, or no Python at all). The same Python costs
    a server measurably more CPU through a shared libpython built without
    ``--enable-optimizations`` (pyenv's default build): docs/benchmarks.md,
    § Fifteenth run."""

    exe: str
    libpython: str | None


def interpreter(pid: int) -> Interpreter | None:
    """What ``pid`` runs (see :class:`Interpreter`); None if it is gone or not
    ours to read."""
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/maps", "rb") as f:
            maps = f.read()
    except OSError:
        return None
    libpython = None
    for line in maps.splitlines():
        # address perms offset dev inode path: the path is the sixth field.
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and os.path.basename(fields[5]).startswith(b"libpython"):
            libpython = fields[5].decode(errors="replace")
            break
    return Interpreter(exe, libpython)


def interpreters(pids: Iterable[int]) -> list[Interpreter]:
    """The distinct :func:`interpreter` of ``pids`` (workers of one server run
    the same one), in the order first seen; gone processes are left out."""
    found: list[Interpreter] = []
    for pid in pids:
        one = interpreter(pid)
        if one is not None and one not in found:
            found.append(one)
    return found


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f, None)  # header
                for line in f:
                    cols = line.split()
                    if len(cols) < 10 or cols[3] != _TCP_LISTEN:
                        continue
                    if int(cols[1].rsplit(":", 1)[1], 16) == port:
                        inodes.add(cols[9])
        except OSError:
            continue
    return inodes


def discover_listeners(port: int) -> list[int]:
    """PIDs of the processes holding a listening TCP socket on ``port``.

    Reads ``/proc/net/tcp{,6}`` for the socket inodes, then finds which processes have
    those inodes among their file descriptors. Needs permission to read other
    processes' ``fd`` directories (same user, or root).
    """
    inodes = _listening_inodes(port)
    if not inodes:
        return []
    targets = {f"socket:[{inode}]" for inode in inodes}
    found: list[int] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"{fd_dir}/{fd}") in targets:
                    found.append(int(entry))
                    break
            except OSError:
                continue
    return sorted(found)


def with_descendants(pids: Iterable[int]) -> list[int]:
    """``pids`` and all their descendants: a server that forks workers (``serve
    --workers N``) is measured whole, not just its supervisor."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        ppid = int(raw[raw.rfind(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.append(pid)
            todo.extend(children.get(pid, ()))
    return sorted(found)


def alive(pids: Iterable[int]) -> list[int]:
    """Those of ``pids`` still running (zombies count as gone)."""
    running = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        state = raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3]
        if state != b"Z":
            running.append(pid)
    return running


def listening_pids(port: int, pids: Iterable[int]) -> set[int]:
    """Those of ``pids`` holding a listening TCP socket on ``port``: how the tool
    tells that a successor started on a shared (SO_REUSEPORT) port is listening,
    which its ``/readyz`` cannot (the old process may answer it)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local address "ADDR:PORT" in hex; state 0A is LISTEN.
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    found = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"{fd_dir}/{fd}") in inodes:
                    found.add(pid)
                    break
    return found
