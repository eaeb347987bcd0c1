"""Resolving by daily span: the training window, the baseline model, Transform's analyzer cache,
and the anomalies gate.

`SpanWindowStrategy` is a TFX ResolverStrategy: for every channel it returns the latest
artifact of each span in [first_span, last_span], oldest first. Given an `anomalies`
channel too, it leaves out spans whose ExampleValidator found anomalies, and it refuses
(with the missing or invalid dates named) when fewer than `min_spans` spans remain.

`BaselineModelStrategy` returns the model blessed by the latest evaluation of a day before
`evaluation_span`: the model the run for that day is compared against. Unlike TFX's
LatestBlessedModelStrategy it does not depend on runs of later days or on the run's own
result, so a rerun of a day (after a crash, or in a backfill) resolves the same baseline,
finds the Evaluator and Pusher cached, and pushes nothing twice.

`EarlierWindowCacheStrategy` returns the analyzer cache Transform wrote on the latest run whose
training window ended before this run's, with the same analysis code: tf.Transform then
analyzes only the spans that cache lacks (the newest day, in a daily rolling window) and takes
the others' per-span analyzer results from it. For the same reason as above it never picks the
cache of a run of the same day, so a rerun resolves the same cache and finds Transform cached
(as long as `poso gc` keeps it: it keeps the caches its kept runs read).
"""


import datetime
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from ml_metadata.proto import metadata_store_pb2
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import types
from tfx.dsl.component.experimental.annotations import InputArtifact
from tfx.dsl.component.experimental.decorators import component
from tfx.dsl.components.common import resolver
from tfx.types import artifact_utils, standard_artifacts

ANOMALIES_FILE = "SchemaDiff.pb"  # what ExampleValidator writes in each Split-* folder
_EPOCH = datetime.date(1970, 1, 1)


class WindowError(RuntimeError):
    """Not enough valid daily spans to train or evaluate."""


def _date(span: int) -> str:
    return (_EPOCH + datetime.timedelta(days=span)).isoformat()


def read_anomalies(artifact: types.Artifact) -> List[str]:
    """Every anomaly of an ExampleAnomalies artifact as 'split: feature: description'."""
    found = []
    for split in artifact_utils.decode_split_names(artifact.split_names):
        path = os.path.join(artifact.uri, f"Split-{split}", ANOMALIES_FILE)
        anomalies = anomalies_pb2.Anomalies()
        with open(path, "rb") as f:
            anomalies.ParseFromString(f.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            reasons = "; ".join(r.description or r.short_description for r in info.reason)
            found.append(f"{split}: feature {feature!r}: {info.short_description or reasons} ({reasons})")
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            found.append(f"{split}: dataset: {info.short_description}")
    return found


def _latest_per_span(artifacts, first: int, last: int) -> Dict[int, types.Artifact]:
    latest: Dict[int, types.Artifact] = {}
    for artifact in artifacts:
        span = artifact.span
        if first <= span <= last and (span not in latest or artifact.id > latest[span].id):
            latest[span] = artifact
    return latest


class SpanWindowStrategy(resolver.ResolverStrategy):
    """The latest artifact per span in [first_span, last_span]; see the module docstring."""

    def __init__(self, first_span: int, last_span: int, min_spans: int = 0, window_name: str = "window",
                 skipped_spans: Sequence[int] = ()):
        self._first, self._last, self._min, self._name = first_span, last_span, min_spans, window_name
        self._skipped = frozenset(skipped_spans)  # recorded as lost (poso skip-day): neither used nor missing

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]
                          ) -> Optional[Dict[str, List[types.Artifact]]]:
        anomalies = _latest_per_span(input_dict.get("anomalies", []), self._first, self._last)
        result, problems = {}, []
        for key, artifacts in input_dict.items():
            if key == "anomalies":
                continue
            latest = {s: a for s, a in _latest_per_span(artifacts, self._first, self._last).items()
                      if s not in self._skipped}
            if "anomalies" in input_dict:
                for span in sorted(latest):
                    if span not in anomalies:
                        problems.append(f"{_date(span)} was not validated")
                        del latest[span]
                    elif read_anomalies(anomalies[span]):
                        problems.append(f"{_date(span)} has schema anomalies")
                        del latest[span]
            result[key] = [latest[s] for s in sorted(latest)]
            if len(result[key]) < self._min:
                missing = [_date(s) for s in range(self._first, self._last + 1)
                           if s not in latest and s not in self._skipped]
                raise WindowError(
                    f"{self._name}: need at least {self._min} valid daily spans from {_date(self._first)} to "
                    f"{_date(self._last)}, have {len(result[key])}; missing or invalid: {', '.join(missing)}"
                    + (f" ({'; '.join(problems)})" if problems else "")
                    + ". Days whose logs are lost: poso skip-day DATE --reason ...; or lower --min-train-days.")
        if "anomalies" in input_dict:  # every input key must be answered; keep the verdicts of the kept spans
            kept = {a.span for artifacts in result.values() for a in artifacts}
            result["anomalies"] = [anomalies[s] for s in sorted(kept) if s in anomalies]
        return result


def producer_lineage(store, artifact_ids: Sequence[int]) -> Dict[int, Tuple[metadata_store_pb2.Execution,
                                                                          Dict[str, List[int]]]]:
    """{artifact id: (the execution that produced it, its input artifact ids by input key)} from
    MLMD. The first producer: a cached execution that reuses an output records the same inputs."""
    producer: Dict[int, int] = {}
    for e in store.get_events_by_artifact_ids(list(artifact_ids)):
        if e.type == metadata_store_pb2.Event.OUTPUT:
            producer[e.artifact_id] = min(producer.get(e.artifact_id, e.execution_id), e.execution_id)
    execution_ids = sorted(set(producer.values()))
    inputs: Dict[int, Dict[str, List[int]]] = {i: {} for i in execution_ids}
    for e in store.get_events_by_execution_ids(execution_ids):
        if e.type == metadata_store_pb2.Event.INPUT and e.path.steps:
            inputs[e.execution_id].setdefault(e.path.steps[0].key, []).append(e.artifact_id)
    executions = {x.id: x for x in store.get_executions_by_id(execution_ids)}
    return {a: (executions[x], inputs[x]) for a, x in producer.items()}


def _input_spans(store, lineage) -> Dict[int, int]:
    """{artifact id: latest span of the Examples its producer read}, from `producer_lineage`: for
    a ModelBlessing the evaluation day, for a TransformCache the last day of the window."""
    read = {artifact_id: [a for ids in by_key.values() for a in ids] for artifact_id, (_, by_key) in lineage.items()}
    examples_type = store.get_artifact_type(standard_artifacts.Examples.TYPE_NAME).id
    span_of_examples = {a.id: a.properties["span"].int_value
                        for a in store.get_artifacts_by_id(sorted({a for ids in read.values() for a in ids}))
                        if a.type_id == examples_type and "span" in a.properties}
    spans = {}
    for artifact_id, ids in read.items():
        found = [span_of_examples[a] for a in ids if a in span_of_examples]
        if found:
            spans[artifact_id] = max(found)
    return spans


def _custom_config(execution: metadata_store_pb2.Execution) -> dict:
    """An execution's custom_config property (TFX keeps a property in `properties` when the type
    declares it, else in `custom_properties`)."""
    value = execution.properties.get("custom_config") or execution.custom_properties.get("custom_config")
    return json.loads(value.string_value) if value is not None and value.string_value else {}


class BaselineModelStrategy(resolver.ResolverStrategy):
    """The model blessed on the latest evaluation day before `evaluation_span`; see the module docstring.

    Inputs `model` (Model) and `model_blessing` (ModelBlessing); both outputs are empty when no
    earlier day blessed a model (the first run is judged by the absolute thresholds only).
    Among blessings of the same day (reruns), the latest model wins.
    """

    def __init__(self, evaluation_span: int):
        self._span = evaluation_span

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]
                          ) -> Optional[Dict[str, List[types.Artifact]]]:
        models = {m.id: m for m in input_dict["model"]}
        blessings = [b for b in input_dict["model_blessing"]
                     if b.get_int_custom_property("blessed") == 1
                     and b.get_int_custom_property("current_model_id") in models]
        spans = _input_spans(store, producer_lineage(store, [b.id for b in blessings])) if blessings else {}
        earlier = [b for b in blessings if spans.get(b.id, self._span) < self._span]
        if not earlier:
            return {"model": [], "model_blessing": []}
        best = max(earlier, key=lambda b: (spans[b.id], b.get_int_custom_property("current_model_id")))
        return {"model": [models[best.get_int_custom_property("current_model_id")]], "model_blessing": [best]}


class EarlierWindowCacheStrategy(resolver.ResolverStrategy):
    """The TransformCache of the latest run whose window ended before `window_last_span` and whose
    Transform ran the same analysis code (`analysis_fingerprint`, in its custom_config); see the
    module docstring. Input and output `cache`; empty on the first run, or after the analysis code
    changed (Transform then analyzes every span and writes a new cache)."""

    def __init__(self, window_last_span: int, analysis_fingerprint: str):
        self._last, self._fingerprint = window_last_span, analysis_fingerprint

    def resolve_artifacts(self, store, input_dict: Dict[str, List[types.Artifact]]
                          ) -> Optional[Dict[str, List[types.Artifact]]]:
        caches = input_dict["cache"]
        lineage = producer_lineage(store, [c.id for c in caches]) if caches else {}
        spans = _input_spans(store, lineage)
        earlier = [c for c in caches if spans.get(c.id, self._last) < self._last
                   and _custom_config(lineage[c.id][0]).get("analysis_fingerprint") == self._fingerprint]
        return {"cache": [max(earlier, key=lambda c: (spans[c.id], c.id))] if earlier else []}


@component
def SchemaAnomaliesGate(anomalies: InputArtifact[standard_artifacts.ExampleAnomalies]) -> None:
    """Stops the run when ExampleValidator found anomalies, naming each one."""
    found = read_anomalies(anomalies)
    if found:
        raise WindowError(f"schema anomalies in the logs of {_date(anomalies.span)} (span {anomalies.span}); "
                          f"not training on them: " + " | ".join(found))
