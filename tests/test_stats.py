"""benchmarks.stats against scipy's paired t-test and its confidence interval."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from benchmarks import stats


@pytest.mark.parametrize("n", [2, 3, 8, 20])
def test_paired_difference_matches_scipy(n):
    rng = np.random.default_rng(n)
    reference = rng.normal(0.7, 0.01, n)
    treatment = reference + rng.normal(0.002, 0.003, n)

    result = stats.paired_difference(treatment, reference)

    expected = scipy_stats.ttest_rel(treatment, reference)
    interval = expected.confidence_interval(0.95)
    assert result["n"] == n
    np.testing.assert_allclose(result["mean"], np.mean(treatment - reference), rtol=1e-12)
    np.testing.assert_allclose(result["std"], np.std(treatment - reference, ddof=1), rtol=1e-12)
    np.testing.assert_allclose([result["low"], result["high"]], [interval.low, interval.high], rtol=1e-9)
    np.testing.assert_allclose(result["p"], expected.pvalue, rtol=1e-9)


def test_interval_by_hand_and_other_levels():
    # d = 1, 2, 3: mean 2, sd 1; t_{0.975, 2} = 4.302653
    result = stats.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 / np.sqrt(3)
    np.testing.assert_allclose([result["low"], result["high"]], [2 - half, 2 + half], rtol=1e-9)
    narrow = stats.paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], confidence=0.5)
    assert result["low"] < narrow["low"] < 2 < narrow["high"] < result["high"]
    # A clear, consistent difference is significant; a sign flip around 0 is not.
    assert stats.paired_difference([1.0, 1.1, 0.9, 1.05], [0.0] * 4)["p"] < 0.001
    assert stats.paired_difference([1.0, -1.0, 0.5, -0.5], [0.0] * 4)["p"] > 0.5


def test_undefined_cases_are_nan_not_errors():
    one = stats.paired_difference([0.6], [0.5])
    assert one["n"] == 1 and one["mean"] == pytest.approx(0.1)
    assert all(np.isnan(one[key]) for key in ("std", "low", "high", "p"))
    with_nan = stats.paired_difference([0.6, np.nan], [0.5, 0.5])
    assert with_nan["n"] == 2 and np.isnan(with_nan["p"]) and np.isnan(with_nan["low"])
    same = stats.paired_difference([0.5, 0.6], [0.5, 0.6])
    assert same["mean"] == 0 and same["p"] == 1.0 and same["low"] == same["high"] == 0
    shifted = stats.paired_difference([0.6, 0.7], [0.5, 0.6])
    assert shifted["p"] == 0.0


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="same length"):
        stats.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="confidence"):
        stats.paired_difference([1.0, 2.0], [1.0, 1.0], confidence=95)
