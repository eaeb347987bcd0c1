"""benchmarks.headroom: the truth joins the pipeline's examples; the ceiling and headroom arithmetic."""

import datetime
import os

import numpy as np
import pandas as pd
import pytest

from benchmarks import headroom, paper_data
from components import synthetic_logs
from components.impression_logs import LOGS_DIR
from feature_specs import specs

START = datetime.date(2022, 4, 8)


def test_summary_states_headroom_and_the_share_closed_paired_by_seed():
    ceiling = pd.DataFrame([dict(preset="p", task="long_view", group="new", ceiling=0.70)])
    models = pd.DataFrame([dict(preset="p", task="long_view", group="new", model=model, seed=seed, gauc=gauc)
                           for model, seed, gauc in (("baseline", 0, 0.66), ("baseline", 1, 0.68),
                                                     ("poso_all", 0, 0.67), ("poso_all", 1, 0.69))])
    row = headroom.summarize(ceiling, models).iloc[0]
    assert row["headroom_pp"] == pytest.approx(3.0) and row["seeds"] == 2
    assert row["headroom_pp_std"] == pytest.approx(np.std([4.0, 2.0], ddof=1))
    assert row["poso_all_gain_pp"] == pytest.approx(1.0)
    assert row["poso_all_closed"] == pytest.approx((1 / 4 + 1 / 2) / 2)  # per seed, then the mean
    assert row["poso_all_gauc"] == pytest.approx(0.68)
    # Both seeds gain exactly 1 pp: no spread, p 0; the shares closed 25% and 50% spread by t_{0.975,1}.
    assert (row["poso_all_gain_low"], row["poso_all_gain_high"], row["poso_all_p"]) == pytest.approx((1, 1, 0))
    half = 12.706 * np.std([0.25, 0.5], ddof=1) / np.sqrt(2)
    assert (row["poso_all_closed_low"], row["poso_all_closed_high"]) == pytest.approx(
        (0.375 - half, 0.375 + half), abs=1e-3)
    assert "| p | long_view | new | 70.00 | 67.00 | +3.00 ± 1.41 (2 seeds) | 68.00 | +1.00 [+1.00, +1.00], p=0 " \
           "(2 seeds) | +37.5% [-121.3, +196.3] |" in headroom.format_table(headroom.summarize(ceiling, models))


def test_a_model_missing_on_one_preset_keeps_whole_seed_counts():
    ceiling = pd.DataFrame([dict(preset=p, task="long_view", group="new", ceiling=0.70) for p in ("a", "b")])
    models = pd.DataFrame([dict(preset=preset, task="long_view", group="new", model=model, seed=seed, gauc=0.66 + seed / 100)
                           for preset, model in (("a", "baseline"), ("a", "mail"), ("b", "baseline"))
                           for seed in (0, 1)])
    table = headroom.format_long_table(headroom.summarize(ceiling, models))
    assert "(2 seeds) | +0.0% " in table and ".0 seeds" not in table


def test_summary_pairs_only_the_seeds_both_models_have():
    ceiling = pd.DataFrame([dict(preset="p", task="long_view", group="new", ceiling=0.70)])
    models = pd.DataFrame([dict(preset="p", task="long_view", group="new", model=model, seed=seed, gauc=gauc)
                           for model, seed, gauc in (("baseline", 0, 0.66), ("baseline", 1, 0.68),
                                                     ("baseline", 2, 0.60), ("poso_all", 0, 0.67),
                                                     ("poso_all", 1, 0.70))])
    row = headroom.summarize(ceiling, models).iloc[0]
    assert row["poso_all_seeds"] == 2 and row["poso_all_gain_pp"] == pytest.approx(1.5)
    from scipy import stats

    assert row["poso_all_p"] == pytest.approx(stats.ttest_rel([0.67, 0.70], [0.66, 0.68]).pvalue)


@pytest.mark.slow
def test_truth_joins_the_pipeline_examples_and_ranks_at_the_ceiling(tmp_path):
    logs = str(tmp_path / "logs")
    synthetic_logs.generate(logs, START, 2, seed=2, impressions_per_day=3000, preset="submergence")
    previous = None
    for day in range(2):
        previous = paper_data._run_avc_day(logs, str(tmp_path / "examples"), START + datetime.timedelta(days=day),
                                           previous)["user_state"][0]
    date = START + datetime.timedelta(days=1)
    files = paper_data._example_files(str(tmp_path / "examples"), date)
    truth = headroom.truth_for_examples(files, os.path.join(logs, LOGS_DIR, date.isoformat()))
    # The examples' own labels are drawn from the joined probabilities.
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.int64) for name in (specs.USER_ID, "long_view", "is_click")}
    parsed = tf.io.parse_example(list(tf.data.TFRecordDataset(files, compression_type="GZIP").as_numpy_iterator()),
                                 spec)
    for label in ("long_view", "is_click"):
        p, y = truth[label], parsed[label].numpy()
        assert abs(y.sum() - p.sum()) < 4 * np.sqrt(np.sum(p * (1 - p))) + 1
    from models import metrics

    users = parsed[specs.USER_ID].numpy()
    labels = parsed["long_view"].numpy()
    shuffled = np.random.default_rng(0).permutation(truth["long_view"])
    assert metrics.grouped_auc(labels, truth["long_view"], users) > metrics.grouped_auc(labels, shuffled, users) + 0.1
    # A truth file of another day does not join.
    with pytest.raises(ValueError, match="does not match"):
        headroom.truth_for_examples(files, os.path.join(logs, LOGS_DIR, START.isoformat()))


def _section_payload(new_gains, regular_gains, none_gains, seeds=8):
    """Rows of a section-(f) payload: the baseline at 70% (ceiling 74%) on every cell, POSO(all)
    and POSO(MLP) that much higher per seed (pp), by preset and group."""
    ceiling, models = [], []
    for preset in headroom.SECTION_PRESETS:
        for task in ("long_view", "like"):
            for group in headroom.GROUPS:
                ceiling.append(dict(preset=preset, task=task, group=group, ceiling=0.74))
                for seed in range(seeds):
                    wobble = 0.001 * (seed % 3)
                    models.append(dict(preset=preset, task=task, group=group, model="baseline", seed=seed,
                                       gauc=0.70 + wobble))
                    gains = (none_gains if preset == "none" else new_gains if group == "new" else regular_gains)
                    for model, gain in gains.items():
                        models.append(dict(preset=preset, task=task, group=group, model=model, seed=seed,
                                           gauc=0.70 + wobble + gain / 100 + 0.0001 * (seed % 2)))
    return dict(budget=dict(data_seed=1, rows_per_day=100, new_user_share=0.1, warmup_days=1, train_days=1,
                            train_steps=3, batch_size=8, learning_rate=0.001),
                data=[dict(preset=p, eval_date="2022-04-18") for p in headroom.SECTION_PRESETS],
                ceiling=ceiling, models=models)


def test_section_goals_follow_the_numbers():
    # POSO(all) gains 1.2 of 4 pp (30%) for new users, 0.05 pp for regular ones; on `none` POSO(MLP)
    # loses 0.3 pp everywhere, POSO(all) nothing.
    payload = _section_payload({"poso_all": 1.2}, {"poso_all": 0.05}, {"poso_all": 0.0, "poso_mlp": -0.3})
    summary = headroom.summarize(pd.DataFrame(payload["ceiling"]), pd.DataFrame(payload["models"]))
    verdicts = {" ".join(g["goal"].split()[:2]): g for g in headroom.goals(summary)}
    assert verdicts["submergence: POSO(all)"]["met"]
    assert "closed +30." in verdicts["submergence: POSO(all)"]["figures"]
    assert verdicts["none: poso_all"]["met"] and not verdicts["none: poso_mlp"]["met"]
    assert "-0.30 pp" in verdicts["none: poso_mlp"]["figures"]
    markdown = "\n".join(headroom.render_section(payload))
    assert "**met**: submergence" in markdown and "**missed**: none: poso_mlp" in markdown
    assert "| long_view | new | 74.00 |" in markdown

    # Too few seeds, or regular users paying more than 0.1 pp, misses the submergence goal.
    for payload in (_section_payload({"poso_all": 1.2}, {"poso_all": 0.05}, {}, seeds=4),
                    _section_payload({"poso_all": 1.2}, {"poso_all": -0.2}, {})):
        summary = headroom.summarize(pd.DataFrame(payload["ceiling"]), pd.DataFrame(payload["models"]))
        assert not headroom.goals(summary)[0]["met"]
