"""What the dashboard shows, read from a pipeline home and never written to.

- the run summaries, HOME/runs/DATE.json (pipeline/summary.py), and the gate means the report
  stores beside them (HOME/runs/DATE/gates.json);
- ML Metadata, opened read-only: every pipeline run with the state of each step, the rows,
  quarantined rows and anomalies of each day, and the lineage of models;
- TF Serving's base directory and models.config: what serves now.

Nothing here imports TensorFlow, TFX or Beam, so the dashboard starts in a second.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import os
import re
from typing import Dict, List, Optional

from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2

from feature_specs import specs
from pipeline import config as config_lib

_Execution = metadata_store_pb2.Execution
STATE_NAMES = {_Execution.NEW: "new", _Execution.RUNNING: "running", _Execution.COMPLETE: "complete",
               _Execution.FAILED: "failed", _Execution.CACHED: "cached", _Execution.CANCELED: "canceled"}
_RESOLVER_TYPE = "tfx.dsl.components.common.resolver.Resolver"
_DAILY_RUN_NODE = "training_window"   # a resolver every daily run has and no ingest-only run
_EXAMPLE_GEN_NODE = "AvcExampleGen"   # its `date` property is the run's day
_ANOMALIES_FILE = "SchemaDiff.pb"     # what ExampleValidator writes in each Split-* folder
_EPOCH = datetime.date(1970, 1, 1)    # a span is the day number since (components/avc_example_gen.py)
# AvcExampleGen keeps each day's bad rows and counts here, also when the step then fails
# (components/avc_example_gen.py: quarantine_dir_of, QUARANTINE_SUMMARY).
_QUARANTINE_DIR, _QUARANTINE_SUMMARY = "quarantine", "summary.json"


def span_date(span: int) -> str:
    return (_EPOCH + datetime.timedelta(days=span)).isoformat()


def from_millis(millis: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(millis / 1000, tz=datetime.timezone.utc)


@dataclasses.dataclass
class Step:
    """One execution of a pipeline node."""
    execution_id: int
    component: str
    state: str
    started: datetime.datetime
    seconds: float
    resolver: bool


@dataclasses.dataclass
class PipelineRun:
    """One pipeline run (a `pipeline_run` context): an ingest of one day or a daily run."""
    id: int
    name: str
    date: Optional[str]
    daily: bool
    steps: List[Step]

    @property
    def started(self) -> Optional[datetime.datetime]:
        return min((s.started for s in self.steps), default=None)

    @property
    def seconds(self) -> float:
        if not self.steps:
            return 0.0
        end = max(s.started.timestamp() + s.seconds for s in self.steps)
        return end - self.started.timestamp()

    @property
    def components(self) -> List[Step]:
        """The steps with an executor (resolvers only pick inputs)."""
        return [s for s in self.steps if not s.resolver]

    @property
    def cached(self) -> int:
        return sum(s.state == "cached" for s in self.components)

    @property
    def failed_step(self) -> Optional[Step]:
        return next((s for s in sorted(self.steps, key=lambda s: s.execution_id) if s.state == "failed"), None)

    @property
    def status(self) -> str:
        """failed; incomplete (a step never finished: killed, or still running); or complete."""
        if self.failed_step is not None:
            return "failed"
        if any(s.state in ("new", "running") for s in self.steps):
            return "incomplete"
        return "complete"


@dataclasses.dataclass
class Day:
    """A date's row of the dashboard: its latest run, its summary, and the day's data."""
    date: str
    summary: Optional[Dict[str, object]]
    runs: List[PipelineRun]
    rows: Optional[int] = None          # examples AvcExampleGen wrote for the day
    quarantined: Optional[int] = None   # rows it set aside
    anomalies: Optional[List[str]] = None   # ExampleValidator's anomalies of the day
    ingest: Optional[Dict[str, object]] = None  # AvcExampleGen's counts and bad-row reasons of the day

    @property
    def latest_run(self) -> Optional[PipelineRun]:
        daily = [r for r in self.runs if r.daily]
        return max(daily or self.runs, key=lambda r: r.id, default=None)

    @property
    def status(self) -> str:
        run = self.latest_run
        if run is None:
            return "summary only"
        if not run.daily and run.status == "complete":
            return "ingested"
        return run.status

    @property
    def seconds(self) -> Optional[float]:
        if self.summary and isinstance(self.summary.get("wall_seconds"), (int, float)):
            return float(self.summary["wall_seconds"])
        return self.latest_run.seconds if self.latest_run else None


@dataclasses.dataclass
class Serving:
    """What TF Serving serves from the home, by models.config and the version folders."""
    models_config: str
    base_path: Optional[str]
    policy: str                         # "latest N", "specific N,M" or "all" (TF Serving's policies)
    versions: List[int]                 # version folders on disk
    served: List[int]                   # the ones the policy serves
    pushes: Dict[int, "Push"]           # version -> its push, from MLMD
    config_written: Optional[datetime.datetime] = None   # models.config's last change
    pin: Optional[Dict[str, object]] = None   # `poso rollback`'s pin: version, pinned_at


@dataclasses.dataclass
class Push:
    version: int
    pushed_at: datetime.datetime
    date: Optional[str]                 # the day of the run that pushed it
    model_id: Optional[int]


@dataclasses.dataclass
class ArtifactInfo:
    id: int
    type: str
    uri: str
    created: datetime.datetime
    span: Optional[int]
    properties: Dict[str, object]

    @property
    def date(self) -> Optional[str]:
        return span_date(self.span) if self.span is not None else None


@dataclasses.dataclass
class Lineage:
    """Where a model comes from: the Trainer run, its window and Transform; its evaluation and pushes."""
    model: ArtifactInfo
    trainer: Optional[Step]
    trainer_run: Optional[PipelineRun]
    window: List[ArtifactInfo]          # the Examples it trained on, one per span
    transform_graph: Optional[ArtifactInfo]
    transform: Optional[Step]
    transform_run: Optional[PipelineRun]
    evaluations: List[Dict[str, object]]   # date, blessed, baseline model id
    pushes: List[Push]


def _value(value: metadata_store_pb2.Value):
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind in ("int_value", "double_value", "string_value", "bool_value") else None


def _properties(node) -> Dict[str, object]:
    found = {k: _value(v) for k, v in node.custom_properties.items()}
    found.update({k: _value(v) for k, v in node.properties.items()})
    return found


class HomeReader:
    """Reads a pipeline home (`--home` of `poso run`); every call reads afresh."""

    def __init__(self, home: str):
        self.cfg = config_lib.home_config(home)
        self.home = self.cfg.home_dir
        self.runs_dir = os.path.join(self.home, "runs")

    def exists(self) -> bool:
        return bool(self.cfg.metadata_mysql) or os.path.isfile(self.cfg.metadata_path) or os.path.isdir(self.runs_dir)

    # --- run summaries --------------------------------------------------------------------------
    def summaries(self) -> Dict[str, Dict[str, object]]:
        found = {}
        for path in sorted(glob.glob(os.path.join(self.runs_dir, "*.json"))):
            date = os.path.basename(path)[:-len(".json")]
            summary = self.summary(date)
            if summary is not None:
                found[date] = summary
        return found

    def summary(self, date: str) -> Optional[Dict[str, object]]:
        return self._json(os.path.join(self.runs_dir, f"{date}.json"))

    def gate_means(self, date: str) -> Dict[str, Dict[str, float]]:
        return self._json(os.path.join(self.runs_dir, date, "gates.json")) or {}

    @staticmethod
    def _json(path: str):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    # --- ML Metadata ----------------------------------------------------------------------------
    def _store(self) -> Optional[metadata_store.MetadataStore]:
        connection = config_lib.metadata_store_connection(self.cfg, read_only=True)
        return None if connection is None else metadata_store.MetadataStore(connection)

    def pipeline_runs(self, store=None) -> List[PipelineRun]:
        store = store or self._store()
        if store is None:
            return []
        type_names = {t.id: t.name for t in store.get_execution_types()}
        component_of = {}
        for node in store.get_contexts_by_type("node"):
            for execution in store.get_executions_by_context(node.id):
                component_of[execution.id] = node.name.split(".", 1)[-1]
        runs = []
        for context in store.get_contexts_by_type("pipeline_run"):
            steps, date = [], None
            for e in store.get_executions_by_context(context.id):
                component = component_of.get(e.id, f"execution {e.id}")
                steps.append(Step(e.id, component, STATE_NAMES.get(e.last_known_state, "unknown"),
                                  from_millis(e.create_time_since_epoch),
                                  (e.last_update_time_since_epoch - e.create_time_since_epoch) / 1000,
                                  type_names.get(e.type_id) == _RESOLVER_TYPE))
                if component == _EXAMPLE_GEN_NODE and "date" in e.custom_properties:
                    date = e.custom_properties["date"].string_value
            steps.sort(key=lambda s: s.execution_id)
            runs.append(PipelineRun(context.id, context.name, date,
                                    any(s.component == _DAILY_RUN_NODE for s in steps), steps))
        return sorted(runs, key=lambda r: r.id)

    def _latest_by_span(self, store, type_name: str) -> Dict[int, ArtifactInfo]:
        latest: Dict[int, ArtifactInfo] = {}
        for artifact in self._artifacts(store, type_name):
            if artifact.span is not None and (artifact.span not in latest or artifact.id > latest[artifact.span].id):
                latest[artifact.span] = artifact
        return latest

    @staticmethod
    def _artifacts(store, type_name: Optional[str] = None, ids: Optional[List[int]] = None) -> List[ArtifactInfo]:
        """The artifacts of one type, or with the given ids."""
        try:
            found = store.get_artifacts_by_type(type_name) if ids is None else store.get_artifacts_by_id(ids)
        except Exception:  # the type is registered on first use
            return []
        type_names = {t.id: t.name for t in store.get_artifact_types()}
        infos = []
        for artifact in found:
            properties = _properties(artifact)
            infos.append(ArtifactInfo(artifact.id, type_names.get(artifact.type_id, "?"), artifact.uri,
                                      from_millis(artifact.create_time_since_epoch), properties.get("span"), properties))
        return infos

    def days(self) -> List[Day]:
        """One row per date that has a run or a summary, newest first."""
        summaries = self.summaries()
        store = self._store()
        runs = self.pipeline_runs(store) if store is not None else []
        days = {date: Day(date, summary, []) for date, summary in summaries.items()}
        for run in runs:
            if run.date is not None:
                days.setdefault(run.date, Day(run.date, summaries.get(run.date), [])).runs.append(run)
        for day in days.values():
            day.ingest = self._json(os.path.join(self.home, _QUARANTINE_DIR, day.date, _QUARANTINE_SUMMARY))
            if day.ingest is not None:
                day.quarantined = day.ingest.get("bad_rows")
        if store is not None:
            examples = self._latest_by_span(store, "Examples")
            quarantine = self._latest_by_span(store, "poso.QuarantinedRows")
            anomalies = self._latest_by_span(store, "ExampleAnomalies")
            for day in days.values():
                span = (datetime.date.fromisoformat(day.date) - _EPOCH).days
                if span in examples:
                    day.rows = examples[span].properties.get("rows")
                if span in quarantine:
                    day.quarantined = quarantine[span].properties.get("bad_rows")
                if span in anomalies:
                    day.anomalies = read_anomalies(anomalies[span].uri)
        return sorted(days.values(), key=lambda d: d.date, reverse=True)

    def day(self, date: str) -> Optional[Day]:
        return next((d for d in self.days() if d.date == date), None)

    # --- serving ----------------------------------------------------------------------------------
    def serving(self) -> Serving:
        path = self.cfg.models_config_path
        text = open(path).read() if os.path.isfile(path) else ""
        base = re.search(r'base_path:\s*"([^"]*)"', text)
        base_path = base.group(1) if base else None
        folder = base_path or self.cfg.serving_model_dir
        versions = sorted(int(v) for v in os.listdir(folder) if v.isdigit()) if os.path.isdir(folder) else []
        specific = re.search(r"specific\s*\{([^}]*)\}", text)
        latest = re.search(r"latest\s*\{\s*(?:num_versions:\s*(\d+))?", text)
        if specific:
            pinned = [int(v) for v in re.findall(r"versions:\s*(\d+)", specific.group(1))]
            policy, served = "specific " + ", ".join(map(str, pinned)), [v for v in pinned if v in versions]
        elif re.search(r"\ball\s*\{", text):
            policy, served = "all", versions
        else:  # TF Serving's default policy is the latest version
            count = int(latest.group(1)) if latest and latest.group(1) else 1
            policy, served = f"latest {count}", versions[-count:]
        written = (datetime.datetime.fromtimestamp(os.path.getmtime(path), tz=datetime.timezone.utc)
                   if text else None)
        return Serving(path if text else "", base_path, policy, versions, served, self._pushes(), written,
                       self._json(self.cfg.pin_path))

    def _pushes(self, store=None) -> Dict[int, Push]:
        store = store or self._store()
        if store is None:
            return {}
        pushed = [a for a in self._artifacts(store, "PushedModel")
                  if a.properties.get("pushed") == 1 and str(a.properties.get("pushed_version", "")).isdigit()]
        if not pushed:
            return {}
        runs = {r.id: r for r in self.pipeline_runs(store)}
        pushes: Dict[int, Push] = {}
        for artifact in sorted(pushed, key=lambda a: a.id):
            version = int(artifact.properties["pushed_version"])
            if version in pushes:
                continue  # a cached rerun re-records the same push
            pusher = self._producer(store, artifact.id)
            date, model_id = None, None
            if pusher is not None:
                run = self._run_of(store, pusher, runs)
                date = run.date if run else None
                blessings = self._inputs(store, pusher, "model_blessing")
                if blessings:
                    model_id = blessings[0].properties.get("current_model_id")
            pushes[version] = Push(version, artifact.created, date, model_id)
        return pushes

    def model_id_of(self, summary: Optional[Dict[str, object]]) -> Optional[int]:
        """The candidate Model artifact of a run summary (by its URI: a cached rerun has the same)."""
        model_dir = (summary or {}).get("candidate_model_dir")
        store = self._store() if model_dir else None
        if store is None:
            return None
        uri = os.path.dirname(str(model_dir))  # the summary names the Format-Serving folder inside
        return next((a.id for a in self._artifacts(store, "Model") if a.uri == uri), None)

    # --- lineage ----------------------------------------------------------------------------------
    @staticmethod
    def _producer(store, artifact_id: int) -> Optional[int]:
        events = [e for e in store.get_events_by_artifact_ids([artifact_id])
                  if e.type == metadata_store_pb2.Event.OUTPUT]
        return events[0].execution_id if events else None

    def _inputs(self, store, execution_id: int, key: str) -> List[ArtifactInfo]:
        ids = [e.artifact_id for e in store.get_events_by_execution_ids([execution_id])
               if e.type == metadata_store_pb2.Event.INPUT and e.path.steps and e.path.steps[0].key == key]
        return sorted(self._artifacts(store, ids=ids), key=lambda a: (a.span or 0, a.id)) if ids else []

    @staticmethod
    def _run_of(store, execution_id: int, runs: Dict[int, PipelineRun]) -> Optional[PipelineRun]:
        found = [runs[c.id] for c in store.get_contexts_by_execution(execution_id) if c.id in runs]
        return found[0] if found else None

    @staticmethod
    def _step(run: Optional[PipelineRun], execution_id: Optional[int]) -> Optional[Step]:
        return next((s for s in run.steps if s.execution_id == execution_id), None) if run else None

    def lineage_of_version(self, version: int) -> Optional[Lineage]:
        push = self._pushes().get(version)
        return self.lineage_of_model(push.model_id) if push and push.model_id is not None else None

    def lineage_of_model(self, model_id: int) -> Optional[Lineage]:
        store = self._store()
        if store is None:
            return None
        models = [a for a in self._artifacts(store, ids=[model_id]) if a.type == "Model"]
        if not models:
            return None
        runs = {r.id: r for r in self.pipeline_runs(store)}
        trainer_id = self._producer(store, model_id)
        trainer_run = self._run_of(store, trainer_id, runs) if trainer_id is not None else None
        window, graph, transform_id, transform_run = [], None, None, None
        if trainer_id is not None:
            window = self._inputs(store, trainer_id, "examples")
            graphs = self._inputs(store, trainer_id, "transform_graph")
            if graphs:
                graph = graphs[0]
                transform_id = self._producer(store, graph.id)
                transform_run = self._run_of(store, transform_id, runs) if transform_id is not None else None
        evaluations = []
        consumers = {e.execution_id for e in store.get_events_by_artifact_ids([model_id])
                     if e.type == metadata_store_pb2.Event.INPUT and e.path.steps and e.path.steps[0].key == "model"}
        for execution_id in sorted(consumers):
            blessings = [a for a in self._outputs(store, execution_id)
                         if a.type == "ModelBlessing" and "blessed" in a.properties]
            if not blessings:
                continue  # not BlessingGate (the Evaluator, whose blessing is empty; the infra validator, a Pusher)
            examples = self._inputs(store, execution_id, "examples")
            baseline = self._inputs(store, execution_id, "baseline_model")
            evaluations.append({"date": examples[0].date if examples else None,
                                "blessed": blessings[0].properties.get("blessed") == 1,
                                "baseline_model_id": baseline[0].id if baseline else None})
        pushes = [p for p in self._pushes(store).values() if p.model_id == model_id]
        return Lineage(models[0], self._step(trainer_run, trainer_id), trainer_run, window, graph,
                       self._step(transform_run, transform_id), transform_run, evaluations, pushes)

    def _outputs(self, store, execution_id: int) -> List[ArtifactInfo]:
        ids = [e.artifact_id for e in store.get_events_by_execution_ids([execution_id])
               if e.type == metadata_store_pb2.Event.OUTPUT]
        return self._artifacts(store, ids=ids) if ids else []


def read_anomalies(uri: str) -> List[str]:
    """ExampleValidator's anomalies in an ExampleAnomalies folder, as 'feature: description'."""
    from tensorflow_metadata.proto.v0 import anomalies_pb2

    found = []
    for path in sorted(glob.glob(os.path.join(uri, "Split-*", _ANOMALIES_FILE))):
        anomalies = anomalies_pb2.Anomalies()
        with open(path, "rb") as f:
            anomalies.ParseFromString(f.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            found.append(f"{feature}: {info.short_description or info.description}")
        if anomalies.HasField("dataset_anomaly_info"):
            found.append(f"dataset: {anomalies.dataset_anomaly_info.short_description}")
    return found


# --- the blessing decision ---------------------------------------------------------------------
def metric_value(rows, slice_name: str, task: str, metric: str) -> Optional[float]:
    for row in rows or []:
        if row.get("slice") == slice_name and row.get("task") == task:
            if metric == "auc" and row.get("mean_label") in (0.0, 1.0):
                return None  # one class only: AUC is undefined, not 0
            value = row.get(metric)
            return value if isinstance(value, (int, float)) else None
    return None


def blessing_checks(summary: Dict[str, object]) -> List[Dict[str, object]]:
    """BlessingGate's checks of the day (pipeline/blessing.py), each with the candidate's and the
    baseline's values, the rule and the slice size, so a NOT blessed shows by how much and where.
    Summaries written before the gate have none."""
    return [{"task": c["task"], "slice": c["slice"], "metric": str(c["metric"]).upper(), "rule": c.get("rule", ""),
             "candidate": c.get("candidate"), "baseline": c.get("baseline"), "size": c.get("size"),
             "passed": c.get("passed")} for c in summary.get("blessing_checks") or []]


def metric_trends(summaries: Dict[str, Dict[str, object]], metric: str, slice_prefix: str,
                  task: str) -> Dict[str, List[Optional[float]]]:
    """{slice value or 'overall': [value per date of `summaries`, in date order]} for one task."""
    dates = sorted(summaries)
    names = {str(r["slice"]) for s in summaries.values() for r in s.get("metrics") or []
             if str(r["slice"]).startswith(slice_prefix + "=")}
    ordered = ["overall"] + sorted(names, key=lambda n: n.split("=", 1)[1])
    return {name.split("=", 1)[-1]: [metric_value(summaries[d].get("metrics"), name, task, metric) for d in dates]
            for name in ordered}
