"""Latency percentiles, as the daemon's ``stats`` and ``runnerd bench`` both report them.

One definition, so the bench's table and the daemon's stats mean the same
thing by p95: the sample at that rank, no interpolation.
"""

from __future__ import annotations


def percentiles_ms(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 of *values* (seconds), in ms."""
    if not values:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}
