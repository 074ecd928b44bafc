"""Paired-ratio statistics shared by the benchmarks: the geometric mean of paired time ratios and its 95 % interval.

Timings on these shared machines drift 3-5x between runs, so every benchmark compares variants measured in the same
round and reports the interval of their ratio rather than absolute times.
"""

from __future__ import annotations

import math
import statistics

T95 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000}


def _t95(df: int) -> float:
    return T95[max(k for k in T95 if k <= df)] if df >= 1 else float("inf")


def ratio_interval(numerator, denominator):
    """Geometric-mean paired ratio and its 95 % confidence interval (Student t on log ratios)."""
    logs = [math.log(a / b) for a, b in zip(numerator, denominator)]
    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, float("inf")
    half = _t95(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)
