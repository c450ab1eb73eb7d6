"""The statistics of a seed-aware comparison: what several seeds of one configuration say, whether
two configurations differ by more than seed noise, and which are worth their cost.

- `summarize`: mean, sample standard deviation and the Student-t confidence interval of the mean.
- `welch`: Welch's t-test (unequal variances: a wide network's accuracy need not vary as a small
  one's does) of a configuration against the baseline, with the interval of the difference.
- `adjust`: Benjamini-Hochberg adjusted p-values: a zoo tests several models against one baseline,
  and at p < 0.05 one in twenty would "win" by chance alone.
- `pareto`: the configurations no other one beats on accuracy at no more cost.

The t quantiles, the test and the adjustment are SciPy's; tests/test_stats.py pins them against
NumPy arithmetic and a simulation of the intervals' coverage.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95  # of every interval
ALPHA = 0.05       # a difference is called real when its adjusted p-value is below this


@dataclass(frozen=True)
class Summary:
    """n values of one metric over seeds. With one value there is no spread to estimate: std and
    the interval are None, never a made-up zero."""

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None


def _scipy():
    """scipy.stats, imported at first use (NumPy too, below): they take a second, which `cnnlab
    compare --help` should not wait for."""
    from scipy import stats

    return stats


def summarize(values: Sequence[float], confidence: float = CONFIDENCE) -> Summary:
    import numpy as np

    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values to summarize")
    mean = float(x.mean())
    if x.size == 1:
        return Summary(1, mean, None, None, None)
    std = float(x.std(ddof=1))
    half = float(_scipy().t.ppf((1 + confidence) / 2, x.size - 1)) * std / math.sqrt(x.size)
    return Summary(int(x.size), mean, std, mean - half, mean + half)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b), its confidence interval and Welch's two-sided p-value."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float


def welch(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference | None:
    """Welch's t-test of a against b; None when either has fewer than two values (no spread, no test).

    Two groups without any spread (every seed the same accuracy, as on data too easy to miss)
    differ surely if their means differ and not at all otherwise: p 0 or 1, where the t statistic
    would divide zero by zero."""
    import numpy as np

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.size < 2 or y.size < 2:
        return None
    diff = float(x.mean() - y.mean())
    if x.std() == 0 and y.std() == 0:
        return Difference(diff, diff, diff, 0.0 if diff else 1.0)
    with warnings.catch_warnings():
        # One group without spread (every seed the same accuracy) is a real answer: its variance is
        # 0, which Welch's test handles; scipy's warning about "nearly identical" data says only that.
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        result = _scipy().ttest_ind(x, y, equal_var=False)
    interval = result.confidence_interval(confidence)
    return Difference(diff, float(interval.low), float(interval.high), float(result.pvalue))


def adjust(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (the false discovery rate among the tests made)."""
    if not p_values:
        return []
    import numpy as np

    return [float(p) for p in _scipy().false_discovery_control(np.asarray(p_values, dtype=float), method="bh")]


def pareto(points: Sequence[tuple[float | None, float]]) -> list[bool]:
    """For (cost, score) points: True where no other point costs no more and scores at least as
    much, being better in one of the two. A point without a cost is not on the frontier."""
    known = [(c, s) for c, s in points if c is not None]
    return [c is not None and not any(oc <= c and os >= s and (oc < c or os > s) for oc, os in known)
            for c, s in points]
