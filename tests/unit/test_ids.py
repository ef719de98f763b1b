"""Identifiers: random client ids are version-4 UUIDs, all distinct, across
refills of the random buffer; unique ids never repeat."""

from __future__ import annotations

import os
import uuid
from collections import Counter

import pytest

from signaling.ids import random_below, random_uuid, random_uuid_hex, unique_id


def test_random_uuid_is_a_version_4_uuid_and_never_repeats() -> None:
    # 2,000 ids: several refills of the 4 KiB buffer (256 ids each).
    ids = [random_uuid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_random_uuid_uses_every_random_byte_it_is_given() -> None:
    # Each id holds 122 random bits: over many ids every hex digit of the
    # random positions takes many values (a constant part would show).
    ids = [random_uuid().replace("-", "") for _ in range(512)]
    for position in range(32):
        if position in (12, 16):  # version digit, variant digit
            continue
        assert len({text[position] for text in ids}) > 8, position


def test_unique_id_never_repeats() -> None:
    ids = [unique_id() for _ in range(10000)]
    assert len(set(ids)) == len(ids)


def test_random_uuid_hex_is_a_version_4_uuid_without_dashes() -> None:
    ids = [random_uuid_hex() for _ in range(600)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(hex=text)
        assert parsed.hex == text
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("n", [1, 2, 3, 7, 2**31 - 1, 2**32])
def test_random_below_stays_in_range(n: int) -> None:
    assert all(0 <= random_below(n) < n for _ in range(500))


def test_random_below_takes_every_value_about_as_often() -> None:
    # 3 does not divide 2**32: without the redraw the low values would be
    # favoured, by too little to see here; what this checks is that every
    # value comes (a constant or a stuck byte would show).
    counts = Counter(random_below(3) for _ in range(3000))
    assert sorted(counts) == [0, 1, 2]
    assert min(counts.values()) > 800, counts


@pytest.mark.parametrize("n", [0, -1, 2**32 + 1])
def test_random_below_refuses_an_empty_or_too_wide_range(n: int) -> None:
    with pytest.raises(ValueError):
        random_below(n)


def test_a_forked_child_does_not_reuse_the_parents_random_bytes() -> None:
    random_uuid()  # the parent's buffer now holds unused bytes
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id, then leave at once
        os.write(write, random_uuid().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child != random_uuid()
