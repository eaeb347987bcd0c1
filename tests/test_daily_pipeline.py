"""The daily pipeline in real runs (LocalDagRunner, Beam, TFX, TensorFlow) on small synthetic logs.

One home builds up like a production one: the run for day 8 is killed inside the Trainer and
resumed, rerun, then day 9 (whose labels are inverted) runs, then day 8 is rerun once more. A
second, small home feeds broken or drifted logs to the ingest step.
"""

import contextlib
import csv
import dataclasses
import datetime
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types

import pytest
from ml_metadata.proto import metadata_store_pb2
from tfx.orchestration import metadata

from components import avc, impression_logs, span_window, synthetic_logs
from components.avc_example_gen import span_of
from feature_specs import specs
from models import preprocessing
from pipeline import config as config_lib
from pipeline import local_runner, scratch, summary
from pipeline import pipeline as pipeline_lib

START = datetime.date(2022, 4, 8)
FIRST_FULL = START + datetime.timedelta(days=config_lib.TRAIN_DAYS)      # day 8: 7 days before it
CORRUPTED = FIRST_FULL + datetime.timedelta(days=1)                        # day 9
ROWS_PER_DAY = 800
SEED = 42          # the demo's data: its first full window is blessed (tests/test_demo_e2e.py)
# Enough steps for the primary tasks to rank better than chance on day 8 (20 left like at AUC 0.50,
# a coin flip against the floor); a step costs about 30 ms here.
TRAIN_STEPS = 150
PRIMARY = next(t.name for t in specs.TASKS if t.primary)
LABELS = [f.name for f in specs.features_of_kind(specs.Kind.LABEL)]
CACHED, COMPLETE, RUNNING = (metadata_store_pb2.Execution.CACHED, metadata_store_pb2.Execution.COMPLETE,
                             metadata_store_pb2.Execution.RUNNING)
INGEST_NODES = ("AvcExampleGen", "StatisticsGen", "ExampleValidator", "SchemaAnomaliesGate")
# Every component of a daily run with an executor (resolvers have none).
COMPONENTS = ("ImportSchemaGen",) + INGEST_NODES + (
    "Transform", "Trainer", "Evaluator", "BlessingGate", "ServingInfraValidator", "Pusher", "ServingConfigWriter")


def _config(home, data, date, **overrides):
    return config_lib.RunConfig(date=date, data_dir=str(data), home=str(home), train_steps=TRAIN_STEPS,
                                beam_direct_running_mode="in_memory", beam_num_workers=1, **overrides)


def _rewrite_csv(path, change):
    """change(header, rows) -> (header, rows), applied to a CSV file in place."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    header, rows = change(header, rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)


def _set_column(column, value_of):
    def change(header, rows):
        i = header.index(column)
        return header, [row[:i] + [value_of(row[i])] + row[i + 1:] for row in rows]
    return change


def _versions(cfg):
    """Numbered version folders in TF Serving's base directory."""
    if not os.path.isdir(cfg.serving_model_dir):
        return []
    return sorted(v for v in os.listdir(cfg.serving_model_dir) if v.isdigit())


# ---------------------------------------------------------------------------------------------
# Reading MLMD: which executions a run made, in which state, on which inputs.
# ---------------------------------------------------------------------------------------------
class Store:
    def __init__(self, cfg):
        self._cfg = cfg

    def __enter__(self):
        self._metadata = metadata.Metadata(pipeline_lib.metadata_connection(self._cfg)).__enter__()
        self.store = self._metadata.store
        return self

    def __exit__(self, *exc):
        self._metadata.__exit__(*exc)

    def runs(self):
        """Pipeline-run context ids, oldest first."""
        return sorted(c.id for c in self.store.get_contexts_by_type("pipeline_run"))

    def executions(self, run_id):
        """{component id: execution} of one pipeline run."""
        node_type = self.store.get_context_type("node").id
        result = {}
        for execution in self.store.get_executions_by_context(run_id):
            nodes = [c.name for c in self.store.get_contexts_by_execution(execution.id) if c.type_id == node_type]
            result[nodes[0].split(".", 1)[1]] = execution
        return result

    def executions_of(self, component):
        context = self.store.get_context_by_type_and_name("node", f"{config_lib.PIPELINE_NAME}.{component}")
        return [] if context is None else self.store.get_executions_by_context(context.id)

    def inputs(self, execution, key):
        events = [e for e in self.store.get_events_by_execution_ids([execution.id])
                  if e.type == metadata_store_pb2.Event.INPUT and e.path.steps[0].key == key]
        return self.store.get_artifacts_by_id([e.artifact_id for e in events])

    def outputs(self, execution, key):
        events = [e for e in self.store.get_events_by_execution_ids([execution.id])
                  if e.type == metadata_store_pb2.Event.OUTPUT and e.path.steps[0].key == key]
        return self.store.get_artifacts_by_id([e.artifact_id for e in events])


def _run_and_record(cfg):
    """run_day, and the executions of the pipeline runs it made: [{component: execution}, ...]."""
    with Store(cfg) as s:
        before = set(s.runs())
    result = local_runner.run_day(cfg)
    with Store(cfg) as s:
        runs = [s.executions(r) for r in s.runs() if r not in before]
    return result, runs


# ---------------------------------------------------------------------------------------------
# The production-like home.
# ---------------------------------------------------------------------------------------------
_KILLED_RUN = """
import dataclasses, datetime, json, sys
from pipeline import config as config_lib, local_runner
fields = json.loads(sys.argv[1])
fields["date"] = datetime.date.fromisoformat(fields["date"])
local_runner.setup_logging(verbose=True)
local_runner.run_day(config_lib.RunConfig(**fields))
"""


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Day 8's run in a child process, killed (SIGKILL) as soon as the Trainer's executor starts."""
    root = tmp_path_factory.mktemp("daily")
    data, home = root / "data", root / "home"
    synthetic_logs.generate(str(data), START, config_lib.TRAIN_DAYS + 2, seed=SEED, impressions_per_day=ROWS_PER_DAY)
    # Day 9 shows every label inverted: a model that ranks better than chance scores an AUC under 0.5.
    for path in impression_logs.day_files(str(data), CORRUPTED):
        for label in LABELS:
            _rewrite_csv(path, _set_column(label, lambda v: "0" if int(v) > 0 else "1"))
    cfg = _config(home, data, FIRST_FULL)
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    fields["date"] = cfg.date.isoformat()
    trainer_outputs = os.path.join(cfg.pipeline_root, "Trainer", "model")
    log_path = root / "killed_run.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, json.dumps(fields)], cwd=config_lib.PROJECT_DIR,
                                 env={**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR},
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 600
            while not (os.path.isdir(trainer_outputs) and os.listdir(trainer_outputs)):
                if child.poll() is not None or time.time() > deadline:
                    pytest.fail(f"the child run ended (code {child.returncode}) or timed out before the Trainer "
                                f"started; its log:\n{open(log_path).read()[-5000:]}")
                time.sleep(0.2)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    return cfg


@pytest.fixture(scope="module")
def resumed(killed):
    return _run_and_record(killed)


@pytest.fixture(scope="module")
def rerun(resumed, killed):
    versions = _versions(killed)
    return _run_and_record(killed), versions


@pytest.fixture(scope="module")
def corrupted_day(rerun, killed):
    cfg = dataclasses.replace(killed, date=CORRUPTED)
    versions = _versions(cfg)
    return _run_and_record(cfg), versions


@pytest.fixture(scope="module")
def earlier_day_rerun(corrupted_day, killed):
    versions = _versions(killed)
    return _run_and_record(killed), versions


def test_killed_run_stopped_inside_the_trainer(killed):
    with Store(killed) as s:
        trainers = s.executions_of("Trainer")
        assert [t.last_known_state for t in trainers] == [RUNNING]
        assert s.executions_of("Evaluator") == [] and s.executions_of("Pusher") == []
        # Everything before the Trainer completed: 7 ingest runs and day 8's run.
        assert len(s.runs()) == config_lib.TRAIN_DAYS + 1
        assert all(e.last_known_state == COMPLETE for e in s.executions_of("Transform"))
    assert _versions(killed) == []


def test_first_full_window_is_blessed_and_pushed_once(resumed, killed):
    result, _ = resumed
    assert result["blessed"], f"day 8 not blessed: {result.get('blessing_failures')}"
    assert result["infra_blessed"] and result["pushed"]
    assert result["train_window"] == [START.isoformat(), (FIRST_FULL - datetime.timedelta(days=1)).isoformat()]
    assert result["train_rows"] == config_lib.TRAIN_DAYS * ROWS_PER_DAY
    assert result["eval_rows"] == ROWS_PER_DAY
    versions = _versions(killed)
    assert versions == [result["pushed_version"]]
    assert os.path.isfile(os.path.join(killed.serving_model_dir, versions[0], "saved_model.pb"))
    with open(killed.models_config_path) as f:
        assert killed.serving_model_dir in f.read()
    assert "Evaluation: BLESSED" in summary.format_summary(result)


def test_resumed_run_reuses_ingest_and_transform_and_trains_once(resumed, killed):
    _, runs = resumed
    assert len(runs) == 1, "the resumed run re-ingested earlier days"
    run = runs[0]
    for component in INGEST_NODES + ("Transform",):
        assert run[component].last_known_state == CACHED, component
    for component in ("Trainer", "Evaluator", "ServingInfraValidator", "Pusher"):
        assert run[component].last_known_state == COMPLETE, component
    with Store(killed) as s:
        # One AvcExampleGen execution per day and the cached one: no day was computed twice.
        executed = [e for e in s.executions_of("AvcExampleGen") if e.last_known_state == COMPLETE]
        assert len(executed) == config_lib.TRAIN_DAYS + 1
        # The Trainer trained on the 7 days before day 8, from the cached Transform graph.
        spans = sorted(a.properties["span"].int_value for a in s.inputs(run["Trainer"], "examples"))
        assert spans == list(range(span_of(START), span_of(FIRST_FULL)))


def test_rerun_of_a_pushed_day_is_cached_and_pushes_nothing(rerun, resumed, killed):
    (result, runs), versions_before = rerun
    assert len(runs) == 1
    states = {component: runs[0][component].last_known_state for component in COMPONENTS}
    assert all(state == CACHED for state in states.values()), states
    assert _versions(killed) == versions_before and len(versions_before) == 1
    assert result["blessed"] and result["evaluation_uri"] == resumed[0]["evaluation_uri"]


def test_corrupted_evaluation_day_is_not_blessed_nor_pushed(corrupted_day, resumed, killed):
    (result, runs), versions_before = corrupted_day
    # The same setup blessed the day before: it is the labels that fail this day.
    assert resumed[0]["blessed"]
    assert not result["blessed"] and not result["pushed"]
    assert _versions(killed) == versions_before and len(versions_before) == 1
    floor_failures = [f for f in result["blessing_failures"] if f.startswith(f"auc ({PRIMARY}) on overall: ")]
    assert floor_failures, result["blessing_failures"]
    assert float(floor_failures[0].split(": ")[1].split()[0]) < config_lib.AUC_FLOOR
    assert floor_failures[0] in summary.format_summary(result)
    # Compared with day 8's model too (on the same inverted labels, so it is the floor that fails):
    # candidate, baseline and change, against a margin from the day's size.
    (compared,) = [c for c in result["blessing_checks"]
                   if (c["metric"], c["task"], c["slice"]) == ("auc", PRIMARY, "overall") and "baseline" in c]
    assert compared["message"].startswith(f"auc ({PRIMARY}) on overall: candidate {compared['candidate']:.4f}, "
                                          f"baseline {compared['baseline']:.4f}, change ")
    assert compared["size"] == ROWS_PER_DAY and compared["allowed"] >= config_lib.MAX_AUC_DROP
    assert "NOT blessed" in summary.format_summary(result)
    # It trained on days 2..8 and was compared against day 8's blessed model.
    run = runs[0]
    with Store(killed) as s:
        spans = sorted(a.properties["span"].int_value for a in s.inputs(run["Trainer"], "examples"))
        assert spans == list(range(span_of(START) + 1, span_of(CORRUPTED)))
        baseline = s.inputs(run["Evaluator"], "baseline_model")
        day8_model = s.outputs(resumed[1][0]["Trainer"], "model")
        assert [m.id for m in baseline] == [m.id for m in day8_model]
    assert result["baseline_metrics"]


def _window_examples(artifacts):
    """Every tf.Example of a training window's Examples artifacts, serialized."""
    import tensorflow as tf

    files = sorted(os.path.join(a.uri, "Split-day", name) for a in artifacts
                   for name in os.listdir(os.path.join(a.uri, "Split-day")))
    return [r.numpy() for r in tf.data.TFRecordDataset(files, compression_type="GZIP")]


def test_next_day_takes_the_earlier_windows_analyzer_cache_and_the_same_z_scores(corrupted_day, resumed, killed):
    """Day 9's Transform reads the analyzer cache day 8's wrote, whose per-span entries cover 6 of
    its 7 spans (only the new day is analyzed); its z-scores equal a NumPy analysis of day 9's
    whole window."""
    import numpy as np
    import tensorflow as tf
    import tensorflow_transform as tft

    with Store(killed) as s:
        day8, day9 = sorted((e for e in s.executions_of("Transform") if e.last_known_state == COMPLETE),
                            key=lambda e: e.id)
        assert s.inputs(day8, "analyzer_cache") == []   # the first window: nothing earlier to reuse
        (day8_cache,) = s.outputs(day8, "updated_analyzer_cache")
        assert [a.id for a in s.inputs(day9, "analyzer_cache")] == [day8_cache.id]
        (day9_cache,) = s.outputs(day9, "updated_analyzer_cache")
        window = s.inputs(day9, "examples")
        graph_uri = s.outputs(day9, "transform_graph")[0].uri
    assert sorted(a.properties["span"].int_value for a in window) == list(range(span_of(START) + 1, span_of(CORRUPTED)))
    entries = lambda cache: {e for e in os.listdir(cache.uri) if os.path.isdir(os.path.join(cache.uri, e))}
    assert len(entries(day8_cache)) == len(entries(day9_cache)) == config_lib.TRAIN_DAYS
    shared = entries(day8_cache) & entries(day9_cache)
    assert len(shared) == config_lib.TRAIN_DAYS - 1
    # Each entry's MANIFEST lists the analyzer-cache keys written for that day. The one day
    # analyzed now has the same keys as the 6 taken from day 8's cache, so this analysis looked
    # up exactly the keys those hold: they were hits, not re-analyses.
    def manifest_keys(entry):
        with open(os.path.join(day9_cache.uri, entry, "MANIFEST"), "rb") as f:
            return set(pickle.loads(f.read()))
    (new_day,) = entries(day9_cache) - shared
    assert manifest_keys(new_day) and all(manifest_keys(entry) == manifest_keys(new_day) for entry in shared)
    # Only a cache of the same analysis code is taken (a changed preprocessing_fn analyzes afresh).
    with Store(killed) as s:
        caches = [types.SimpleNamespace(id=a.id) for a in s.store.get_artifacts_by_type("TransformCache")]
        resolve = lambda fingerprint: span_window.EarlierWindowCacheStrategy(
            span_of(CORRUPTED), fingerprint).resolve_artifacts(s.store, {"cache": caches})["cache"]
        assert [c.id for c in resolve(preprocessing.analysis_fingerprint())] == [day9_cache.id]
        assert resolve("another analysis") == []
    # The run summaries say so: day 8 analyzed its whole window, day 9 only its newest day.
    assert resumed[0]["transform_cached_days"] == 0
    assert resumed[0]["transform_analyzed_rows"] == config_lib.TRAIN_DAYS * ROWS_PER_DAY
    day9_summary = corrupted_day[0][0]
    assert day9_summary["transform_cached_days"] == config_lib.TRAIN_DAYS - 1
    assert day9_summary["transform_analyzed_rows"] == ROWS_PER_DAY
    assert (f"Transform: {config_lib.TRAIN_DAYS - 1} of the window's days analyzed from the analyzer cache"
            in summary.format_summary(day9_summary))

    output = tft.TFTransformOutput(graph_uri)
    serialized = _window_examples(window)
    raw = tf.io.parse_example(tf.constant(serialized), output.raw_feature_spec())
    transformed = output.transform_raw_features(raw)
    for feature in specs.features_of_kind(specs.Kind.NUMERIC):
        values = np.log1p(np.maximum(raw[feature.name].numpy().astype(np.float64).reshape(-1), 0.0))
        expected = (values - values.mean()) / (values.std() or 1.0)
        np.testing.assert_allclose(transformed[feature.name].numpy().reshape(-1), expected, rtol=1e-3, atol=1e-3,
                                   err_msg=feature.name)


def test_rerun_of_an_earlier_day_pushes_nothing_and_reports_that_day(earlier_day_rerun, resumed, killed):
    """A backfill over day 8 after day 9 ran: nothing is recomputed, the served version stays."""
    (result, runs), versions_before = earlier_day_rerun
    for component in ("Trainer", "Evaluator", "ServingInfraValidator", "Pusher"):
        assert runs[0][component].last_known_state == CACHED, component
    assert _versions(killed) == versions_before
    assert result["date"] == FIRST_FULL.isoformat()
    assert result["evaluation_uri"] == resumed[0]["evaluation_uri"] and result["blessed"]


def test_gc_deletes_what_no_kept_model_needs_and_keeps_what_serves(earlier_day_rerun, corrupted_day, resumed,
                                                                   killed, capsys):
    """After days 8 (pushed) and 9 (not blessed): `poso gc --keep 0` removes day 9's model steps and
    an old version folder, keeps the served version and the baseline (day 8's model)."""
    from pipeline import cli, gc

    home = str(killed.home)
    old_version = os.path.join(killed.serving_model_dir, "1")
    os.makedirs(old_version)
    open(os.path.join(old_version, "saved_model.pb"), "wb").close()
    served = _versions(killed)
    with Store(killed) as s:
        day9_model = s.outputs(corrupted_day[0][1][-1]["Trainer"], "model")[0]
        day8_model = s.outputs(resumed[1][-1]["Trainer"], "model")[0]
    planned = gc.plan(home, keep=0)
    doomed = {artifact_id for artifact_id, _, _ in planned.artifacts}
    assert day9_model.id in doomed and day8_model.id not in doomed
    assert planned.versions == [old_version] and planned.kept_versions == [int(served[-1])]

    assert cli.main(["gc", "--home", home, "--keep", "0"]) == 0     # a dry run deletes nothing
    assert "Pass --delete to delete" in capsys.readouterr().out
    assert os.path.isdir(day9_model.uri) and os.path.isdir(old_version)
    assert cli.main(["gc", "--home", home, "--keep", "0", "--delete"]) == 0
    assert not os.path.exists(day9_model.uri) and not os.path.exists(old_version)
    assert os.path.isdir(day8_model.uri) and _versions(killed) == served[-1:]
    with Store(killed) as s:
        states = {a.id: a.state for a in s.store.get_artifacts_by_id([day9_model.id, day8_model.id])}
    assert states == {day9_model.id: metadata_store_pb2.Artifact.DELETED, day8_model.id: metadata_store_pb2.Artifact.LIVE}
    assert gc.plan(home, keep=0).artifacts == [] and gc.plan(home, keep=0).versions == []


# ---------------------------------------------------------------------------------------------
# Broken and drifted logs: the run stops before training and says what is wrong, and where.
# ---------------------------------------------------------------------------------------------
DAY_1, DAY_2 = START, START + datetime.timedelta(days=1)


@pytest.fixture(scope="module")
def ingest_home(tmp_path_factory):
    """Day 1 ingested; each case then runs day 2 (trained on day 1) on its own copy of the logs."""
    root = tmp_path_factory.mktemp("ingest")
    data = root / "clean"
    synthetic_logs.generate(str(data), DAY_1, 2, seed=3, impressions_per_day=300)
    local_runner.run_day(_config(root / "home", data, DAY_1, ingest_only=True))
    return root


def _broken_copy(root, name, file_name, change):
    data = root / name
    shutil.copytree(root / "clean", data)
    path = impression_logs.day_files(str(data), DAY_2)[0] if file_name is None else str(data / file_name)
    _rewrite_csv(path, change)
    return data, path


def _drop_column(column):
    def change(header, rows):
        i = header.index(column)
        return header[:i] + header[i + 1:], [row[:i] + row[i + 1:] for row in rows]
    return change


_INT_USER_COLUMN = next(f.name for f in avc.USER_PROFILE_FEATURES if f.dtype is specs.Dtype.INT64)
_UNKNOWN_DEGREE = "hyper_active"
assert _UNKNOWN_DEGREE not in specs.feature(specs.USER_ACTIVE_DEGREE).vocabulary

BROKEN = {
    # name: (file (None: the day's log), change, failing component, words the message must hold)
    "log_without_tab": (None, _drop_column(specs.TAB), "AvcExampleGen", ["LogFormatError", "missing log columns", specs.TAB]),
    "log_with_text_in_tab": (None, _set_column(specs.TAB, lambda v: "home"), "AvcExampleGen",
                             ["LogFormatError", f"column '{specs.TAB}': 'home' is not an integer"]),
    "user_table_with_text_in_int_column": (
        impression_logs.USER_TABLE_FILE, _set_column(_INT_USER_COLUMN, lambda v: "yes"), "AvcExampleGen",
        ["LogFormatError", impression_logs.USER_TABLE_FILE, f"column '{_INT_USER_COLUMN}' holds 'yes'"]),
    "unknown_active_degree": (
        impression_logs.USER_TABLE_FILE, _set_column(specs.USER_ACTIVE_DEGREE, lambda v: _UNKNOWN_DEGREE),
        "SchemaAnomaliesGate", ["schema anomalies", f"feature '{specs.USER_ACTIVE_DEGREE}'", _UNKNOWN_DEGREE]),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_logs_stop_the_run_before_training(ingest_home, case):
    file_name, change, component, words = BROKEN[case]
    data, path = _broken_copy(ingest_home, case, file_name, change)
    cfg = _config(ingest_home / "home", data, DAY_2, train_days=1, min_train_days=1)
    with Store(cfg) as s:
        before = set(s.runs())
    with pytest.raises(local_runner.PipelineRunError) as raised:
        local_runner.run_day(cfg)
    assert raised.value.component == component
    message = str(raised.value)
    assert all(word in message for word in words), message
    if component == "AvcExampleGen":
        assert path in message or os.path.basename(path) in message
    with Store(cfg) as s:
        (run_id,) = set(s.runs()) - before
        ran = s.executions(run_id)
    assert "Transform" not in ran and "Trainer" not in ran


def test_too_few_valid_days_names_the_training_window(ingest_home):
    """A resolver failure is only logged by LocalDagRunner; run_day must still stop with it."""
    cfg = _config(ingest_home / "home", ingest_home / "clean", DAY_2)  # 7 days needed, 1 there
    with pytest.raises(local_runner.PipelineRunError) as raised:
        local_runner.run_day(cfg)
    assert raised.value.component == "training_window"
    assert "WindowError" in str(raised.value) and f"need at least {config_lib.TRAIN_DAYS} valid daily spans" in str(raised.value)


def test_cli_exits_non_zero_naming_the_bad_file(ingest_home):
    data, path = _broken_copy(ingest_home, "cli_log_without_tab", None, _drop_column(specs.TAB))
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--date", DAY_2.isoformat(), "--data", str(data),
         "--home", str(ingest_home / "cli_home"), "--beam-mode", "in_memory", "--train-days", "1"],
        cwd=config_lib.PROJECT_DIR, env={**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR},
        capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert path in done.stderr + done.stdout and "missing log columns" in done.stderr + done.stdout


def test_a_run_keeps_its_temp_files_in_a_directory_removed_at_the_end(tmp_path, monkeypatch):
    """Beam and TensorFlow leave files in the temp directory; a run's go to its own scratch
    directory (TMPDIR too, for Beam's worker processes), removed afterwards."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("TMPDIR", raising=False)
    with scratch.run_scratch_dir() as scratch_dir:
        leftover = tempfile.mkdtemp()
        assert os.path.dirname(leftover) == scratch_dir and os.environ["TMPDIR"] == scratch_dir
        assert os.path.dirname(scratch_dir) == str(tmp_path)
    assert not os.path.exists(scratch_dir)
    assert tempfile.tempdir == str(tmp_path) and "TMPDIR" not in os.environ


def test_a_stop_while_the_scratch_folder_is_set_up_leaves_nothing(tmp_path, monkeypatch):
    """A stop signal (here raised where the watchdog starts) before the block is entered: the
    folder, whose path the run knew beforehand (scratch.new_path), is removed, TMPDIR untouched."""
    def stopped(*_args, **_kwargs):
        raise KeyboardInterrupt

    path = scratch.new_path(str(tmp_path))
    monkeypatch.setattr(scratch.subprocess, "Popen", stopped)
    monkeypatch.delenv("TMPDIR", raising=False)
    with pytest.raises(KeyboardInterrupt):
        with scratch.run_scratch_dir(path):
            pytest.fail("the block ran")
    assert os.listdir(tmp_path) == [] and "TMPDIR" not in os.environ

def _scratch_holders(tmp_path, count):
    """`count` real processes, each in its own session, inside run_scratch_dir with a child
    process started there (as Beam starts its workers); yields [(process, scratch, child pid)]."""
    holder = ("import subprocess, sys, time; from pipeline import scratch\n"
              "with scratch.run_scratch_dir() as d:\n"
              "    child = subprocess.Popen(['sleep', '600'])\n"
              "    print(d, child.pid, flush=True); time.sleep(600)")
    env = {**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR, "TMPDIR": str(tmp_path)}
    runs = [subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True, env=env,
                             start_new_session=True) for _ in range(count)]
    held = []
    for run in runs:
        folder, child = run.stdout.readline().split()
        held.append((run, folder, int(child)))
    return held


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_run_killed_outright_leaves_no_process_nor_scratch_folder(tmp_path):
    """SIGKILL to a run (as the OOM killer): the processes it started in its scratch folder (Beam's
    workers) are ended and the folder removed by its watchdog; a live run's are untouched."""
    (killed, killed_dir, killed_child), (live, live_dir, live_child) = _scratch_holders(tmp_path, 2)
    try:
        assert scratch.processes_started_in(killed_dir) == [killed_child]
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        deadline = time.time() + 20
        while (_alive(killed_child) or os.path.exists(killed_dir)) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(killed_child) and not os.path.exists(killed_dir)
        assert _alive(live_child) and os.path.isdir(live_dir)
    finally:
        for run, _, child in ((killed, killed_dir, killed_child), (live, live_dir, live_child)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def test_a_scratch_folder_left_by_a_killed_run_and_watchdog_is_removed_by_the_next_run(tmp_path):
    """Run and watchdog killed at once (their whole session): the next run removes the folder,
    keeps a live run's, and leaves a folder that is no run's alone."""
    (killed, killed_dir, killed_child), (live, live_dir, live_child) = _scratch_holders(tmp_path, 2)
    try:
        os.killpg(killed.pid, signal.SIGKILL)   # the holder, its watchdog and its child
        killed.wait(timeout=30)
        other = tmp_path / (scratch.PREFIX + "not-a-run")
        other.mkdir()
        assert os.path.isdir(killed_dir) and scratch.remove_abandoned(str(tmp_path)) == [killed_dir]
        assert os.path.isdir(live_dir) and other.is_dir()
    finally:
        for run in (killed, live):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert scratch.remove_abandoned(str(tmp_path)) == [live_dir]
