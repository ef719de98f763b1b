"""Small value types shared across the core."""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["JSON", "JSONObject", "compact"]

# A decoded JSON value (what orjson.loads returns).
JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"
JSONObject: TypeAlias = "dict[str, JSON]"


def compact(raw: bytes) -> bytes:
    """A right-sized copy of ``raw``, for bytes that are kept.

    orjson (3.13) builds every result in a 4 KiB buffer and hands it over
    without shrinking it, so each kept ``orjson.dumps`` result holds 4 KiB
    however short it is (measured with tracemalloc): a history of 100 short
    messages would cost 400 KiB. Transient results need no copy.
    """
    return memoryview(raw).tobytes()
