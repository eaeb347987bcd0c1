"""Pushes a blessed model into TF Serving's base directory exactly once per day.

TFX's Pusher names a version by the clock and copies into it in place, so a rerun after a kill
between the copy and ML Metadata's record pushes the day again, and two runs at once can collide
on one number. Here the version folder is a function of the day and the model:

- version = YYYYMMDD * 100 + revision (2022041500): later days serve over earlier ones, and a day
  has one number whatever the wall clock;
- the model is copied into a hidden temporary folder `.push-VERSION` (saved_model.pb last, then
  PUSH.json: the day, the model's fingerprint, when), then renamed into place: a version folder
  under its number is always complete, and servers ignore the hidden one;
- a rerun first removes the day's leftover temporary folders, then adopts a complete version of the
  day whose PUSH.json names the same model (no copy: what a kill after the rename leaves behind);
- a different blessed model for a day already pushed (its input changed, or --no-cache) takes the
  next revision, and the day's other versions are removed once it is in place (except a version
  pinned by `poso rollback`).

So after any kill and a rerun the base directory holds exactly one version per pushed day, and the
PushedModel artifact records it (`push` = copied or adopted).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

from tfx import types
from tfx.components.pusher import executor as tfx_pusher_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import day_versions, serving_config
from components.avc_example_gen import date_of


class ExactlyOncePusherSpec(ComponentSpec):
    PARAMETERS = {"base_directory": ExecutionParameter(type=str), "pin_path": ExecutionParameter(type=str)}
    INPUTS = {"model_blessing": ChannelParameter(type=standard_artifacts.ModelBlessing),
              "infra_blessing": ChannelParameter(type=standard_artifacts.InfraBlessing),
              "examples": ChannelParameter(type=standard_artifacts.Examples)}
    OUTPUTS = {"pushed_model": ChannelParameter(type=standard_artifacts.PushedModel)}


class Executor(tfx_pusher_executor.Executor):
    """TFX's blessing checks and model path; `push` instead of the clock-named copy."""

    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, Any]) -> None:
        pushed = artifact_utils.get_single_instance(output_dict["pushed_model"])
        if not self.CheckBlessing(input_dict):
            self._MarkNotPushed(pushed)
            return
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        date = date_of(examples.span)
        result = day_versions.push(self.GetModelPath(input_dict), exec_properties["base_directory"], date,
                                   pinned=serving_config.read_pin(exec_properties["pin_path"]))
        self._MarkPushed(pushed, pushed_destination=result["destination"], pushed_version=str(result["version"]))
        pushed.set_string_custom_property("push", result["push"])
        pushed.set_string_custom_property("date", date.isoformat())
        logging.info("Model for %s %s as version %s", date, result["push"], result["version"])


class ExactlyOncePusher(base_component.BaseComponent):
    """Pusher with one version per day, safe against a kill at any point (module docstring)."""

    SPEC_CLASS = ExactlyOncePusherSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(self, model_blessing: types.BaseChannel, infra_blessing: types.BaseChannel,
                 examples: types.BaseChannel, base_directory: str, pin_path: str):
        super().__init__(spec=ExactlyOncePusherSpec(
            model_blessing=model_blessing, infra_blessing=infra_blessing, examples=examples,
            base_directory=base_directory, pin_path=pin_path,
            pushed_model=types.Channel(type=standard_artifacts.PushedModel)))
