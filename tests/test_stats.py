"""The statistics of seed-aware comparisons, pinned against NumPy arithmetic, textbook quantiles
and a simulation of what a 95% interval promises."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cnnlab.analysis import stats

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student-t 97.5% quantiles (printed tables)


def test_summary_is_mean_sample_std_and_student_t_interval():
    for values in ([0.90, 0.91, 0.93], [0.912, 0.9107, 0.9136, 0.9121, 0.9099]):
        x = np.array(values)
        s = stats.summarize(values)
        half = T_975[len(x) - 1] * x.std(ddof=1) / math.sqrt(len(x))
        assert s.n == len(x)
        assert s.mean == pytest.approx(x.mean(), abs=1e-12)
        assert s.std == pytest.approx(x.std(ddof=1), abs=1e-12)
        assert (s.ci_low, s.ci_high) == pytest.approx((x.mean() - half, x.mean() + half), abs=1e-9)


def test_one_seed_has_no_spread_and_no_interval():
    assert stats.summarize([0.9]) == stats.Summary(1, 0.9, None, None, None)
    with pytest.raises(ValueError):
        stats.summarize([])


def test_the_interval_covers_the_true_mean_95_percent_of_the_time():
    """3 seeds of a model whose true accuracy is 0.91 and seed spread 0.003: over 4000 repeats
    of the experiment, about 95% of the intervals hold 0.91 (binomial sd 0.34 points)."""
    rng = np.random.default_rng(0)
    draws = rng.normal(0.91, 0.003, size=(4000, 3))
    covered = [s.ci_low <= 0.91 <= s.ci_high for s in map(stats.summarize, draws)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.012)


def test_welch_matches_its_formula():
    a, b = np.array([0.90, 0.91, 0.92, 0.95]), np.array([0.93, 0.94])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))  # Welch-Satterthwaite
    assert (t, df) == pytest.approx((-1.2603, 3.8879), abs=1e-3)
    d = stats.welch(a, b)
    assert d.diff == pytest.approx(a.mean() - b.mean())
    assert d.p_value == pytest.approx(0.27791, abs=1e-4)  # two-sided, t = -1.260 on 3.89 df
    half = (d.ci_high - d.ci_low) / 2
    assert (d.ci_low + d.ci_high) / 2 == pytest.approx(d.diff)
    assert half / math.sqrt(va + vb) == pytest.approx(2.8083, abs=1e-3)  # t quantile at 3.89 df (4 df: 2.776)


def test_welch_verdict_material_cases():
    clear = stats.welch([0.93, 0.94, 0.95], [0.90, 0.91, 0.92])  # 3 points apart, spread 1 point
    assert clear.p_value == pytest.approx(0.021312, abs=1e-5) and clear.ci_low > 0  # t = 3.67 on 4 df
    noise = stats.welch([0.905, 0.915, 0.91], [0.90, 0.92, 0.91])
    assert noise.p_value > 0.5 and noise.ci_low < 0 < noise.ci_high
    assert stats.welch([0.9], [0.9, 0.91]) is None and stats.welch([0.9, 0.91], [0.9]) is None


def test_welch_without_any_spread():
    assert stats.welch([1.0, 1.0], [1.0, 1.0]).p_value == 1.0
    assert stats.welch([0.9, 0.9], [0.8, 0.8]) == stats.Difference(pytest.approx(0.1), pytest.approx(0.1),
                                                                   pytest.approx(0.1), 0.0)


def test_benjamini_hochberg_by_hand():
    # sorted 0.01 0.03 0.04 0.5 -> p * m / rank = 0.04 0.06 0.0533 0.5 -> running minimum from the top
    assert stats.adjust([0.01, 0.04, 0.03, 0.5]) == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert stats.adjust([0.2]) == [0.2] and stats.adjust([]) == []


def test_pareto_frontier():
    points = [(100, 0.90), (200, 0.92), (150, 0.89), (200, 0.91), (50, 0.85), (None, 0.99), (100, 0.90)]
    # (150, .89) costs more than (100, .90) for less; (200, .91) is beaten by (200, .92) at the same cost;
    # the two (100, .90) tie: neither beats the other; no cost, no place on the frontier.
    assert stats.pareto(points) == [True, True, False, False, True, False, True]


def test_a_group_without_spread_against_one_with_spread_is_tested_without_scipy_warnings():
    """Every seed of one model at the same accuracy (0.75 three times, as float32 metrics come back)
    against a model whose seeds differ: a real comparison, not scipy's 'nearly identical data' alarm."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = stats.welch([0.7500000059604645] * 3, [0.7, 0.8, 0.6])
    assert result is not None and result.diff == pytest.approx(0.05) and 0 < result.p_value < 1
