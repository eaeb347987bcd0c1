"""benchmarks.movielens_diagnosis: the paired statistics and the experiment registry (no training)."""

import numpy as np
import pytest
from scipy import stats

from benchmarks import movielens_diagnosis as diagnosis


def test_paired_difference_is_the_t_interval_and_test_of_the_per_seed_differences():
    poso = [65.1, 64.8, 65.6, 65.0, 64.9]
    base = [65.3, 65.0, 65.2, 65.4, 65.1]
    result = diagnosis.paired_difference(poso, base)
    differences = np.subtract(poso, base)
    half = stats.t.ppf(0.975, 4) * differences.std(ddof=1) / np.sqrt(5)
    assert result["n"] == 5
    assert result["mean"] == pytest.approx(differences.mean())
    assert (result["low"], result["high"]) == pytest.approx((differences.mean() - half, differences.mean() + half))
    assert result["p"] == pytest.approx(stats.ttest_rel(poso, base).pvalue)
    assert result["low"] < result["mean"] < result["high"]


def test_paired_difference_of_one_seed_has_no_interval():
    result = diagnosis.paired_difference([1.0], [0.5])
    assert result["mean"] == 0.5 and np.isnan(result["low"]) and np.isnan(result["p"])


@pytest.mark.parametrize("name", sorted(diagnosis.EXPERIMENTS))
def test_every_arm_is_compared_with_a_baseline_of_the_same_budget_and_data(name):
    _, arms = diagnosis.EXPERIMENTS[name]
    by_label = {arm.label: arm for arm in arms}
    assert len(by_label) == len(arms), "arm labels must be unique within an experiment"
    for arm in arms:
        if arm.reference is None:
            continue
        reference = by_label[arm.reference]
        assert reference.variant == "baseline"
        assert (reference.epochs, reference.batch_size, reference.user_fraction) == (
            arm.epochs, arm.batch_size, arm.user_fraction)
        assert reference.config_overrides().get("learning_rate") == arm.config_overrides().get("learning_rate")


def test_unknown_arm_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit) as exit_info:
        diagnosis.main(["--experiment", "pc", "--arms", "no_such_arm"])
    assert exit_info.value.code == 2
    assert "unknown arm(s) ['no_such_arm']" in capsys.readouterr().err
