"""The daily run under faults, for real (bin/poso, TFX, Beam, TensorFlow) on tiny synthetic logs.

- fast (default suite): a second run of the same HOME refused with exit code 4 naming the holder,
  then SIGTERM to the PID of a real `bin/poso run` wrapper while Beam's worker processes run a step;
- slow: one day's run killed (SIGKILL, POSO_FAULT_INJECT) at every component boundary and inside
  the Pusher in turn, each rerun resuming; a run killed (SIGKILL) while Beam's multi_processing
  worker processes run StatisticsGen, then Transform; a second copy of a day's log file, then a
  corrected file; then two days at once and the same day twice at once.

After each: at most one pushed version per day (exactly one once a blessed day's run ends), no row
lost (raw rows = examples + quarantined rows, for every ingested day), no process left of the run,
no execution left RUNNING once a run has finished, no scratch folder left. The slow cases print
their figures (`-s`) and write them to fault_figures.json in their temp folder.
"""

import csv
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from ml_metadata.proto import metadata_store_pb2
from tfx.orchestration import metadata

from components import day_versions, fault_injection, impression_logs, synthetic_logs
from components.avc_example_gen import QuarantinedRows, date_of
from pipeline import config as config_lib
from pipeline import exit_codes
from pipeline import pipeline as pipeline_lib

START = datetime.date(2022, 4, 8)
TRAIN_DAYS = 2
EVAL_DAY = START + datetime.timedelta(days=TRAIN_DAYS)          # trained on the two days before it
NEXT_DAY = EVAL_DAY + datetime.timedelta(days=1)
ROWS_PER_DAY = 400
BAD_ROWS = 2            # per day, under the 1% that stops a day: they are quarantined
SEED = 42
TRAIN_STEPS = 20
POSO = os.path.join(config_lib.PROJECT_DIR, "bin", "poso")
# The nodes of a daily run in LocalDagRunner's order (resolvers too: they log the same lines).
NODES = ("ImportSchemaGen", "baseline_model", "previous_user_state", "training_window", "AvcExampleGen",
         "StatisticsGen", "ExampleValidator", "SchemaAnomaliesGate", "Transform", "Trainer", "Evaluator",
         "ServingInfraValidator", "BlessingGate", "Pusher", "ServingConfigWriter")
KILL_POINTS = [point for node in NODES for point in
               ([f"{node}:running", f"{node}:finished"] if node != "Pusher" else
                ["Pusher:running", "Pusher:copied", "Pusher:renamed", "Pusher:finished"])]
FIGURES = {"kill_points_tried": 0, "multi_processing_kills_tried": 0, "stop_signals_tried": 0,
           "concurrent_scenarios_tried": 0, "changed_input_scenarios_tried": 0, "pushes_per_blessed_day": [],
           "rows_lost": 0, "orphan_processes": 0,
           "seconds_until_workers_gone": []}


def _data(root):
    data = os.path.join(root, "data")
    synthetic_logs.generate(data, START, TRAIN_DAYS + 2, seed=SEED, impressions_per_day=ROWS_PER_DAY)
    for day in [START + datetime.timedelta(days=d) for d in range(TRAIN_DAYS + 2)]:
        path = impression_logs.day_files(data, day)[0]
        with open(path, newline="") as f:
            header, *rows = list(csv.reader(f))
        for row in rows[:BAD_ROWS]:
            row[header.index("tab")] = "home"
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows([header] + rows)
    return data


def _command(home, data, day, *extra):
    return ["run", "--date", day.isoformat(), "--data", data, "--home", home, "--train-days", str(TRAIN_DAYS),
            "--train-steps", str(TRAIN_STEPS), *extra]


def _session_processes(session_id):
    """PIDs of live processes in a session (a run started with start_new_session)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session_id:
            found.append(int(stat.split("/")[2]))
    return found


def _beam_workers(session_id):
    """PIDs of Beam SDK worker processes (DirectRunner multi_processing) in a session."""
    found = []
    for pid in _session_processes(session_id):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"sdk_worker_main" in f.read():
                    found.append(pid)
        except OSError:
            continue
    return found


def _orphans_after(child, wait_seconds=20):
    deadline = time.time() + wait_seconds
    while _session_processes(child.pid) and time.time() < deadline:
        time.sleep(0.5)
    left = _session_processes(child.pid)
    for pid in left:  # do not leave them to the next test
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def _start(argv, log_path, env_extra=None, through_wrapper=False):
    cmd = [POSO, *argv] if through_wrapper else [sys.executable, "-m", "pipeline.cli", *argv]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=config_lib.PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR, **(env_extra or {})},
                            start_new_session=True)


def _cfg(home):
    return config_lib.RunConfig(date=EVAL_DAY, home=home)


def _executions(home, states):
    with metadata.Metadata(pipeline_lib.metadata_connection(_cfg(home))) as m:
        return [e for e in m.store.get_executions() if e.last_known_state in states]


def _rows_lost(home, data):
    """Raw data rows minus examples and quarantined rows, summed over every ingested day."""
    with metadata.Metadata(pipeline_lib.metadata_connection(_cfg(home))) as m:
        store = m.store
        latest = {}
        for type_name, key in (("Examples", "rows"), (QuarantinedRows.TYPE_NAME, "bad_rows")):
            for artifact in store.get_artifacts_by_type(type_name):
                span = artifact.custom_properties["span"].int_value if "span" in artifact.custom_properties \
                    else artifact.properties["span"].int_value
                if key in artifact.custom_properties and artifact.state == metadata_store_pb2.Artifact.LIVE:
                    latest.setdefault(span, {})[key] = artifact.custom_properties[key].int_value
    lost = 0
    for span, counts in latest.items():
        raw = sum(sum(1 for _ in open(path)) - 1 for path in impression_logs.day_files(data, date_of(span)))
        lost += abs(raw - counts.get("rows", 0) - counts.get("bad_rows", 0))
    return lost, len(latest)


def _versions(home):
    base = _cfg(home).serving_model_dir
    return sorted(os.listdir(base)) if os.path.isdir(base) else []


def _versions_of(home, day):
    return day_versions.day_versions(_cfg(home).serving_model_dir, day)


def _wait_for_line(log_path, text, child, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if text in open(log_path).read():
            return
        if child.poll() is not None:
            pytest.fail(f"the run ended (code {child.returncode}) before {text!r}:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.5)
    pytest.fail(f"no {text!r} within {timeout} s:\n{open(log_path).read()[-3000:]}")


# ------------------------------------------------------------------------------------------------
# Fast: SIGTERM to the bin/poso wrapper, and a second run refused meanwhile.
# ------------------------------------------------------------------------------------------------
def test_sigterm_to_the_wrapper_stops_the_run_cleanly_and_a_concurrent_run_is_refused(tmp_path):
    data, home = _data(str(tmp_path)), str(tmp_path / "home")
    scratch_parent = tmp_path / "tmp"   # the run's TMPDIR: its /tmp/poso-run-* folder goes here
    scratch_parent.mkdir()
    log = str(tmp_path / "run.log")
    # Beam's multi_processing mode (the default): StatisticsGen runs in worker processes.
    run = _start(_command(home, data, EVAL_DAY), log, {"TMPDIR": str(scratch_parent)}, through_wrapper=True)
    try:
        _wait_for_line(log, "Component ImportSchemaGen is running.", run, 900)   # HOME's lock is held
        second = subprocess.run([POSO, *_command(home, data, EVAL_DAY)], capture_output=True, text=True,
                                timeout=600, cwd=config_lib.PROJECT_DIR)
        assert second.returncode == exit_codes.LOCKED, second.stderr[-2000:]
        holder = json.load(open(os.path.join(home, ".poso.lock")))
        assert f"pid {holder['pid']}" in second.stderr and "poso run" in second.stderr
        # The stop lands while Beam's worker processes run a step (StatisticsGen or Transform,
        # whichever the run has reached): that step's execution is RUNNING in ML Metadata until its
        # executor returns, which it cannot while its workers live, so the stop has one to cancel.
        # Not at a log line: the refused run above takes up to a minute on a loaded machine, and a
        # stop between two steps (or before TFX registers the next one) has nothing to cancel.
        deadline = time.time() + 900
        while not _beam_workers(run.pid):
            assert run.poll() is None and time.time() < deadline, f"no Beam worker process seen:\n" \
                                                                  f"{open(log).read()[-3000:]}"
            time.sleep(0.2)
        assert os.listdir(scratch_parent), "the run keeps no scratch folder"
        run.send_signal(signal.SIGTERM)   # the wrapper's PID, as systemd, timeout or Kubernetes do
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    output = open(log).read()
    assert code == exit_codes.STOPPED, output[-3000:]
    assert "stopped by SIGTERM" in output.splitlines()[-1] and "Traceback" not in output, output[-3000:]
    orphans = _orphans_after(run)
    FIGURES["orphan_processes"] += len(orphans)
    assert orphans == []
    assert _executions(home, (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.NEW)) == []
    assert _executions(home, (metadata_store_pb2.Execution.CANCELED,)), "no step was marked cancelled"
    assert os.listdir(scratch_parent) == []
    assert _versions(home) == []


# ------------------------------------------------------------------------------------------------
# Slow: every kill point in turn on one day's run, then concurrent runs.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def faulty_home(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    return str(root), _data(str(root)), str(root / "home")


def _record(home, data):
    lost, days = _rows_lost(home, data)
    FIGURES["rows_lost"] += lost
    return lost, days


@pytest.mark.slow
@pytest.mark.timeout(3600)  # 31 runs: pytest.ini's 900 s is for one
def test_a_run_killed_at_every_boundary_resumes_to_one_push(faulty_home):
    root, data, home = faulty_home
    for number, point in enumerate(KILL_POINTS):
        log = os.path.join(root, f"kill-{number:02d}.log")
        child = _start(_command(home, data, EVAL_DAY, "--beam-mode", "in_memory"), log,
                       {fault_injection.VARIABLE: point})
        code = child.wait(timeout=1800)
        assert code == -signal.SIGKILL, f"{point}: the run was not killed there (code {code}):\n" \
                                        f"{open(log).read()[-3000:]}"
        FIGURES["kill_points_tried"] += 1
        orphans = _orphans_after(child)
        FIGURES["orphan_processes"] += len(orphans)
        assert orphans == [], point
        assert len(_versions_of(home, EVAL_DAY)) <= 1, (point, _versions(home))
        assert [v for v in _versions(home) if not v.isdigit() and not v.startswith(".push-")] == []
        lost, _ = _record(home, data)
        assert lost == 0, point
    log = os.path.join(root, "final.log")
    final = _start(_command(home, data, EVAL_DAY, "--beam-mode", "in_memory"), log)
    assert final.wait(timeout=1800) == exit_codes.PUSHED, open(log).read()[-3000:]
    assert _versions(home) == [str(_versions_of(home, EVAL_DAY)[0])], _versions(home)
    FIGURES["pushes_per_blessed_day"].append(len(_versions_of(home, EVAL_DAY)))
    summary = json.load(open(os.path.join(home, "runs", f"{EVAL_DAY.isoformat()}.json")))
    assert summary["pushed"] and summary["pushed_version"] == str(_versions_of(home, EVAL_DAY)[0])
    assert _executions(home, (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.NEW)) == []
    lost, days = _record(home, data)
    assert lost == 0 and days == TRAIN_DAYS + 1


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_kill_9_while_beam_worker_processes_run_then_one_push(tmp_path):
    """Beam's DirectRunner multi_processing mode (the default; AvcExampleGen runs in one process,
    see RunConfig.beam_single_process_components): the run's Python process is
    killed (SIGKILL, as the OOM killer does) while its SDK worker processes run StatisticsGen (the
    first day's ingest) and then Transform (the evaluated day's run). The workers must end on their
    own, the next run must clear what the killed one left, and the last run pushes once."""
    data, home = _data(str(tmp_path)), str(tmp_path / "home")
    scratch_parent = tmp_path / "tmp"   # the runs' TMPDIR: their scratch folders go here
    scratch_parent.mkdir()
    env = {"TMPDIR": str(scratch_parent)}
    for number, component in enumerate(("StatisticsGen", "Transform")):
        log = str(tmp_path / f"mp-kill-{number}.log")
        run = _start(_command(home, data, EVAL_DAY), log, env)
        try:
            _wait_for_line(log, f"Component {component} is running.", run, 1800)
            deadline = time.time() + 600
            while not _beam_workers(run.pid) and time.time() < deadline:
                assert f"Component {component} is finished" not in open(log).read(), \
                    f"{component} finished before its Beam workers were seen"
                assert run.poll() is None, open(log).read()[-3000:]
                time.sleep(0.2)
            workers = _beam_workers(run.pid)
            assert workers, f"no Beam worker process within 600 s of {component} starting"
            time.sleep(1)   # the workers hold bundles
            os.kill(run.pid, signal.SIGKILL)
            killed_at = time.time()
            assert run.wait(timeout=60) == -signal.SIGKILL
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait()
        FIGURES["multi_processing_kills_tried"] += 1
        while _session_processes(run.pid) and time.time() < killed_at + 60:
            time.sleep(0.2)
        FIGURES["seconds_until_workers_gone"].append(round(time.time() - killed_at, 1))
        orphans = _orphans_after(run, wait_seconds=0)
        FIGURES["orphan_processes"] += len(orphans)
        assert orphans == [], f"{component}: {len(workers)} Beam workers, still running 60 s after the kill: {orphans}"
        assert _versions_of(home, EVAL_DAY) == []
        lost, _ = _record(home, data)
        assert lost == 0, component
    log = str(tmp_path / "mp-final.log")
    final = _start(_command(home, data, EVAL_DAY), log, env)
    assert final.wait(timeout=1800) == exit_codes.PUSHED, open(log).read()[-3000:]
    assert _orphans_after(final) == []
    assert _versions(home) == [str(_versions_of(home, EVAL_DAY)[0])], _versions(home)
    FIGURES["pushes_per_blessed_day"].append(len(_versions_of(home, EVAL_DAY)))
    assert _executions(home, (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.NEW)) == []
    lost, days = _record(home, data)
    assert lost == 0 and days == TRAIN_DAYS + 1
    assert os.listdir(scratch_parent) == [], "scratch folders of the killed runs are left"
    print("\nFault suite figures so far:", json.dumps(FIGURES))


def _withdraw_last_rows(path, count):
    """Rewrites a log file without its last `count` impressions (a corrected file)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows[:-count])


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_a_second_copy_or_a_corrected_log_file_then_one_version_per_day_and_input(tmp_path):
    """The changed-input scenarios on a day already run: a second copy of its log file is refused
    (exit 2, nothing pushed); a corrected file is ingested again; the day keeps one version, a new
    blessed model replacing the old under the next revision, the same model never pushed twice."""
    data, home = _data(str(tmp_path)), str(tmp_path / "home")

    def run(name):
        log = str(tmp_path / f"{name}.log")
        child = _start(_command(home, data, EVAL_DAY, "--beam-mode", "in_memory"), log)
        code = child.wait(timeout=1800)
        orphans = _orphans_after(child)
        FIGURES["orphan_processes"] += len(orphans)
        assert orphans == [], name
        return code, open(log).read()

    code, output = run("first")
    assert code in (exit_codes.PUSHED, exit_codes.NOT_BLESSED), output[-3000:]
    before = _versions_of(home, EVAL_DAY)
    if code == exit_codes.PUSHED:
        FIGURES["pushes_per_blessed_day"].append(len(before))
    day_file = impression_logs.day_files(data, EVAL_DAY)[0]
    copy = os.path.join(os.path.dirname(day_file), "copy-" + os.path.basename(day_file))
    shutil.copy(day_file, copy)
    code, output = run("second-copy")
    FIGURES["changed_input_scenarios_tried"] += 1
    assert code == exit_codes.BAD_INPUT and os.path.basename(copy) in output, output[-3000:]
    assert _versions_of(home, EVAL_DAY) == before
    os.remove(copy)

    # A corrected file of the evaluated day: ingested again (the summary says so) and evaluated
    # again; the window and so the model are unchanged, and the day keeps its one version.
    _withdraw_last_rows(day_file, 10)
    code, output = run("corrected-evaluation-day")
    FIGURES["changed_input_scenarios_tried"] += 1
    assert code in (exit_codes.PUSHED, exit_codes.NOT_BLESSED), output[-3000:]
    summary = json.load(open(os.path.join(home, "runs", f"{EVAL_DAY.isoformat()}.json")))
    assert summary["input_changed"] is True
    assert "Component AvcExampleGen is finished." in output and "Component Trainer is finished (cached)." in output
    if before or code != exit_codes.PUSHED:
        assert _versions_of(home, EVAL_DAY) == before
    else:   # not blessed before, blessed on the corrected day
        before = _versions_of(home, EVAL_DAY)
        assert len(before) == 1
    assert _record(home, data)[0] == 0

    # A corrected file of a training day: that day and the days after it are ingested again and a
    # new model is trained; blessed, it replaces the day's version under the next revision number.
    def model_of(version):
        return day_versions.read_marker(os.path.join(_cfg(home).serving_model_dir, str(version)))["model_fingerprint"]

    models_before = {v: model_of(v) for v in before}
    _withdraw_last_rows(impression_logs.day_files(data, EVAL_DAY - datetime.timedelta(days=1))[0], 10)
    code, output = run("corrected-training-day")
    FIGURES["changed_input_scenarios_tried"] += 1
    assert code in (exit_codes.PUSHED, exit_codes.NOT_BLESSED), output[-3000:]
    assert "Component Trainer is finished." in output, output[-3000:]
    summary = json.load(open(os.path.join(home, "runs", f"{EVAL_DAY.isoformat()}.json")))
    assert summary["input_changed"] is False   # the evaluated day was ingested again, its file unchanged
    after = _versions_of(home, EVAL_DAY)
    if code == exit_codes.PUSHED:
        assert len(after) == 1 and all(after[0] > v and model_of(after[0]) != model for v, model in
                                       models_before.items()), (before, after)
        FIGURES["pushes_per_blessed_day"].append(len(after))
    else:
        assert after == before
    assert _executions(home, (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.NEW)) == []
    lost, days = _record(home, data)
    assert lost == 0 and days == TRAIN_DAYS + 1
    print("\nFault suite figures so far:", json.dumps(FIGURES))


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_two_days_at_once_and_the_same_day_twice_at_once(faulty_home):
    root, data, home = faulty_home
    # Two days at once: the second waits for the lock, then both finish.
    runs = [_start(_command(home, data, day, "--beam-mode", "in_memory", "--wait-for-lock", "3600"),
                   os.path.join(root, f"both-{day}.log")) for day in (NEXT_DAY, EVAL_DAY)]
    codes = [run.wait(timeout=3600) for run in runs]
    assert set(codes) <= {exit_codes.PUSHED, exit_codes.NOT_BLESSED}, codes
    FIGURES["concurrent_scenarios_tried"] += 1
    # The same day twice at once: one runs, the other is refused at once.
    runs = [_start(_command(home, data, NEXT_DAY, "--beam-mode", "in_memory"),
                   os.path.join(root, f"same-{n}.log")) for n in range(2)]
    codes = sorted(run.wait(timeout=3600) for run in runs)
    assert exit_codes.LOCKED in codes and codes[0] in (exit_codes.PUSHED, exit_codes.NOT_BLESSED), codes
    FIGURES["concurrent_scenarios_tried"] += 1
    for run in runs:
        orphans = _orphans_after(run)
        FIGURES["orphan_processes"] += len(orphans)
        assert orphans == []
    for day in (EVAL_DAY, NEXT_DAY):
        summary = json.load(open(os.path.join(home, "runs", f"{day.isoformat()}.json")))
        pushes = len(_versions_of(home, day))
        assert pushes == (1 if summary["pushed"] else 0), (day, _versions(home))
        if summary["pushed"]:
            FIGURES["pushes_per_blessed_day"].append(pushes)
    assert _executions(home, (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.NEW)) == []
    lost, _ = _record(home, data)
    assert lost == 0
    with open(os.path.join(root, "fault_figures.json"), "w") as f:
        json.dump(FIGURES, f, indent=1)
    print("\nFault suite figures:", json.dumps(FIGURES))
