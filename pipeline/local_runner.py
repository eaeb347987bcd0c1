"""Local orchestration: LocalDagRunner with the sqlite metadata store under --home.

A daily run for date D first ingests, in order, every earlier day of the logs that is not in the
metadata store yet (each day needs the user state of the day before), then runs the whole
pipeline for D. Everything is cached in MLMD, so a rerun after a crash resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import re
import shutil
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

from tfx import v1 as tfx

from components import fault_injection, impression_logs
from components.avc_example_gen import span_of
from feature_specs import schema as schema_lib
from models.trainer import PROGRESS_LOGGER
from pipeline import config as config_lib
from pipeline import home_lock
from pipeline import pipeline as pipeline_lib
from pipeline import scratch, skip_day


class _ProgressHandler(logging.Handler):
    """Prints TFX's per-component 'is running' / 'is finished' log lines as progress lines, marks
    the steps TFX took from its cache, and passes on the Trainer's progress (models/trainer.py)."""

    def __init__(self, label: str):
        super().__init__(level=logging.INFO)
        self._label, self._start = label, time.time()
        self.resolvers: frozenset = frozenset()  # node ids not counted as steps (nor by `poso runs`, the dashboard)
        self._cached = False
        self.steps = self.cached_steps = 0

    def _print(self, message: str) -> None:
        print(f"  [{self._label} +{time.time() - self._start:4.0f}s] {message}", flush=True)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == PROGRESS_LOGGER:
            self._print(message)
        elif message.startswith("A cached execution ") and message.endswith(" is used."):
            self._cached = True
        elif message.startswith("Component ") and message.endswith(" is running."):
            self._cached = False
            self._print(message)
        elif message.startswith("Component ") and message.endswith(" is finished."):
            self._print(message[:-1] + (" (cached)." if self._cached else "."))
        if message.startswith("Component ") and message.endswith((" is running.", " is finished.")):
            component, when = message[len("Component "):].rstrip(".").split(" is ")
            if when == "finished" and component not in self.resolvers:
                self.steps += 1
                self.cached_steps += self._cached
            fault_injection.reached(f"{component}:{when}")


def validated_ingests(cfg: config_lib.RunConfig) -> Dict[int, str]:
    """{span: input fingerprint} of the days whose ingest passed validation (SchemaAnomaliesGate
    completed or cached in the same pipeline run as the AvcExampleGen that wrote the span); the
    latest such ingest per span. A day ingested but not validated (a run stopped in between, or
    one whose logs had anomalies) is not in it, so the next run ingests it again."""
    if not cfg.metadata_mysql and not os.path.exists(cfg.metadata_path):
        return {}
    from ml_metadata.proto import metadata_store_pb2
    from tfx.dsl.compiler import constants
    from tfx.orchestration import metadata

    done = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
    validated: Dict[int, Tuple[int, str]] = {}
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        store = m.store
        try:
            gate = store.get_context_by_type_and_name(constants.NODE_CONTEXT_TYPE_NAME,
                                                      f"{config_lib.PIPELINE_NAME}.SchemaAnomaliesGate")
            example_gen = store.get_context_by_type_and_name(constants.NODE_CONTEXT_TYPE_NAME,
                                                             f"{config_lib.PIPELINE_NAME}.AvcExampleGen")
        except Exception:  # a new store
            return {}
        if gate is None or example_gen is None:
            return {}
        run_type = store.get_context_type(constants.PIPELINE_RUN_CONTEXT_TYPE_NAME).id
        passed_runs = {c.id for e in store.get_executions_by_context(gate.id) if e.last_known_state in done
                       for c in store.get_contexts_by_execution(e.id) if c.type_id == run_type}
        for execution in store.get_executions_by_context(example_gen.id):
            if execution.last_known_state not in done:
                continue
            runs = {c.id for c in store.get_contexts_by_execution(execution.id) if c.type_id == run_type}
            if not runs & passed_runs:
                continue
            outputs = [e.artifact_id for e in store.get_events_by_execution_ids([execution.id])
                       if e.type == metadata_store_pb2.Event.OUTPUT and e.path.steps[0].key == "examples"]
            for artifact in store.get_artifacts_by_id(outputs):
                span = artifact.properties["span"].int_value
                fingerprint = artifact.custom_properties["input_fingerprint"].string_value \
                    if "input_fingerprint" in artifact.custom_properties else ""
                if span not in validated or execution.id > validated[span][0]:
                    validated[span] = (execution.id, fingerprint)
    return {span: fingerprint for span, (_, fingerprint) in validated.items()}


class PipelineRunError(RuntimeError):
    """A component of a run failed; `component` and `cause` name which and why."""

    def __init__(self, label: str, component: str, cause: str):
        super().__init__(f"{label}: {component} failed: {cause}")
        self.label, self.component, self.cause = label, component, cause


# The first line of a formatted exception ("package.module.SomeError: message"); in a chained
# traceback the root cause is printed first.
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$")


def _root_cause(traceback_text: str) -> Optional[str]:
    for line in traceback_text.splitlines():
        match = _EXCEPTION_LINE.match(line)
        if match:
            return f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return None


def _run_contexts(store) -> set:
    from tfx.dsl.compiler import constants

    try:
        return {c.id for c in store.get_contexts_by_type(constants.PIPELINE_RUN_CONTEXT_TYPE_NAME)}
    except Exception:  # a new store: no run yet
        return set()


def _first_failure(store, known_runs: set) -> Optional[Tuple[str, Optional[str]]]:
    """(component id, root cause or None) of the first failed execution of the runs not in
    `known_runs`, or None when every execution of them succeeded."""
    from ml_metadata.proto import metadata_store_pb2
    from tfx.dsl.compiler import constants
    from tfx.orchestration.portable.mlmd import execution_lib

    failed = []
    for run_id in sorted(_run_contexts(store) - known_runs):
        failed += [e for e in store.get_executions_by_context(run_id)
                   if e.last_known_state == metadata_store_pb2.Execution.FAILED]
    if not failed:
        return None
    first = min(failed, key=lambda e: e.id)
    node_type = store.get_context_type(constants.NODE_CONTEXT_TYPE_NAME).id
    names = [c.name for c in store.get_contexts_by_execution(first.id) if c.type_id == node_type]
    component = names[0].split(".", 1)[-1] if names else f"execution {first.id}"
    result = execution_lib.get_execution_result(first, ignore_parse_errors=True)
    return component, _root_cause(result.result_message) if result and result.result_message else None


# The pipeline run in progress in this process, for the clean-up after a stop signal.
_active: Dict[str, object] = {}
_cleanup_guard = threading.Lock()


def _unfinished_states():
    from ml_metadata.proto import metadata_store_pb2

    return (metadata_store_pb2.Execution.RUNNING, metadata_store_pb2.Execution.NEW)


def _cancel(store, executions, reason: str) -> int:
    """Marks executions CANCELED with `reason`; returns how many."""
    from ml_metadata.proto import metadata_store_pb2

    for execution in executions:
        execution.last_known_state = metadata_store_pb2.Execution.CANCELED
        execution.custom_properties["cancelled_reason"].string_value = reason
    if executions:
        store.put_executions(executions)
    return len(executions)


def cancel_unfinished_executions(cfg: config_lib.RunConfig, known_runs: Optional[set], reason: str) -> int:
    """Marks the RUNNING (or NEW) executions of pipeline runs not in `known_runs` (every run when
    None) CANCELED: LocalDagRunner leaves them RUNNING when its process is stopped or killed."""
    if not cfg.metadata_mysql and not os.path.exists(cfg.metadata_path):
        return 0
    from tfx.orchestration import metadata

    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        runs = _run_contexts(m.store) - (known_runs or set())
        unfinished = {e.id: e for run_id in runs for e in m.store.get_executions_by_context(run_id)
                      if e.last_known_state in _unfinished_states()}
        return _cancel(m.store, list(unfinished.values()), reason)


def note_stop(signal_name: str) -> None:
    _active["stopped_by"] = signal_name


def _stop_child_processes(scratch_dir: Optional[str], grace_seconds: float = 5) -> None:
    """Beam's worker processes and anything else this process started, including those started
    in its scratch folder that are no longer its descendants (a worker whose `sh -c` parent
    ended, or that a Beam thread started after the list of children was taken)."""
    import psutil

    children = {p.pid: p for p in psutil.Process().children(recursive=True)}
    for pid in scratch.processes_started_in(scratch_dir) if scratch_dir else ():
        with contextlib.suppress(psutil.Error):
            children.setdefault(pid, psutil.Process(pid))
    children = list(children.values())
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_seconds)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    psutil.wait_procs(alive, timeout=grace_seconds)


def clean_up_after_stop() -> None:
    """After a stop signal: ends child processes, marks this run's unfinished steps CANCELED in
    MLMD and removes its scratch folder. Safe to call twice (the main thread and the watchdog)."""
    with _cleanup_guard:
        if _active.get("cleaned"):
            return
        _stop_child_processes(_active.get("scratch"))
        cfg, known_runs = _active.get("cfg"), _active.get("known_runs")
        if cfg is not None:
            reason = f"stopped by {_active.get('stopped_by', 'a signal')}"
            try:
                count = cancel_unfinished_executions(cfg, known_runs, reason)
                logging.warning("Marked %d unfinished execution(s) CANCELED (%s)", count, reason)
            except Exception:  # pylint: disable=broad-except
                logging.exception("Could not mark the stopped run's executions CANCELED")
        if _active.get("scratch"):
            shutil.rmtree(str(_active["scratch"]), ignore_errors=True)
        _active["cleaned"] = True


def _run(cfg: config_lib.RunConfig, label: str) -> None:
    """Runs the pipeline once; raises PipelineRunError naming the first component that failed.

    LocalDagRunner raises when an executor fails, but when a resolver fails (say, too few valid
    days for the training window) it only logs it, records the execution as FAILED and goes on
    skipping the nodes downstream, so the error users see is some later, unrelated one. MLMD
    keeps every execution's state and error, so the first failure of this run is read from there.
    """
    from tfx.orchestration import metadata

    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        known_runs = _run_contexts(m.store)
    progress = _ProgressHandler(label)
    logging.getLogger().addHandler(progress)
    raised: Optional[BaseException] = None
    _active.clear()
    # The scratch folder's path is known before the folder exists: a stop signal while it is being
    # set up still finds it to remove (clean_up_after_stop).
    _active.update(cfg=cfg, known_runs=known_runs, scratch=scratch.new_path())
    try:
        with scratch.run_scratch_dir(str(_active["scratch"])):
            pipeline = pipeline_lib.create_pipeline(cfg)
            # Resolvers only pick inputs: the steps counted are the components that run an executor.
            progress.resolvers = frozenset(node.id for node in pipeline.components if isinstance(node, tfx.dsl.Resolver))
            tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as error:  # pylint: disable=broad-except
        raised = error
    finally:
        logging.getLogger().removeHandler(progress)
        if progress.steps:
            print(f"  [{label}] {progress.steps} steps, {progress.cached_steps} from the cache", flush=True)
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        failure = _first_failure(m.store, known_runs)
    if failure is None:
        if raised is not None:
            raise raised
        return
    component, cause = failure
    if cause is None:  # the executor that raised: its exception is the cause
        cause = f"{type(raised).__name__}: {raised}" if raised is not None else "no error message recorded"
    raise PipelineRunError(label, component, cause) from raised


def days_to_ingest(cfg: config_lib.RunConfig) -> List[datetime.date]:
    """The days before cfg.date to ingest, in order: from the first day of the logs that is not
    validated, or whose log files changed since (input fingerprint), every later day too (each
    day's user state feeds the next; the unchanged ones come from the cache). Skipped days are
    never ingested."""
    validated = validated_ingests(cfg)
    days = [d for d in impression_logs.available_dates(cfg.data_dir)
            if d < cfg.date and d not in cfg.skipped_dates]
    for i, day in enumerate(days):
        fingerprint = impression_logs.day_fingerprint(cfg.data_dir, day, cfg.fingerprint_cache_path)
        if validated.get(span_of(day)) != fingerprint:
            return days[i:]
    return []


class InputError(ValueError):
    """The run's input cannot work (no data folder, no logs for a day): nothing was run."""


def check_inputs(cfg: config_lib.RunConfig) -> None:
    """Refuses, before anything runs, a --data without logs, an evaluation day without logs, and a
    day without logs between the first day of the data and the evaluation day (each day needs
    the day before's user state), with the command that gets past each."""
    logs = os.path.join(cfg.data_dir, impression_logs.LOGS_DIR)
    if not os.path.isdir(logs):
        raise InputError(f"--data {cfg.data_dir}: no {impression_logs.LOGS_DIR}/ folder there (expected "
                         f"{logs}/YYYY-MM-DD/*.csv|*.parquet and the feature tables); check the path")
    dates = impression_logs.available_dates(cfg.data_dir)
    if not dates:
        raise InputError(f"--data {cfg.data_dir}: {logs} holds no YYYY-MM-DD folders of logs")
    if cfg.date in cfg.skipped_dates:
        raise InputError(f"{cfg.date.isoformat()} is skipped (poso skip-day): it has nothing to evaluate on. "
                         f"Undo: {skip_day.command(cfg.date, cfg.home, undo=True)}")
    if cfg.date not in dates:
        raise InputError(f"no logs for {cfg.date.isoformat()} in {logs} (it has logs for {dates[0].isoformat()}.."
                         f"{dates[-1].isoformat()}); run a day that has logs")
    gaps = [dates[0] + datetime.timedelta(days=d) for d in range((cfg.date - dates[0]).days)]
    gaps = [d for d in gaps if d not in dates and d not in cfg.skipped_dates]
    if gaps:
        raise InputError(
            f"no logs for {', '.join(d.isoformat() for d in gaps)} in {logs}, between the first day of the "
            f"logs ({dates[0].isoformat()}) and {cfg.date.isoformat()}: each day starts from the user state of "
            f"the day before. If they are lost, record it: {skip_day.command(gaps[0], cfg.home)}"
            + (" (one per day)" if len(gaps) > 1 else ""))


def run_day(cfg: config_lib.RunConfig, wait_for_lock: float = 0) -> Dict[str, object]:
    """The daily run for cfg.date under HOME's lock; returns the run summary (see
    `summary.summarize`)."""
    with home_lock.home_lock(cfg.home_dir, wait_for_lock):
        return _run_day(cfg)


def _run_day(cfg: config_lib.RunConfig) -> Dict[str, object]:
    from pipeline import summary

    cfg = dataclasses.replace(cfg, skipped_dates=tuple(sorted(skip_day.read_skipped_days(cfg))))
    check_inputs(cfg)
    if not cfg.metadata_mysql:  # the store is this HOME's own, and this process holds its lock
        abandoned = cancel_unfinished_executions(cfg, None, "abandoned: its process ended without finishing it")
        if abandoned:
            print(f"Marked {abandoned} step(s) left RUNNING by an earlier run that ended as CANCELED", flush=True)
    schema_lib.write_schema(cfg.schema_path)
    started = time.time()
    ingest = days_to_ingest(cfg)
    for k, day in enumerate(ingest, 1):
        print(f"Ingesting {day.isoformat()}, day {k} of {len(ingest)} to ingest (AVC state carried from the "
              f"day before)", flush=True)
        try:
            _run(dataclasses.replace(cfg, date=day, ingest_only=True), f"ingest {day.isoformat()}")
        except PipelineRunError as error:
            # An earlier day that cannot be ingested stops every later day: say how to get past it.
            raise PipelineRunError(error.label, error.component, (
                f"{error.cause}. {day.isoformat()} must be ingested before {cfg.date.isoformat()}: fix its logs "
                f"and rerun, or, if they cannot be fixed, skip it: {skip_day.command(day, cfg.home)}")) from error
    print(f"Daily run for {cfg.date.isoformat()}: train on {cfg.train_dates[0].isoformat()}.."
          f"{cfg.train_dates[-1].isoformat()}, evaluate on {cfg.date.isoformat()}", flush=True)
    _run(cfg, f"run {cfg.date.isoformat()}")
    result = summary.summarize(cfg)
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


def backfill(cfg: config_lib.RunConfig, first: datetime.date, last: datetime.date,
             on_day: Optional[Callable[[Dict[str, object]], None]] = None,
             wait_for_lock: float = 0) -> List[Dict[str, object]]:
    """Daily runs for first..last in order under HOME's lock; cached steps are not recomputed.
    `on_day` gets each day's summary as that day ends (so a later failure loses nothing)."""
    results = []
    days = (last - first).days + 1
    with home_lock.home_lock(cfg.home_dir, wait_for_lock):
        for k in range(days):
            day = first + datetime.timedelta(days=k)
            print(f"Backfill: day {k + 1} of {days}, {day.isoformat()}", flush=True)
            results.append(run_day(dataclasses.replace(cfg, date=day)))
            if on_day is not None:
                on_day(results[-1])
    return results


def setup_logging(verbose: bool = False, log_file: Optional[str] = None) -> None:
    """Warnings (everything with --verbose) to stderr; INFO records still reach the progress
    handler; every record at INFO to `log_file` when given."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setLevel(logging.INFO if verbose else logging.WARNING)
    stderr.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(stderr)
    if log_file:
        to_file = logging.FileHandler(log_file)
        to_file.setLevel(logging.INFO)
        to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(to_file)
    if not verbose:  # TensorFlow's logger has a handler of its own; keep it to real problems
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        stderr.addFilter(_drop_expected_warnings)
        if log_file:  # errors and their tracebacks go to the file; the command prints one line
            stderr.addFilter(lambda record: record.levelno < logging.ERROR)


# Warnings every run logs that say nothing about the run (shown with --verbose):
_EXPECTED_WARNINGS = (
    "Fail to find metrics for model name: baseline",  # TFMA, when there is no baseline yet
    "ArtifactQuery.property_predicate is not supported",  # MLMD without ZetaSQL, on each resolve
    "Fallback to non-ZetaSQL contexts execution query",
    "Not using the in-place Transform because",  # tf.Transform: the preprocessing_fn has analyzers
)


# Notices every Beam worker process (multi_processing mode) gives at start, which the job service
# relays as WARNING records, once per worker and Beam stage (shown with --verbose).
_BEAM_WORKER_NOTICES = ("No semi_persistent_directory found", "Discarding unparseable args")


def _drop_expected_warnings(record: logging.LogRecord) -> bool:
    if record.levelno != logging.WARNING:
        return True
    message = record.getMessage()
    return not (message.startswith(_EXPECTED_WARNINGS) or (
        record.name.startswith("apache_beam") and any(notice in message for notice in _BEAM_WORKER_NOTICES)))
