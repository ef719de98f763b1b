"""The machine speed probe of the load tool (loadtest/speed.py)."""

from __future__ import annotations

import os

from loadtest.speed import PIECE_ITERATIONS, SLOW_MOMENTS, Pieces, probe_speed


def test_probe_times_the_work_on_the_given_cpu_and_gives_the_affinity_back() -> None:
    before = os.sched_getaffinity(0)
    cpu = min(before)
    probe = probe_speed([cpu])
    # Positive times, the fastest round no slower than the median one. (How
    # fast is not asserted: that is what the probe is there to measure.)
    assert 0 < probe.best_us <= probe.median_us
    pieces = probe.pieces
    assert 0 < pieces.median_us <= pieces.p99_us <= pieces.p999_us <= pieces.max_us
    assert pieces.p999_over_median >= 1.0
    assert probe.to_json() == {
        "best_us": probe.best_us,
        "median_us": probe.median_us,
        "pieces": pieces.to_json(),
    }
    assert os.sched_getaffinity(0) == before


def test_pieces_add_up_to_the_rounds() -> None:
    # A piece is PIECE_ITERATIONS iterations, so the median piece is about that
    # many times the median iteration (the same work, timed in smaller slices).
    probe = probe_speed()
    per_iteration_in_pieces = probe.pieces.median_us / PIECE_ITERATIONS
    assert 0.5 * probe.median_us < per_iteration_in_pieces < 2 * probe.median_us, probe


def test_slow_moments_are_the_slowest_pieces_over_the_median() -> None:
    pieces = Pieces(median_us=50.0, p99_us=90.0, p999_us=600.0, max_us=900.0)
    assert pieces.p999_over_median == 12.0
    assert pieces.to_json()["p999_over_median"] == 12.0
    note = pieces.slow_moments_note()
    assert note is not None and "12x their median" in note
    assert Pieces(50.0, 60.0, 50.0 * SLOW_MOMENTS - 5, 300.0).slow_moments_note() is None
    assert Pieces(50.0, 60.0, 50.0 * SLOW_MOMENTS, 300.0).slow_moments_note() is not None
