"""`poso gc --keep N`: deletes old pushed versions and the pipeline_root artifacts no kept model needs.

Kept, whatever N:
- the versions models.config serves (the latest, or the one `poso rollback` pinned) and the N
  newest pushed versions;
- the baseline: the model blessed on the latest evaluation day, which the next run's Evaluator
  compares against (components/span_window.py, BaselineModelStrategy);
- every artifact of the pipeline runs that trained a kept version or the baseline, and of the
  latest daily run (so that rerunning it stays cached);
- every ingest artifact (the daily Examples, statistics, anomalies, user state): later training
  windows and the user state of later days are made from them.

Deleted: the outputs of Transform, Trainer, Evaluator, ServingInfraValidator and Pusher in other
runs (models never pushed, pushes no longer kept, what killed runs left). Transform's analyzer
cache goes with its run, except the caches kept runs' Transforms read (rerunning such a day
resolves the same one); a later day that then finds only an older cache, or none, analyzes the
days it lacks (slower, the same result). Each deleted artifact
is marked DELETED in ML Metadata, so TFX neither resolves nor reuses it from the cache: rerunning
such a day recomputes it. A dry run (the default) lists what would go and how much space it frees;
`--delete` deletes. Run it between daily runs, not during one.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
from typing import Dict, List, Optional, Set

from components import serving_config
from pipeline import argtypes
from pipeline import config as config_lib

MODEL_STEPS = ("Transform", "Trainer", "Evaluator", "ServingInfraValidator", "Pusher")
_DAILY_RUN_NODE = "training_window"   # a resolver of every daily run and of no ingest-only run


@dataclasses.dataclass
class Plan:
    versions: List[str]                 # version folders to delete
    artifacts: List[tuple]              # (artifact id, type name, uri) to delete
    kept_versions: List[int]

    def paths(self) -> List[str]:
        return self.versions + [uri for _, _, uri in self.artifacts]


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names if not os.path.islink(os.path.join(root, name)))


def _store(cfg: config_lib.RunConfig, writable: bool):
    from ml_metadata.metadata_store import metadata_store

    connection = config_lib.metadata_store_connection(cfg, read_only=not writable)
    return None if connection is None else metadata_store.MetadataStore(connection)


def _custom_int(artifact, key: str) -> Optional[int]:
    if key not in artifact.custom_properties:
        return None
    value = artifact.custom_properties[key]
    if value.HasField("int_value"):
        return value.int_value
    text = value.string_value
    return int(text) if text.isdigit() else None


def _served_versions(cfg: config_lib.RunConfig, pushed: List[int]) -> Set[int]:
    from serving import config as serving_config_lib

    if not os.path.exists(cfg.models_config_path):
        return set(pushed[-1:])
    model = serving_config_lib.find_model(serving_config_lib.load_model_server_config(cfg.models_config_path),
                                          config_lib.MODEL_NAME)
    return set(serving_config_lib.aspired_versions(pushed, model)) if model else set()


def plan(home: str, keep: int, store=None) -> Plan:
    from ml_metadata.proto import metadata_store_pb2
    from serving import config as serving_config_lib

    cfg = config_lib.home_config(home)
    pushed = sorted(serving_config_lib.list_versions(cfg.serving_model_dir))
    kept_versions = set(pushed[-keep:] if keep else []) | _served_versions(cfg, pushed)
    pinned = serving_config.read_pin(cfg.pin_path)
    if pinned is not None:
        kept_versions.add(pinned)
    versions = [os.path.join(cfg.serving_model_dir, str(v)) for v in pushed if v not in kept_versions]

    store = store or _store(cfg, writable=False)
    if store is None:
        return Plan(versions, [], sorted(kept_versions))
    node_of: Dict[int, str] = {}
    for node in store.get_contexts_by_type("node"):
        for execution in store.get_executions_by_context(node.id):
            node_of[execution.id] = node.name.split(".", 1)[-1]
    executions_of_run = {run.id: [e.id for e in store.get_executions_by_context(run.id)]
                         for run in store.get_contexts_by_type("pipeline_run")}
    events = store.get_events_by_execution_ids(sorted(node_of))
    outputs: Dict[int, List[int]] = {}
    producer: Dict[int, int] = {}
    inputs: Dict[int, Dict[str, List[int]]] = {}
    for event in events:
        if event.type == metadata_store_pb2.Event.OUTPUT:
            outputs.setdefault(event.execution_id, []).append(event.artifact_id)
            producer.setdefault(event.artifact_id, event.execution_id)
        elif event.type == metadata_store_pb2.Event.INPUT and event.path.steps:
            inputs.setdefault(event.execution_id, {}).setdefault(event.path.steps[0].key, []).append(event.artifact_id)
    artifacts = {a.id: a for a in store.get_artifacts_by_id(sorted(producer))}
    type_names = {t.id: t.name for t in store.get_artifact_types()}

    def of_type(name: str):
        return [a for a in artifacts.values() if type_names.get(a.type_id) == name]

    # Runs to keep: those that pushed a kept version or trained the baseline, and the latest daily run.
    kept_executions: Set[int] = set()
    for pushed_model in of_type("PushedModel"):
        if _custom_int(pushed_model, "pushed") and _custom_int(pushed_model, "pushed_version") in kept_versions:
            kept_executions.add(producer[pushed_model.id])
    baseline_ids = _baseline(of_type("ModelBlessing"), producer, inputs, artifacts)
    kept_executions |= {producer[i] for i in baseline_ids if i in producer}
    daily_runs = [run for run, executions in executions_of_run.items()
                  if any(node_of.get(e) == _DAILY_RUN_NODE for e in executions)]
    kept_runs = {run for run, executions in executions_of_run.items() if kept_executions & set(executions)}
    if daily_runs:
        kept_runs.add(max(daily_runs))
    keep_ids = set(baseline_ids)
    for run in kept_runs:
        for execution in executions_of_run[run]:
            keep_ids.update(outputs.get(execution, []))
            # and the analyzer cache its Transform read: a rerun of that day resolves it again
            keep_ids.update(inputs.get(execution, {}).get("analyzer_cache", []))

    doomed = []
    root = cfg.pipeline_root.rstrip("/") + "/"
    for execution, produced in sorted(outputs.items()):
        if node_of.get(execution) not in MODEL_STEPS:
            continue
        for artifact_id in produced:
            artifact = artifacts[artifact_id]
            if (artifact_id in keep_ids or artifact.state == metadata_store_pb2.Artifact.DELETED
                    or not artifact.uri.startswith(root)):
                continue
            doomed.append((artifact_id, type_names.get(artifact.type_id, "?"), artifact.uri))
    return Plan(versions, sorted(set(doomed)), sorted(kept_versions))


def _baseline(blessings, producer, inputs, artifacts) -> Set[int]:
    """{model id, blessing id} of the model blessed on the latest evaluation day (as
    BaselineModelStrategy picks it for the next day)."""
    best, best_key = None, None
    for blessing in blessings:
        if _custom_int(blessing, "blessed") != 1 or blessing.id not in producer:
            continue
        examples = inputs.get(producer[blessing.id], {}).get("examples", [])
        spans = [artifacts[a].properties["span"].int_value for a in examples
                 if a in artifacts and "span" in artifacts[a].properties]
        key = (max(spans, default=-1), _custom_int(blessing, "current_model_id") or -1)
        if best_key is None or key > best_key:
            best, best_key = blessing, key
    if best is None:
        return set()
    return {best.id, _custom_int(best, "current_model_id")} - {None}


def delete(home: str, planned: Plan) -> None:
    from ml_metadata.proto import metadata_store_pb2

    cfg = config_lib.home_config(home)
    for path in planned.versions:
        shutil.rmtree(path, ignore_errors=True)
    if not planned.artifacts:
        return
    store = _store(cfg, writable=True)
    found = store.get_artifacts_by_id([artifact_id for artifact_id, _, _ in planned.artifacts])
    for artifact in found:
        if os.path.isdir(artifact.uri):
            shutil.rmtree(artifact.uri, ignore_errors=True)
        elif os.path.exists(artifact.uri):
            os.remove(artifact.uri)
        artifact.state = metadata_store_pb2.Artifact.DELETED
    store.put_artifacts(found)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_home_argument(parser, "the pipeline home")
    parser.add_argument("--keep", type=argtypes.non_negative_int, required=True, metavar="N",
                        help="pushed versions to keep besides the serving one (newest first)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="only list what would be deleted (the default)")
    mode.add_argument("--delete", action="store_true", help="delete it")


def run(args: argparse.Namespace) -> int:
    planned = plan(args.home, args.keep)
    sizes = {path: _size(path) for path in planned.paths() if os.path.exists(path)}
    for path in planned.versions:
        print(f"version   {path}  {sizes.get(path, 0) / 2**20:8.1f} MiB")
    for artifact_id, type_name, uri in planned.artifacts:
        print(f"artifact  {uri}  ({type_name} {artifact_id})  {sizes.get(uri, 0) / 2**20:8.1f} MiB")
    total = sum(sizes.values()) / 2**20
    kept = ", ".join(map(str, planned.kept_versions)) or "none"
    if not args.delete:
        print(f"Would delete {len(planned.versions)} versions and {len(planned.artifacts)} artifacts "
              f"({total:.1f} MiB); keeping versions {kept} and the baseline model. Pass --delete to delete.")
        return 0
    from pipeline import exit_codes, home_lock

    try:  # never while a run uses the home: it may be reading what would be deleted
        with home_lock.home_lock(os.path.abspath(args.home), command="gc --delete"):
            delete(args.home, planned)
    except home_lock.HomeLocked as locked:
        print(f"poso gc: {locked}", file=sys.stderr)
        return exit_codes.LOCKED
    print(f"Deleted {len(planned.versions)} versions and {len(planned.artifacts)} artifacts ({total:.1f} MiB); "
          f"kept versions {kept} and the baseline model.")
    return 0
