"""The blessing decision (pipeline/blessing.py) on metric rows as TFMA reports them."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline import blessing, config as config_lib, evaluation

NEW = "user_group=new"
SETTINGS = evaluation.blessing_thresholds()
TASK = SETTINGS["tasks"][0]


def _row(slice_name, auc, gauc, count, mean_label=0.3):
    return {"slice": slice_name, "task": TASK, "auc": auc, "gauc": gauc, "example_count": float(count),
            "mean_label": mean_label}


def _decide(candidate, baseline):
    checks = blessing.decide(candidate, baseline, [TASK], SETTINGS, NEW)
    return {(c["metric"], c["slice"]): c for c in checks}


def test_hanley_mcneil_standard_error_matches_the_spread_of_auc_over_samples():
    rng = np.random.default_rng(0)
    positives, negatives, shift = 60, 140, 1.2  # binormal scores: AUC = Phi(shift / sqrt 2) ~ 0.80
    aucs = []
    for _ in range(1500):
        scores = np.concatenate([rng.normal(shift, 1, positives), rng.normal(0, 1, negatives)])
        aucs.append(roc_auc_score(np.r_[np.ones(positives), np.zeros(negatives)], scores))
    se = blessing.hanley_mcneil_se(float(np.mean(aucs)), positives, negatives)
    assert se == pytest.approx(np.std(aucs), rel=0.15)
    assert blessing.hanley_mcneil_se(0.8, 600, 1400) < se / 3  # 10x the impressions: about 1/sqrt(10)


def test_a_drop_on_a_small_slice_does_not_gate():
    """The issue's case: -0.0234 new-user GAUC on about 100 impressions refused a model."""
    candidate = [_row("overall", 0.72, 0.66, 20000), _row(NEW, 0.70, 0.6166, 100)]
    baseline = [_row("overall", 0.72, 0.66, 20000), _row(NEW, 0.70, 0.64, 100)]
    checks = _decide(candidate, baseline)
    new_users = checks[("gauc", NEW)]
    assert new_users["passed"] is None and "not gating: 100 impressions" in new_users["message"]
    assert all(c["passed"] is not False for c in checks.values())


def test_the_margin_grows_as_the_slice_shrinks():
    def allowed(count):
        checks = _decide([_row("overall", 0.72, 0.66, 50000), _row(NEW, 0.70, 0.62, count)],
                         [_row("overall", 0.72, 0.66, 50000), _row(NEW, 0.70, 0.64, count)])
        return checks[("gauc", NEW)]

    small, large = allowed(config_lib.MIN_SLICE_SIZE), allowed(200_000)
    assert small["allowed"] > 3 * config_lib.MAX_NEW_USER_GAUC_DROP and small["passed"]  # -0.02 is noise here
    assert large["allowed"] == config_lib.MAX_NEW_USER_GAUC_DROP and not large["passed"]  # the fixed floor
    assert large["message"] == (
        f"gauc ({TASK}) on {NEW}: candidate 0.6200, baseline 0.6400, change -0.0200 < -0.0100 allowed "
        f"(max(0.0100, 1.96 x SE {large['se']:.4f}) on 200000 impressions)")


def test_overall_auc_is_compared_with_the_last_blessed_model():
    checks = _decide([_row("overall", 0.60, 0.60, 30000)], [_row("overall", 0.72, 0.66, 30000)])
    drop = checks[("auc", "overall")]
    assert drop["passed"] is False and drop["change"] == pytest.approx(-0.12)
    assert drop["message"].startswith(f"auc ({TASK}) on overall: candidate 0.6000, baseline 0.7200, change -0.1200 < -")


def test_the_floor_holds_without_a_baseline():
    checks = blessing.decide([_row("overall", 0.49, 0.5, 30000)], None, [TASK], SETTINGS, NEW)
    assert [c["passed"] for c in checks] == [False]
    assert checks[0]["message"] == f"auc ({TASK}) on overall: 0.4900 <= floor 0.5000"
    assert blessing.decide([_row("overall", 0.55, 0.5, 30000)], None, [TASK], SETTINGS, NEW)[0]["passed"]

