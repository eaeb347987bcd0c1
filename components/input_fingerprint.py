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
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.dsl.io import fileio
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import impression_logs
from components.avc_example_gen import run_date


class DayInputFingerprintSpec(ComponentSpec):
    PARAMETERS = {
        "input_base": ExecutionParameter(type=str),
        "date": ExecutionParameter(type=str),
        "cache_file": ExecutionParameter(type=str, optional=True),
    }
    INPUTS: Dict[str, ChannelParameter] = {}
    OUTPUTS = {"fingerprint": ChannelParameter(type=standard_artifacts.String)}


class DayInputFingerprintExecutor(base_executor.BaseExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, object]) -> None:
        output = artifact_utils.get_single_instance(output_dict["fingerprint"])
        date = run_date(str(exec_properties["date"]))
        fileio.makedirs(os.path.dirname(output.uri))
        # '' when the day has no logs: AvcExampleGen then refuses the day with the reason.
        output.value = impression_logs.day_fingerprint(str(exec_properties["input_base"]), date,
                                                       exec_properties.get("cache_file") or None)


class DayInputFingerprint(base_component.BaseComponent):
    """Fingerprint of the log files of `date` under `input_base`; see the module docstring."""

    SPEC_CLASS = DayInputFingerprintSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(DayInputFingerprintExecutor)

    def __init__(self, input_base: str, date, cache_file: Optional[str] = None):
        super().__init__(spec=DayInputFingerprintSpec(
            input_base=input_base, date=date, cache_file=cache_file,
            fingerprint=types.Channel(type=standard_artifacts.String)))
