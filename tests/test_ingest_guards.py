"""The ingest side of a daily home under faults: a lost day, a changed log file, a run stopped
mid-ingest, a mistyped --data (real TFX ingest runs on tiny synthetic logs; each suggestion a
failure prints is run as printed)."""

import datetime
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest
from ml_metadata.proto import metadata_store_pb2
from tfx.orchestration import metadata

from components import impression_logs, synthetic_logs
from components.avc_example_gen import span_of
from components.span_window import SpanWindowStrategy, WindowError
from pipeline import config as config_lib
from pipeline import local_runner, skip_day
from pipeline import pipeline as pipeline_lib

DAY_1 = datetime.date(2022, 4, 8)
DAY_2, LOST, DAY_4 = (DAY_1 + datetime.timedelta(days=d) for d in (1, 2, 3))
_ENV = {**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR}


def _config(home, data, date, **overrides):
    return config_lib.RunConfig(date=date, data_dir=str(data), home=str(home), ingest_only=True,
                                beam_direct_running_mode="in_memory", beam_num_workers=1, **overrides)


def _run_suggestion(message):
    """Runs the `bin/poso ...` command a failure message suggests, as the CLI (we are in its environment)."""
    match = re.search(r"bin/poso (skip-day \S+ (?:--reason '[^']*' |--undo )--home \S+)", message)
    assert match, f"no command suggested in: {message}"
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *shlex.split(match.group(1))],
                          cwd=config_lib.PROJECT_DIR, env=_ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _executions(cfg, component):
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        context = m.store.get_context_by_type_and_name("node", f"{config_lib.PIPELINE_NAME}.{component}")
        return [] if context is None else m.store.get_executions_by_context(context.id)


@pytest.fixture(scope="module")
def gap_data(tmp_path_factory):
    """Four days of logs with the third lost."""
    data = tmp_path_factory.mktemp("gap") / "data"
    synthetic_logs.generate(str(data), DAY_1, 4, seed=5, impressions_per_day=200)
    shutil.rmtree(impression_logs.day_dir(str(data), LOST))
    return data


def test_train_dates_reach_past_skipped_days():
    cfg = config_lib.RunConfig(date=DAY_4, train_days=2, skipped_dates=(LOST,))
    assert cfg.train_dates == [DAY_1, DAY_2] and cfg.previous_date == DAY_2
    assert config_lib.RunConfig(date=DAY_4, train_days=2).train_dates == [DAY_2, LOST]


def test_window_leaves_skipped_spans_out_and_still_enforces_the_minimum():
    class Examples:
        def __init__(self, span, id_):
            self.span, self.id = span, id_

    spans = [span_of(DAY_1), span_of(DAY_2)]
    window = SpanWindowStrategy(spans[0], span_of(LOST), min_spans=2, skipped_spans=[span_of(LOST)])
    resolved = window.resolve_artifacts(None, {"examples": [Examples(s, i) for i, s in enumerate(spans)]})
    assert [a.span for a in resolved["examples"]] == spans
    with pytest.raises(WindowError, match=f"have 1; missing or invalid: {DAY_1.isoformat()}\\."):
        window.resolve_artifacts(None, {"examples": [Examples(spans[1], 1)]})


def test_skip_day_is_recorded_in_ml_metadata_and_undone(tmp_path):
    cfg = _config(tmp_path / "home", tmp_path, DAY_4)
    os.makedirs(cfg.home_dir)
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        skip_day.record_skip(m.store, LOST, "disk lost")
        with pytest.raises(ValueError, match="already skipped"):
            skip_day.record_skip(m.store, LOST, "again")
    assert skip_day.read_skipped_days(cfg) == {LOST: "disk lost"}
    _run_suggestion(skip_day.command(LOST, cfg.home, undo=True))
    assert skip_day.read_skipped_days(cfg) == {}
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        (record,) = m.store.get_artifacts_by_type(skip_day.TYPE_NAME)
        assert record.state == metadata_store_pb2.Artifact.DELETED
        assert record.custom_properties["reason"].string_value == "disk lost"


@pytest.mark.parametrize("case", ["mistyped_data", "date_without_logs"])
def test_bad_data_or_date_is_refused_before_anything_runs(gap_data, tmp_path, case):
    data, date, words = {"mistyped_data": (str(gap_data) + "x", DAY_2, "no logs/ folder there"),
                         "date_without_logs": (gap_data, DAY_4 + datetime.timedelta(days=30),
                                               f"it has logs for {DAY_1.isoformat()}..{DAY_4.isoformat()}")}[case]
    cfg = _config(tmp_path / "home", data, date)
    with pytest.raises(local_runner.InputError, match=re.escape(words)):
        local_runner.run_day(cfg)
    assert not os.path.exists(cfg.metadata_path)


@pytest.fixture(scope="module")
def lost_day_home(gap_data, tmp_path_factory):
    """Day 4 refused for the lost day 3 (the message: `skip-day` to run), then skipped and ingested."""
    cfg = _config(tmp_path_factory.mktemp("lost") / "home", gap_data, DAY_4)
    with pytest.raises(local_runner.InputError) as refused:
        local_runner.run_day(cfg)
    printed = _run_suggestion(str(refused.value))
    result = local_runner.run_day(cfg)
    return cfg, str(refused.value), printed, result


def test_a_lost_day_is_refused_with_a_skip_day_that_works(lost_day_home):
    cfg, refused, printed, _ = lost_day_home
    assert f"no logs for {LOST.isoformat()}" in refused and "skip-day" in refused
    assert f"{LOST.isoformat()} skipped" in printed and "--undo" in printed
    assert set(local_runner.validated_ingests(cfg)) == {span_of(DAY_1), span_of(DAY_2), span_of(DAY_4)}
    # No user state through the lost day: day 4 started from day 2's.
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        states = {a.custom_properties["span"].int_value for a in m.store.get_artifacts_by_type("poso.UserState")}
    assert span_of(LOST) not in states


def test_a_changed_log_file_is_ingested_again_and_reported(lost_day_home, gap_data):
    cfg, _, _, _ = lost_day_home
    before = len(_executions(cfg, "AvcExampleGen"))
    path = impression_logs.day_files(str(gap_data), DAY_4)[0]
    with open(path) as f:
        header, *rows = f.read().splitlines()
    with open(path, "w") as f:  # a corrected file: one row fewer
        f.write("\n".join([header] + rows[:-1]) + "\n")
    result = local_runner.run_day(cfg)
    executions = _executions(cfg, "AvcExampleGen")[before:]
    states = [e.last_known_state for e in executions]
    # Days 1 and 2 are unchanged (no ingest run at all); day 4 runs again on the new file.
    assert states == [metadata_store_pb2.Execution.COMPLETE], states
    assert result["input_changed"] and result["eval_rows"] == len(rows) - 1
    assert local_runner.validated_ingests(cfg)[span_of(DAY_4)] == impression_logs.day_fingerprint(str(gap_data), DAY_4)


def test_an_earlier_day_that_fails_ingest_names_the_skip_day_that_gets_past_it(tmp_path):
    data = tmp_path / "data"
    synthetic_logs.generate(str(data), DAY_1, 3, seed=8, impressions_per_day=150)
    with open(impression_logs.day_files(str(data), DAY_2)[0], "w") as f:
        f.write("user_id,video_id\n1,2\n")  # columns missing: AvcExampleGen refuses the day
    cfg = _config(tmp_path / "home", data, LOST)
    with pytest.raises(local_runner.PipelineRunError) as failed:
        local_runner.run_day(cfg)
    assert failed.value.component == "AvcExampleGen" and "missing log columns" in failed.value.cause
    assert f"{DAY_2.isoformat()} must be ingested before {LOST.isoformat()}" in str(failed.value)
    _run_suggestion(str(failed.value))
    local_runner.run_day(cfg)
    assert set(local_runner.validated_ingests(cfg)) == {span_of(DAY_1), span_of(LOST)}


_INGEST_RUN = """
import datetime, sys
from pipeline import config as config_lib, local_runner
local_runner.run_day(config_lib.RunConfig(date=datetime.date.fromisoformat(sys.argv[3]), data_dir=sys.argv[1],
                     home=sys.argv[2], ingest_only=True, beam_direct_running_mode="in_memory"))
"""


@pytest.mark.slow
def test_ctrl_c_during_an_earlier_days_statistics_is_finished_by_the_rerun(tmp_path):
    """Interrupted (SIGINT) in StatisticsGen of day 1's ingest, within the run for day 2: day 1's
    examples are recorded but not validated; the rerun validates day 1 from the cache, then day 2."""
    data, home = tmp_path / "data", tmp_path / "home"
    synthetic_logs.generate(str(data), DAY_1, 2, seed=6, impressions_per_day=200)
    cfg = _config(home, data, DAY_2)
    statistics = os.path.join(cfg.pipeline_root, "StatisticsGen")
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, "-c", _INGEST_RUN, str(data), str(home), DAY_2.isoformat()],
                                 cwd=config_lib.PROJECT_DIR, env=_ENV, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            deadline = time.time() + 600
            while not os.path.isdir(statistics):
                assert child.poll() is None and time.time() < deadline, open(tmp_path / "child.log").read()[-3000:]
                time.sleep(0.1)
            os.killpg(child.pid, signal.SIGINT)
            child.wait(timeout=120)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    assert local_runner.validated_ingests(cfg) == {}
    assert local_runner.days_to_ingest(cfg) == [DAY_1]
    local_runner.run_day(cfg)
    assert set(local_runner.validated_ingests(cfg)) == {span_of(DAY_1), span_of(DAY_2)}
    states = [e.last_known_state for e in _executions(cfg, "AvcExampleGen")]
    assert states == [metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED,
                      metadata_store_pb2.Execution.COMPLETE], states
