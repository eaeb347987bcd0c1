"""SavedModel warm-up requests, in TensorFlow Serving's format.

A SavedModel may carry `assets.extra/tf_serving_warmup_requests`: a TFRecord file of
`tensorflow.serving.PredictionLog` records. A model server replays them on every version it
loads, before the version takes traffic, so the first real requests do not pay for graph
tracing and kernel initialisation. TensorFlow Serving accepts at most 1000 records and
refuses a version whose warm-up fails; this server does the same.

    write_warmup_requests(export_dir, serialized_examples, model_name="ranker")
    read_warmup_requests(export_dir)                                     # -> [PredictionLog]

Where a path is asked for, give the SavedModel directory or the warm-up file itself
(a path ending in tf_serving_warmup_requests).
"""

from __future__ import annotations

import logging
import os
from typing import List, Mapping, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from serving.client import DEFAULT_EXAMPLES_INPUT, DEFAULT_SIGNATURE, build_predict_request
from serving.errors import ServingError

__all__ = [
    "WARMUP_DIRECTORY", "WARMUP_FILENAME", "MAX_WARMUP_RECORDS", "warmup_file_path",
    "predict_log", "write_warmup_requests", "write_prediction_logs", "read_warmup_requests",
    "replay_warmup_requests",
]

logger = logging.getLogger(__name__)

WARMUP_DIRECTORY = "assets.extra"
WARMUP_FILENAME = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000


def warmup_file_path(export_dir: str) -> str:
    """Where a SavedModel keeps its warm-up requests (a warm-up file path is kept as is)."""
    export_dir = os.fspath(export_dir)
    if os.path.basename(export_dir) == WARMUP_FILENAME:
        return export_dir
    return os.path.join(export_dir, WARMUP_DIRECTORY, WARMUP_FILENAME)


def predict_log(model_name: str, inputs: Mapping[str, np.ndarray],
                signature_name: str = DEFAULT_SIGNATURE) -> prediction_log_pb2.PredictionLog:
    """A PredictionLog holding one PredictRequest of `inputs` ({input name: array})."""
    log = prediction_log_pb2.PredictionLog()
    log.predict_log.request.CopyFrom(build_predict_request(model_name, inputs, signature_name))
    return log


def write_prediction_logs(path: str, logs: Sequence[prediction_log_pb2.PredictionLog]) -> str:
    """Writes `logs` as a warm-up file (path: SavedModel dir or the file); returns its path."""
    if not logs:
        raise ValueError("no warm-up records to write")
    if len(logs) > MAX_WARMUP_RECORDS:
        raise ValueError(f"{len(logs)} warm-up records; model servers accept at most "
                         f"{MAX_WARMUP_RECORDS}")
    path = warmup_file_path(path)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return path


def write_warmup_requests(path: str,
                          serialized_examples: Sequence[Union[bytes, tf.train.Example]],
                          model_name: str, signature_name: str = DEFAULT_SIGNATURE,
                          input_name: str = DEFAULT_EXAMPLES_INPUT,
                          batch_size: Optional[int] = None) -> str:
    """Writes Predict warm-up requests of serialized tf.Examples.

    path: the SavedModel directory or the warm-up file. The examples are split into
    requests of `batch_size` examples (default: one request with all of them); returns the
    warm-up file's path.
    """
    examples = [example.SerializeToString() if isinstance(example, tf.train.Example)
                else bytes(example) for example in serialized_examples]
    if not examples:
        raise ValueError("no examples to write as warm-up requests")
    size = batch_size or len(examples)
    if size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    logs = []
    for start in range(0, len(examples), size):
        chunk = np.empty(len(examples[start:start + size]), dtype=object)
        chunk[:] = examples[start:start + size]
        logs.append(predict_log(model_name, {input_name: chunk}, signature_name))
    return write_prediction_logs(path, logs)


def read_warmup_requests(path_or_export_dir: str) -> List[prediction_log_pb2.PredictionLog]:
    """The PredictionLogs of a warm-up file (or of a SavedModel directory's warm-up file).

    Raises ValueError for a corrupt file or one with more than MAX_WARMUP_RECORDS records;
    a SavedModel without a warm-up file gives [].
    """
    path = os.fspath(path_or_export_dir)
    if os.path.isdir(path):
        path = warmup_file_path(path)
        if not os.path.exists(path):
            return []
    elif not os.path.exists(path):
        raise ValueError(f"no warm-up file at {path}")
    logs = []
    try:
        for index, record in enumerate(tf.data.TFRecordDataset(path)):
            if index >= MAX_WARMUP_RECORDS:
                raise ValueError(f"{path}: more than {MAX_WARMUP_RECORDS} warm-up records")
            log = prediction_log_pb2.PredictionLog()
            log.ParseFromString(record.numpy())
            logs.append(log)
    except tf.errors.OpError as error:
        raise ValueError(f"{path}: corrupt warm-up file: {error.message}") from error
    except Exception as error:
        if isinstance(error, ValueError):
            raise
        raise ValueError(f"{path}: record {len(logs)} is not a PredictionLog: {error}") from error
    return logs


def replay_warmup_requests(servable, iterations: int = 1) -> int:
    """Runs a loaded version's warm-up requests `iterations` times; returns how many ran.

    `servable` is a `serving.servable.SavedModelServable`. Raises ValueError naming the
    first record that fails (the version must then not be served).
    """
    logs = read_warmup_requests(servable.export_dir)
    handlers = {
        "predict_log": lambda log: servable.predict(log.predict_log.request),
        "classify_log": lambda log: servable.classify(log.classify_log.request),
        "regress_log": lambda log: servable.regress(log.regress_log.request),
        "multi_inference_log": lambda log: servable.multi_inference(
            log.multi_inference_log.request),
    }
    replayed = 0
    for _ in range(max(iterations, 1)):
        for index, log in enumerate(logs):
            kind = log.WhichOneof("log_type")
            if kind not in handlers:
                raise ValueError(f"warm-up record {index}: unsupported log type {kind!r}; "
                                 f"supported: {sorted(handlers)}")
            try:
                handlers[kind](log)
            except ServingError as error:
                raise ValueError(f"warm-up record {index} ({kind}) failed: "
                                 f"{error.code.name}: {error.message}") from error
            replayed += 1
    return replayed
