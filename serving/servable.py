"""One loaded SavedModel version and the Predict / Classify / Regress calls on it.

A version runs in a TF1 Session, as in tensorflow_model_server: the `serve` MetaGraphDef is
loaded by `tf.compat.v1.saved_model.load` (which restores the variables and runs the init op,
e.g. tf.Transform's vocabulary tables), and each signature is a Session callable made once at
load (Session::MakeCallable) that feeds and fetches the tensors its SignatureDef names.
Against `tf.saved_model.load`'s functions this skips the per-call Python of an eager function
call (structure flattening, tensor conversion, variable handle lookups). Measured on the demo's
ranking model, in one process pinned to one CPU (a one-off script; medians of 5 rounds): 1 row
0.72 -> 0.45 ms per call, 100 rows 2.67 -> 2.34 ms, 1,024 rows 17.4 -> 15.6 ms.
Requests are validated against the SignatureDef before anything runs, so a wrong input name,
dtype or shape is an INVALID_ARGUMENT naming the input, not a TensorFlow stack trace.

Classify and Regress follow TensorFlow Serving: the signature's method name must be
`tensorflow/serving/classify` (outputs `classes` and/or `scores`, [batch, num_classes]) or
`tensorflow/serving/regress` (output `outputs`, [batch] or [batch, 1]), with one DT_STRING
input fed the serialized tf.Examples of the request's `Input`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow.core.protobuf import config_pb2, meta_graph_pb2, saved_model_pb2
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, inference_pb2,
                                     input_pb2, predict_pb2, regression_pb2)

from serving import errors, tensor_protos
from serving.batching import BatchingOptions, BatchScheduler
from serving.deadlines import check_deadline
from serving.errors import ServingError

__all__ = [
    "PREDICT_METHOD", "CLASSIFY_METHOD", "REGRESS_METHOD", "DEFAULT_SIGNATURE",
    "TensorSpec", "Signature", "SavedModelServable", "SessionSignatures",
    "read_serve_meta_graph", "serialize_input_examples", "array_from_tensor_proto",
    "shape_string",
]

logger = logging.getLogger(__name__)

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"
DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"
SIGNATURE_DEF_FIELD = "signature_def"

_CLASSES = "classes"
_SCORES = "scores"
_REGRESSION_OUTPUT = "outputs"


def shape_string(shape) -> str:
    """[?,3] style text of a TensorShape (or any sequence of dims)."""
    shape = tf.TensorShape(shape)
    if shape.rank is None:
        return "<unknown rank>"
    return "[" + ",".join("?" if dim is None else str(dim) for dim in shape.as_list()) + "]"


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One input or output of a signature, as its SignatureDef declares it."""

    alias: str
    dtype: tf.DType
    shape: tf.TensorShape

    @classmethod
    def from_tensor_info(cls, alias: str, info: meta_graph_pb2.TensorInfo) -> "TensorSpec":
        return cls(alias, tf.as_dtype(info.dtype), tf.TensorShape(info.tensor_shape))

    @property
    def is_string(self) -> bool:
        return self.dtype == tf.string

    def accepts_dtype(self, array: np.ndarray) -> bool:
        if self.is_string:
            return array.dtype == object or array.dtype.kind == "S"
        return array.dtype == self.dtype.as_numpy_dtype

    def describe(self) -> str:
        return f"{self.dtype.name} {shape_string(self.shape)}"


@dataclasses.dataclass(frozen=True)
class Signature:
    """A SignatureDef in a form requests can be checked against."""

    name: str
    method_name: str
    inputs: Mapping[str, TensorSpec]
    outputs: Mapping[str, TensorSpec]

    @classmethod
    def from_proto(cls, name: str, signature_def: meta_graph_pb2.SignatureDef) -> "Signature":
        return cls(
            name=name,
            method_name=signature_def.method_name,
            inputs={alias: TensorSpec.from_tensor_info(alias, info)
                    for alias, info in signature_def.inputs.items()},
            outputs={alias: TensorSpec.from_tensor_info(alias, info)
                     for alias, info in signature_def.outputs.items()},
        )

    @property
    def batchable(self) -> bool:
        """Every input and output has an unknown leading (batch) dimension."""
        specs = list(self.inputs.values()) + list(self.outputs.values())
        return bool(self.inputs) and all(
            spec.shape.rank is not None and spec.shape.rank >= 1 and spec.shape[0] is None
            for spec in specs)


def read_serve_meta_graph(export_dir: str) -> meta_graph_pb2.MetaGraphDef:
    """The MetaGraphDef tagged exactly `serve`, else the first whose tags include it (as
    tensorflow_model_server picks it). Raises ValueError saying what is wrong."""
    binary = os.path.join(export_dir, "saved_model.pb")
    text = os.path.join(export_dir, "saved_model.pbtxt")
    saved_model = saved_model_pb2.SavedModel()
    try:
        if os.path.exists(binary):
            with open(binary, "rb") as graph_file:
                saved_model.ParseFromString(graph_file.read())
        elif os.path.exists(text):
            with open(text, encoding="utf-8") as graph_file:
                text_format.Parse(graph_file.read(), saved_model)
        else:
            raise ValueError(f"no saved_model.pb or saved_model.pbtxt in {export_dir}")
    except ValueError:
        raise
    except Exception as error:  # DecodeError, ParseError, UnicodeDecodeError, OSError
        raise ValueError(f"cannot parse the SavedModel graph in {export_dir}: {error}") from error
    tag_sets = [list(meta_graph.meta_info_def.tags) for meta_graph in saved_model.meta_graphs]
    exact = [mg for mg in saved_model.meta_graphs if list(mg.meta_info_def.tags) == [SERVE_TAG]]
    tagged = [mg for mg in saved_model.meta_graphs if SERVE_TAG in mg.meta_info_def.tags]
    chosen = (exact or tagged or [None])[0]
    if chosen is None:
        raise ValueError(
            f"the SavedModel in {export_dir} has no MetaGraphDef tagged '{SERVE_TAG}' "
            f"(tag sets: {tag_sets})")
    return chosen


def serialize_input_examples(model_input: input_pb2.Input) -> List[bytes]:
    """Serialized tf.Examples of a Classify/Regress `Input`; context features are merged in
    (an example's own feature wins over a context feature of the same name)."""
    kind = model_input.WhichOneof("kind")
    if kind == "example_list":
        examples = list(model_input.example_list.examples)
        serialized = [example.SerializeToString() for example in examples]
    elif kind == "example_list_with_context":
        context = model_input.example_list_with_context.context
        serialized = []
        for example in model_input.example_list_with_context.examples:
            merged = tf.train.Example()
            merged.CopyFrom(context)
            for name, feature in example.features.feature.items():
                merged.features.feature[name].CopyFrom(feature)
            serialized.append(merged.SerializeToString())
    else:
        raise errors.invalid_argument("Input is empty: set example_list or "
                                      "example_list_with_context")
    if not serialized:
        raise errors.invalid_argument(f"Input is empty: {kind} has no examples")
    return serialized


def array_from_tensor_proto(alias: str, proto, spec: Optional[TensorSpec] = None) -> np.ndarray:
    """A request TensorProto as a numpy array; a dtype other than `spec`'s or a malformed
    proto is an INVALID_ARGUMENT naming `alias`."""
    if spec is not None and proto.dtype != spec.dtype.as_datatype_enum:
        try:
            sent = tf.as_dtype(proto.dtype).name
        except TypeError:
            sent = f"dtype enum {proto.dtype}"
        raise errors.invalid_argument(
            f"input '{alias}' expects {spec.dtype.name} but the request has {sent}")
    try:
        return tensor_protos.make_ndarray(proto)
    except Exception as error:
        raise errors.invalid_argument(f"tensor parsing error: input '{alias}': {error}") from error


class SessionSignatures:
    """The `serve` MetaGraphDef of a SavedModel in a Session, its signatures as callables.

    `run(name, inputs)` feeds {input alias: numpy array} and returns {output alias: numpy
    array}; the inputs must already match the SignatureDef (SavedModelServable.run checks
    names, dtypes and shapes: the callable does not). It is safe to call from many threads
    at once. Signatures share the Session, so they share the model's variables and tables.
    The Session is closed when the object is garbage collected, i.e. after the last request
    still holding it has finished (a version is unloaded while requests may be running on it).

    A signature that cannot be run (a sparse tensor, a tensor the graph lacks, no outputs) is
    left out of `names` and its reason kept in `unusable`; the others are served, as
    tensorflow_model_server serves a model whose one signature fails.
    """

    def __init__(self, export_dir: str, meta_graph: meta_graph_pb2.MetaGraphDef):
        """`meta_graph`: the export's `serve` MetaGraphDef (read_serve_meta_graph)."""
        graph = tf.Graph()
        # No config: the Session takes tf.config's, e.g. the server's thread pool flags.
        self._session = tf.compat.v1.Session(graph=graph)
        self._calls = {}
        self.unusable: Dict[str, str] = {}
        try:
            with graph.as_default(), _without_v1_loader_deprecation():
                tf.compat.v1.saved_model.load(self._session, list(meta_graph.meta_info_def.tags),
                                              export_dir)
            for name, signature_def in meta_graph.signature_def.items():
                if name.startswith(_RESERVED_SIGNATURE_PREFIX):
                    continue
                try:
                    self._calls[name] = self._callable(name, signature_def)
                except (ValueError, TypeError, tf.errors.OpError) as error:
                    reason = getattr(error, "message", None) or str(error)
                    self.unusable[name] = reason.strip().splitlines()[0]
                    logger.warning("%s: signature '%s' cannot be run and is not served: %s",
                                   export_dir, name, self.unusable[name])
        except BaseException:
            self._session.close()
            raise

    def _callable(self, name: str, signature_def: meta_graph_pb2.SignatureDef):
        """(input aliases, [(output alias, fetch index or the input alias it passes
        through)], callable) of one signature."""
        for kind, infos in (("input", signature_def.inputs), ("output", signature_def.outputs)):
            for alias, info in infos.items():
                if not info.name:  # a sparse or composite TensorInfo
                    raise ValueError(f"{kind} '{alias}' is not a dense tensor; only dense "
                                     "tensors are served")
                try:
                    self._session.graph.as_graph_element(info.name)
                except (KeyError, ValueError, TypeError) as error:
                    raise ValueError(f"{kind} '{alias}' names a tensor the graph does not "
                                     f"have: {error}") from error
        if not signature_def.outputs:
            raise ValueError("it has no outputs")
        inputs = sorted(signature_def.inputs)
        fed = {signature_def.inputs[alias].name: alias for alias in inputs}
        if len(fed) < len(inputs):
            raise ValueError("two of its inputs are the same tensor")
        # An output that is also an input (a TF1 pass-through) is answered with the input:
        # a Session cannot both feed and fetch a tensor.
        fetch, outputs = [], []
        for alias in sorted(signature_def.outputs):
            tensor_name = signature_def.outputs[alias].name
            if tensor_name in fed:
                outputs.append((alias, fed[tensor_name]))
            else:
                if tensor_name not in fetch:
                    fetch.append(tensor_name)
                outputs.append((alias, fetch.index(tensor_name)))
        feed = list(fed)  # the input tensors in the order of `inputs`
        # Session::MakeCallable, as tf_keras' graph functions use it: feeds and fetches are
        # resolved once, not on every call as Session.run and make_callable with feeds do.
        make = getattr(self._session, "_make_callable_from_options", None)
        if not fetch:  # every output passes an input through: nothing to run
            call = None
        elif make is None:
            call = self._session.make_callable(fetch, feed_list=feed)
        else:
            call = make(config_pb2.CallableOptions(feed=feed, fetch=fetch))
        return inputs, outputs, call

    @property
    def names(self) -> List[str]:
        return sorted(self._calls)

    def run(self, name: str, inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        input_aliases, outputs, call = self._calls[name]
        fetched = call(*[inputs[alias] for alias in input_aliases]) if call else ()
        return {alias: np.asarray(inputs[source] if isinstance(source, str) else fetched[source])
                for alias, source in outputs}


_RESERVED_SIGNATURE_PREFIX = "__saved_model_"  # the init op's SignatureDef, not a signature


class _DeprecationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.pathname.endswith("deprecation.py")


@contextlib.contextmanager
def _without_v1_loader_deprecation():
    """Drops the v1 loader's deprecation warning, which would tell operators to use
    tf.saved_model.load: the Session is what tensorflow_model_server uses, on purpose.
    (TensorFlow warns once per function, so the one warning is simply not printed.)"""
    log_filter = _DeprecationFilter()
    tf_logger = tf.get_logger()
    tf_logger.addFilter(log_filter)
    try:
        yield
    finally:
        tf_logger.removeFilter(log_filter)


def _tf_error(error: tf.errors.OpError, what: str) -> ServingError:
    message = error.message.strip().splitlines()[0] if error.message else type(error).__name__
    return ServingError(errors.code_from_tf_error(error), f"{what}: {message}")


class SavedModelServable:
    """A SavedModel version ready to answer requests.

    Build with `load`. `run` is the one place a model is called; Predict, Classify, Regress
    and warm-up all go through it (and through the batcher when batching is on).
    """

    def __init__(self, model_name: str, version: int, export_dir: str,
                 signature_defs: Mapping[str, meta_graph_pb2.SignatureDef],
                 runner: SessionSignatures, batching: Optional[BatchingOptions] = None,
                 on_batch: Optional[Callable[[str, str, int], None]] = None):
        """`on_batch(model name, signature name, rows)` is called for each batch run."""
        self.model_name = model_name
        self.version = version
        self.export_dir = export_dir
        self.signature_defs = dict(signature_defs)
        self.signatures = {name: Signature.from_proto(name, self.signature_defs[name])
                           for name in runner.names}
        self._runner = runner
        self._on_batch = on_batch
        self.batcher = (BatchScheduler(self._execute_batch, batching,
                                       name=f"batch-{model_name}-{version}")
                        if batching is not None else None)
        self.warmup_requests_replayed = 0

    @classmethod
    def load(cls, model_name: str, version: int, export_dir: str,
             batching: Optional[BatchingOptions] = None,
             on_batch: Optional[Callable[[str, str, int], None]] = None
             ) -> "SavedModelServable":
        """Loads a SavedModel; raises ValueError (or TensorFlow's error) saying why not."""
        meta_graph = read_serve_meta_graph(export_dir)
        signature_defs = dict(meta_graph.signature_def)
        runner = SessionSignatures(export_dir, meta_graph)
        if not runner.names:
            reasons = "; ".join(f"{name}: {reason}" for name, reason in runner.unusable.items())
            raise ValueError(f"the SavedModel in {export_dir} has no serving signatures that can "
                             f"be run (SignatureDefs: {sorted(signature_defs)}"
                             f"{'; ' + reasons if reasons else ''})")
        return cls(model_name, version, export_dir, signature_defs, runner, batching=batching,
                   on_batch=on_batch)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()

    # -- signatures ---------------------------------------------------------------------

    def signature(self, name: str) -> Signature:
        """The signature `name` ('' means serving_default); FAILED_PRECONDITION if absent."""
        name = name or DEFAULT_SIGNATURE
        try:
            return self.signatures[name]
        except KeyError:
            self._refuse_unusable(name)
            raise errors.failed_precondition(
                f"Serving signature key \"{name}\" not found. Model {self.model_name} version "
                f"{self.version} has signatures: {sorted(self.signatures)}") from None

    def _refuse_unusable(self, name: str) -> None:
        """INVALID_ARGUMENT with the reason if `name` is a SignatureDef that cannot be run."""
        reason = self._runner.unusable.get(name)
        if reason is not None:
            raise errors.invalid_argument(
                f"signature '{name}' of model {self.model_name} version {self.version} cannot "
                f"be run: {reason}")

    def _check_input_names(self, signature: Signature, names: Iterable[str]) -> None:
        names = set(names)
        expected = set(signature.inputs)
        if names != expected:
            missing, extra = sorted(expected - names), sorted(names - expected)
            raise errors.invalid_argument(
                f"inputs do not match signature '{signature.name}': missing {missing}, "
                f"unexpected {extra}; expected exactly {sorted(expected)}")

    # -- running --------------------------------------------------------------------------

    def run(self, signature_name: str, inputs: Mapping[str, np.ndarray],
            output_filter: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Validates `inputs` against the signature, runs it, returns {output alias: array}."""
        signature = self.signature(signature_name)
        self._check_input_names(signature, inputs)
        for alias, array in inputs.items():
            spec = signature.inputs[alias]
            if not spec.accepts_dtype(array):
                raise errors.invalid_argument(
                    f"input '{alias}' of signature '{signature.name}' expects {spec.dtype.name} "
                    f"but got {array.dtype}")
            if not spec.shape.is_compatible_with(array.shape):
                raise errors.invalid_argument(
                    f"input '{alias}' of signature '{signature.name}' expects shape "
                    f"{shape_string(spec.shape)} but got {shape_string(array.shape)}")
        wanted = list(output_filter)
        for alias in wanted:
            if alias not in signature.outputs:
                raise errors.invalid_argument(
                    f"output tensor alias not found in signature: {alias}. Outputs expected to "
                    f"be in the set {sorted(signature.outputs)}")
        if len(set(wanted)) != len(wanted):
            raise errors.invalid_argument(f"duplicate output tensor alias in {wanted}")

        check_deadline("request before running the model")
        rows = {array.shape[0] for array in inputs.values() if array.ndim >= 1}
        if (self.batcher is not None and signature.batchable and len(rows) == 1
                and all(array.ndim >= 1 for array in inputs.values())):
            outputs = self.batcher.submit(signature.name, inputs, rows.pop())
        else:
            outputs = self._execute(signature.name, inputs)
        if wanted:
            outputs = {alias: outputs[alias] for alias in wanted}
        return outputs

    def _execute_batch(self, signature_name: str,
                       inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        if self._on_batch is not None:
            self._on_batch(self.model_name, signature_name,
                           len(next(iter(inputs.values()))))
        return self._execute(signature_name, inputs)

    def _execute(self, signature_name: str,
                 inputs: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        what = f"model {self.model_name} version {self.version} signature '{signature_name}'"
        try:
            return self._runner.run(signature_name, inputs)
        except tf.errors.OpError as error:
            raise _tf_error(error, what) from error
        except UnicodeDecodeError as error:
            # TensorFlow's message quotes the bad input (e.g. "Could not parse example input,
            # value: '\xff...'"), which its Python binding cannot decode as UTF-8.
            message = (error.object.decode("utf-8", "backslashreplace")
                       if isinstance(error.object, bytes) else str(error))
            message = message.strip().splitlines()[0] if message.strip() else str(error)
            raise errors.invalid_argument(f"{what}: {message} (undecodable input; a serialized "
                                          "tf.Example, say, that is not one)") from error
        except (TypeError, ValueError) as error:
            raise errors.invalid_argument(f"{what}: {error}") from error

    # -- the PredictionService calls -------------------------------------------------------

    def _model_spec(self, target, signature_name: str) -> None:
        target.name = self.model_name
        target.version.value = self.version
        target.signature_name = signature_name

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        signature = self.signature(request.model_spec.signature_name)
        self._check_input_names(signature, request.inputs.keys())
        inputs = {alias: array_from_tensor_proto(alias, proto, signature.inputs[alias])
                  for alias, proto in request.inputs.items()}
        outputs = self.run(signature.name, inputs, request.output_filter)
        response = predict_pb2.PredictResponse()
        self._model_spec(response.model_spec, signature.name)
        for alias, array in outputs.items():
            tensor_protos.fill_tensor_proto_field(response.outputs[alias], array)
        return response

    def _typed_signature(self, signature_name: str, method: str, kind: str) -> Signature:
        name = signature_name or DEFAULT_SIGNATURE
        if name not in self.signatures:
            self._refuse_unusable(name)
            raise errors.invalid_argument(
                f"No signature was found with the name: {name}. Model {self.model_name} version "
                f"{self.version} has signatures: {sorted(self.signatures)}")
        signature = self.signatures[name]
        if signature.method_name != method:
            raise errors.invalid_argument(
                f"Expected {kind} signature method_name to be {method}. "
                f"Was: {signature.method_name or '(empty)'} (signature '{name}')")
        if len(signature.inputs) != 1:
            raise errors.invalid_argument(
                f"{kind} signature '{name}' must have exactly one input, has "
                f"{sorted(signature.inputs)}")
        spec = next(iter(signature.inputs.values()))
        if not spec.is_string:
            raise errors.invalid_argument(
                f"{kind} signature '{name}' input '{spec.alias}' must be a string tensor of "
                f"serialized tf.Examples, is {spec.dtype.name}")
        return signature

    def _run_examples(self, signature: Signature, model_input):
        """Runs the request's examples; returns (outputs, number of examples)."""
        serialized = serialize_input_examples(model_input)
        alias = next(iter(signature.inputs))
        outputs = self.run(signature.name, {alias: np.array(serialized, dtype=object)})
        return outputs, len(serialized)

    @staticmethod
    def _rows(name: str, array: np.ndarray, batch: int, signature: Signature) -> np.ndarray:
        if array.ndim == 1:
            array = array[:, None]
        if array.ndim != 2 or array.shape[0] != batch:
            raise errors.invalid_argument(
                f"output '{name}' of signature '{signature.name}' has shape "
                f"{shape_string(array.shape)}; expected [{batch},num_classes]")
        return array

    def classify(self, request: classification_pb2.ClassificationRequest
                 ) -> classification_pb2.ClassificationResponse:
        signature = self._typed_signature(request.model_spec.signature_name, CLASSIFY_METHOD,
                                          "classification")
        if _CLASSES not in signature.outputs and _SCORES not in signature.outputs:
            raise errors.invalid_argument(
                f"classification signature '{signature.name}' has neither a '{_CLASSES}' nor a "
                f"'{_SCORES}' output (has {sorted(signature.outputs)})")
        outputs, batch = self._run_examples(signature, request.input)
        classes = outputs.get(_CLASSES)
        scores = outputs.get(_SCORES)
        if classes is not None:
            classes = self._rows(_CLASSES, classes, batch, signature)
        if scores is not None:
            scores = self._rows(_SCORES, scores, batch, signature)
        if classes is not None and scores is not None and classes.shape != scores.shape:
            raise errors.invalid_argument(
                f"signature '{signature.name}': classes {shape_string(classes.shape)} and "
                f"scores {shape_string(scores.shape)} differ in shape")
        response = classification_pb2.ClassificationResponse()
        self._model_spec(response.model_spec, signature.name)
        num_classes = (classes if classes is not None else scores).shape[1]
        for row in range(batch):
            classifications = response.result.classifications.add()
            for column in range(num_classes):
                entry = classifications.classes.add()
                if classes is not None:
                    label = classes[row, column]
                    entry.label = label.decode("utf-8", "replace") if isinstance(
                        label, bytes) else str(label)
                if scores is not None:
                    entry.score = float(scores[row, column])
        return response

    def regress(self, request: regression_pb2.RegressionRequest
                ) -> regression_pb2.RegressionResponse:
        signature = self._typed_signature(request.model_spec.signature_name, REGRESS_METHOD,
                                          "regression")
        if _REGRESSION_OUTPUT not in signature.outputs:
            raise errors.invalid_argument(
                f"regression signature '{signature.name}' has no '{_REGRESSION_OUTPUT}' output "
                f"(has {sorted(signature.outputs)})")
        outputs, batch = self._run_examples(signature, request.input)
        values = outputs[_REGRESSION_OUTPUT]
        if values.ndim == 2 and values.shape[1] == 1:
            values = values[:, 0]
        if values.ndim != 1 or values.shape[0] != batch:
            raise errors.invalid_argument(
                f"output '{_REGRESSION_OUTPUT}' of signature '{signature.name}' has shape "
                f"{shape_string(values.shape)}; expected [{batch}] or [{batch},1]")
        response = regression_pb2.RegressionResponse()
        self._model_spec(response.model_spec, signature.name)
        for value in values:
            response.result.regressions.add().value = float(value)
        return response

    def multi_inference(self, request: inference_pb2.MultiInferenceRequest
                        ) -> inference_pb2.MultiInferenceResponse:
        if not request.tasks:
            raise errors.invalid_argument("MultiInferenceRequest has no tasks")
        seen = set()
        response = inference_pb2.MultiInferenceResponse()
        for index, task in enumerate(request.tasks):
            signature_name = task.model_spec.signature_name or DEFAULT_SIGNATURE
            if signature_name in seen:
                raise errors.invalid_argument(f"Duplicate evaluation of signature: "
                                              f"{signature_name} (task {index})")
            seen.add(signature_name)
            result = response.results.add()
            if task.method_name == CLASSIFY_METHOD:
                sub = classification_pb2.ClassificationRequest(input=request.input)
                sub.model_spec.CopyFrom(task.model_spec)
                answer = self.classify(sub)
                result.classification_result.CopyFrom(answer.result)
            elif task.method_name == REGRESS_METHOD:
                sub = regression_pb2.RegressionRequest(input=request.input)
                sub.model_spec.CopyFrom(task.model_spec)
                answer = self.regress(sub)
                result.regression_result.CopyFrom(answer.result)
            else:
                raise errors.unimplemented(
                    f"task {index}: unsupported method_name {task.method_name!r}; "
                    f"use {CLASSIFY_METHOD} or {REGRESS_METHOD}")
            result.model_spec.CopyFrom(answer.model_spec)
        return response

    def metadata(self, metadata_fields: Sequence[str]
                 ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not metadata_fields:
            raise errors.invalid_argument(
                "GetModelMetadataRequest must specify at least one metadata_field")
        for field in metadata_fields:
            if field != SIGNATURE_DEF_FIELD:
                raise errors.invalid_argument(
                    f"Metadata field {field} is not supported; only '{SIGNATURE_DEF_FIELD}'")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature_def in self.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature_def)
        response.metadata[SIGNATURE_DEF_FIELD].Pack(signature_map)
        return response
