"""Small value types shared across the core."""

from __future__ import annotations

from typing import TypeAlias

__all__ = ["JSON", "JSONObject"]

# A decoded JSON value (what orjson.loads returns).
JSON: TypeAlias = "dict[str, JSON] | list[JSON] | str | int | float | bool | None"
JSONObject: TypeAlias = "dict[str, JSON]"
