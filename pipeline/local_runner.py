"""Local orchestration: LocalDagRunner with the sqlite metadata store under --home.

A daily run for date D first ingests, in order, every earlier day of the logs that is not in the
metadata store yet (each day needs the user state of the day before), then runs the whole
pipeline for D. Everything is cached in MLMD, so a rerun after a crash resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
import time
from typing import Dict, List, Optional

from tfx import v1 as tfx

from components import impression_logs
from components.avc_example_gen import span_of
from feature_specs import schema as schema_lib
from pipeline import config as config_lib
from pipeline import pipeline as pipeline_lib


class _ProgressHandler(logging.Handler):
    """Prints TFX's per-component 'is running' / 'is finished' log lines as progress lines."""

    def __init__(self, label: str):
        super().__init__(level=logging.INFO)
        self._label, self._start = label, time.time()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Component ") and message.endswith((" is running.", " is finished.")):
            print(f"  [{self._label} +{time.time() - self._start:4.0f}s] {message}", flush=True)


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


def _run(cfg: config_lib.RunConfig, label: str) -> None:
    progress = _ProgressHandler(label)
    logging.getLogger().addHandler(progress)
    try:
        tfx.orchestration.LocalDagRunner().run(pipeline_lib.create_pipeline(cfg))
    finally:
        logging.getLogger().removeHandler(progress)


def days_to_ingest(cfg: config_lib.RunConfig) -> List[datetime.date]:
    done = ingested_spans(cfg)
    return [d for d in impression_logs.available_dates(cfg.data_dir) if d < cfg.date and span_of(d) not in done]


def run_day(cfg: config_lib.RunConfig) -> Dict[str, object]:
    """The daily run for cfg.date; returns the run summary (see `summary.summarize`)."""
    from pipeline import summary

    schema_lib.write_schema(cfg.schema_path)
    started = time.time()
    for day in days_to_ingest(cfg):
        print(f"Ingesting {day.isoformat()} (AVC state carried from the day before)", flush=True)
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
    day = first
    while day <= last:
        results.append(run_day(dataclasses.replace(cfg, date=day)))
        day += datetime.timedelta(days=1)
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
