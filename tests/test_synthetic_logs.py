"""Tests of the synthetic KuaiRand-format log generator, measured on the files it writes."""

import csv
import datetime
import filecmp
import os

import numpy as np
import pandas as pd
import pytest

from components import synthetic_logs
from components import impression_logs
from components.impression_logs import DAY_MS, LOGS_DIR, USER_TABLE_FILE, VIDEO_TABLE_FILE
from feature_specs import specs

(USER, VIDEO, DATE, HOURMIN, TIME, CLICK, LIKE, FOLLOW, COMMENT, FORWARD, HATE, LONG_VIEW, PLAY, DURATION,
 PROFILE_STAY, COMMENT_STAY, PROFILE_ENTER, IS_RAND, TAB) = specs.LOG_COLUMNS
VIDEO_UPLOAD_DT_INDEX = specs.VIDEO_TABLE_COLUMNS.index(specs.UPLOAD_DT)

START = datetime.date(2022, 4, 8)
# The real KuaiRand-Pure feature tables: $POSO_KUAIRAND_DIR, else ../shared/data beside the checkout.
KUAIRAND_DIR = os.environ.get("POSO_KUAIRAND_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "shared",
                                                                   "data", "kuairand-pure")
NEW_USER_MS = specs.NEW_USER_HOURS * 3_600_000


def _all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _read_logs(root):
    paths = sorted(os.path.join(root, LOGS_DIR, d, f) for d in os.listdir(os.path.join(root, LOGS_DIR))
                   for f in os.listdir(os.path.join(root, LOGS_DIR, d)) if f != synthetic_logs.TRUTH_FILE)
    frames = [pd.read_parquet(p) if p.endswith(".parquet") else pd.read_csv(p) for p in paths]
    return pd.concat(frames, ignore_index=True)


def _header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f))


def _flag_new_impressions(logs):
    """Newness as a pipeline sees it in the files: within NEW_USER_HOURS of the first impression.

    Users first seen on the first date may have existed before it, so they count as regular.
    """
    first_ms = logs.groupby(USER)[TIME].transform("min")
    first_date = logs.groupby(USER)[DATE].transform("min")
    return ((logs[TIME] - first_ms) < NEW_USER_MS) & (first_date > logs[DATE].min())


def _auc(labels, scores):
    labels = np.asarray(labels, bool)
    ranks = pd.Series(np.asarray(scores)).rank(method="average").to_numpy()
    positives, negatives = labels.sum(), (~labels).sum()
    return (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)


@pytest.fixture(scope="module")
def six_days(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("six_days"))
    paths = synthetic_logs.generate(out, START, 6, seed=7, impressions_per_day=30_000)
    logs = _read_logs(out)
    logs["new"] = _flag_new_impressions(logs)
    return out, paths, logs


def test_layout_and_schemas_match_kuairand(six_days):
    out, paths, logs = six_days
    dates = [START + datetime.timedelta(days=i) for i in range(6)]
    assert paths == [os.path.join(out, LOGS_DIR, d.isoformat(), "log.csv") for d in dates]
    truth = [os.path.join(os.path.dirname(os.path.relpath(p, out)), synthetic_logs.TRUTH_FILE) for p in paths]
    assert _all_files(out) == sorted([USER_TABLE_FILE, VIDEO_TABLE_FILE] + [os.path.relpath(p, out) for p in paths]
                                     + truth)
    for path in paths:
        assert _header(path) == list(specs.LOG_COLUMNS)
    assert _header(os.path.join(out, USER_TABLE_FILE)) == list(specs.USER_TABLE_COLUMNS)
    assert _header(os.path.join(out, VIDEO_TABLE_FILE)) == list(specs.VIDEO_TABLE_COLUMNS)
    assert list(logs.columns[:-1]) == list(specs.LOG_COLUMNS)
    assert all(np.issubdtype(logs[c].dtype, np.integer) for c in specs.LOG_COLUMNS)
    assert logs.groupby(DATE).size().tolist() == [30_000] * 6
    assert logs[TAB].between(0, 14).all()
    for flag in (CLICK, LIKE, FOLLOW, COMMENT, FORWARD, HATE, LONG_VIEW, PROFILE_ENTER, IS_RAND):
        assert set(logs[flag].unique()) <= {0, 1}, flag
    assert ((logs[PROFILE_STAY] > 0) == (logs[PROFILE_ENTER] == 1)).all()
    assert (logs[PLAY] >= 0).all() and (logs[DURATION] > 0).all()
    # Every id in the logs is described by the feature files.
    users = pd.read_csv(os.path.join(out, USER_TABLE_FILE))
    videos = pd.read_csv(os.path.join(out, VIDEO_TABLE_FILE))
    assert set(logs[USER]) == set(users[specs.USER_ID]) and users[specs.USER_ID].is_unique
    assert set(logs[VIDEO]) == set(videos[specs.VIDEO_ID]) and videos[specs.VIDEO_ID].is_unique
    # Vocabularies declared in feature_specs hold the synthetic values.
    declared = {f.name: f.vocabulary for f in specs.FEATURES if f.vocabulary is not None}
    checked = 0
    for table in (users, videos):
        for name in set(table.columns) & set(declared):
            assert set(table[name].astype(str)) <= set(declared[name]), name
            checked += 1
    assert checked >= 6


def _truth(out, date):
    return synthetic_logs.read_truth(os.path.join(out, LOGS_DIR, date.isoformat()))


def test_truth_aligns_with_the_log_and_its_labels_are_drawn_from_it(six_days):
    out, paths, logs = six_days
    truth = pd.concat([_truth(out, START + datetime.timedelta(days=i)) for i in range(6)], ignore_index=True)
    assert list(truth.columns) == list(synthetic_logs.TRUTH_KEY) + list(synthetic_logs.TRUTH_LABELS)
    assert len(truth) == len(logs)
    for key in synthetic_logs.TRUTH_KEY[1:]:
        np.testing.assert_array_equal(truth[key].to_numpy(), logs[key].to_numpy())
    np.testing.assert_array_equal(truth[synthetic_logs.LOG_ROW], np.tile(np.arange(1, 30_001), 6))
    for label in synthetic_logs.TRUTH_LABELS:
        p, y = truth[label].to_numpy(np.float64), logs[label].to_numpy()
        assert ((p >= 0) & (p <= 1)).all(), label
        # The labels' count is the probabilities' sum up to sampling noise (4 standard deviations) ...
        assert abs(y.sum() - p.sum()) < 4 * np.sqrt(np.sum(p * (1 - p))) + 1, label
    # ... and so is every fifth of the impressions ordered by probability (calibration, not just the mean).
    for label in (LONG_VIEW, CLICK, LIKE):
        p, y = truth[label].to_numpy(np.float64), logs[label].to_numpy()
        for part in np.array_split(np.argsort(p, kind="stable"), 5):
            assert abs(y[part].sum() - p[part].sum()) < 4 * np.sqrt(np.sum(p[part] * (1 - p[part]))) + 1, label
    # The truth ranks far better than chance within users: it is the signal the labels come from.
    assert _auc(logs[LONG_VIEW], truth[LONG_VIEW]) > 0.75


def test_the_product_reads_only_the_log_beside_the_truth(six_days):
    out, paths, _ = six_days
    assert os.path.isfile(os.path.join(os.path.dirname(paths[0]), synthetic_logs.TRUTH_FILE))
    for day, path in enumerate(paths):
        assert impression_logs.day_files(out, START + datetime.timedelta(days=day)) == [path]
    assert impression_logs.available_dates(out) == [START + datetime.timedelta(days=i) for i in range(6)]


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """Three days of every preset from the same seed: the same impressions, different responses.
    On the last day the files tell new users exactly (day-1 arrivals are no longer new)."""
    root = tmp_path_factory.mktemp("presets")
    last = START + datetime.timedelta(days=2)
    runs = {}
    for preset in synthetic_logs.PRESETS:
        out = str(root / preset)
        synthetic_logs.generate(out, START, 3, seed=3, impressions_per_day=30_000, preset=preset)
        logs = _read_logs(out)
        on_last = (logs[DATE] == int(last.strftime("%Y%m%d"))).to_numpy()
        truth = _truth(out, last)
        truth["new"] = _flag_new_impressions(logs)[on_last].to_numpy()
        truth["log_duration"] = np.log(logs[DURATION][on_last].to_numpy())
        runs[preset] = (logs, truth)
    return runs


def _duration_slope(truth, new):
    """How the long-view probability's logit falls with log duration, for new or regular impressions."""
    rows = truth[truth["new"] == new]
    p = np.clip(rows[LONG_VIEW].to_numpy(np.float64), 1e-6, 1 - 1e-6)
    return float(np.polyfit(rows["log_duration"], np.log(p) - np.log1p(-p), 1)[0])


def test_presets_change_only_responses_and_differ_as_documented(presets):
    default_logs, default_truth = presets["default"]
    for preset, (logs, truth) in presets.items():
        # Same seed: the same users, videos and times in every preset; only the responses differ.
        for key in (USER, VIDEO, TIME):
            np.testing.assert_array_equal(logs[key].to_numpy(), default_logs[key].to_numpy())
        assert 0.02 < truth["new"].mean() < 0.1  # new users are a small share
    new = default_truth["new"].to_numpy()
    none_truth, submergence_truth = presets["none"][1], presets["submergence"][1]
    slopes = {preset: (_duration_slope(truth, True), _duration_slope(truth, False))
              for preset, (_, truth) in presets.items()}
    print(slopes)
    # none: regular users respond as in the default world, new users as regular users do.
    for label in synthetic_logs.TRUTH_LABELS:
        np.testing.assert_array_equal(none_truth[label][~new], default_truth[label][~new])
        assert (none_truth[label][new] != default_truth[label][new]).mean() > 0.9
    assert abs(slopes["none"][0] - slopes["none"][1]) < 0.15
    assert abs(none_truth[LONG_VIEW][new].mean() - none_truth[LONG_VIEW][~new].mean()) < 0.03
    # default and submergence: new users turn from long videos much more steeply than regular users.
    for preset in ("default", "submergence"):
        assert slopes[preset][0] < slopes[preset][1] - 0.5, preset
    # default: new users like more (the POSO paper's Fig. 1a); none: as much as regular users.
    assert default_truth[LIKE][new].mean() > 1.5 * default_truth[LIKE][~new].mean()
    assert none_truth[LIKE][new].mean() < 1.2 * none_truth[LIKE][~new].mean()


def test_default_preset_is_unchanged(tmp_path):
    """The default preset writes the very logs it wrote before presets and truth files existed:
    sha256 of day 1 of seed 5 at 20,000 rows, generated at f31c43a."""
    import hashlib

    path = synthetic_logs.generate(str(tmp_path), START, 1, seed=5, impressions_per_day=20_000)[0]
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == \
            "560fd64faef83ed99185f6202ffdc2d5a05f6f037fcca3517ae0862297d3d67d"


def test_times_lie_within_their_day(six_days):
    _, _, logs = six_days
    # Midnight of each row's date in the logs' time zone (UTC+8), computed by pandas.
    dates = pd.to_datetime(logs[DATE].astype(str), format="%Y%m%d").dt.tz_localize(datetime.timezone(datetime.timedelta(hours=8)))
    day_start = (dates - pd.Timestamp("1970-01-01", tz="UTC")) // pd.Timedelta(milliseconds=1)
    offset = logs[TIME] - day_start
    assert ((offset >= 0) & (offset < DAY_MS)).all()
    assert (logs[HOURMIN] == (offset // 3_600_000) * 100 + (offset // 60_000) % 60).all()
    # A user's impressions spread over the day rather than sharing one time.
    spread = logs.groupby([USER, DATE])[TIME].agg(lambda t: t.max() - t.min())
    counts = logs.groupby([USER, DATE]).size()
    assert spread[counts >= 5].median() > 3 * 3_600_000


def test_long_view_follows_kuairand_rule(six_days):
    _, _, logs = six_days
    short = logs[DURATION] <= 18_000
    expected = np.where(short, logs[PLAY] >= logs[DURATION], logs[PLAY] >= 18_000)
    assert (logs[LONG_VIEW] == expected).all()
    assert short.any() and (~short).any() and 0.2 < logs[LONG_VIEW].mean() < 0.8


def test_videos_are_shown_only_after_their_upload(six_days):
    out, _, logs = six_days
    videos = pd.read_csv(os.path.join(out, VIDEO_TABLE_FILE))
    upload = pd.to_datetime(logs[VIDEO].map(videos.set_index(specs.VIDEO_ID)[specs.UPLOAD_DT]))
    shown = pd.to_datetime(logs[DATE].astype(str), format="%Y%m%d")
    age_days = (shown - upload).dt.days
    assert (age_days >= 0).all()
    assert (age_days < specs.NEW_ITEM_DAYS).mean() > 0.05 and (age_days > 30).mean() > 0.05


def test_new_user_share_is_near_the_target(six_days):
    _, _, logs = six_days
    # From the third date on, first appearance in the files is exact (day-1 arrivals' second
    # day is the only censored part).
    later = logs[logs[DATE] > sorted(logs[DATE].unique())[1]]
    assert later["new"].mean() == pytest.approx(0.05, rel=0.15)


def test_new_user_share_follows_the_argument(tmp_path):
    synthetic_logs.generate(str(tmp_path), START, 4, seed=3, impressions_per_day=20_000, new_user_share=0.15)
    logs = _read_logs(str(tmp_path))
    new = _flag_new_impressions(logs)
    later = logs[DATE] > sorted(logs[DATE].unique())[1]
    assert new[later].mean() == pytest.approx(0.15, rel=0.15)


def test_new_users_behave_as_in_poso_fig_1a(six_days):
    _, _, logs = six_days
    logs = logs[logs[DATE] > logs[DATE].min()]
    new, regular = logs[logs["new"]], logs[~logs["new"]]
    per_user_day = logs.groupby([USER, DATE, "new"]).size().reset_index(name="views")
    assert per_user_day[per_user_day["new"]].views.mean() < 0.7 * per_user_day[~per_user_day["new"]].views.mean()
    assert new[LIKE].mean() > 1.3 * regular[LIKE].mean()
    assert new[PLAY].mean() < 0.85 * regular[PLAY].mean()
    finish_rate = lambda rows: (rows[PLAY] >= rows[DURATION]).mean()  # noqa: E731
    assert finish_rate(new) > 1.2 * finish_rate(regular)


def test_ignoring_newness_ranks_worse_for_new_users(six_days):
    """Not a constant shift: how long_view depends on video duration differs for new users.

    A duration-bucket model fit on all users (plus any constant for newness, which leaves a
    ranking unchanged) ranks new users' last-day impressions worse than one fit on new users.
    """
    _, _, logs = six_days
    logs = logs[logs[DATE] > logs[DATE].min()].copy()
    logs["bucket"] = pd.qcut(logs[DURATION].rank(method="first"), 10, labels=False)
    last = logs[DATE] == logs[DATE].max()
    train, test = logs[~last], logs[last]
    shared = train.groupby("bucket")[LONG_VIEW].mean()
    new_only = train[train["new"]].groupby("bucket")[LONG_VIEW].mean()
    regular_only = train[~train["new"]].groupby("bucket")[LONG_VIEW].mean()
    new_test, regular_test = test[test["new"]], test[~test["new"]]
    auc_new_shared = _auc(new_test[LONG_VIEW], new_test["bucket"].map(shared))
    auc_new_own = _auc(new_test[LONG_VIEW], new_test["bucket"].map(new_only))
    assert auc_new_own > auc_new_shared + 0.05
    # For regular users the shared model is as good as their own: the shift is specific to new users.
    assert _auc(regular_test[LONG_VIEW], regular_test["bucket"].map(shared)) == pytest.approx(
        _auc(regular_test[LONG_VIEW], regular_test["bucket"].map(regular_only)), abs=0.01)


def test_same_seed_gives_identical_files_and_other_seeds_differ(tmp_path):
    runs = {}
    for name, seed in (("a", 11), ("b", 11), ("c", 12)):
        runs[name] = str(tmp_path / name)
        synthetic_logs.generate(runs[name], START, 2, seed=seed, impressions_per_day=3000)
    files = _all_files(runs["a"])
    assert files == _all_files(runs["b"]) == _all_files(runs["c"])
    match, mismatch, errors = filecmp.cmpfiles(runs["a"], runs["b"], files, shallow=False)
    assert mismatch == [] and errors == [] and match == files
    _, differ, _ = filecmp.cmpfiles(runs["a"], runs["c"], files, shallow=False)
    assert differ == files


def test_longer_runs_reproduce_shorter_runs_days(tmp_path):
    short, long = str(tmp_path / "short"), str(tmp_path / "long")
    short_paths = synthetic_logs.generate(short, START, 2, seed=5, impressions_per_day=3000)
    long_paths = synthetic_logs.generate(long, START, 3, seed=5, impressions_per_day=3000)
    for a, b in zip(short_paths, long_paths):
        assert filecmp.cmp(a, b, shallow=False)
    short_users = pd.read_csv(os.path.join(short, USER_TABLE_FILE))
    long_users = pd.read_csv(os.path.join(long, USER_TABLE_FILE)).set_index(specs.USER_ID)
    pd.testing.assert_frame_equal(long_users.loc[short_users[specs.USER_ID]], short_users.set_index(specs.USER_ID))


def test_parquet_holds_the_same_rows_as_csv(tmp_path):
    as_csv, as_parquet = str(tmp_path / "csv"), str(tmp_path / "parquet")
    synthetic_logs.generate(as_csv, START, 2, seed=1, impressions_per_day=2000)
    paths = synthetic_logs.generate(as_parquet, START, 2, seed=1, impressions_per_day=2000, file_format="parquet")
    assert all(p.endswith("log.parquet") for p in paths)
    parquet = _read_logs(as_parquet)
    assert list(parquet.columns) == list(specs.LOG_COLUMNS)
    pd.testing.assert_frame_equal(parquet, _read_logs(as_csv))
    # Regenerating in the other format leaves exactly one log file per date.
    synthetic_logs.generate(as_parquet, START, 2, seed=1, impressions_per_day=2000)
    assert sorted(f for f in _all_files(as_parquet) if f.startswith(LOGS_DIR)) == sorted(
        os.path.join(LOGS_DIR, (START + datetime.timedelta(days=i)).isoformat(), name)
        for i in range(2) for name in ("log.csv", synthetic_logs.TRUTH_FILE))


def test_a_failed_day_leaves_no_partial_log_file(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic_logs, "_CHUNK_ROWS", 500)  # several chunks per day
    simulate, calls = synthetic_logs._World.simulate, []

    def fail_on_third_chunk(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return simulate(self, *args, **kwargs)

    monkeypatch.setattr(synthetic_logs._World, "simulate", fail_on_third_chunk)
    with pytest.raises(RuntimeError, match="simulated crash"):
        synthetic_logs.generate(str(tmp_path), START, 1, seed=0, impressions_per_day=2000)
    assert _all_files(str(tmp_path)) == []


def test_cli_writes_logs_and_reports_throughput(tmp_path, capsys):
    out = str(tmp_path / "cli")
    assert synthetic_logs.main(["--out", out, "--start", "2022-05-01", "--days", "2", "--seed", "4",
                                "--rows-per-day", "1500", "--verbose"]) == 0
    assert os.path.isfile(os.path.join(out, LOGS_DIR, "2022-05-02", "log.csv"))
    assert "rows/s" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synthetic_logs.main(["--out", out, "--start", "May 1st"])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(days=0), ValueError, "days"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(impressions_per_day=0), ValueError, "impressions_per_day"),
    (dict(new_user_share=0.9), ValueError, "new_user_share"),
    (dict(file_format="json"), ValueError, "file_format"),
    (dict(start_date="2022-04-08"), TypeError, "start_date"),
    (dict(kuairand_dir="/nonexistent/kuairand"), FileNotFoundError, "/nonexistent/kuairand"),
])
def test_bad_arguments_are_named(tmp_path, kwargs, error, message):
    args = dict(out_dir=str(tmp_path), start_date=START, days=1, seed=0, impressions_per_day=100)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        synthetic_logs.generate(**args)


def _write_rows(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def test_small_real_table_is_extended_with_copies_of_real_rows(tmp_path):
    """More users than the file has: extra users copy real rows under new ids."""
    real = tmp_path / "real"
    real.mkdir()
    user_rows = [[str(i), "full_active" if i % 2 else "middle_active", "0", "-124", "1", str(10 * i),
                  "(50,100]", "12", "[10,100)", "3", "[1,5)", "800", "730+"] + ["1"] * 18 for i in range(50)]
    video_rows = [[str(v), str(1000 + v), "NORMAL", "2022-04-10", "Web", "0.0", str(9000.0 + 1000 * v), "720.0",
                   "1280.0", "77", "9.0", f"{v % 7 + 1},{v % 5 + 10}"] for v in range(40)]
    _write_rows(real / synthetic_logs.REAL_USER_FILE, specs.USER_TABLE_COLUMNS, user_rows)
    _write_rows(real / synthetic_logs.REAL_VIDEO_FILE, specs.VIDEO_TABLE_COLUMNS, video_rows)
    out = str(tmp_path / "out")
    synthetic_logs.generate(out, START, 2, seed=0, impressions_per_day=1000, kuairand_dir=str(real))
    with open(os.path.join(out, USER_TABLE_FILE), newline="") as f:
        written = list(csv.reader(f))[1:]
    real_ids = {r[0] for r in user_rows}
    copies = [r for r in written if r[0] not in real_ids]
    assert copies and all(int(r[0]) > 49 for r in copies)
    assert all(r[1:] in [u[1:] for u in user_rows] for r in copies)
    assert [r for r in written if r[0] in real_ids] == [u for u in user_rows if u[0] in {r[0] for r in written}]


def test_malformed_real_table_is_rejected_with_its_name(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    _write_rows(real / synthetic_logs.REAL_USER_FILE, specs.USER_TABLE_COLUMNS[:-1], [["1"] * 30])
    _write_rows(real / synthetic_logs.REAL_VIDEO_FILE, specs.VIDEO_TABLE_COLUMNS, [])
    with pytest.raises(ValueError, match=r"user_features_pure\.csv.*missing \['onehot_feat17'\]"):
        synthetic_logs.generate(str(tmp_path / "out"), START, 1, seed=0, impressions_per_day=100,
                                kuairand_dir=str(real))


@pytest.mark.skipif(not os.path.isdir(KUAIRAND_DIR),
                    reason=f"the real KuaiRand-Pure feature files are not available at {KUAIRAND_DIR}")
def test_real_kuairand_features_are_copied_verbatim(tmp_path):
    out = str(tmp_path / "real")
    synthetic_logs.generate(out, START, 3, seed=2, impressions_per_day=8000, kuairand_dir=KUAIRAND_DIR)
    logs = _read_logs(out)

    def lines(path):
        with open(path, newline="") as f:
            return f.read().splitlines()

    real_users = {line.split(",", 1)[0]: line for line in lines(os.path.join(KUAIRAND_DIR,
                                                                            synthetic_logs.REAL_USER_FILE))[1:]}
    written_users = lines(os.path.join(out, USER_TABLE_FILE))
    assert written_users[0] == ",".join(specs.USER_TABLE_COLUMNS)
    assert len(written_users) - 1 == logs[USER].nunique()
    # Rows are the real rows, byte for byte.
    assert all(real_users[line.split(",", 1)[0]] == line for line in written_users[1:])

    with open(os.path.join(KUAIRAND_DIR, synthetic_logs.REAL_VIDEO_FILE), newline="") as f:
        real_videos = {row[0]: row for row in list(csv.reader(f))[1:]}
    with open(os.path.join(out, VIDEO_TABLE_FILE), newline="") as f:
        written_videos = list(csv.reader(f))
    assert written_videos[0] == list(specs.VIDEO_TABLE_COLUMNS)
    assert {r[0] for r in written_videos[1:]} == {str(v) for v in logs[VIDEO].unique()}
    for row in written_videos[1:]:
        real = real_videos[row[0]]
        assert row[:VIDEO_UPLOAD_DT_INDEX] + row[VIDEO_UPLOAD_DT_INDEX + 1:] == \
            real[:VIDEO_UPLOAD_DT_INDEX] + real[VIDEO_UPLOAD_DT_INDEX + 1:]
    # Upload dates are remapped around the generated dates, keeping the real dates' order.
    remapped = pd.DataFrame([(real_videos[r[0]][VIDEO_UPLOAD_DT_INDEX], r[VIDEO_UPLOAD_DT_INDEX])
                             for r in written_videos[1:]], columns=["real", "remapped"])
    spans = remapped.groupby("real")["remapped"].agg(["min", "max"]).sort_index()
    assert (spans["max"].shift(1).fillna("") <= spans["min"]).all()
    assert remapped["remapped"].min() < START.isoformat() < remapped["remapped"].max()
    # The generated behaviour holds on real users and videos too.
    new = _flag_new_impressions(logs)
    later = logs[DATE] > sorted(logs[DATE].unique())[1]
    assert new[later].mean() == pytest.approx(0.05, rel=0.25)
    assert logs[new][LIKE].mean() > logs[~new][LIKE].mean()
