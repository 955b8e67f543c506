"""The paired comparison against a plain computation and scipy's t distribution."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from smse_metric.recipes.histopathology.compare import paired_comparison, t_quantile_975


def test_t_quantiles_equal_scipys():
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 31), 31, 40, 60, 120, 1000]:
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-3), df


@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=2, max_size=40))
def test_interval_equals_the_textbook_formula(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    c = paired_comparison(a, b)
    d = np.subtract(a, b)
    half = t_quantile_975(len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    assert c.n == len(d) and c.difference == pytest.approx(d.mean(), abs=1e-12)
    assert (c.mean_a, c.mean_b) == (pytest.approx(np.mean(a)), pytest.approx(np.mean(b)))
    assert c.ci_low == pytest.approx(d.mean() - half, abs=1e-12)
    assert c.ci_high == pytest.approx(d.mean() + half, abs=1e-12)
    want = "better" if c.ci_low > 0 else "worse" if c.ci_high < 0 else "no significant difference"
    assert c.verdict == want


def test_a_constant_difference_is_significant_and_bad_input_is_named():
    assert paired_comparison([0.8, 0.9, 0.7], [0.7, 0.8, 0.6]).verdict == "better"
    assert paired_comparison([0.6, 0.7], [0.7, 0.8]).verdict == "worse"
    with pytest.raises(ValueError, match="same length"):
        paired_comparison([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        paired_comparison([0.1], [0.2])
    with pytest.raises(ValueError, match="finite"):
        paired_comparison([0.1, float("nan")], [0.2, 0.3])
    with pytest.raises(ValueError, match="df must be"):
        t_quantile_975(0)
