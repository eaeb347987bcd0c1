"""benchmarks.movielens_diagnosis: the experiment registry and argument checks (no training)."""

import pytest

from benchmarks import movielens_diagnosis as diagnosis


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
