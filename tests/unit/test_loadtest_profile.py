"""loadtest/profile.py: py-spy's native stacks summed into where the server's
busy time goes. Synthetic stacks in py-spy's raw format (the real tool on a
real server: tests/integration/test_loadtest_smoke.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from loadtest.profile import (
    Frame,
    callback_entry,
    find_py_spy,
    parse_frame,
    read_raw,
    summarize,
)

# Frames every stack of a server process starts with: the interpreter, runpy,
# our start-up, then the event loop (uvloop and its C code).
START = [
    "_start (python3.11)",
    "<module> (<frozen runpy>:198)",
    "<module> (signaling/__main__.py:7)",
    "main (signaling/cli.py:73)",
    "run_single (signaling/cli.py:118)",
    "run (asyncio/runners.py:118)",
    "run (uvloop/__init__.py:92)",
    "uv_run (core.c:460)",
]


def line(frames: list[str], count: int) -> str:
    return ";".join(START + frames) + f" {count}\n"


RAW = [
    # The loop waiting for work: left out.
    line(["uv__io_poll (linux.c:1370)", "epoll_pwait (libc.so.6)"], 50),
    # A publish command's task, in the write() of its reply.
    line(
        [
            "Handle__run (loop.c:5)",
            "task_step (_asynciomodule.c:2700)",
            "_run_commands (signaling/session.py:389)",
            "_dispatch (signaling/session.py:443)",
            "release (signaling/transport.py:429)",
            "write (libc.so.6)",
        ],
        6,
    ),
    # The same task, in our Python.
    line(
        [
            "Handle__run (loop.c:5)",
            "_run_commands (signaling/session.py:389)",
            "_dispatch (signaling/session.py:440)",
        ],
        2,
    ),
    # A socket's data_received, in a library's Python under ours.
    line(
        [
            "uv__io_poll (linux.c:1370)",
            "data_received (signaling/transport.py:621)",
            "loads (json/__init__.py:346)",
        ],
        1,
    ),
    # The loop's own work (reading a socket): no frame of ours.
    line(["uv__io_poll (linux.c:1370)", "read (libc.so.6)"], 1),
    "not a stack line\n",
    "\n",
]


def test_frames_are_parsed_with_their_place() -> None:
    frame = parse_frame("_dispatch (signaling/session.py:440)")
    assert frame == Frame("_dispatch", "signaling/session.py:440")
    assert frame.python and frame.own and frame.function == "_dispatch (signaling/session.py)"
    native = parse_frame("write (libc.so.6)")
    assert not native.python and not native.own and native.function == "write (libc.so.6)"
    frozen = parse_frame("<module> (<frozen runpy>:198)")
    assert frozen.python and not frozen.own
    assert parse_frame("0x7f917fde424a") == Frame("0x7f917fde424a", "?")


def test_malformed_lines_are_skipped() -> None:
    stacks = read_raw(RAW)
    assert [count for _, count in stacks] == [50, 6, 2, 1, 1]


def test_waits_are_left_out_and_the_busy_samples_summed_three_ways() -> None:
    summary = summarize([read_raw(RAW)], rate_hz=200, pids=[42])
    assert (summary.samples, summary.waiting, summary.busy) == (60, 50, 10)
    out = summary.to_json()
    assert out["innermost"] == [
        ["write()", 60.0],
        ["Python (own code)", 20.0],
        ["Python (libraries)", 10.0],
        ["read()", 10.0],
    ]
    # The start-up frames of ours that every sample shares are not a callback.
    assert out["callbacks"] == [
        ["_run_commands (signaling/session.py)", 80.0],
        ["data_received (signaling/transport.py)", 10.0],
        ["loop only: read", 10.0],
    ]
    # Our innermost frame, whatever native code or library it was in.
    assert out["own_self"] == [
        ["release (signaling/transport.py)", 60.0],
        ["_dispatch (signaling/session.py)", 20.0],
        ["data_received (signaling/transport.py)", 10.0],
    ]
    inclusive = dict(out["own_inclusive"])
    assert inclusive["_run_commands (signaling/session.py)"] == 80.0
    assert inclusive["_dispatch (signaling/session.py)"] == 80.0
    assert "run_single (signaling/cli.py)" not in inclusive  # start-up, in every sample


def test_processes_are_summed_together() -> None:
    one = read_raw(RAW)
    summary = summarize([one, one], rate_hz=200, pids=[1, 2])
    assert (summary.samples, summary.busy) == (120, 20)
    assert summary.to_json()["callbacks"][0] == ["_run_commands (signaling/session.py)", 80.0]


@pytest.mark.parametrize(
    ("frames", "entry"),
    [
        (["a (x.c:1)", "main (signaling/cli.py:1)", "run (asyncio/runners.py:1)"], None),
        (["main (signaling/cli.py:1)", "run (uvloop/x.py:1)", "cb (handlers/chat/m.py:3)"], 2),
        # A worker process: its start-up runs through the supervisor's code first.
        (
            [
                "main (signaling/cli.py:1)",
                "serve (signaling/workers.py:9)",
                "run (asyncio/runners.py:1)",
                "Handle__run (loop.c:5)",
                "flush (signaling/hub.py:278)",
                "_write (signaling/hub.py:284)",
            ],
            4,
        ),
    ],
)
def test_the_callback_is_our_first_frame_past_start_up_and_loop(
    frames: list[str], entry: int | None
) -> None:
    assert callback_entry([parse_frame(f) for f in frames]) == entry


def test_py_spy_is_found_beside_the_interpreter_or_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    venv_bin, elsewhere = tmp_path / "bin", tmp_path / "elsewhere"
    venv_bin.mkdir()
    elsewhere.mkdir()
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(elsewhere))
    assert find_py_spy() is None  # --profile is then refused (loadtest/cli.py)
    on_path = elsewhere / "py-spy"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert find_py_spy() == str(on_path)
    beside = venv_bin / "py-spy"
    beside.write_text("#!/bin/sh\n")
    beside.chmod(0o755)
    assert find_py_spy() == str(beside)
