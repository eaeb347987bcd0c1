"""Carrying state between daily runs on Kubeflow Pipelines v2 / Vertex, where custom resolvers do not compile.

TFX's KubeflowV2DagRunner compiles a Resolver only for LatestArtifactStrategy (one artifact) and
LatestBlessedModelStrategy (tfx/orchestration/kubeflow/v2/step_builder.py, `_build_resolver_spec`
raises TypeError for any other strategy). They become KFP artifact queries on the schema title
alone (`schema_title="tfx.Examples" AND state=LIVE`; every custom artifact type is queried as
"tfx.Artifact"), which can pick neither the 7 validated spans D-7..D-1 that `SpanWindowStrategy`
picks from ML Metadata locally, nor, reliably, the user state through D-1.

So on Kubeflow the pipeline keeps a span registry itself: a folder under the remote home with
one small JSON file per validated day naming its Examples and UserState URIs.
- `RegisteredUserState` (first) copies the registered user state through D-1 for AvcExampleGen;
  with none registered it outputs an empty state of span -1, and AvcExampleGen then starts from
  AVC 0 on the first day of the logs, or refuses, naming the days to run first, on a later day.
  Its cache key holds D-1's input fingerprint and registry entry (components/input_fingerprint.py):
  it refuses a state ingested from D-1 files that have changed since, and carries a new one once
  D-1 is run again.
- `SpanWindowExamples` (after the anomalies gate of day D) gathers the registered spans
  D-7..D-1 into one Examples artifact (their files copied; split `day`, as AvcExampleGen writes
  it), refusing, with the missing dates named, when fewer than `min_spans` are registered; then
  it registers day D for the runs of later days. A day is registered only after its gate passed,
  so the window holds validated spans only, as locally.
The registry assumes one daily run at a time, in date order (the recurring run's max_concurrency=1).
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components.avc_example_gen import SPLIT, UserState, date_of, run_date, span_of
from components.span_window import WindowError


def registry_dir_of(home: str) -> str:
    return os.path.join(home, "span_registry")


def _entry_path(registry_dir: str, span: int) -> str:
    return os.path.join(registry_dir, f"span-{span}.json")


def register_day(registry_dir: str, span: int, examples_uri: str, user_state_uri: str,
                 input_fingerprint: str = "") -> None:
    """`input_fingerprint`: of the log files the day was ingested from (AvcExampleGen's)."""
    fileio.makedirs(registry_dir)
    entry = {"span": span, "date": date_of(span).isoformat(), "examples_uri": examples_uri,
             "user_state_uri": user_state_uri, "input_fingerprint": input_fingerprint}
    with fileio.open(_entry_path(registry_dir, span), "w") as f:
        f.write(json.dumps(entry))


def registered_days(registry_dir: str, first: int, last: int) -> Dict[int, Dict[str, str]]:
    """{span: registry entry} of the registered days in [first, last]."""
    found = {}
    for span in range(first, last + 1):
        path = _entry_path(registry_dir, span)
        if fileio.exists(path):
            with fileio.open(path, "r") as f:
                found[span] = json.loads(f.read())
    return found


def _copy_files(source_dir: str, target_dir: str, prefix: str = "") -> None:
    fileio.makedirs(target_dir)
    for name in sorted(fileio.listdir(source_dir)):
        fileio.copy(os.path.join(source_dir, name), os.path.join(target_dir, prefix + name), overwrite=True)


class StaleUserStateError(ValueError):
    """The registered user state of D-1 was ingested from log files that have changed since."""


class RegisteredUserStateSpec(ComponentSpec):
    # previous_day: its cache key beyond the date (components/input_fingerprint.previous_day_key).
    PARAMETERS = {"registry_dir": ExecutionParameter(type=str), "date": ExecutionParameter(type=str),
                  "previous_day": ExecutionParameter(type=str, optional=True)}
    INPUTS: Dict[str, ChannelParameter] = {}
    OUTPUTS = {"user_state": ChannelParameter(type=UserState)}


class RegisteredUserStateExecutor(base_executor.BaseExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, object]) -> None:
        state = artifact_utils.get_single_instance(output_dict["user_state"])
        wanted = span_of(run_date(str(exec_properties["date"]))) - 1
        entry = registered_days(str(exec_properties["registry_dir"]), wanted, wanted).get(wanted)
        # Only changed files make it stale: logs deleted since (retention) do not, as locally.
        now = json.loads(exec_properties.get("previous_day") or "{}").get("input_fingerprint")
        if entry is not None and entry.get("input_fingerprint") and now and entry["input_fingerprint"] != now:
            day_before = date_of(wanted).isoformat()
            raise StaleUserStateError(
                f"previous_user_state: the log files of {day_before} changed since it was ingested (registered "
                f"from {entry['input_fingerprint']}, now {now}); its user state is "
                f"stale. Run the pipeline for {day_before} again first (date={day_before}), then this day.")
        fileio.makedirs(state.uri)
        if entry is None:
            state.span = -1  # AvcExampleGen decides: the first day of the logs, or days missing
            return
        _copy_files(entry["user_state_uri"], state.uri)
        state.span = wanted
        state.through_date = date_of(wanted).isoformat()


class RegisteredUserState(base_component.BaseComponent):
    """The user state through D-1 from the span registry (Kubeflow); see the module docstring."""

    SPEC_CLASS = RegisteredUserStateSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(RegisteredUserStateExecutor)

    def __init__(self, registry_dir: str, date, previous_day=None):
        super().__init__(spec=RegisteredUserStateSpec(
            registry_dir=registry_dir, date=date, previous_day=previous_day, user_state=types.Channel(type=UserState)))


class SpanWindowExamplesSpec(ComponentSpec):
    PARAMETERS = {
        "registry_dir": ExecutionParameter(type=str),
        "train_days": ExecutionParameter(type=int),
        "min_spans": ExecutionParameter(type=int),
    }
    INPUTS = {"examples": ChannelParameter(type=standard_artifacts.Examples),
              "user_state": ChannelParameter(type=UserState)}
    OUTPUTS = {"window": ChannelParameter(type=standard_artifacts.Examples)}


class SpanWindowExamplesExecutor(base_executor.BaseExecutor):
    """Window of spans D-train_days..D-1 from the registry -> one Examples artifact; registers D."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, object]) -> None:
        today = artifact_utils.get_single_instance(input_dict["examples"])
        user_state = artifact_utils.get_single_instance(input_dict["user_state"])
        window = artifact_utils.get_single_instance(output_dict["window"])
        registry, days = str(exec_properties["registry_dir"]), int(exec_properties["train_days"])
        first, last = today.span - days, today.span - 1
        found = registered_days(registry, first, last)
        if len(found) < int(exec_properties["min_spans"]):
            missing = [date_of(s).isoformat() for s in range(first, last + 1) if s not in found]
            raise WindowError(
                f"training window: need at least {exec_properties['min_spans']} validated daily spans from "
                f"{date_of(first).isoformat()} to {date_of(last).isoformat()} in {registry}, have {len(found)}; "
                f"missing: {', '.join(missing)}. Run the pipeline for the missing days first, in order.")
        for span, entry in sorted(found.items()):
            _copy_files(os.path.join(entry["examples_uri"], f"Split-{SPLIT}"),
                        os.path.join(window.uri, f"Split-{SPLIT}"), prefix=f"span-{span}-")
        window.split_names = artifact_utils.encode_split_names([SPLIT])
        window.span = last
        window.set_string_custom_property("spans", ",".join(str(s) for s in sorted(found)))
        register_day(registry, today.span, today.uri, user_state.uri, today.get_string_custom_property("input_fingerprint"))


class SpanWindowExamples(base_component.BaseComponent):
    """Kubeflow's training window; see the module docstring."""

    SPEC_CLASS = SpanWindowExamplesSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(SpanWindowExamplesExecutor)

    def __init__(self, examples: types.BaseChannel, user_state: types.BaseChannel, registry_dir: str,
                 train_days: int, min_spans: int):
        super().__init__(spec=SpanWindowExamplesSpec(
            examples=examples, user_state=user_state, registry_dir=registry_dir, train_days=train_days,
            min_spans=min_spans, window=types.Channel(type=standard_artifacts.Examples)))
