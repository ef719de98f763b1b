"""How a per-item script's items are split into Redis calls (in_batches)."""

from __future__ import annotations

from signaling.state.redis import in_batches


def test_batches_bound_their_length_and_keep_the_order() -> None:
    assert in_batches(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert in_batches([], 3) == []


def test_batches_hold_values_of_one_slot_each() -> None:
    values = ["a1", "b1", "a2", "b2", "a3"]
    assert in_batches(values, 2, slot_of=lambda v: ord(v[0])) == [
        ["a1", "a2"],
        ["a3"],
        ["b1", "b2"],
    ]


def test_weighted_batches_bound_the_sum_of_their_weights() -> None:
    # A presence refresh's items: one per channel, weighing its entries.
    weights = {"x": 40, "y": 40, "z": 30, "big": 250, "w": 1}
    batches = in_batches(["x", "y", "z", "big", "w"], 100, weight=weights.__getitem__)
    assert batches == [["x", "y"], ["z"], ["big"], ["w"]]  # the heavy one alone


def test_weighted_batches_still_keep_to_one_slot() -> None:
    values = ["a1", "b1", "a2"]
    batches = in_batches(values, 10, slot_of=lambda v: ord(v[0]), weight=lambda v: 6)
    assert batches == [["a1"], ["a2"], ["b1"]]
