"""AvcExampleGen: one day of raw impression logs -> tf.Examples with AVC, as a TFX component.

For the log date D it reads `INPUT_BASE/logs/D/*.csv|*.parquet` and the user and video
feature tables, and writes one span (days since 1970-01-01, as TFX's {YYYY}{MM}{DD} spans)
of gzip TFRecord tf.Examples (split `day`), with every feature of feature_specs: the joined
user and video features, the user's Accumulated View Count, is_new_user and behaviour
history. AVC is exact across days because the per-user state is an artifact carried from
day D-1 to day D (`previous_user_state`), so day D never rereads earlier days.

Bad rows go to the `quarantine` artifact with their file, row number and reason; a day with
more than `max_bad_row_fraction` bad rows fails with a message naming them. Bad rows: a row
that does not parse, is outside its day, names an unknown video, holds a label other than 0 or
1, or repeats an earlier row of the day exactly (an impression logged twice: the first is kept).
A user missing from the user table is a new sign-up: the profile features take their defaults,
and the rows are counted (`rows_without_user_profile`). A second copy of a file (same content)
is refused before any row is read. With `quarantine_dir`, the bad rows and the day's counts are
also copied to QUARANTINE_DIR/DATE/, outside TFX's outputs (which TFX deletes when the step
fails), before the step can fail.

`input_fingerprint` (names, sizes and SHA-256 of the day's log files, computed when the
pipeline is built; on Kubeflow by components/input_fingerprint.py when the run starts) is an
execution property only so that the cache key holds it: a changed file means a new execution,
and new Examples for every step downstream.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import Any, Dict, List, Optional

import apache_beam as beam
from tfx import types
from tfx.dsl.components.base import base_beam_component, base_beam_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import avc, impression_logs
from feature_specs import specs

SPLIT = "day"
EXAMPLES_PREFIX = "data_tfrecord"
STATE_FILE_PREFIX = "user_state"
QUARANTINE_FILE = "bad_rows.jsonl"
QUARANTINE_SUMMARY = "summary.json"
_COUNTER_NAMESPACE = "avc_example_gen"
_SHOWN_BAD_ROWS = 10
_CHUNK_ROWS = 100_000   # rows grouped by user before the shuffle
_ENCODE_BATCH = 4_096   # examples encoded to tf.Example at once
_EPOCH = datetime.date(1970, 1, 1)


def span_of(date: datetime.date) -> int:
    return (date - _EPOCH).days


def date_of(span: int) -> datetime.date:
    return _EPOCH + datetime.timedelta(days=span)


class _SpanCustomProperty:
    """`span` kept as an MLMD custom property: Kubeflow Pipelines v2 compiles custom artifact
    types only without PROPERTIES (their schema is the generic system.Artifact)."""

    span = property(lambda self: self.get_int_custom_property("span"),
                    lambda self, value: self.set_int_custom_property("span", int(value)))


class UserState(_SpanCustomProperty, types.Artifact):
    """Per-user AVC, first appearance and history as of the end of `through_date`."""

    TYPE_NAME = "poso.UserState"  # a KFP v2 schema title, importable: see poso/__init__.py
    through_date = property(lambda self: self.get_string_custom_property("through_date"),
                            lambda self, value: self.set_string_custom_property("through_date", value))


class QuarantinedRows(_SpanCustomProperty, types.Artifact):
    """Rows of a day's logs that could not be used, with their reasons."""

    TYPE_NAME = "poso.QuarantinedRows"


class AvcExampleGenSpec(ComponentSpec):
    PARAMETERS = {
        "input_base": ExecutionParameter(type=str),
        "date": ExecutionParameter(type=str),
        "max_bad_row_fraction": ExecutionParameter(type=float),
        "input_fingerprint": ExecutionParameter(type=str, optional=True),
        "quarantine_dir": ExecutionParameter(type=str, optional=True),
    }
    INPUTS = {"previous_user_state": ChannelParameter(type=UserState, optional=True)}
    OUTPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "user_state": ChannelParameter(type=UserState),
        "quarantine": ChannelParameter(type=QuarantinedRows),
    }


# The feature tables of the running executor, by (path, key, mtime, size). The executor reads them
# before Beam starts (a broken table stops the day early); DoFns running in the same process (the
# in_memory runner) take them from here in setup(), workers in other processes read them once each.
_TABLES: Dict[tuple, Dict[int, Dict[str, str]]] = {}


def _table(path: str, key: str) -> Dict[int, Dict[str, str]]:
    try:
        stat = os.stat(path)
    except OSError:
        return impression_logs.read_table(path, key)  # names what is wrong
    cache_key = (path, key, stat.st_mtime_ns, stat.st_size)
    if cache_key not in _TABLES:
        _TABLES[cache_key] = impression_logs.read_table(path, key)
    return _TABLES[cache_key]


class _ValidateRows(beam.DoFn):
    """Reads one log file; yields (user_id, [Impression, ...]) per chunk of rows, and bad rows.

    Grouping a chunk's rows by user here keeps the number of elements Beam shuffles close to the
    number of users rather than of rows. The video table is taken in `setup` (see _TABLES), not
    pickled with the DoFn: Beam pickles (and bz2-compresses) a DoFn several times while it builds
    and runs the pipeline, which for a production-size table cost more than reading it.
    """

    def __init__(self, date: datetime.date, videos_path: str):
        self._date, self._videos_path = date, videos_path
        self._good = beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, "good_rows")
        self._bad = beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, "bad_rows")

    def setup(self):
        self._known_videos = frozenset(_table(self._videos_path, specs.VIDEO_ID))

    def process(self, path: str):
        by_user: Dict[int, List] = {}
        in_chunk = 0
        for number, fields in impression_logs.read_raw_rows(path):
            good, bad = impression_logs.validate_row(path, number, fields, self._date, self._known_videos)
            if bad is not None:
                self._bad.inc()
                yield beam.pvalue.TaggedOutput("bad", bad)
                continue
            self._good.inc()
            by_user.setdefault(good.user_id, []).append(good)
            in_chunk += 1
            if in_chunk >= _CHUNK_ROWS:
                yield from by_user.items()
                by_user, in_chunk = {}, 0
        yield from by_user.items()


class _ProcessUser(beam.DoFn):
    """CoGroupByKey result for one user -> serialized examples (main output), the new state, and
    the user's exact duplicate rows (`bad`): a user's rows of every file meet only here.

    Examples are encoded in batches (see avc.encode_examples), flushed at the end of each bundle.
    The feature tables are read in `setup` (see _ValidateRows).
    """

    def __init__(self, users_path: str, videos_path: str):
        self._users_path, self._videos_path = users_path, videos_path
        self._duplicates = beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, "duplicate_rows")
        self._without_profile = beam.metrics.Metrics.counter(_COUNTER_NAMESPACE, "rows_without_user_profile")

    def setup(self):
        self._users = _table(self._users_path, specs.USER_ID)
        self._videos = _table(self._videos_path, specs.VIDEO_ID)

    def start_bundle(self):
        self._pending: List[Dict[str, Any]] = []

    def process(self, keyed):
        user_id, grouped = keyed
        impressions, duplicates = impression_logs.split_duplicates(
            imp for chunk in grouped["impressions"] for imp in chunk)
        for duplicate in duplicates:
            self._duplicates.inc()
            yield beam.pvalue.TaggedOutput("bad", duplicate)
        states = list(grouped["state"])
        previous = states[0] if states else None
        if not impressions:  # not seen today: carry the state over unchanged
            yield beam.pvalue.TaggedOutput("state", previous)
            return
        user_row = self._users.get(user_id)
        if user_row is None:  # a new sign-up: profile defaults (see the module docstring)
            self._without_profile.inc(len(impressions))
        try:
            examples, state = avc.process_user_day(user_id, impressions, previous, user_row, self._videos)
        except ValueError as error:
            # A feature table is shared by every day: name the cell instead of failing mid-Beam on
            # a bare "could not convert string to float".
            raise impression_logs.LogFormatError(
                self._bad_table_cell(user_id, user_row, impressions) or str(error)) from error
        self._pending.extend(examples)
        if len(self._pending) >= _ENCODE_BATCH:
            yield from avc.encode_examples(self._pending)
            self._pending = []
        yield beam.pvalue.TaggedOutput("state", state)

    def _bad_table_cell(self, user_id: int, user_row, impressions) -> Optional[str]:
        """'file: key id: column: value' of the first feature-table value of this user's day that
        cannot be read as its feature's dtype, or None."""
        rows = [(self._users_path, specs.USER_ID, user_id, user_row, avc.USER_PROFILE_FEATURES)]
        for video_id in sorted({imp.value(specs.VIDEO_ID) for imp in impressions}):
            rows.append((self._videos_path, specs.VIDEO_ID, video_id, self._videos.get(video_id),
                         avc.VIDEO_PROFILE_FEATURES + (specs.feature(specs.VIDEO_TAGS),)))
        for path, key, key_value, row, features in rows:
            for feature in features:
                column = specs.TAG if feature.name == specs.VIDEO_TAGS else feature.name
                try:
                    if feature.name == specs.VIDEO_TAGS:
                        avc.parse_tags((row or {}).get(specs.TAG, ""))
                    else:
                        avc._profile_value(feature, row)  # the very parse process_user_day does
                except ValueError:
                    return (f"{path}: {key} {key_value}: column {column!r} holds {row.get(column)!r}, "
                            f"which is not {feature.dtype.value} (feature_specs declares {feature.name!r} "
                            f"{feature.dtype.value}); fix the table or the spec")
        return None

    def finish_bundle(self):
        if self._pending:
            for record in avc.encode_examples(self._pending):
                yield beam.transforms.window.GlobalWindows.windowed_value(record)
            self._pending = []


def _read_state(pipeline, artifact) -> beam.PCollection:
    if artifact is None:
        return pipeline | "NoPreviousState" >> beam.Create([])
    pattern = os.path.join(artifact.uri, f"{STATE_FILE_PREFIX}*")
    return (pipeline
            | "ReadState" >> beam.io.ReadFromText(pattern)
            | "ParseState" >> beam.Map(lambda line: avc.UserState.from_record(json.loads(line))))


def run_date(text: str) -> datetime.date:
    """The log date: YYYY-MM-DD; "before:YYYY-MM-DD" (the day before; a Kubeflow recurring run
    passes "before:[[ScheduledTime.2006-01-02]]", so a run that catches up still evaluates the
    day before its scheduled date); or "yesterday" (in the logs' time zone, when the executor runs). A compiled
    Kubeflow pipeline takes the date as a runtime parameter; the components after this one read
    the date from its span."""
    if text == "yesterday":
        return datetime.datetime.now(specs.LOG_TIMEZONE).date() - datetime.timedelta(days=1)
    before = text.startswith("before:")
    try:
        date = datetime.date.fromisoformat(text[len("before:"):] if before else text)
    except ValueError:
        raise ValueError(f"AvcExampleGen: date {text!r} is not YYYY-MM-DD, before:YYYY-MM-DD or yesterday") from None
    return date - datetime.timedelta(days=1) if before else date


class Executor(base_beam_executor.BaseBeamExecutor):
    """Validates a day's rows, computes AVC with the carried state, writes the span."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        input_base = exec_properties["input_base"]
        date = run_date(exec_properties["date"])
        max_bad = float(exec_properties.get("max_bad_row_fraction") or 0.01)
        previous = _previous_state(input_dict.get("previous_user_state") or [], input_base, date)
        files = impression_logs.day_files(input_base, date)
        described = impression_logs.describe_files(files)
        copies = impression_logs.duplicate_files(described, files)
        if copies:
            raise impression_logs.LogFormatError(
                f"{date.isoformat()}: " + "; ".join(f"{copy} has the same content as {original}"
                                                    for copy, original in copies)
                + ": a second copy of the day's log would count every impression twice; remove the copy")
        users_path = os.path.join(input_base, impression_logs.USER_TABLE_FILE)
        videos_path = os.path.join(input_base, impression_logs.VIDEO_TABLE_FILE)
        _table(users_path, specs.USER_ID)  # read before Beam starts: a broken table stops the day here
        _table(videos_path, specs.VIDEO_ID)

        examples = artifact_utils.get_single_instance(output_dict["examples"])
        state_out = artifact_utils.get_single_instance(output_dict["user_state"])
        quarantine = artifact_utils.get_single_instance(output_dict["quarantine"])

        pipeline = self._make_beam_pipeline()
        rows = (pipeline
                | "LogFiles" >> beam.Create(files)
                | "Validate" >> beam.ParDo(_ValidateRows(date, videos_path)).with_outputs("bad", main="good"))
        by_user = {
            "impressions": rows.good,
            "state": _read_state(pipeline, previous) | "KeyState" >> beam.Map(lambda s: (s.user_id, s)),
        }
        processed = (by_user
                     | "GroupByUser" >> beam.CoGroupByKey()
                     | "ComputeAvc" >> beam.ParDo(_ProcessUser(users_path, videos_path)).with_outputs(
                         "state", "bad", main="examples"))
        ((rows.bad, processed.bad)
         | "AllBadRows" >> beam.Flatten()
         | "BadRowToJson" >> beam.Map(lambda b: json.dumps({"file": b.file, "row": b.row_number,
                                                          "reason": b.reason, "raw": b.raw}))
         | "WriteQuarantine" >> beam.io.WriteToText(os.path.join(quarantine.uri, QUARANTINE_FILE),
                                                    shard_name_template=""))
        (processed.examples
         | "WriteExamples" >> beam.io.WriteToTFRecord(
             os.path.join(examples.uri, f"Split-{SPLIT}", EXAMPLES_PREFIX),
             file_name_suffix=".gz", compression_type=beam.io.filesystem.CompressionTypes.GZIP))
        (processed.state
         | "StateToJson" >> beam.Map(lambda s: json.dumps(s.to_record()))
         | "WriteState" >> beam.io.WriteToText(os.path.join(state_out.uri, STATE_FILE_PREFIX),
                                               file_name_suffix=".jsonl.gz",
                                               compression_type=beam.io.filesystem.CompressionTypes.GZIP))
        result = pipeline.run()
        result.wait_until_finish()
        _TABLES.clear()  # large, and needed no more (after a failed run the next one clears them)

        duplicates = _counter(result, "duplicate_rows")
        good = _counter(result, "good_rows") - duplicates  # duplicates passed validation first
        bad_rows = _read_bad_rows(os.path.join(quarantine.uri, QUARANTINE_FILE))
        counts = {"good_rows": good, "bad_rows": len(bad_rows), "duplicate_rows": duplicates,
                  "rows_without_user_profile": _counter(result, "rows_without_user_profile")}
        summary = {"date": date.isoformat(), "files": [dict(d, path=p) for p, d in zip(files, described)],
                   "input_fingerprint": impression_logs.fingerprint(described), **counts,
                   "reasons": _count_reasons(bad_rows)}
        with open(os.path.join(quarantine.uri, QUARANTINE_SUMMARY), "w") as f:
            json.dump(summary, f, indent=2)
        bad_rows_path = os.path.join(quarantine.uri, QUARANTINE_FILE)
        if exec_properties.get("quarantine_dir"):
            bad_rows_path = keep_quarantine(quarantine.uri, str(exec_properties["quarantine_dir"]), date)
        total = good + len(bad_rows)
        if total == 0:
            raise impression_logs.LogFormatError(f"{date.isoformat()}: the log files {files} have no rows")
        if len(bad_rows) > max_bad * total:
            shown = "; ".join(f"{b['file']} row {b['row']}: {b['reason']}" for b in bad_rows[:_SHOWN_BAD_ROWS])
            raise impression_logs.LogFormatError(
                f"{date.isoformat()}: {len(bad_rows)} of {total} rows are bad "
                f"({len(bad_rows) / total:.2%} > {max_bad:.2%}); first ones: {shown}. "
                f"All bad rows with reasons: {bad_rows_path}")

        span = span_of(date)
        examples.split_names = artifact_utils.encode_split_names([SPLIT])
        examples.span = span
        examples.set_string_custom_property("payload_format", "FORMAT_TF_EXAMPLE")
        examples.set_string_custom_property("file_format", "tfrecords_gzip")
        for name, value in counts.items():
            examples.set_int_custom_property("rows" if name == "good_rows" else name, value)
        examples.set_string_custom_property("input_fingerprint", summary["input_fingerprint"])
        state_out.span = span
        state_out.through_date = date.isoformat()
        quarantine.span = span
        quarantine.set_int_custom_property("bad_rows", len(bad_rows))


def quarantine_dir_of(home: str) -> str:
    return os.path.join(home, "quarantine")


def keep_quarantine(quarantine_uri: str, quarantine_dir: str, date: datetime.date) -> str:
    """Copies a day's bad rows and counts to QUARANTINE_DIR/DATE/ (replacing an earlier ingest's);
    returns the path of the bad rows there."""
    kept = os.path.join(quarantine_dir, date.isoformat())
    os.makedirs(kept, exist_ok=True)
    for name in (QUARANTINE_FILE, QUARANTINE_SUMMARY):
        source = os.path.join(quarantine_uri, name)
        if os.path.exists(source):
            shutil.copyfile(source, os.path.join(kept, name + ".partial"))
            os.replace(os.path.join(kept, name + ".partial"), os.path.join(kept, name))
        elif os.path.exists(os.path.join(kept, name)):
            os.remove(os.path.join(kept, name))  # no bad rows this time: none from an earlier ingest
    return os.path.join(kept, QUARANTINE_FILE)


def run_executor_for_day(input_base: str, date: datetime.date, output_dir: str, beam_pipeline_args: List[str],
                         previous_user_state: Optional[types.Artifact] = None,
                         max_bad_row_fraction: float = 0.01,
                         quarantine_dir: str = "") -> Dict[str, List[types.Artifact]]:
    """The executor on one day outside a pipeline (benchmarks, tests): its three output artifacts,
    written under output_dir/<examples|user_state|quarantine>."""
    executor = Executor(base_beam_executor.BaseBeamExecutor.Context(
        beam_pipeline_args=beam_pipeline_args, tmp_dir=os.path.join(output_dir, "tmp")))
    outputs = {}
    for key, artifact_class in (("examples", standard_artifacts.Examples), ("user_state", UserState),
                                ("quarantine", QuarantinedRows)):
        artifact = artifact_class()
        artifact.uri = os.path.join(output_dir, key)
        os.makedirs(artifact.uri, exist_ok=True)
        outputs[key] = [artifact]
    executor.Do({"previous_user_state": [previous_user_state] if previous_user_state else []}, outputs,
                {"input_base": input_base, "date": date.isoformat(), "max_bad_row_fraction": max_bad_row_fraction,
                 "quarantine_dir": quarantine_dir})
    return outputs


def _previous_state(artifacts, input_base: str, date: datetime.date):
    """The resolved user state of the day before, or of the day before skipped days (the
    resolver picks which); None on the first day of the logs."""
    wanted = span_of(date) - 1
    matching = [a for a in artifacts if 0 <= a.span <= wanted]
    if matching:
        return max(matching, key=lambda a: (a.span, a.id))
    earlier = [d for d in impression_logs.available_dates(input_base) if d < date]
    if earlier:
        raise impression_logs.LogFormatError(
            f"no user state through {date_of(wanted).isoformat()}, but {input_base} has logs from "
            f"{earlier[0].isoformat()}: days must be ingested in order so that AVC counts every earlier "
            f"impression (poso run ingests the days before; a day whose logs are lost: poso skip-day)")
    return None  # the first day of the data: every user starts at AVC 0


def _counter(result, name: str) -> int:
    query = result.metrics().query(beam.metrics.MetricsFilter().with_namespace(_COUNTER_NAMESPACE).with_name(name))
    return int(sum(c.committed or c.attempted or 0 for c in query["counters"]))


def _read_bad_rows(path: str) -> List[Dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _count_reasons(bad_rows) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for row in bad_rows:
        kind = row["reason"].split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


class AvcExampleGen(base_beam_component.BaseBeamComponent):
    """TFX component: one day of impression logs -> a span of tf.Examples with AVC."""

    SPEC_CLASS = AvcExampleGenSpec
    EXECUTOR_SPEC = executor_spec.BeamExecutorSpec(Executor)

    def __init__(self, input_base: str, date: str, previous_user_state: types.BaseChannel = None,
                 max_bad_row_fraction: float = 0.01, input_fingerprint: str = "", quarantine_dir: str = ""):
        super().__init__(spec=AvcExampleGenSpec(
            input_base=input_base, date=date, max_bad_row_fraction=max_bad_row_fraction,
            input_fingerprint=input_fingerprint, quarantine_dir=quarantine_dir,
            previous_user_state=previous_user_state,
            examples=types.Channel(type=standard_artifacts.Examples),
            user_state=types.Channel(type=UserState),
            quarantine=types.Channel(type=QuarantinedRows)))
