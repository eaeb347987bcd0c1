"""The end-of-run summary: window, rows, metrics per slice, blessed or not and why, pushed version."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from tfx import v1 as tfx

from components import serving_config, span_window
from components.avc_example_gen import span_of
from feature_specs import specs
from pipeline import blessing as blessing_lib
from pipeline import config as config_lib
from pipeline import pipeline as pipeline_lib
from pipeline import skip_day


def _latest(store, type_name: str, span: Optional[int] = None):
    try:
        artifacts = store.get_artifacts_by_type(type_name)
    except Exception:
        return None
    if span is not None:
        artifacts = [a for a in artifacts if "span" in a.properties and a.properties["span"].int_value == span]
    return max(artifacts, key=lambda a: a.id) if artifacts else None


def _custom(artifact, key: str, default=None):
    if artifact is None or key not in artifact.custom_properties:
        return default
    value = artifact.custom_properties[key]
    return value.int_value if value.HasField("int_value") else value.string_value


def _outputs_of_run(store, span: int) -> Dict[str, object]:
    """Output artifacts, by type name, of the latest pipeline run that evaluated `span`.

    Not simply the latest artifacts of the store: rerunning an earlier day (a resume, a
    backfill) is all cached and creates none, and must still report that day's evaluation.
    """
    from ml_metadata.proto import metadata_store_pb2
    from tfx.dsl.compiler import constants as compiler_constants

    evaluations = _artifacts(store, tfx.types.standard_artifacts.ModelEvaluation.TYPE_NAME)
    if not evaluations:
        return {}
    evaluators = {e.execution_id for e in store.get_events_by_artifact_ids([a.id for a in evaluations])
                  if e.type == metadata_store_pb2.Event.OUTPUT}
    inputs = [(e.artifact_id, e.execution_id) for e in store.get_events_by_execution_ids(sorted(evaluators))
              if e.type == metadata_store_pb2.Event.INPUT]
    examples_type = store.get_artifact_type(tfx.types.standard_artifacts.Examples.TYPE_NAME).id
    span_examples = {a.id for a in store.get_artifacts_by_id(sorted({a for a, _ in inputs}))
                     if a.type_id == examples_type and "span" in a.properties and a.properties["span"].int_value == span}
    of_span = {execution for artifact, execution in inputs if artifact in span_examples}
    done = (metadata_store_pb2.Execution.COMPLETE, metadata_store_pb2.Execution.CACHED)
    finished = [e.id for e in store.get_executions_by_id(sorted(of_span)) if e.last_known_state in done]
    if not finished:
        return {}
    run_type = store.get_context_type(compiler_constants.PIPELINE_RUN_CONTEXT_TYPE_NAME).id
    runs = [c for c in store.get_contexts_by_execution(max(finished)) if c.type_id == run_type]
    if not runs:
        return {}
    executions = [e.id for e in store.get_executions_by_context(runs[0].id)]
    outputs = [e.artifact_id for e in store.get_events_by_execution_ids(executions)
               if e.type == metadata_store_pb2.Event.OUTPUT]
    type_names = {t.id: t.name for t in store.get_artifact_types()}
    by_type: Dict[str, object] = {}
    for artifact in sorted(store.get_artifacts_by_id(sorted(set(outputs))), key=lambda a: a.id):
        name = type_names[artifact.type_id]
        if name == tfx.types.standard_artifacts.ModelBlessing.TYPE_NAME and "blessed" not in artifact.custom_properties:
            continue  # the Evaluator's, empty: it runs without thresholds (BlessingGate blesses)
        by_type[name] = artifact
    return by_type


def _artifacts(store, type_name: str):
    try:
        return store.get_artifacts_by_type(type_name)
    except Exception:  # the type is registered on first use
        return []


def _analysis_from_cache(store, cache_output) -> Dict[str, object]:
    """The days of this run's window whose tf.Transform analysis came from the analyzer cache an
    earlier run wrote (components/span_window.py, EarlierWindowCacheStrategy), and the rows
    Transform read and analyzed itself: {} when the run wrote no cache (an older run)."""
    if cache_output is None:
        return {}

    def inputs_of(artifact_id: int) -> Dict[str, List[int]]:
        lineage = span_window.producer_lineage(store, [artifact_id])
        return lineage[artifact_id][1] if artifact_id in lineage else {}

    own = inputs_of(cache_output.id)
    window = {a.id: _custom(a, "rows", 0) for a in store.get_artifacts_by_id(own.get("examples", []))}
    cached = set()  # the same Examples artifacts (a day ingested again is a new one, analyzed afresh)
    for cache_id in own.get("analyzer_cache", []):
        cached |= set(window) & set(inputs_of(cache_id).get("examples", []))
    return {"transform_cached_days": len(cached),
            "transform_analyzed_rows": sum(rows for artifact_id, rows in window.items() if artifact_id not in cached)}


def _input_checks(store, examples) -> Dict[str, object]:
    """What ingest found in the evaluation day's logs, and whether they changed since the day's
    previous ingest (a corrected or late file: the day was ingested and validated again)."""
    if examples is None:
        return {}
    fingerprint = _custom(examples, "input_fingerprint", "")
    earlier = [a for a in _artifacts(store, tfx.types.standard_artifacts.Examples.TYPE_NAME)
               if a.id < examples.id and "span" in a.properties
               and a.properties["span"].int_value == examples.properties["span"].int_value]
    # Against the day's previous ingest only: a day ingested again for another reason (an earlier
    # day's file changed, so its user state did) has the same files as last time.
    fingerprinted = [a for a in earlier if _custom(a, "input_fingerprint", "")]
    previous = max(fingerprinted, key=lambda a: a.id) if fingerprinted else None
    changed = previous is not None and _custom(previous, "input_fingerprint", "") != fingerprint
    return {"input_fingerprint": fingerprint, "input_changed": changed,
            "bad_rows": _custom(examples, "bad_rows", 0), "duplicate_rows": _custom(examples, "duplicate_rows", 0),
            "rows_without_user_profile": _custom(examples, "rows_without_user_profile", 0)}


def summarize(cfg: config_lib.RunConfig) -> Dict[str, object]:
    from tfx.orchestration import metadata

    span = span_of(cfg.date)
    artifacts = tfx.types.standard_artifacts
    with metadata.Metadata(pipeline_lib.metadata_connection(cfg)) as m:
        store = m.store
        examples = _latest(store, artifacts.Examples.TYPE_NAME, span)
        run = _outputs_of_run(store, span)
        evaluation_artifact = run.get(artifacts.ModelEvaluation.TYPE_NAME)
        blessing = run.get(artifacts.ModelBlessing.TYPE_NAME)
        infra = run.get(artifacts.InfraBlessing.TYPE_NAME)
        pushed = run.get(artifacts.PushedModel.TYPE_NAME)
        model = run.get(artifacts.Model.TYPE_NAME)
        train_rows = []
        for date in cfg.train_dates:
            artifact = _latest(store, tfx.types.standard_artifacts.Examples.TYPE_NAME, span_of(date))
            train_rows.append(_custom(artifact, "rows", 0))
        input_checks = _input_checks(store, examples)
        analysis = _analysis_from_cache(store, run.get(artifacts.TransformCache.TYPE_NAME))
    summary: Dict[str, object] = {
        "date": cfg.date.isoformat(),
        "variant": cfg.variant,
        "train_window": [cfg.train_dates[0].isoformat(), cfg.train_dates[-1].isoformat()],
        "train_rows": sum(train_rows), "eval_rows": _custom(examples, "rows", 0),
        "eval_examples_uri": examples.uri if examples is not None else None,
        **input_checks,
        **analysis,
        "skipped_days": {d.isoformat(): reason for d, reason in sorted(
            skip_day.read_skipped_days(cfg).items()) if cfg.train_dates[0] <= d < cfg.date},
        "blessed": bool(_custom(blessing, "blessed", 0)),
        "infra_blessed": bool(_custom(infra, "blessed", 0)),
        "infra_reason": _custom(infra, "reason", ""),
        "pushed": bool(_custom(pushed, "pushed", 0)),
        "pushed_version": _custom(pushed, "pushed_version", None),
        "pushed_destination": _custom(pushed, "pushed_destination", None),
        # "copied", or "adopted": a complete version of the day with this model was already in
        # place (a rerun after a kill inside the push); see components/exactly_once_pusher.py.
        "push": _custom(pushed, "push", None),
        "serving_base_directory": cfg.serving_model_dir,
        "models_config": cfg.models_config_path,
        "pinned_version": serving_config.read_pin(cfg.pin_path),
        "pipeline_root": cfg.pipeline_root,
        "metadata": cfg.metadata_location,
        "candidate_model_dir": os.path.join(model.uri, "Format-Serving") if model is not None else None,
    }
    if evaluation_artifact is not None:
        summary["evaluation_uri"] = evaluation_artifact.uri
        summary["metrics"] = blessing_lib.metric_rows(evaluation_artifact.uri)
        try:  # present when the Evaluator compared against a last blessed model
            summary["baseline_metrics"] = blessing_lib.metric_rows(evaluation_artifact.uri, model_name="baseline")
        except Exception:
            summary["baseline_metrics"] = None
    decision = blessing_lib.read_decision(blessing.uri) if blessing is not None else None
    if decision is not None:
        summary["blessing_checks"] = decision["checks"]
        summary["blessing_failures"] = [c["message"] for c in decision["checks"] if c["passed"] is False]
    return summary


def format_summary(summary: Dict[str, object]) -> str:
    model = f" (model {summary['variant']})" if summary.get("variant") else ""  # older summaries lack it
    lines = [f"Run {summary['date']}{model}: trained on {summary['train_window'][0]}..{summary['train_window'][1]} "
             f"({summary['train_rows']} impressions), evaluated on {summary['eval_rows']} impressions"]
    if summary.get("transform_cached_days"):
        lines.append(f"  Transform: {summary['transform_cached_days']} of the window's days analyzed from the "
                     f"analyzer cache of an earlier run; {summary['transform_analyzed_rows']} impressions analyzed")
    if summary.get("input_changed"):
        lines.append(f"  Input changed: {summary['date']}'s log files differ from an earlier ingest; ingested "
                     f"and validated again")
    if any(summary.get(k) for k in ("bad_rows", "duplicate_rows", "rows_without_user_profile")):
        lines.append(f"  Input checks: {summary.get('bad_rows', 0)} bad rows quarantined (of them "
                     f"{summary.get('duplicate_rows', 0)} exact duplicates); {summary.get('rows_without_user_profile', 0)} "
                     f"rows of users missing from the user table (profile defaults)")
    for date, reason in (summary.get("skipped_days") or {}).items():
        lines.append(f"  Skipped day {date} (poso skip-day): {reason}")
    rows = summary.get("metrics") or []
    if rows:
        tasks = [t.name for t in specs.TASKS]
        slices = sorted({r["slice"] for r in rows}, key=lambda s: (s != "overall", s))
        lines.append(f"  {'slice':28s} " + " ".join(f"{t + ' GAUC/AUC':>18s}" for t in tasks))
        for name in slices:
            cells = []
            for task in tasks:
                row = next((r for r in rows if r["slice"] == name and r["task"] == task), {})
                gauc, auc = row.get("gauc"), row.get("auc")
                if row.get("mean_label") in (0.0, 1.0):  # one class only: AUC is undefined, not 0
                    auc = None
                fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "  -   "
                cells.append(f"{fmt(gauc):>8s}/{fmt(auc):<9s}")
            lines.append(f"  {name:28s} " + " ".join(cells))
    verdict = "BLESSED" if summary["blessed"] else "NOT blessed"
    lines.append(f"  Evaluation: {verdict}" + ("" if summary["blessed"] else
                 ": " + ("; ".join(summary.get("blessing_failures") or []) or "see the evaluation artifact")))
    lines.append("  Infra validation: " + ("passed" if summary["infra_blessed"] else f"FAILED {summary['infra_reason']}"))
    if summary["pushed"]:
        adopted = " (already in place from an earlier run: adopted)" if summary.get("push") == "adopted" else ""
        lines.append(f"  Pushed version {summary['pushed_version']} to {summary['pushed_destination']}{adopted}")
        if summary.get("pinned_version") is not None:
            lines.append(f"  Not serving it: version {summary['pinned_version']} is pinned by `poso rollback` "
                         f"(lift with `poso rollback --release` or `poso run --unpin`)")
    else:
        lines.append("  Not pushed")
    return "\n".join(lines)


def write_summary(summary: Dict[str, object], home: str) -> str:
    path = os.path.join(os.path.abspath(home), "runs", f"{summary['date']}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2, default=str)
    return path
