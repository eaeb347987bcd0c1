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
  next revision, and the day's other versions are removed once it is in place.

So after any kill and a rerun the base directory holds exactly one version per pushed day, and the
PushedModel artifact records it (`push` = copied or adopted).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
from typing import Any, Dict, List

from tfx import types
from tfx.components.pusher import executor as tfx_pusher_executor
from tfx.dsl.components.base import base_component, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from components import fault_injection
from components.avc_example_gen import date_of

MARKER = "PUSH.json"
TEMPORARY_PREFIX = ".push-"
_REVISIONS = 100
# The files whose bytes identify a SavedModel: the graph and the variables' index, which holds
# every variable's checksum (the data shards themselves need not be read).
_FINGERPRINT_FILES = ("saved_model.pb", os.path.join("variables", "variables.index"))


def day_versions(base_directory: str, date: datetime.date) -> List[int]:
    """The complete version numbers of `date` in the base directory, oldest revision first."""
    first = int(date.strftime("%Y%m%d")) * _REVISIONS
    if not os.path.isdir(base_directory):
        return []
    return sorted(int(name) for name in os.listdir(base_directory)
                  if name.isdigit() and first <= int(name) < first + _REVISIONS)


def read_marker(version_dir: str) -> Dict[str, Any]:
    try:
        with open(os.path.join(version_dir, MARKER)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def model_fingerprint(model_dir: str) -> str:
    digest = hashlib.sha256()
    for name in _FINGERPRINT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.exists(path):
            digest.update(name.encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def push(model_dir: str, base_directory: str, date: datetime.date) -> Dict[str, Any]:
    """Pushes `model_dir` as `date`'s version (see the module docstring); returns
    {version, destination, push: copied|adopted}."""
    os.makedirs(base_directory, exist_ok=True)
    first = int(date.strftime("%Y%m%d")) * _REVISIONS
    for name in os.listdir(base_directory):  # leftovers of this day's pushes that were killed
        if name.startswith(TEMPORARY_PREFIX) and name[len(TEMPORARY_PREFIX):].isdigit() and \
                first <= int(name[len(TEMPORARY_PREFIX):]) < first + _REVISIONS:
            logging.warning("Removing %s, left by a push that did not finish", name)
            shutil.rmtree(os.path.join(base_directory, name))
    fingerprint = model_fingerprint(model_dir)
    existing = day_versions(base_directory, date)
    same = [v for v in existing if read_marker(os.path.join(base_directory, str(v))).get("model_fingerprint") == fingerprint]
    if same:
        version, mode = same[-1], "adopted"
        logging.info("Version %d already holds this model for %s: adopted, not pushed again", version, date)
    else:
        version, mode = (existing[-1] + 1 if existing else first), "copied"
        if version >= first + _REVISIONS:
            raise RuntimeError(f"{date}: {_REVISIONS} revisions pushed already; remove old ones from {base_directory}")
        temporary = os.path.join(base_directory, f"{TEMPORARY_PREFIX}{version}")
        # saved_model.pb last: it is what marks a SavedModel as complete (as TFX's Pusher does).
        shutil.copytree(model_dir, temporary, ignore=shutil.ignore_patterns("saved_model.pb"))
        shutil.copy2(os.path.join(model_dir, "saved_model.pb"), os.path.join(temporary, "saved_model.pb"))
        fault_injection.reached("Pusher:copied")
        with open(os.path.join(temporary, MARKER), "w") as f:
            json.dump({"date": date.isoformat(), "version": version, "model_fingerprint": fingerprint,
                       "source": model_dir, "host": socket.gethostname(), "pid": os.getpid(),
                       "pushed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}, f)
        _fsync_tree(temporary)
        os.rename(temporary, os.path.join(base_directory, str(version)))
        fault_injection.reached("Pusher:renamed")
    for other in existing:
        if other != version:
            logging.info("Removing version %d of %s: replaced by version %d", other, date, version)
            shutil.rmtree(os.path.join(base_directory, str(other)))
    return {"version": version, "destination": os.path.join(base_directory, str(version)), "push": mode}


class ExactlyOncePusherSpec(ComponentSpec):
    PARAMETERS = {"base_directory": ExecutionParameter(type=str)}
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
        result = push(self.GetModelPath(input_dict), exec_properties["base_directory"], date)
        self._MarkPushed(pushed, pushed_destination=result["destination"], pushed_version=str(result["version"]))
        pushed.set_string_custom_property("push", result["push"])
        pushed.set_string_custom_property("date", date.isoformat())
        logging.info("Model for %s %s as version %s", date, result["push"], result["version"])


class ExactlyOncePusher(base_component.BaseComponent):
    """Pusher with one version per day, safe against a kill at any point (module docstring)."""

    SPEC_CLASS = ExactlyOncePusherSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(self, model_blessing: types.BaseChannel, infra_blessing: types.BaseChannel,
                 examples: types.BaseChannel, base_directory: str):
        super().__init__(spec=ExactlyOncePusherSpec(
            model_blessing=model_blessing, infra_blessing=infra_blessing, examples=examples,
            base_directory=base_directory, pushed_model=types.Channel(type=standard_artifacts.PushedModel)))
