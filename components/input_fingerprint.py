"""DayInputFingerprint: a day's input fingerprint at run time, for Kubeflow Pipelines v2 / Vertex.

Locally the fingerprint of day D's log files (names, sizes, SHA-256: impression_logs.fingerprint)
is computed when the pipeline is built and passed to AvcExampleGen as an execution property, so
that the step's cache key holds it. A compiled Kubeflow pipeline knows the date only at run time
(the `date` runtime parameter), so this component computes it then, as a String output that
AvcExampleGen takes as a parameter (`outputs["fingerprint"].future()[0].value`: KFP passes it as
a task output parameter, and KFP's cache key holds parameter values). This task itself must
never be taken from KFP's cache (its inputs, the date and the paths, stay the same when a file
changes): kubeflow_v2_runner turns caching off for it. With the same files AvcExampleGen then
finds its cached execution; with a changed file it runs again, and so does every step after it.

It also outputs `previous_day`, the cache key of `previous_user_state`
(components/span_registry.py), which otherwise holds only the date: the fingerprint of day D-1's
log files now and D-1's registry entry (the user state registered for it and the fingerprint of
the files it was ingested from). Locally, day D's ingest starts from the user state of D-1's latest
ingest, and D-1 is ingested again when its files change; on Kubeflow a corrected D-1 file changes
this key, so `previous_user_state` runs again and refuses to carry a state ingested from other
files; once D-1 is run again, its new registry entry changes the key again and the new state is
carried (as it is when D-1 was run again because a day before it changed).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Dict, List, Optional

from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import impression_logs, span_registry
from components.avc_example_gen import run_date, span_of


class DayInputFingerprintSpec(ComponentSpec):
    PARAMETERS = {
        "input_base": ExecutionParameter(type=str),
        "date": ExecutionParameter(type=str),
        "cache_file": ExecutionParameter(type=str, optional=True),
        "registry_dir": ExecutionParameter(type=str, optional=True),
    }
    INPUTS: Dict[str, ChannelParameter] = {}
    OUTPUTS = {"fingerprint": ChannelParameter(type=standard_artifacts.String),
               "previous_day": ChannelParameter(type=standard_artifacts.String)}


class DayInputFingerprintExecutor(base_executor.BaseExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, object]) -> None:
        output = artifact_utils.get_single_instance(output_dict["fingerprint"])
        date = run_date(str(exec_properties["date"]))
        input_base, cache_file = str(exec_properties["input_base"]), exec_properties.get("cache_file") or None
        fileio.makedirs(os.path.dirname(output.uri))
        # '' when the day has no logs: AvcExampleGen then refuses the day with the reason.
        output.value = impression_logs.day_fingerprint(input_base, date, cache_file)
        previous = artifact_utils.get_single_instance(output_dict["previous_day"])
        fileio.makedirs(os.path.dirname(previous.uri))
        previous.value = previous_day_key(input_base, str(exec_properties.get("registry_dir") or ""), date, cache_file)


def previous_day_key(input_base: str, registry_dir: str, date: datetime.date, cache_file: Optional[str] = None) -> str:
    """`previous_user_state`'s cache key for day `date`: D-1's input fingerprint now and its
    registry entry (None before D-1 is registered), as JSON."""
    day_before = date - datetime.timedelta(days=1)
    entry = span_registry.registered_days(registry_dir, span_of(day_before), span_of(day_before)).get(
        span_of(day_before)) if registry_dir else None
    return json.dumps({"date": day_before.isoformat(), "registered": entry,
                       "input_fingerprint": impression_logs.day_fingerprint(input_base, day_before, cache_file)},
                      sort_keys=True)


class DayInputFingerprint(base_component.BaseComponent):
    """Fingerprint of the log files of `date` under `input_base`; see the module docstring."""

    SPEC_CLASS = DayInputFingerprintSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(DayInputFingerprintExecutor)

    def __init__(self, input_base: str, date, cache_file: Optional[str] = None, registry_dir: Optional[str] = None):
        super().__init__(spec=DayInputFingerprintSpec(
            input_base=input_base, date=date, cache_file=cache_file, registry_dir=registry_dir,
            fingerprint=types.Channel(type=standard_artifacts.String),
            previous_day=types.Channel(type=standard_artifacts.String)))
