"""Identifiers: random client ids are version-4 UUIDs, all distinct, across
refills of the random buffer; unique ids never repeat."""

from __future__ import annotations

import uuid

from signaling.ids import random_uuid, unique_id


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
