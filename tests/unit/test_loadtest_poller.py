"""The load tool's ``--client-poll-us`` poller: while it runs, the worker's loop
sleeps between iterations instead of waiting in epoll for the server's writes."""

from __future__ import annotations

import asyncio
import resource

from loadtest.worker import LoopPoller


def _sleeps() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


async def test_the_loop_sleeps_in_short_steps_while_polled_and_not_after() -> None:
    before = _sleeps()
    await asyncio.sleep(0.2)
    waiting = _sleeps() - before  # one wait in epoll (a few with other threads' noise)

    poller = LoopPoller(1000)
    before = _sleeps()
    await asyncio.sleep(0.2)
    polled = _sleeps() - before
    poller.stop()

    before = _sleeps()
    await asyncio.sleep(0.2)
    after = _sleeps() - before

    # About one sleep per millisecond while polled: 200 at most, fewer when the
    # machine is busy; waiting in epoll for 0.2 s takes one.
    assert polled >= 40, (waiting, polled)
    assert waiting < 10 and after < 10, (waiting, polled, after)


async def test_timers_and_callbacks_still_run_while_polled() -> None:
    poller = LoopPoller(500)
    loop = asyncio.get_running_loop()
    fired = loop.create_future()
    loop.call_later(0.05, fired.set_result, "timer")
    assert await asyncio.wait_for(fired, 2.0) == "timer"
    poller.stop()
