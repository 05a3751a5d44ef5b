"""
Statistics of measured latencies: one percentile, one summary line.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """
    The C{q} quantile (0 < C{q} <= 1) of C{values} by the nearest-rank
    method: the smallest value that at least C{q} of the values are less
    than or equal to, C{sorted(values)[ceil(q * n) - 1]}.

    It is always a value that was measured (no interpolation), and never
    below the true share: "p95 = 12 ms" means at least 95 % of the
    values were 12 ms or less.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], not {q!r}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(latencies: Sequence[float], quantiles: Iterable[float] = (0.5, 0.95)) -> str:
    """
    C{n=20 p50=1.20ms p95=3.40ms max=5.00ms}: a line for a report or an
    assertion message (the bounds themselves are checked on C{max} or on
    each value, never on this line).
    """
    if not latencies:
        return "n=0"
    parts = [f"n={len(latencies)}"]
    parts += [f"p{q * 100:g}={percentile(latencies, q):.2f}ms" for q in quantiles]
    parts.append(f"max={max(latencies):.2f}ms")
    return " ".join(parts)
