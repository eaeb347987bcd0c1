"""`poso skip-day DATE --reason "..."`: the explicit way past a day whose logs are lost.

A skipped day is recorded in ML Metadata as an artifact of type `poso.SkippedDay` (custom
properties `date`, `reason`, `recorded_at`), so it sits beside the runs it changes.
After it:
- the day is not ingested; the next day starts from the user state of the day before the gap
  (AVC does not count the lost impressions: they cannot be counted);
- the training window is the --train-days latest days before the evaluation day that are not
  skipped (it reaches further back), and --min-train-days is still enforced on the days that
  are there;
- the run summary and report list the skipped days of the window, with their reasons.
`poso skip-day DATE --undo` withdraws it (the artifact is marked DELETED, kept for the record).
The local runner only: the Kubeflow span registry does not read skipped days.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time
from typing import Dict

from pipeline import argtypes

TYPE_NAME = "poso.SkippedDay"


def _artifact_type():
    from ml_metadata.proto import metadata_store_pb2

    return metadata_store_pb2.ArtifactType(name=TYPE_NAME)


def _records(store):
    try:
        return store.get_artifacts_by_type(TYPE_NAME)
    except Exception:  # the type is registered by the first skip
        return []


def skipped_days(store) -> Dict[datetime.date, str]:
    """{date: reason} of every day skipped and not undone."""
    from ml_metadata.proto import metadata_store_pb2

    return {datetime.date.fromisoformat(a.custom_properties["date"].string_value):
            a.custom_properties["reason"].string_value
            for a in _records(store) if a.state == metadata_store_pb2.Artifact.LIVE}


def record_skip(store, date: datetime.date, reason: str) -> None:
    from ml_metadata.proto import metadata_store_pb2

    if date in skipped_days(store):
        raise ValueError(f"{date.isoformat()} is already skipped ({skipped_days(store)[date]})")
    artifact = metadata_store_pb2.Artifact(type_id=store.put_artifact_type(_artifact_type()),
                                           state=metadata_store_pb2.Artifact.LIVE)
    artifact.custom_properties["date"].string_value = date.isoformat()
    artifact.custom_properties["reason"].string_value = reason
    artifact.custom_properties["recorded_at"].string_value = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.put_artifacts([artifact])


def undo_skip(store, date: datetime.date) -> None:
    from ml_metadata.proto import metadata_store_pb2

    live = [a for a in _records(store) if a.state == metadata_store_pb2.Artifact.LIVE
            and a.custom_properties["date"].string_value == date.isoformat()]
    if not live:
        raise ValueError(f"{date.isoformat()} is not skipped")
    for artifact in live:
        artifact.state = metadata_store_pb2.Artifact.DELETED
        artifact.custom_properties["undone_at"].string_value = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.put_artifacts(live)


def open_store(cfg):
    """The run's ML Metadata store, opened with ml_metadata alone (importing TFX takes seconds)."""
    from ml_metadata.metadata_store import metadata_store
    from ml_metadata.proto import metadata_store_pb2

    if cfg.metadata_mysql:
        from pipeline import pipeline as pipeline_lib

        return metadata_store.MetadataStore(pipeline_lib.metadata_connection(cfg))
    connection = metadata_store_pb2.ConnectionConfig()
    connection.sqlite.filename_uri = cfg.metadata_path
    connection.sqlite.connection_mode = metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE_OPENCREATE
    return metadata_store.MetadataStore(connection)


def read_skipped_days(cfg) -> Dict[datetime.date, str]:
    """skipped_days() of the run's metadata store (none when there is no store yet)."""
    if not cfg.metadata_mysql and not os.path.exists(cfg.metadata_path):
        return {}
    return skipped_days(open_store(cfg))


def command(date: datetime.date, home: str, reason: str = "", undo: bool = False) -> str:
    """The `skip-day` invocation that does this (printed as advice by the runner)."""
    if undo:
        return f"bin/poso skip-day {date.isoformat()} --undo --home {home}"
    return f"bin/poso skip-day {date.isoformat()} --reason {reason or 'WHY'!r} --home {home}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("date", type=datetime.date.fromisoformat, help="the lost day YYYY-MM-DD")
    parser.add_argument("--reason", default="", help="why the day is skipped (required unless --undo)")
    parser.add_argument("--undo", action="store_true", help="withdraw an earlier skip of DATE")
    argtypes.add_home_argument(parser, "the home whose metadata store records the skip")


def run(args) -> int:
    from pipeline import config as config_lib

    if not args.undo and not args.reason.strip():
        raise SystemExit("skip-day: --reason is required (it is kept in ML Metadata and shown in the reports)")
    cfg = config_lib.RunConfig(date=args.date, home=args.home)
    os.makedirs(cfg.home_dir, exist_ok=True)
    store = open_store(cfg)
    try:
        if args.undo:
            undo_skip(store, args.date)
        else:
            record_skip(store, args.date, args.reason.strip())
    except ValueError as error:
        raise SystemExit(f"skip-day: {error}") from None
    if args.undo:
        print(f"{args.date.isoformat()} is no longer skipped: its logs are needed again.")
    else:
        print(f"{args.date.isoformat()} skipped ({args.reason.strip()}), recorded in {cfg.metadata_path}. "
              f"Undo: {command(args.date, args.home, undo=True)}")
    return 0
