"""Paired comparison of two methods over seeds: mean difference, 95% CI, verdict.

Runs on the same data and split per seed are paired, so the seed-to-seed variation
that both share (which patients land in the test split) cancels in the difference.
The interval is Student's t on the paired differences.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["PairedComparison", "paired_comparison", "t_quantile_975"]

# 97.5% quantiles of Student's t, df = 1..30
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def t_quantile_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (two-sided 95%).

    Args:
        df: degrees of freedom, at least 1.

    Examples:
        >>> t_quantile_975(4), round(t_quantile_975(1000), 3)
        (2.776, 1.962)
    """
    if df < 1:
        raise ValueError(f"df must be at least 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion around the normal quantile
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B on one metric over ``n`` paired seeds.

    Attributes:
        n: number of pairs (seeds).
        mean_a: mean of method A's values.
        mean_b: mean of method B's values.
        difference: mean of the paired differences A - B.
        ci_low: lower end of its 95% confidence interval.
        ci_high: upper end of its 95% confidence interval.

    Examples:
        >>> c = PairedComparison(5, 0.80, 0.78, 0.02, -0.01, 0.05)
        >>> c.verdict, c.to_dict()["verdict"]
        ('no significant difference', 'no significant difference')
    """

    n: int
    mean_a: float
    mean_b: float
    difference: float  #: mean of A - B
    ci_low: float
    ci_high: float

    @property
    def verdict(self) -> str:
        """ "better" / "worse" (A than B) when the 95% CI excludes 0, else no difference."""
        if self.ci_low > 0:
            return "better"
        if self.ci_high < 0:
            return "worse"
        return "no significant difference"

    def to_dict(self) -> dict:
        return {**asdict(self), "verdict": self.verdict}


def paired_comparison(a: Sequence[float], b: Sequence[float]) -> PairedComparison:
    """Mean difference ``a - b`` over paired values and its 95% t interval.

    Args:
        a: method A's values, one per seed.
        b: method B's values on the same seeds, in the same order.

    Examples:
        >>> c = paired_comparison([0.80, 0.82, 0.79], [0.70, 0.71, 0.72])
        >>> round(c.difference, 3), c.verdict
        (0.093, 'better')
        >>> paired_comparison([0.8, 0.7, 0.9], [0.75, 0.8, 0.8]).verdict
        'no significant difference'
    """
    if len(a) != len(b):
        raise ValueError(f"a and b must be paired (same length), got {len(a)} and {len(b)}")
    if len(a) < 2:
        raise ValueError(f"a paired comparison needs at least 2 pairs, got {len(a)}")
    if not all(math.isfinite(x) for x in (*a, *b)):
        raise ValueError("a and b must hold finite values")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return PairedComparison(n, sum(a) / n, sum(b) / n, mean, mean - half, mean + half)
