"""What the load tool reads from /proc about a process's CPU (loadtest/procstat.py),
the kernel's share of it that reports carry (loadtest/aggregate.py), and which
interpreter build a server runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from loadtest.aggregate import kernel_percent
from loadtest.procstat import (
    ProcSample,
    cpu_seconds,
    cpu_times,
    interpreter,
    interpreters,
    sample,
)


def _own_times() -> tuple[float, float]:
    times = cpu_times(os.getpid())
    assert times is not None
    return times


def test_user_and_kernel_time_are_told_apart() -> None:
    # Pure Python arithmetic is user time; write() system calls are kernel time.
    # Each loop runs until the kernel's counter (10 ms ticks) has moved, at most 5 s
    # of the process's CPU, so the test waits for the tick, not for a speed.
    user0, system0 = _own_times()
    limit = time.process_time() + 5.0
    while _own_times()[0] - user0 < 0.1 and time.process_time() < limit:
        sum(i * i for i in range(20_000))
    user1, system1 = _own_times()
    assert user1 - user0 >= 0.1
    assert system1 - system0 < user1 - user0

    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        limit = time.process_time() + 5.0
        while _own_times()[1] - system1 < 0.05 and time.process_time() < limit:
            for _ in range(2_000):
                os.write(fd, b"x" * 4096)
    finally:
        os.close(fd)
    assert _own_times()[1] - system1 >= 0.05


def test_the_sample_carries_the_kernel_part_of_its_cpu() -> None:
    pid = os.getpid()
    got = sample([pid])
    user, system = _own_times()
    assert got.alive == 1
    assert 0 <= got.system_s <= got.cpu_s
    assert got.system_s <= system
    own = cpu_seconds(pid)
    assert own is not None and got.cpu_s <= own <= user + system + 0.02


def test_a_gone_process_reads_as_none_and_is_left_out_of_a_sample() -> None:
    # PID 2**22 + 1 is above the kernel's largest (pid_max is at most 2**22).
    assert cpu_times(2**22 + 1) is None
    assert sample([2**22 + 1]) == ProcSample(0.0, 0, 0, 0.0)


def test_kernel_percent_is_the_kernel_share_of_the_cpu_between_two_samples() -> None:
    start = ProcSample(cpu_s=10.0, rss_kib=0, alive=2, system_s=2.0)
    end = ProcSample(cpu_s=14.0, rss_kib=0, alive=2, system_s=3.0)
    assert kernel_percent(start, end) == pytest.approx(25.0)
    assert kernel_percent(start, start) is None


@pytest.fixture
def python_child() -> Iterator[subprocess.Popen[bytes]]:
    """A Python process of the interpreter running the tests, started and ended here."""
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdout.write('up\\n'); sys.stdout.flush(); "
         "sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert child.stdout is not None and child.stdout.readline() == b"up\n"
    with child:  # closes the pipes
        yield child
        child.kill()


def _linked_libpython(executable: str) -> str | None:
    """The libpython ``ldd`` says ``executable`` needs, resolved; None if none:
    the dynamic linker's view, against which /proc's is checked."""
    ldd = shutil.which("ldd")
    assert ldd is not None, "ldd (libc-bin) is part of every Debian system"
    out = subprocess.run([ldd, executable], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        name, _, rest = line.strip().partition(" => ")
        if name.startswith("libpython"):
            return os.path.realpath(rest.split(" (")[0])
    return None


def test_the_interpreter_of_a_python_process_is_read_from_proc(
    python_child: subprocess.Popen[bytes],
) -> None:
    got = interpreter(python_child.pid)
    assert got is not None
    binary = os.path.realpath(sys.executable)
    assert got.exe == binary
    expected = _linked_libpython(binary)
    found = None if got.libpython is None else os.path.realpath(got.libpython)
    assert found == expected


def test_a_process_without_python_has_no_libpython() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        got = interpreter(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert got is not None
    assert got.exe == os.path.realpath(shutil.which("sleep") or "")
    assert got.libpython is None


def test_interpreters_are_listed_once_and_gone_processes_left_out(
    python_child: subprocess.Popen[bytes],
) -> None:
    assert interpreter(2**22 + 1) is None
    own = interpreter(os.getpid())
    child = interpreter(python_child.pid)
    assert own is not None and own == child  # the same binary and library
    assert interpreters([os.getpid(), 2**22 + 1, python_child.pid]) == [own]
