"""AvcExampleGen against a brute-force computation on a random multi-day log (real Beam)."""

import csv
import datetime
import glob
import json
import os
import random
import tempfile

import pytest
import tensorflow as tf

from components import avc_example_gen, impression_logs
from components.avc import parse_tags
from feature_specs import specs
from pipeline import config

START = datetime.date(2022, 4, 8)
DAYS = 3
USERS = 25
VIDEOS = 40


def _day_ms(date):
    return specs.day_start_ms(date)


def _write_tables(base, rng):
    with open(os.path.join(base, impression_logs.USER_TABLE_FILE), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(specs.USER_TABLE_COLUMNS)
        for u in range(USERS - 3):  # a few users have no profile row (new sign-ups)
            row = {c: 0 for c in specs.USER_TABLE_COLUMNS}
            row.update({specs.USER_ID: u, specs.USER_ACTIVE_DEGREE: rng.choice(["full_active", "low_active"]),
                        "follow_user_num_range": "0", "fans_user_num_range": "0", "register_days_range": "730+",
                        "friend_user_num_range": "0", "is_live_streamer": specs.MISSING_VALUE})
            w.writerow([row[c] for c in specs.USER_TABLE_COLUMNS])
    tags = {}
    with open(os.path.join(base, impression_logs.VIDEO_TABLE_FILE), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(specs.VIDEO_TABLE_COLUMNS)
        for v in range(VIDEOS):
            tags[v] = ",".join(str(rng.randrange(60)) for _ in range(rng.randint(0, 3)))
            row = {c: 0 for c in specs.VIDEO_TABLE_COLUMNS}
            row.update({specs.VIDEO_ID: v, "video_type": "NORMAL", specs.UPLOAD_DT: "2022-04-01",
                        "upload_type": "Web", specs.VIDEO_DURATION: 15000.0, specs.TAG: tags[v]})
            w.writerow([row[c] for c in specs.VIDEO_TABLE_COLUMNS])
    return tags


def _write_day(base, date, rng, rows, extra_lines=()):
    folder = impression_logs.day_dir(base, date)
    os.makedirs(folder, exist_ok=True)
    records = []
    for _ in range(rows):
        user = rng.randrange(USERS) if date > START else rng.randrange(USERS - 5)  # some users appear later
        time_ms = _day_ms(date) + rng.randrange(86_400_000)
        values = {c: rng.randint(0, 1) for c in specs.LOG_COLUMNS}
        values.update({specs.USER_ID: user, specs.VIDEO_ID: rng.randrange(VIDEOS), specs.DATE: int(date.strftime("%Y%m%d")),
                       specs.TIME_MS: time_ms, specs.HOURMIN: 0, specs.PLAY_TIME_MS: 1000, specs.DURATION_MS: 15000,
                       specs.TAB: rng.randrange(15)})
        values[specs.HOURMIN] = (time_ms - _day_ms(date)) // 3_600_000 * 100
        records.append(values)
    path = os.path.join(folder, "log.csv")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(specs.LOG_COLUMNS)
        for r in records:
            w.writerow([r[c] for c in specs.LOG_COLUMNS])
        for line in extra_lines:
            f.write(line + "\n")
    return records


def _run_day(base, out, date, previous=None, max_bad=0.01):
    return avc_example_gen.run_executor_for_day(base, date, os.path.join(out, date.isoformat()),
                                                config.direct_runner_args("in_memory"), previous, max_bad)


def _read_examples(artifact):
    rows = []
    for path in glob.glob(os.path.join(artifact.uri, "Split-day", "*.gz")):
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP"):
            ex = tf.train.Example.FromString(record.numpy())
            rows.append({k: list(getattr(v, v.WhichOneof("kind")).value) for k, v in ex.features.feature.items()})
    return rows


@pytest.fixture(scope="module")
def multi_day(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("logs"))
    out = str(tmp_path_factory.mktemp("artifacts"))
    rng = random.Random(7)
    tags = _write_tables(base, rng)
    logs = {START + datetime.timedelta(days=d): _write_day(base, START + datetime.timedelta(days=d), rng, 150)
            for d in range(DAYS)}
    outputs, previous = {}, None
    for date in sorted(logs):
        outputs[date] = _run_day(base, out, date, previous)
        previous = outputs[date]["user_state"][0]
    return base, out, tags, logs, outputs


def test_avc_history_and_new_user_equal_brute_force_across_days(multi_day):
    _, _, tags, logs, outputs = multi_day
    every = [r for date in sorted(logs) for r in logs[date]]
    expected = {}
    by_user = {}
    for r in every:
        by_user.setdefault(r[specs.USER_ID], []).append(r)
    for user, rows in by_user.items():
        rows.sort(key=lambda r: r[specs.TIME_MS])
        first = rows[0][specs.TIME_MS]
        for i, r in enumerate(rows):
            earlier = rows[:i]
            hist_ids = [e[specs.VIDEO_ID] for e in reversed(earlier)][: specs.HISTORY_LENGTH]
            hist_tags = [t for e in reversed(earlier) for t in reversed(parse_tags(tags[e[specs.VIDEO_ID]]))][: specs.HISTORY_LENGTH]
            is_new = int(r[specs.TIME_MS] - first < specs.NEW_USER_HOURS * 3_600_000)
            expected[(user, r[specs.TIME_MS])] = (i, hist_ids, hist_tags, is_new)
    seen = 0
    for date in sorted(logs):
        for ex in _read_examples(outputs[date]["examples"][0]):
            user = ex[specs.USER_ID][0]
            hour = ex[specs.HOUR][0]
            matches = [k for k in expected if k[0] == user]
            assert matches
            # Identify the impression by its AVC: unique per user.
            avc = ex[specs.AVC][0]
            key = next(k for k in matches if expected[k][0] == avc)
            want_avc, want_ids, want_tags, want_new = expected[key]
            assert ex[specs.HIST_VIDEO_IDS] == want_ids
            assert ex[specs.HIST_TAGS] == want_tags
            assert ex[specs.IS_NEW_USER] == [want_new]
            assert ex[specs.AVC_BUCKET] == [specs.pc_bucket(avc)]
            # The hour of day in the logs' time zone (days there start at _day_ms of each date).
            assert hour == (key[1] - _day_ms(datetime.date(1970, 1, 1))) % 86_400_000 // 3_600_000
            seen += 1
    assert seen == len(every)


def test_no_leakage_history_only_holds_earlier_videos(multi_day):
    _, _, _, logs, outputs = multi_day
    last = max(logs)
    for ex in _read_examples(outputs[last]["examples"][0]):
        assert len(ex[specs.HIST_VIDEO_IDS]) == min(ex[specs.AVC][0], specs.HISTORY_LENGTH)


def test_state_carries_counts(multi_day):
    _, _, _, logs, outputs = multi_day
    state = outputs[max(logs)]["user_state"][0]
    records = []
    for path in glob.glob(os.path.join(state.uri, "*.gz")):
        import gzip
        with gzip.open(path, "rt") as f:
            records += [json.loads(line) for line in f]
    counts = {}
    for date in logs:
        for r in logs[date]:
            counts[r[specs.USER_ID]] = counts.get(r[specs.USER_ID], 0) + 1
    assert {r["user_id"]: r["impressions"] for r in records} == counts
    assert state.through_date == max(logs).isoformat()


def test_artifact_properties(multi_day):
    _, _, _, logs, outputs = multi_day
    examples = outputs[START]["examples"][0]
    assert examples.span == (START - datetime.date(1970, 1, 1)).days
    assert examples.get_int_custom_property("rows") == len(logs[START])


def _row(date, **values):
    """One log line of `date` for user 1, video 1, with `values` set."""
    fields = {c: "0" for c in specs.LOG_COLUMNS}
    fields.update({specs.USER_ID: "1", specs.VIDEO_ID: "1", specs.DATE: date.strftime("%Y%m%d"),
                   specs.TIME_MS: str(_day_ms(date) + 5)})
    fields.update({k: str(v) for k, v in values.items()})
    return ",".join(fields[c] for c in specs.LOG_COLUMNS)


_LABEL = impression_logs.LABEL_COLUMNS[0]
BAD_LINES = {
    "1,2,3": "expected 19 columns",
    ",".join(["x"] + ["0"] * 18): "column 'user_id': 'x' is not an integer",
    ",".join(["-1", "1", "20220411", "0", str(_day_ms(START + datetime.timedelta(days=3))), *["0"] * 14]): "negative value",
    ",".join(["1", "1", "20220411", "0", "5", *["0"] * 14]): "outside 2022-04-11",
    ",".join(["1", "99999", "20220411", "0", str(_day_ms(START + datetime.timedelta(days=3)) + 5), *["0"] * 14]): "unknown video",
    _row(START + datetime.timedelta(days=3), **{_LABEL: 7}): f"column {_LABEL!r}: label 7 is not 0 or 1",
    _row(START + datetime.timedelta(days=3), **{_LABEL: -1}): f"column {_LABEL!r}: label -1 is not 0 or 1",
}


def _copy_base(base, tmp_path):
    import shutil
    return shutil.copytree(base, os.path.join(str(tmp_path), "base"))


def test_bad_rows_are_quarantined_with_reasons(multi_day, tmp_path):
    base, out, _, logs, outputs = multi_day
    base = _copy_base(base, tmp_path)
    date = START + datetime.timedelta(days=DAYS)
    _write_day(base, date, random.Random(1), 800, extra_lines=list(BAD_LINES))
    result = _run_day(base, str(tmp_path), date, outputs[max(logs)]["user_state"][0], max_bad=0.01)
    quarantine = result["quarantine"][0]
    with open(os.path.join(quarantine.uri, avc_example_gen.QUARANTINE_FILE)) as f:
        bad = [json.loads(line) for line in f]
    assert len(bad) == len(BAD_LINES)
    for row in bad:
        assert any(want in row["reason"] for line, want in BAD_LINES.items() if line == row["raw"]), row
        assert row["row"] > 800 and row["file"].endswith("log.csv")
    assert len(_read_examples(result["examples"][0])) == 800


def test_too_many_bad_rows_fail_naming_file_rows_and_reasons(multi_day, tmp_path):
    """The bad rows are kept outside the step's outputs (TFX deletes a failed step's), and the
    message points there."""
    import shutil

    base, out, _, logs, outputs = multi_day
    base = _copy_base(base, tmp_path)
    date = START + datetime.timedelta(days=DAYS)
    _write_day(base, date, random.Random(2), 100, extra_lines=list(BAD_LINES) * 2)
    kept = str(tmp_path / "home" / "quarantine")
    with pytest.raises(impression_logs.LogFormatError) as error:
        avc_example_gen.run_executor_for_day(
            base, date, str(tmp_path / "out"), config.direct_runner_args("in_memory"),
            outputs[max(logs)]["user_state"][0], max_bad_row_fraction=0.01, quarantine_dir=kept)
    shutil.rmtree(tmp_path / "out")  # as TFX does with a failed execution's outputs
    message = str(error.value)
    kept_rows = os.path.join(kept, date.isoformat(), avc_example_gen.QUARANTINE_FILE)
    assert "log.csv row 101" in message and "rows are bad" in message and message.endswith(kept_rows)
    with open(kept_rows) as f:
        bad = [json.loads(line) for line in f]
    assert len(bad) == 2 * len(BAD_LINES) and all(row["reason"] for row in bad)
    with open(os.path.join(kept, date.isoformat(), avc_example_gen.QUARANTINE_SUMMARY)) as f:
        assert json.load(f)["bad_rows"] == 2 * len(BAD_LINES)


def test_exact_duplicate_rows_are_quarantined_and_counted(multi_day, tmp_path):
    """Rows equal in every column are one impression logged twice, within a file or across files."""
    base, out, _, logs, outputs = multi_day
    base = _copy_base(base, tmp_path)
    date = START + datetime.timedelta(days=DAYS)
    records = _write_day(base, date, random.Random(5), 400)
    lines = [",".join(str(r[c]) for c in specs.LOG_COLUMNS) for r in records[:3]]
    with open(os.path.join(impression_logs.day_dir(base, date), "log.csv"), "a") as f:
        f.write(lines[0] + "\n")
    with open(os.path.join(impression_logs.day_dir(base, date), "late.csv"), "w") as f:
        f.write(",".join(specs.LOG_COLUMNS) + "\n" + "\n".join(lines[1:]) + "\n")
    result = _run_day(base, str(tmp_path), date, outputs[max(logs)]["user_state"][0], max_bad=0.01)
    with open(os.path.join(result["quarantine"][0].uri, avc_example_gen.QUARANTINE_FILE)) as f:
        bad = sorted((os.path.basename(row["file"]), row["row"], row["reason"]) for row in map(json.loads, f))
    # The first in (file, row) order is kept: late.csv sorts before log.csv.
    kept = [("late.csv", 1), ("late.csv", 2), ("log.csv", 1)]
    assert [(name, number) for name, number, _ in bad] == [("log.csv", 2), ("log.csv", 3), ("log.csv", 401)]
    for (_, _, reason), (name, number) in zip(bad, kept):
        assert reason.startswith("duplicate row: same as ") and reason.endswith(f"{name} row {number}"), reason
    examples = result["examples"][0]
    assert len(_read_examples(examples)) == 400 == examples.get_int_custom_property("rows")
    assert examples.get_int_custom_property("duplicate_rows") == 3


def test_a_second_copy_of_the_days_file_is_refused(multi_day, tmp_path):
    import shutil

    base, _, _, logs, outputs = multi_day
    base = _copy_base(base, tmp_path)
    folder = impression_logs.day_dir(base, max(logs))
    shutil.copyfile(os.path.join(folder, "log.csv"), os.path.join(folder, "log_copy.csv"))
    with pytest.raises(impression_logs.LogFormatError, match=r"log_copy\.csv has the same content as .*log\.csv"):
        _run_day(base, str(tmp_path), max(logs), outputs[max(logs) - datetime.timedelta(days=1)]["user_state"][0])


def test_users_missing_from_the_user_table_get_defaults_and_are_counted(multi_day):
    _, _, _, logs, outputs = multi_day
    for date in logs:
        without = sum(1 for r in logs[date] if r[specs.USER_ID] >= USERS - 3)  # _write_tables leaves them out
        assert outputs[date]["examples"][0].get_int_custom_property("rows_without_user_profile") == without
    assert without > 0


def test_file_fingerprints_are_cached_by_size_and_mtime(tmp_path):
    path, cache = tmp_path / "log.csv", str(tmp_path / "cache.json")
    path.write_text("a,b\n1,2\n")
    first = impression_logs.describe_files([str(path)], cache)
    assert first[0]["sha256"] == impression_logs.file_sha256(str(path)) and first[0]["size"] == 8
    path.write_text("a,b\n1,3\n")   # same size, new mtime: hashed again
    os.utime(path, ns=(1, 2))
    second = impression_logs.describe_files([str(path)], cache)
    assert second[0]["sha256"] != first[0]["sha256"]
    with open(cache) as f:
        assert json.load(f)[str(path)] == [8, 2, second[0]["sha256"]]
    assert impression_logs.fingerprint(second) == f"log.csv:8:{second[0]['sha256']}"


def test_missing_state_for_a_later_day_is_refused(multi_day, tmp_path):
    base, _, _, logs, _ = multi_day
    with pytest.raises(impression_logs.LogFormatError, match="days must be ingested in order"):
        _run_day(base, str(tmp_path), START + datetime.timedelta(days=1), previous=None)


def test_parquet_logs_give_the_same_examples_as_csv(multi_day, tmp_path):
    import shutil

    import pyarrow.csv as pv
    import pyarrow.parquet as pq

    base, _, _, _, outputs = multi_day
    parquet_base = shutil.copytree(base, os.path.join(str(tmp_path), "parquet"))
    folder = impression_logs.day_dir(parquet_base, START)
    pq.write_table(pv.read_csv(os.path.join(folder, "log.csv")), os.path.join(folder, "log.parquet"))
    os.remove(os.path.join(folder, "log.csv"))
    from_parquet = _run_day(parquet_base, str(tmp_path), START)
    key = lambda ex: (ex[specs.USER_ID][0], ex[specs.AVC][0])
    csv_rows = sorted(_read_examples(outputs[START]["examples"][0]), key=key)
    parquet_rows = sorted(_read_examples(from_parquet["examples"][0]), key=key)
    assert len(parquet_rows) == len(csv_rows) > 0
    assert parquet_rows == csv_rows


def test_a_log_day_runs_from_midnight_to_midnight_beijing_time():
    """KuaiRand's dates are Beijing time (UTC+8): 00:00 there is 16:00 UTC the day before."""
    date = datetime.date(2022, 4, 11)
    midnight_utc = int(datetime.datetime(2022, 4, 11, tzinfo=datetime.timezone.utc).timestamp() * 1000)
    hour_ms = 3_600_000

    def reason(time_ms):
        fields = ["1", "1", "20220411", "0", str(time_ms), *["0"] * 14]
        impression, bad = impression_logs.validate_row("log.csv", 2, fields, date, known_videos={1})
        return None if bad is None else bad.reason

    assert reason(midnight_utc - 8 * hour_ms) is None          # 00:00 in Beijing
    assert reason(midnight_utc + 16 * hour_ms - 1) is None     # 23:59:59.999 in Beijing
    assert "outside 2022-04-11 (UTC+08:00" in reason(midnight_utc - 8 * hour_ms - 1)
    assert "outside 2022-04-11" in reason(midnight_utc + 16 * hour_ms)


def test_beam_components_do_not_package_tfx_for_direct_runner(multi_day, tmp_path, monkeypatch):
    """With the project's DirectRunner arguments TFX does not copy and sdist itself into the
    temp directory before a Beam component (it would for a remote runner)."""
    base, _, _, logs, outputs = multi_day
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    date = max(logs)
    _run_day(base, str(tmp_path / "out"), date, outputs[date - datetime.timedelta(days=1)]["user_state"][0])
    packaged = [p for p in scratch.rglob("*") if "tfx_ephemeral" in p.name]
    assert not packaged, f"TFX packaged itself for Beam workers: {packaged[:3]}"
    assert "--sdk_container_image" not in " ".join(config.direct_runner_args(extra=["--runner=DataflowRunner"]))
    assert config.direct_runner_args(extra=["--setup_file=/x/setup.py"])[-1] == "--setup_file=/x/setup.py"
