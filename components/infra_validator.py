"""Infra validation without Docker.

TFX's InfraValidator starts tensorflow/serving only through Docker or Kubernetes, neither of
which exists on these machines. `ServingInfraValidator` instead starts the project's TF
Serving-API server (serving/) on the candidate SavedModel, checks that it loads and answers
warmup requests made from real examples of the evaluation day, and on success writes the model
with those requests in assets.extra/tf_serving_warmup_requests into its InfraBlessing, which
is what Pusher pushes (as it does after InfraValidator's make_warmup).
"""


import glob
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, List

import numpy as np
import tensorflow as tf
from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter
from tfx.utils import path_utils

from feature_specs import specs
from serving import warmup as warmup_lib

WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
STAMPED_MODEL_DIR = "stamped_model"   # where Pusher looks for a model inside an InfraBlessing
SERVING_SIGNATURE = "serving_default"


def sample_request_examples(examples: types.Artifact, count: int) -> List[bytes]:
    """The first `count` examples of an Examples artifact, stripped to what a request carries."""
    keep = {f.name for f in specs.model_input_features()}
    out: List[bytes] = []
    for split in artifact_utils.decode_split_names(examples.split_names):
        for path in sorted(glob.glob(os.path.join(examples.uri, f"Split-{split}", "*"))):
            for record in tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else ""):
                example = tf.train.Example.FromString(record.numpy())
                for name in list(example.features.feature):
                    if name not in keep:
                        del example.features.feature[name]
                out.append(example.SerializeToString())
                if len(out) >= count:
                    return out
    if not out:
        raise ValueError(f"no examples in {examples.uri} to build warmup requests from")
    return out


def validate_model_in_server(model_dir: str, model_name: str, request_examples: List[bytes]) -> Dict[str, Any]:
    """Serves `model_dir` with the project's server and checks it answers every request.

    Returns a report; raises RuntimeError naming what failed.
    """
    from serving import client, server

    tasks = [t.name for t in specs.TASKS]
    with tempfile.TemporaryDirectory() as base:
        os.symlink(os.path.abspath(model_dir), os.path.join(base, "1"))
        handle = server.start_in_background(model_base=base, model_name=model_name, grpc_port=0, rest_port=None)
        try:
            outputs = client.predict_grpc(f"127.0.0.1:{handle.grpc_port}", model_name,
                                          examples=request_examples, signature_name=SERVING_SIGNATURE)
        finally:
            handle.stop()
    missing = [t for t in tasks if t not in outputs]
    if missing:
        raise RuntimeError(f"the served model's {SERVING_SIGNATURE} lacks outputs {missing} (has {sorted(outputs)})")
    for task in tasks:
        scores = np.asarray(outputs[task]).reshape(-1)
        if scores.shape[0] != len(request_examples):
            raise RuntimeError(f"output {task!r}: {scores.shape[0]} scores for {len(request_examples)} requests")
        if not np.all(np.isfinite(scores)) or scores.min() < 0 or scores.max() > 1:
            raise RuntimeError(f"output {task!r}: scores outside [0, 1]: {scores[:5]}")
    return {"requests": len(request_examples), "tasks": tasks}


class ServingInfraValidatorSpec(ComponentSpec):
    PARAMETERS = {"num_requests": ExecutionParameter(type=int), "model_name": ExecutionParameter(type=str)}
    INPUTS = {"model": ChannelParameter(type=standard_artifacts.Model),
              "examples": ChannelParameter(type=standard_artifacts.Examples)}
    OUTPUTS = {"blessing": ChannelParameter(type=standard_artifacts.InfraBlessing)}


class Executor(base_executor.BaseExecutor):

    def Do(self, input_dict, output_dict, exec_properties) -> None:
        model = artifact_utils.get_single_instance(input_dict["model"])
        examples = artifact_utils.get_single_instance(input_dict["examples"])
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])
        model_dir = path_utils.serving_model_path(model.uri, path_utils.is_old_model_artifact(model))
        requests = sample_request_examples(examples, int(exec_properties["num_requests"]))
        model_name = exec_properties["model_name"]
        stamped = os.path.join(blessing.uri, STAMPED_MODEL_DIR)
        shutil.copytree(model_dir, stamped, dirs_exist_ok=True)
        warmup_lib.write_warmup_requests(os.path.join(stamped, WARMUP_FILE), requests,
                                         model_name=model_name, signature_name=SERVING_SIGNATURE)
        try:
            report = validate_model_in_server(stamped, model_name, requests)
        except Exception as error:  # any failure to load or answer means: not blessed
            logging.error("Infra validation failed for %s: %s", model_dir, error)
            with open(os.path.join(blessing.uri, "INFRA_NOT_BLESSED"), "w") as f:
                f.write(f"{type(error).__name__}: {error}\n")
            shutil.rmtree(stamped, ignore_errors=True)
            blessing.set_int_custom_property("blessed", 0)
            blessing.set_string_custom_property("reason", str(error)[:1000])
            return
        logging.info("Infra validation passed: %s", report)
        open(os.path.join(blessing.uri, "INFRA_BLESSED"), "w").close()
        blessing.set_int_custom_property("blessed", 1)
        blessing.set_int_custom_property("has_model", 1)


class ServingInfraValidator(base_component.BaseComponent):
    """Loads the candidate in the project's TF Serving-API server and answers warmup requests."""

    SPEC_CLASS = ServingInfraValidatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(Executor)

    def __init__(self, model: types.BaseChannel, examples: types.BaseChannel, model_name: str,
                 num_requests: int = 16):
        super().__init__(spec=ServingInfraValidatorSpec(
            model=model, examples=examples, num_requests=num_requests, model_name=model_name,
            blessing=types.Channel(type=standard_artifacts.InfraBlessing)))
