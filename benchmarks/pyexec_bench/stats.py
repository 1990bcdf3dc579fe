"""Percentiles, summaries and bounded loops.

Usage::

    summary = summarize([9.8, 10.1, 12.0])          # n, p50, p99, mean, min, max
    for _ in bounded(count=200, seconds=30): ...    # stops at whichever comes first
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks (numpy's default)."""
    if not samples:
        raise ValueError("percentile of no samples")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, not {q}")
    ordered = sorted(samples)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    n: int
    p50: float
    p99: float
    mean: float
    min: float
    max: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def summarize(samples: Sequence[float]) -> Summary:
    return Summary(
        n=len(samples),
        p50=percentile(samples, 50),
        p99=percentile(samples, 99),
        mean=sum(samples) / len(samples),
        min=min(samples),
        max=max(samples),
    )


def bounded(count: int, seconds: float) -> Iterator[int]:
    """Indices 0.. until ``count`` iterations or ``seconds`` have passed (at least one)."""
    deadline = time.monotonic() + seconds
    for i in range(count):
        if i and time.monotonic() >= deadline:
            return
        yield i


def ratio(value: float | None, base: float | None) -> float | None:
    if value is None or not base:
        return None
    return value / base
