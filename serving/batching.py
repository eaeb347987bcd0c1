"""Server-side request batching: many small Predict calls become one model call.

A request of `r` rows waits in an open batch until the batch holds `max_batch_size` rows or
its oldest request has waited `batch_timeout_s`; one of `num_batch_threads` workers then
runs the batch:

    inputs[name]  = concat_i(request_i[name], axis=0)                  (rows R = sum_i r_i)
    outputs       = model(inputs)                                        (each [R, ...])
    request_i out = outputs[name][offset_i : offset_i + r_i]

Only requests whose inputs agree on everything but the leading dimension (same names,
dtypes and trailing shapes) share a batch, so nothing is padded and a padded [None, None]
id list batches with lists of its own width. A request larger than `max_batch_size` runs on
its own; when `max_enqueued_batches` full batches already wait, new requests are refused
with UNAVAILABLE, as TensorFlow Serving does.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time
from concurrent import futures
from typing import Callable, Deque, Dict, List, Mapping, Optional, Tuple

import numpy as np

from serving import errors

__all__ = ["BatchingOptions", "BatchScheduler", "parse_batching_parameters",
           "load_batching_parameters"]

logger = logging.getLogger(__name__)

Arrays = Dict[str, np.ndarray]
RunFn = Callable[[str, Mapping[str, np.ndarray]], Mapping[str, np.ndarray]]


@dataclasses.dataclass(frozen=True)
class BatchingOptions:
    """Batching knobs (names follow TensorFlow Serving's BatchingParameters)."""

    max_batch_size: int = 128
    batch_timeout_s: float = 0.002
    num_batch_threads: int = max(1, os.cpu_count() or 1)
    max_enqueued_batches: int = 64

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.batch_timeout_s < 0:
            raise ValueError(f"batch_timeout_s must be >= 0, got {self.batch_timeout_s}")
        if self.num_batch_threads < 1:
            raise ValueError(f"num_batch_threads must be >= 1, got {self.num_batch_threads}")
        if self.max_enqueued_batches < 1:
            raise ValueError(
                f"max_enqueued_batches must be >= 1, got {self.max_enqueued_batches}")


@dataclasses.dataclass
class _Task:
    inputs: Mapping[str, np.ndarray]
    rows: int
    future: futures.Future


@dataclasses.dataclass
class _Batch:
    signature_name: str
    deadline: float
    tasks: List[_Task] = dataclasses.field(default_factory=list)
    rows: int = 0


def _batch_key(signature_name: str, inputs: Mapping[str, np.ndarray]) -> Tuple:
    return (signature_name,) + tuple(
        (name, inputs[name].dtype.str, inputs[name].shape[1:]) for name in sorted(inputs))


class BatchScheduler:
    """Merges concurrent `submit` calls into batched calls of `run`.

    `run(signature_name, inputs)` must return outputs whose leading dimension equals the
    number of input rows. Counters `batches_run` and `requests_run` are kept for monitoring.
    """

    def __init__(self, run: RunFn, options: BatchingOptions, name: str = "batcher"):
        self._run = run
        self._options = options
        self._cond = threading.Condition()
        self._open: Dict[Tuple, _Batch] = {}
        self._ready: Deque[_Batch] = collections.deque()
        self._closed = False
        self.batches_run = 0
        self.requests_run = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{index}", daemon=True)
            for index in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    @property
    def options(self) -> BatchingOptions:
        return self._options

    def submit(self, signature_name: str, inputs: Mapping[str, np.ndarray], rows: int) -> Arrays:
        """Runs `inputs` (all with leading dimension `rows`) as part of a batch; blocks."""
        if rows > self._options.max_batch_size or rows == 0:
            return dict(self._run(signature_name, inputs))
        task = _Task(inputs=inputs, rows=rows, future=futures.Future())
        key = _batch_key(signature_name, inputs)
        with self._cond:
            if self._closed:
                # Draining after an unload: finish in the caller rather than fail.
                run_directly = True
            else:
                run_directly = False
                batch = self._open.get(key)
                if batch is not None and batch.rows + rows > self._options.max_batch_size:
                    self._ready.append(self._open.pop(key))
                    batch = None
                if batch is None:
                    if len(self._ready) >= self._options.max_enqueued_batches:
                        raise errors.unavailable(
                            "The batch scheduling queue is full: "
                            f"{len(self._ready)} batches are waiting; retry later")
                    batch = _Batch(signature_name, time.monotonic() + self._options.batch_timeout_s)
                    self._open[key] = batch
                batch.tasks.append(task)
                batch.rows += rows
                if batch.rows >= self._options.max_batch_size:
                    self._ready.append(self._open.pop(key))
                self._cond.notify_all()
        if run_directly:
            return dict(self._run(signature_name, inputs))
        return task.future.result()

    def close(self, timeout: Optional[float] = 10.0) -> None:
        """Runs what is queued, then stops the workers."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def _next_batch(self) -> Optional[_Batch]:
        with self._cond:
            while True:
                if self._ready:
                    return self._ready.popleft()
                now = time.monotonic()
                due = [key for key, batch in self._open.items()
                       if batch.deadline <= now or self._closed]
                if due:
                    for key in due:
                        self._ready.append(self._open.pop(key))
                    continue
                if self._closed:
                    return None
                wait = min((batch.deadline for batch in self._open.values()), default=None)
                self._cond.wait(None if wait is None else max(wait - now, 0.0))

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: _Batch) -> None:
        tasks = batch.tasks
        try:
            if len(tasks) == 1:
                merged = tasks[0].inputs
            else:
                merged = {name: np.concatenate([task.inputs[name] for task in tasks], axis=0)
                          for name in tasks[0].inputs}
            outputs = self._run(batch.signature_name, merged)
            for name, value in outputs.items():
                if np.ndim(value) == 0 or np.shape(value)[0] != batch.rows:
                    raise errors.internal(
                        f"batched output '{name}' of signature '{batch.signature_name}' has "
                        f"shape {list(np.shape(value))}, expected {batch.rows} rows; the "
                        "signature is not row-wise and cannot be batched")
            offset = 0
            for task in tasks:
                task.future.set_result(
                    {name: value[offset: offset + task.rows] for name, value in outputs.items()})
                offset += task.rows
        except BaseException as error:  # every waiting request must learn of the failure
            for task in tasks:
                if not task.future.done():
                    task.future.set_exception(error)
        with self._cond:
            self.batches_run += 1
            self.requests_run += len(tasks)


# -- TensorFlow Serving's --batching_parameters_file ----------------------------------------

# The BatchingParameters fields tensorflow_model_server reads (session_bundle_config.proto),
# as (name, wrapper type or scalar kind). The tensorflow-serving-api wheel does not ship that
# proto, so its text format is parsed with a message type declared here.
_WRAPPED_FIELDS = (
    ("max_batch_size", "Int64Value"), ("batch_timeout_micros", "Int64Value"),
    ("max_enqueued_batches", "Int64Value"), ("num_batch_threads", "Int64Value"),
    ("thread_pool_name", "StringValue"), ("enable_large_batch_splitting", "BoolValue"),
    ("max_execution_batch_size", "Int64Value"),
)
# Accepted for compatibility but without effect here: batches are never padded (requests
# whose trailing shapes differ do not share a batch) and run on this server's own threads.
_IGNORED_FIELDS = ("thread_pool_name", "allowed_batch_sizes", "pad_variable_length_inputs",
                   "enable_large_batch_splitting", "max_execution_batch_size")

_parameters_class = None


def _batching_parameters_class():
    """A message class with BatchingParameters' field names and types (built once)."""
    global _parameters_class
    if _parameters_class is None:
        from google.protobuf import (descriptor_pb2, descriptor_pool, message_factory,
                                     wrappers_pb2)

        field = descriptor_pb2.FieldDescriptorProto
        file_proto = descriptor_pb2.FileDescriptorProto(
            name="poso/serving/batching_parameters.proto", package="tensorflow.serving",
            syntax="proto3", dependency=["google/protobuf/wrappers.proto"])
        message = file_proto.message_type.add(name="BatchingParameters")
        for number, (name, wrapper) in enumerate(_WRAPPED_FIELDS, start=1):
            message.field.add(name=name, number=number, label=field.LABEL_OPTIONAL,
                              type=field.TYPE_MESSAGE, type_name=f".google.protobuf.{wrapper}")
        message.field.add(name="allowed_batch_sizes", number=len(_WRAPPED_FIELDS) + 1,
                          label=field.LABEL_REPEATED, type=field.TYPE_INT64)
        message.field.add(name="pad_variable_length_inputs", number=len(_WRAPPED_FIELDS) + 2,
                          label=field.LABEL_OPTIONAL, type=field.TYPE_BOOL)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(
            wrappers_pb2.DESCRIPTOR.serialized_pb))
        pool.Add(file_proto)
        _parameters_class = message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
    return _parameters_class


def parse_batching_parameters(text: str, source: str = "<string>") -> BatchingOptions:
    """BatchingOptions from a text-format BatchingParameters, TensorFlow Serving's
    --batching_parameters_file:

        max_batch_size { value: 64 }
        batch_timeout_micros { value: 2000 }
        num_batch_threads { value: 2 }
        max_enqueued_batches { value: 100 }

    Fields left out keep BatchingOptions' defaults; fields this server has no use for
    (_IGNORED_FIELDS) are accepted and logged. Raises ValueError naming `source`.
    """
    from google.protobuf import text_format

    parameters = _batching_parameters_class()()
    try:
        text_format.Parse(text, parameters)
    except text_format.ParseError as error:
        raise ValueError(f"{source}: not a text-format BatchingParameters: {error}") from error
    values = {}
    for name in ("max_batch_size", "num_batch_threads", "max_enqueued_batches"):
        if parameters.HasField(name):
            values[name] = getattr(parameters, name).value
    if parameters.HasField("batch_timeout_micros"):
        values["batch_timeout_s"] = parameters.batch_timeout_micros.value / 1e6
    ignored = [name for name in _IGNORED_FIELDS
               if (parameters.HasField(name) if name in dict(_WRAPPED_FIELDS)
                   else bool(getattr(parameters, name)))]
    if ignored:
        logger.info("%s: %s have no effect on this server", source, ", ".join(ignored))
    try:
        return BatchingOptions(**values)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from error


def load_batching_parameters(path: str) -> BatchingOptions:
    """parse_batching_parameters of a file."""
    with open(path, encoding="utf-8") as parameters_file:
        return parse_batching_parameters(parameters_file.read(), source=os.fspath(path))
