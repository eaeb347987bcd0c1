"""End-to-end test of `poso bench paper`'s machinery on tiny synthetic data (the baseline with 2
seeds as a headline row, POSO(all) with 1, and POSO with the item-age PC for the item table).

The real code path runs (synthetic logs -> AvcExampleGen -> tf.Transform -> training -> GAUC ->
submergence and gates -> JSON -> RESULTS.md); the assertions check that RESULTS.md shows the
numbers that were computed, and that the plots exist.
"""

import dataclasses
import glob
import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from scipy import stats as scipy_stats

from benchmarks import paper
from models import metrics

TINY = paper.Budget(rows_per_day=600, train_days=1, warmup_days=1, new_user_share=0.1, train_steps=3, batch_size=64)
# The baseline a headline row (seeds 0 and 1), POSO(all) not (seed 0 only).
MODELS = (paper.TABLE2_MODELS[0],
          dataclasses.replace(next(spec for spec in paper.TABLE2_MODELS if spec.name == paper.POSO), headline=False))
# The baseline and POSO(all) with the item-age PC (one seed: every training adds to the test's time).
ITEM_MODELS = (paper.ITEM_COLD_START_MODELS[0], dataclasses.replace(paper.ITEM_COLD_START_MODELS[1], headline=False))
COMMAND = "poso bench paper --test"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("out"))
    work = str(tmp_path_factory.mktemp("work"))
    written = paper.run_sections(["a", "b", "d", "e"], [0], out, work, COMMAND, budget=TINY,
                                 movielens_zip=os.path.join(work, "no-such-movielens.zip"), table2_models=MODELS,
                                 item_models=ITEM_MODELS, headline_seeds=[1])
    with open(os.path.join(out, paper.RESULTS_FILE)) as f:
        markdown = f.read()
    return dict(out=out, work=work, written=written, markdown=markdown)


def _section(markdown: str, section: str) -> str:
    start = markdown.index(f"## {paper.SECTION_TITLES[section]}")
    end = markdown.find("\n## ", start + 1)
    return markdown[start:] if end < 0 else markdown[start:end]


def _first_table(text: str) -> pd.DataFrame:
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    # The first table ends where the next table's header starts (a row of the same width whose
    # first cell is "Model" again): keep rows until then.
    table = []
    for row in rows:
        if row[0] == header[0]:
            break
        table.append(row)
    return pd.DataFrame(table, columns=header)


def test_table2_shows_the_computed_gaucs_and_differences(run):
    frame = pd.DataFrame(run["written"]["b"]["rows"])
    assert set(frame["model"]) == {m.name for m in MODELS}
    seeds = frame.groupby("model")["seed"].unique()
    assert sorted(seeds[paper.BASELINE]) == [0, 1] and list(seeds[paper.POSO]) == [0]
    text = _section(run["markdown"], "b")
    table = _first_table(text.split("p-value:", 1)[1]).set_index("Model")
    assert table.loc[MODELS[0].label, "Seeds"] == "2" and table.loc[MODELS[1].label, "Seeds"] == "1"
    assert f"Rows with fewer than 2 seeds: {MODELS[1].label} (1)." in text
    for group in paper.GROUPS:
        for task in paper.TASK_NAMES:
            rows = frame[(frame["group"] == group) & (frame["task"] == task)]
            base = rows[rows["model"] == paper.BASELINE].set_index("seed")["gauc"]
            poso = rows[rows["model"] == paper.POSO].set_index("seed")["gauc"][0]
            column = f"{group} {task}"
            # The baseline's mean over its 2 seeds; POSO's difference paired with seed 0 only.
            expected_base = "n/a" if base.isna().any() else f"{base.mean():.4f} ± {base.std():.4f}"
            expected_diff = "n/a" if np.isnan(poso - base[0]) else f"{100 * (poso - base[0]):+.2f}"
            assert table.loc[MODELS[0].label, column] == expected_base, column
            assert table.loc[MODELS[1].label, column] == expected_diff, column
    # The numbers are real GAUCs of two different models, not placeholders.
    long_view = frame[(frame["task"] == "long_view") & (frame["group"] == "all")].set_index("model")["gauc"]
    assert 0.0 < long_view.min() and long_view.max() < 1.0
    assert long_view[paper.POSO] not in long_view[paper.BASELINE].values
    # Every user group has users with both labels (the after-support slices of tiny data may not).
    grouped = frame[(frame["task"] == "long_view") & frame["group"].isin(list(paper.GROUPS) + ["all"])]
    assert len(grouped) and (grouped["users"] > 0).all()


def test_goal_lines_follow_the_numbers(run):
    stats = paper.summarize(pd.DataFrame(run["written"]["b"]["rows"]))
    goal = paper.cold_start_goal(stats)
    line = next(l for l in _section(run["markdown"], "b").splitlines() if l.startswith(f"- {MODELS[1].label}:"))
    verdicts = re.findall(r"\*\*(met|missed)\*\*", line)
    assert verdicts == ["met" if goal["new_met"] else "missed", "met" if goal["regular_met"] else "missed"]
    for task, value in goal["new_diff_pp"].items():
        assert (f"{task} n/a" if np.isnan(value) else f"{task} {value:+.2f}") in line
    # One seed: no p-value, so no gain counts as significant.
    assert goal["new_significant"] == [] and line.endswith("new-user gains with p < 0.05: none")


def test_submergence_and_gate_plots(run):
    d = run["written"]["d"]
    changes = d["submergence"]["changes"]
    assert set(changes) == {paper.BASELINE, paper.POSO}
    for model_changes in changes.values():
        assert set(model_changes) == {"is_new_user", paper.ACTIVITY_MASK, d["submergence"]["balanced_feature"]}
        assert all(np.isfinite(v) and v >= 0 for v in model_changes.values())
        assert model_changes[paper.ACTIVITY_MASK] > 0  # AVC is an input of every model
    text = _section(run["markdown"], "d")
    label = d["labels"][paper.POSO]
    row = next(l for l in text.splitlines() if l.startswith(f"| {label} |"))
    assert f"{100 * changes[paper.POSO][paper.ACTIVITY_MASK]:.2f}%" in row
    # POSO(all) has gates in the MLP, the attention and the MMoE.
    assert {"mlp_layer_0", "attention_keys", "mmoe_experts"} <= set(d["gates_by_avc"])
    for name in ("submergence.png", "gates_by_avc.png"):
        path = os.path.join(run["out"], name)
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in run["markdown"]


def test_item_cold_start_table_slices_by_video(run):
    frame = pd.DataFrame(run["written"]["e"]["rows"])
    assert {"poso_all[item_age]", paper.BASELINE} == set(frame["model"])
    assert set(paper.VIDEO_GROUPS) <= set(frame["group"])
    assert {m["pc_source"] for m in run["written"]["e"]["models"]} == {"avc_bucket_onehot", "item_age"}
    text = _section(run["markdown"], "e")
    table = _first_table(text.split("p-value:", 1)[1]).set_index("Model")
    assert [c for c in table.columns if c != "Seeds"] == [f"{g} {t}" for g in paper.VIDEO_GROUPS
                                                          for t in paper.TASK_NAMES]
    # Both video groups occur on the tiny evaluation day, and every example is in one of them.
    examples = frame[frame["task"] == "long_view"].groupby("group")["examples"].first()
    assert examples["new_video"] > 0 and examples["regular_video"] > 0
    assert examples["new_video"] + examples["regular_video"] == examples["all"]


def test_results_record_the_run(run):
    text = run["markdown"]
    assert f"`{COMMAND}`" in text and "Seeds: headline rows 0, 1 (2), other rows 0 (1)" in text and "cores" in text
    overview_text = text.split("when it last ran", 1)[1].split("\n\n")[1]  # the table after the sentence
    overview = _first_table(overview_text)
    assert list(overview["Section"]) == [paper.SECTION_TITLES[s] for s in "abde"]
    b = run["written"]["b"]["meta"]
    assert overview.set_index("Section").loc[paper.SECTION_TITLES["b"], "Wall time (min)"] == \
        f"{b['wall_seconds'] / 60:.1f}"
    assert "**Unavailable**" in _section(text, "a")
    with open(os.path.join(run["out"], paper.RESULTS_DIR, "b.json")) as f:
        saved = json.load(f)
    assert saved["meta"]["data"]["budget"]["rows_per_day"] == TINY.rows_per_day
    assert saved["meta"]["data"]["eval"]["examples"] == TINY.rows_per_day


def test_rerunning_one_section_keeps_the_others(run):
    before = _section(run["markdown"], "b")
    # Another benchmark's section, written into RESULTS.md by hand or by its own command.
    findings = "## Diagnosis on ml-latest-small\n\nWhy POSO(all) does not help: ...\n\n| a | b |\n|---|---|\n"
    with open(os.path.join(run["out"], paper.RESULTS_FILE), "a") as f:
        f.write("\n" + findings)
    paper.run_sections(["a"], [0, 1], run["out"], run["work"], "poso bench paper --sections a",
                       movielens_zip=os.path.join(run["work"], "still-missing.zip"))
    with open(os.path.join(run["out"], paper.RESULTS_FILE)) as f:
        after = f.read()
    assert _section(after, "b") == before
    assert "`poso bench paper --sections a`" in _section(after, "a")
    assert after.count("## Diagnosis on ml-latest-small") == 1 and after.rstrip().endswith(findings.rstrip())
    assert after.index("## Diagnosis") > after.index(f"## {paper.SECTION_TITLES['d']}")


def test_a_rerun_reuses_each_finished_model_and_retrains_a_broken_one(run, monkeypatch):
    """A stopped `bench paper` started again trains only what it had not finished."""
    first = run["written"]["b"]["rows"]
    cached = sorted(glob.glob(os.path.join(run["work"], "synthetic-*", "results", "*.json")))
    # (b)'s baseline seeds 0 and 1 and POSO(all) seed 0, (e)'s POSO(all) with the item-age PC.
    assert sorted(os.path.basename(path).split("-")[0] + "-" + os.path.basename(path).split("-")[1]
                  for path in cached) == ["baseline-seed0", "baseline-seed1", "poso_all-seed0",
                                          "poso_all[item_age]-seed0"], cached
    broken = next(path for path in cached if os.path.basename(path).startswith(f"{paper.POSO}-seed0-"))
    with open(broken, "w") as f:
        f.write('[{"model": "poso_a')  # as a kill mid-write would leave it, were it not written atomically
    trained = []
    real_train = paper.train_model
    monkeypatch.setattr(paper, "train_model", lambda spec, *a: trained.append(spec.name) or real_train(spec, *a))
    out = os.path.join(run["work"], "rerun")
    payload = paper.run_sections(["b"], [0], out, run["work"], COMMAND, budget=TINY, table2_models=MODELS,
                                 headline_seeds=[1])["b"]
    again = payload["rows"]
    assert trained == [paper.POSO]
    assert payload["meta"]["cached_models"] == ["submergence: baseline seed 0", "submergence: baseline seed 1"]
    with open(os.path.join(out, paper.RESULTS_FILE)) as f:
        assert "not counting 2 models whose rows an earlier, stopped run had written" in _section(f.read(), "b")
    # The same rows (NaN, no support, equals NaN); POSO(all) trained again from the same seed.
    pd.testing.assert_frame_equal(pd.DataFrame(again).drop(columns="train_seconds"),
                                  pd.DataFrame(first).drop(columns="train_seconds"))
    with open(broken) as f:
        assert len(json.load(f)) == len([r for r in first if r["model"] == paper.POSO])


def test_two_jobs_train_the_same_models_in_workers(run, tmp_path):
    """`--jobs 2`: every model of a table trains in a worker process, and the rows are the ones
    a single process computes (up to the float order of one thread instead of two)."""
    import shutil

    work = str(tmp_path / "work")
    for data in glob.glob(os.path.join(run["work"], "synthetic-*")):  # the data, not the trained models' rows
        shutil.copytree(data, os.path.join(work, os.path.basename(data)), ignore=shutil.ignore_patterns("results"))
    out = str(tmp_path / "out")
    payload = paper.run_sections(["b"], [0], out, work, COMMAND, budget=TINY, table2_models=MODELS,
                                 headline_seeds=[1], jobs=2)["b"]
    assert payload["meta"]["jobs"] == 2 and payload["meta"]["cached_models"] == []
    assert len(glob.glob(os.path.join(work, "synthetic-*", "results", "*.json"))) == 3  # written by the workers
    columns = ["model", "seed", "group", "task", "gauc", "users"]
    pd.testing.assert_frame_equal(pd.DataFrame(payload["rows"])[columns],
                                  pd.DataFrame(run["written"]["b"]["rows"])[columns], atol=1e-3)
    with open(os.path.join(out, paper.RESULTS_FILE)) as f:
        assert ", 2 models at a time" in _section(f.read(), "b")


def test_result_key_changes_with_what_training_depends_on():
    spec, seed, fingerprint = paper.TABLE2_MODELS[1], 0, "code-a"
    key = paper.result_key(TINY, spec, seed, fingerprint)
    assert key == paper.result_key(TINY, dataclasses.replace(spec, label="renamed", headline=True), seed, fingerprint)
    others = [paper.result_key(dataclasses.replace(TINY, train_steps=4), spec, seed, fingerprint),
              paper.result_key(TINY, dataclasses.replace(spec, variant="poso_mha"), seed, fingerprint),
              paper.result_key(TINY, dataclasses.replace(spec, overrides=(("pc_source", "is_new_user"),)), seed,
                               fingerprint),
              paper.result_key(TINY, dataclasses.replace(spec, melu=True), seed, fingerprint),
              paper.result_key(TINY, spec, seed + 1, fingerprint),
              paper.result_key(TINY, spec, seed, "code-b")]
    assert len({key, *others}) == 1 + len(others)


def test_summarize_gives_the_paired_t_interval_and_p():
    rng = np.random.default_rng(3)
    base, poso = rng.normal(0.7, 0.01, 8), None
    poso = base + rng.normal(0.003, 0.002, 8)
    rows = [dict(model=name, seed=seed, group="new", task="like", gauc=value[seed])
            for name, value in ((paper.BASELINE, base), (paper.POSO, poso)) for seed in range(8)]
    # A seed the baseline lacks is not paired.
    rows.append(dict(model=paper.POSO, seed=9, group="new", task="like", gauc=0.9))
    stats = paper.summarize(pd.DataFrame(rows)).set_index("model")
    row = stats.loc[paper.POSO]
    expected = scipy_stats.ttest_rel(100 * poso, 100 * base)
    interval = expected.confidence_interval(0.95)
    assert row["seeds"] == 9 and row["pairs"] == 8
    np.testing.assert_allclose([row["diff_pp_low"], row["diff_pp_high"], row["p_value"]],
                               [interval.low, interval.high, expected.pvalue], rtol=1e-9)
    assert paper.format_paired(row) == (f"{100 * np.mean(poso - base):+.2f} [{interval.low:+.2f}, "
                                        f"{interval.high:+.2f}] {paper.format_p(expected.pvalue)}")
    assert paper.format_p(0.0004) == "p<0.001" and paper.format_p(0.0123) == "p=0.012"


def test_summarize_pairs_differences_by_seed():
    rows = []
    for seed, (base, poso) in enumerate([(0.60, 0.62), (0.70, 0.71), (0.50, 0.53)]):
        rows += [dict(model=paper.BASELINE, seed=seed, group="new", task="like", gauc=base, users=5),
                 dict(model=paper.POSO, seed=seed, group="new", task="like", gauc=poso, users=5)]
    stats = paper.summarize(pd.DataFrame(rows)).set_index("model")
    np.testing.assert_allclose(stats.loc[paper.POSO, "diff_pp_mean"], 2.0)
    np.testing.assert_allclose(stats.loc[paper.POSO, "diff_pp_std"], np.std([2, 1, 3], ddof=1))
    np.testing.assert_allclose(stats.loc[paper.BASELINE, "gauc_mean"], 0.6)
    np.testing.assert_allclose(stats.loc[paper.BASELINE, "gauc_std"], 0.1)


def test_gauc_rows_match_grouped_auc():
    from benchmarks.paper_data import Split

    rng = np.random.default_rng(0)
    n = 400
    labels = {t.label: (rng.random(n) < 0.4).astype(np.float32) for t in paper.specs.TASKS}
    split = Split(features=labels, user_ids=rng.integers(0, 30, n),
                  user_groups=np.where(rng.random(n) < 0.3, "new", "regular"), avc_buckets=np.zeros(n, int))
    predictions = {t.name: rng.random(n) for t in paper.specs.TASKS}
    rows = pd.DataFrame(paper.gauc_rows(predictions, split)).set_index(["task", "group"])
    new = split.user_groups == "new"
    task = paper.specs.TASKS[0]
    assert rows.loc[(task.name, "new"), "gauc"] == metrics.grouped_auc(
        labels[task.label][new], predictions[task.name][new], split.user_ids[new])
    assert rows.loc[(task.name, "all"), "examples"] == n
    # With the AVC: the same groups after each user's first 8 examples (MeLU's query set).
    split.features = dict(labels, **{paper.specs.AVC: rng.random(n).astype(np.float32)})
    rows = pd.DataFrame(paper.gauc_rows(predictions, split)).set_index(["task", "group"])
    later = new & (pd.Series(split.features[paper.specs.AVC]).groupby(split.user_ids).rank(method="first") > 8).values
    assert rows.loc[(task.name, "new" + paper.AFTER_SUPPORT), "examples"] == later.sum() > 0
    assert rows.loc[(task.name, "new" + paper.AFTER_SUPPORT), "gauc"] == metrics.grouped_auc(
        labels[task.label][later], predictions[task.name][later], split.user_ids[later])


def test_cli_rejects_unknown_sections():
    from pipeline import cli

    parser = cli.build_parser()
    args = parser.parse_args(["bench", "paper", "--sections", "d,b", "--seeds", "3,4"])
    assert args.sections == ["b", "d"] and args.seeds == [3, 4]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "paper", "--sections", "b,g"])
    args = parser.parse_args(["bench", "paper"])
    assert args.seeds == list(paper.DEFAULT_SEEDS) and len(args.headline_seeds) >= 8
    assert args.preset == "submergence"
    assert parser.parse_args(["bench", "paper", "--preset", "default"]).preset == "default"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "paper", "--preset", "submerged"])


def test_movielens_table_shows_the_returned_frame(tmp_path):
    rows = []
    for seed, (base, poso) in enumerate([(0.70, 0.72), (0.68, 0.71)]):
        for task, shift in (("favorite", 0.0), ("satisfied", -0.05)):
            rows += [dict(variant=paper.BASELINE, seed=seed, task=task, gauc=base + shift, gauc_avc_lt_32=base - 0.1,
                          gauc_avc_ge_32=base + 0.1),
                     dict(variant=paper.POSO, seed=seed, task=task, gauc=poso + shift, gauc_avc_lt_32=poso - 0.1,
                          gauc_avc_ge_32=poso + 0.1)]
    payload = dict(available=True, zip="ml.zip", variants=[paper.BASELINE, paper.POSO], budget={}, rows=rows,
                   meta=dict(command="c", date="d", wall_seconds=60, commit="x", tensorflow="t", seeds=[0, 1],
                             machine=dict(cores=2, cpu="cpu", memory_gib=1, os="os", python="3")))
    text = "\n".join(paper.render_section_a(payload))
    row = next(l for l in text.splitlines() if l.startswith(f"| {paper.POSO} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # favorite: GAUC 0.715 ± std(0.72, 0.71); Δ (2 pp, 3 pp) -> +2.50 [95% CI] p
    assert cells[1] == "2"
    assert cells[2] == f"0.7150 ± {np.std([0.72, 0.71], ddof=1):.4f}"
    expected = scipy_stats.ttest_rel([72.0, 71.0], [70.0, 68.0])
    interval = expected.confidence_interval(0.95)
    assert cells[3] == f"+2.50 [{interval.low:+.2f}, {interval.high:+.2f}] {paper.format_p(expected.pvalue)}"
    assert "fewer than 32 earlier ones" in text and "32 or more earlier ones" in text


def test_section_a_without_the_archive_stops_before_any_work(tmp_path, capsys):
    from pipeline import cli

    out = tmp_path / "out"
    missing = tmp_path / "no-such.zip"
    code = cli.main(["bench", "paper", "--sections", "a,b", "--out", str(out), "--work-dir", str(tmp_path / "w"),
                     "--movielens-zip", str(missing)])
    assert code == 2
    assert str(missing) in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "w").exists()


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_headroom_section_trains_every_row_and_renders_the_goals(tmp_path):
    from benchmarks import headroom

    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    # Table 2 cut to its headline pair and one other POSO variant: enough to check the rows.
    table2 = tuple(m for m in paper.TABLE2_MODELS if m.name in ("baseline", "poso_all", "poso_mlp", "mail"))
    written = paper.run_sections(["b", "f"], [0], out, work, "poso bench paper --sections b,f", budget=TINY,
                                 table2_models=table2, headline_seeds=[1])
    models = pd.DataFrame(written["f"]["models"])
    trained = models.groupby(["preset", "model"])["seed"].agg(lambda s: sorted(set(s))).to_dict()
    for spec in table2:
        seeds = [0, 1] if spec.headline else [0]
        assert trained[("submergence", spec.name)] == seeds
        assert trained.get(("none", spec.name)) == (seeds if spec.name in headroom.NONE_PRESET_MODELS else None)
    # (f) reused (b)'s models on the same data: the same GAUCs, not a second training.
    table2_rows = pd.DataFrame(written["b"]["rows"])
    poso = table2_rows[(table2_rows["model"] == "poso_all") & (table2_rows["seed"] == 1)
                       & (table2_rows["task"] == "long_view") & (table2_rows["group"] == "new")]["gauc"].item()
    assert models[(models["preset"] == "submergence") & (models["model"] == "poso_all") & (models["seed"] == 1)
                  & (models["task"] == "long_view") & (models["group"] == "new")]["gauc"].item() == poso
    with open(os.path.join(out, paper.RESULTS_FILE)) as f:
        section = _section(f.read(), "f")
    summary = headroom.summarize(pd.DataFrame(written["f"]["ceiling"]), models)
    row = summary[(summary["preset"] == "submergence") & (summary["task"] == "long_view")
                  & (summary["group"] == "new")].iloc[0]
    assert f"| long_view | new | {100 * row['ceiling']:.2f} |" in section
    assert f"{row['poso_all_gain_pp']:+.2f} [" in section
    # One verdict on submergence (POSO(all)), one per POSO variant on none (not MAIL: the goal is POSO's).
    assert section.count("**met**") + section.count("**missed**") == 1 + 2
