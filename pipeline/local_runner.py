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
import tempfile
import time
from typing import Dict, Iterator, List, Optional, Tuple

from tfx import v1 as tfx

from components import impression_logs
from components.avc_example_gen import span_of
from feature_specs import schema as schema_lib
from models.trainer import PROGRESS_LOGGER
from pipeline import config as config_lib
from pipeline import pipeline as pipeline_lib


class _ProgressHandler(logging.Handler):
    """Prints TFX's per-component 'is running' / 'is finished' log lines as progress lines, marks
    the steps TFX took from its cache, and passes on the Trainer's progress (models/trainer.py)."""

    def __init__(self, label: str):
        super().__init__(level=logging.INFO)
        self._label, self._start = label, time.time()
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
            self.steps += 1
            self.cached_steps += self._cached
            self._print(message[:-1] + (" (cached)." if self._cached else "."))


def ingested_spans(cfg: config_lib.RunConfig) -> set:
    """Spans of daily Examples already in the metadata store."""
    if not cfg.metadata_mysql and not os.path.exists(cfg.metadata_path):
        return set()
    from tfx.orchestration import metadata

    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as store:
        try:
            artifacts = store.store.get_artifacts_by_type(tfx.types.standard_artifacts.Examples.TYPE_NAME)
        except Exception:  # the type is registered on the first ingest
            return set()
        return {a.properties["span"].int_value for a in artifacts if "span" in a.properties}


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


@contextlib.contextmanager
def _scratch_tempdir() -> Iterator[str]:
    """Points the run's temporary files at a directory removed when the run ends.

    Beam's staging and TensorFlow's autograph leave files in the system temp directory, so a
    daily job would fill /tmp. TMPDIR carries the directory to Beam's worker processes.
    """
    scratch = tempfile.mkdtemp(prefix="poso-run-")
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = scratch
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)


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
    try:
        with _scratch_tempdir():
            tfx.orchestration.LocalDagRunner().run(pipeline_lib.create_pipeline(cfg))
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
    done = ingested_spans(cfg)
    return [d for d in impression_logs.available_dates(cfg.data_dir) if d < cfg.date and span_of(d) not in done]


def run_day(cfg: config_lib.RunConfig) -> Dict[str, object]:
    """The daily run for cfg.date; returns the run summary (see `summary.summarize`)."""
    from pipeline import summary

    schema_lib.write_schema(cfg.schema_path)
    started = time.time()
    ingest = days_to_ingest(cfg)
    for k, day in enumerate(ingest, 1):
        print(f"Ingesting {day.isoformat()}, day {k} of {len(ingest)} to ingest (AVC state carried from the "
              f"day before)", flush=True)
        _run(dataclasses.replace(cfg, date=day, ingest_only=True), f"ingest {day.isoformat()}")
    print(f"Daily run for {cfg.date.isoformat()}: train on {cfg.train_dates[0].isoformat()}.."
          f"{cfg.train_dates[-1].isoformat()}, evaluate on {cfg.date.isoformat()}", flush=True)
    _run(cfg, f"run {cfg.date.isoformat()}")
    result = summary.summarize(cfg)
    result["wall_seconds"] = round(time.time() - started, 1)
    return result


def backfill(cfg: config_lib.RunConfig, first: datetime.date, last: datetime.date) -> List[Dict[str, object]]:
    """Daily runs for first..last in order; cached steps are not recomputed."""
    results = []
    days = (last - first).days + 1
    for k in range(days):
        day = first + datetime.timedelta(days=k)
        print(f"Backfill: day {k + 1} of {days}, {day.isoformat()}", flush=True)
        results.append(run_day(dataclasses.replace(cfg, date=day)))
    return results


def setup_logging(verbose: bool = False) -> None:
    """Warnings (everything with --verbose) to stderr; INFO records still reach the progress handler."""
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
    if not verbose:  # TensorFlow's logger has a handler of its own; keep it to real problems
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
        stderr.addFilter(_drop_expected_warnings)


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
