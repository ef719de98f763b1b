"""The machine speed probe of the load tool (loadtest/speed.py)."""

from __future__ import annotations

import os

from loadtest.speed import probe_speed


def test_probe_times_the_work_on_the_given_cpu_and_gives_the_affinity_back() -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    probe = probe_speed([cpu])
    # Positive times, the fastest round no slower than the median one. (How
    # fast is not asserted: that is what the probe is there to measure.)
    assert 0 < probe.best_us <= probe.median_us
    assert probe.to_json() == {"best_us": probe.best_us, "median_us": probe.median_us}
    assert os.sched_getaffinity(0) == before
