"""Latency histograms and delivery bitmaps: what workers record and send back.

A run can deliver tens of millions of messages, so workers never keep one sample per
message: latencies go into a log-linear histogram (exact below 128 µs, then 64 buckets
per power of two, so any percentile is within 1.6 %), and which publications a
subscriber received is one bit per publication sequence number.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "Histogram",
    "bitmap_count",
    "bitmap_missing",
    "bitmap_or",
    "bitmap_set",
    "bucket_index",
    "bucket_low_us",
]

_SUB_BITS = 6
_SUB = 1 << _SUB_BITS  # 64 buckets per power of two
_LINEAR = _SUB * 2  # values below this are their own bucket


def bucket_index(us: int) -> int:
    """Histogram bucket of a latency in whole microseconds (negative counts as 0)."""
    if us < _LINEAR:
        return us if us > 0 else 0
    shift = us.bit_length() - (_SUB_BITS + 1)
    return _LINEAR + (shift - 1) * _SUB + ((us >> shift) - _SUB)


def bucket_low_us(index: int) -> int:
    """The smallest latency (µs) that falls in bucket ``index``."""
    if index < _LINEAR:
        return index
    shift, sub = divmod(index - _LINEAR, _SUB)
    return (sub + _SUB) << (shift + 1)


def _bucket_mid_us(index: int) -> float:
    low = bucket_low_us(index)
    high = bucket_low_us(index + 1)
    return (low + high - 1) / 2 if high - low > 1 else float(low)


class Histogram:
    """Sparse bucket → count map with exact count, sum and max."""

    __slots__ = ("buckets", "count", "max_us", "sum_us")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.sum_us = 0
        self.max_us = 0

    def add(self, us: int) -> None:
        index = bucket_index(us)
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.sum_us += us
        if us > self.max_us:
            self.max_us = us

    def merge(self, other: Histogram) -> None:
        buckets = self.buckets
        for index, n in other.buckets.items():
            buckets[index] = buckets.get(index, 0) + n
        self.count += other.count
        self.sum_us += other.sum_us
        self.max_us = max(self.max_us, other.max_us)

    def percentile_us(self, q: float) -> float:
        """Value at quantile ``q`` (0-1): the middle of its bucket, capped at the max."""
        if self.count == 0:
            return 0.0
        rank = q * self.count
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(_bucket_mid_us(index), float(self.max_us))
        return float(self.max_us)

    def summary_ms(self) -> dict[str, float | int]:
        """count, mean, p50, p95, p99, p999, max, in milliseconds."""

        def ms(us: float) -> float:
            return round(us / 1000.0, 3)

        return {
            "count": self.count,
            "mean": ms(self.sum_us / self.count) if self.count else 0.0,
            "p50": ms(self.percentile_us(0.50)),
            "p95": ms(self.percentile_us(0.95)),
            "p99": ms(self.percentile_us(0.99)),
            "p999": ms(self.percentile_us(0.999)),
            "max": ms(self.max_us),
        }

    def to_wire(self) -> tuple[dict[int, int], int, int, int]:
        return self.buckets, self.count, self.sum_us, self.max_us

    @classmethod
    def from_wire(cls, wire: tuple[Mapping[int, int], int, int, int]) -> Histogram:
        hist = cls()
        buckets, hist.count, hist.sum_us, hist.max_us = wire
        hist.buckets = dict(buckets)
        return hist

    @classmethod
    def merged(cls, parts: Iterable[Histogram]) -> Histogram:
        out = cls()
        for part in parts:
            out.merge(part)
        return out

    def rows(self) -> list[tuple[int, int, int]]:
        """(bucket low bound µs, high bound µs (exclusive), count), ascending: for
        plots and the JSON report."""
        return [
            (bucket_low_us(i), bucket_low_us(i + 1), self.buckets[i]) for i in sorted(self.buckets)
        ]


# --- bitmaps: bit n set = publication with sequence number n seen ------------------------


def bitmap_set(bitmap: bytearray, seq: int) -> bool:
    """Set bit ``seq`` (growing the bitmap); True if it was already set (a duplicate)."""
    byte, bit = seq >> 3, 1 << (seq & 7)
    if byte >= len(bitmap):
        bitmap.extend(bytes(byte - len(bitmap) + 256))
    old = bitmap[byte]
    if old & bit:
        return True
    bitmap[byte] = old | bit
    return False


def bitmap_or(into: bytearray, other: bytes) -> None:
    if len(other) > len(into):
        into.extend(bytes(len(other) - len(into)))
    for i, value in enumerate(other):
        if value:
            into[i] |= value


def bitmap_count(bitmap: bytes | bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()


def bitmap_missing(expected: bytes | bytearray, received: bytes | bytearray) -> int:
    """How many bits of ``expected`` are not set in ``received``."""
    want = int.from_bytes(expected, "little")
    got = int.from_bytes(received, "little")
    return (want & ~got).bit_count()
