"""A small Python client for TensorFlow Serving's Predict API, over gRPC or REST.

It works against this project's server and against a real `tensorflow_model_server`:

    from serving import client
    scores = client.predict_grpc("127.0.0.1:8500", "ranker", examples=serialized_examples)
    scores = client.predict_rest("http://127.0.0.1:8501", "ranker",
                                 {"x": [0.5, 1.0], "ids": [[5, 9], [7]]},
                                 signature_name="serving_raw")

What to send is one of:

* `examples`: serialized tf.Examples (bytes, or tf.train.Example messages), fed to the
  signature's `input_name` input (default "examples");
* `inputs` (positional): a mapping {input name: values} of raw features (lists, nested
  lists or numpy arrays), or a sequence of serialized examples;
* `instances`: row-format raw features, [{input name: value}, ...].

Raw values are cast to the dtypes the signature declares (read once per client with
GetModelMetadata); integer lists of unequal lengths are padded with `pad_value` (the
project's SEQUENCE_PADDING_VALUE, -1). The result is {output name: np.ndarray}.

Failures raise `ServingClientError` carrying the server's canonical code name and message.
From the command line: `poso predict --help` (or `python -m serving.client --help`).
"""

from __future__ import annotations

import abc
import argparse
import base64
import dataclasses
import glob
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import types_pb2
from tensorflow_serving.apis import (get_model_metadata_pb2, predict_pb2,
                                     prediction_service_pb2_grpc)

from feature_specs import SEQUENCE_PADDING_VALUE
from serving import instances as instances_lib
from serving import tensor_protos
from serving.client_flags import (DEFAULT_GRPC_ADDRESS, DEFAULT_REST_URL, DEFAULT_SIGNATURE, JSON_SHAPES, add_arguments,
                                  build_arg_parser)

__all__ = [
    "ServingClientError", "GrpcPredictionClient", "RestPredictionClient", "predict_grpc",
    "predict_rest", "build_predict_request", "predict_response_arrays", "input_arrays", "collect_inputs",
    "DEFAULT_SIGNATURE", "DEFAULT_EXAMPLES_INPUT", "JsonRequest", "read_json_request",
    "raw_feature_inputs", "read_examples", "examples_as_raw_inputs", "format_table",
    "format_json", "add_arguments", "run", "main",
]

DEFAULT_EXAMPLES_INPUT = "examples"
_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

Inputs = Union[Sequence[bytes], Sequence[tf.train.Example], Mapping[str, Any]]
# {alias: (dtype, shape)} of a signature's inputs or outputs.
TensorTypes = Dict[str, Tuple[tf.DType, Optional[list]]]


class ServingClientError(RuntimeError):
    """The server refused or failed a request.

    code: canonical status name ("INVALID_ARGUMENT", "NOT_FOUND", ...) for gRPC, or
    "HTTP <status>" for REST; http_status is set for REST.
    """

    def __init__(self, code: str, message: str, http_status: Optional[int] = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.http_status = http_status


# -- turning user inputs into typed arrays ------------------------------------------------

def _is_example_sequence(inputs) -> bool:
    if isinstance(inputs, (bytes, str, Mapping)):
        return False
    items = list(inputs)
    return bool(items) and all(isinstance(item, (bytes, tf.train.Example)) for item in items)


def _pad_ragged(value, pad_value):
    """[[1, 2], [3]] -> [[1, 2], [3, pad]]; anything else is returned unchanged."""
    if not isinstance(value, (list, tuple)) or not value:
        return value
    if not all(isinstance(row, (list, tuple, np.ndarray)) for row in value):
        return value
    lengths = {len(row) for row in value}
    if len(lengths) <= 1:
        return value
    width = max(lengths)
    return [list(row) + [pad_value] * (width - len(row)) for row in value]


def _to_bytes(value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, tf.train.Example):
        return value.SerializeToString()
    return str(value).encode("utf-8")


def _typed_array(name: str, value, dtype: Optional[tf.DType], pad_value) -> np.ndarray:
    value = _pad_ragged(value, pad_value)
    if dtype == tf.string or (dtype is None and _looks_textual(value)):
        array = np.asarray(value, dtype=object)
        flat = [_to_bytes(item) for item in array.reshape(-1)]
        result = np.empty(len(flat), dtype=object)
        result[:] = flat
        return result.reshape(array.shape)
    try:
        array = np.asarray(value)
    except ValueError as error:  # e.g. nested lists of uneven depth
        raise ValueError(f"input '{name}' is not a rectangular array: {error}") from None
    if dtype is None:  # no signature to go by: TensorFlow's usual dtypes
        kind = array.dtype.kind
        dtype = tf.bool if kind == "b" else tf.int64 if kind in "iu" else tf.float32
    target = dtype.as_numpy_dtype
    if array.dtype.kind == "f" and np.dtype(target).kind in "iu":
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"input '{name}' expects {dtype.name} but has non-integer values")
    if array.size and array.dtype.kind in "OUS" and np.dtype(target).kind not in "OUS":
        raise ValueError(f"input '{name}' expects {dtype.name} but has non-numeric values "
                         f"such as {array.reshape(-1)[0]!r}")
    return array.astype(target, copy=False)


def _looks_textual(value) -> bool:
    array = np.asarray(value, dtype=object).reshape(-1)
    return array.size > 0 and isinstance(array[0], (bytes, str, tf.train.Example))


def input_arrays(inputs: Inputs, input_name: str = DEFAULT_EXAMPLES_INPUT,
                 dtypes: Optional[Mapping[str, tf.DType]] = None,
                 pad_value=SEQUENCE_PADDING_VALUE) -> Dict[str, np.ndarray]:
    """{input name: typed numpy array} from serialized examples or a raw feature mapping."""
    if _is_example_sequence(inputs):
        examples = np.empty(len(inputs), dtype=object)
        examples[:] = [_to_bytes(example) for example in inputs]
        return {input_name: examples}
    if not isinstance(inputs, Mapping):
        raise TypeError("inputs must be a sequence of serialized tf.Examples (bytes or "
                        f"tf.train.Example) or a mapping of input name to values, got "
                        f"{type(inputs).__name__}")
    dtypes = dtypes or {}
    return {name: _typed_array(name, value, dtypes.get(name), pad_value)
            for name, value in inputs.items()}


def collect_inputs(inputs: Optional[Inputs] = None, examples: Optional[Sequence] = None,
                   instances: Optional[Sequence[Mapping[str, Any]]] = None) -> Inputs:
    """The one of `inputs`, `examples`, `instances` given, as examples or a column mapping."""
    given = [name for name, value in (("inputs", inputs), ("examples", examples),
                                      ("instances", instances)) if value is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of inputs, examples, instances (got {given or 'none'})")
    if examples is not None:
        examples = list(examples)
        if not _is_example_sequence(examples):
            raise TypeError("examples must be serialized tf.Examples (bytes) or "
                            "tf.train.Example messages")
        return examples
    if instances is not None:
        instances = list(instances)
        if not instances or not all(isinstance(row, Mapping) for row in instances):
            raise TypeError("instances must be a non-empty list of {input name: value} objects")
        names = list(instances[0])
        for index, row in enumerate(instances):
            if set(row) != set(names):
                raise ValueError(f"instance {index} has inputs {sorted(row)}, instance 0 has "
                                 f"{sorted(names)}")
        return {name: [row[name] for row in instances] for name in names}
    return inputs


def build_predict_request(model_name: str, inputs: Mapping[str, np.ndarray],
                          signature_name: str = DEFAULT_SIGNATURE,
                          version: Optional[int] = None, version_label: Optional[str] = None,
                          output_filter: Sequence[str] = ()) -> predict_pb2.PredictRequest:
    """A PredictRequest of numpy arrays (use `input_arrays` to build them)."""
    if version is not None and version_label is not None:
        raise ValueError("give a version or a version_label, not both")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model_name
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = int(version)
    if version_label is not None:
        request.model_spec.version_label = version_label
    for name, array in inputs.items():
        tensor_protos.fill_tensor_proto(request.inputs[name], array)
    request.output_filter.extend(output_filter)
    return request


def predict_response_arrays(response: predict_pb2.PredictResponse) -> Dict[str, np.ndarray]:
    """{output alias: numpy array} of a PredictResponse."""
    return {alias: tensor_protos.make_ndarray(proto) for alias, proto in response.outputs.items()}


def _tensor_types(tensor_infos) -> TensorTypes:
    types: TensorTypes = {}
    for alias, info in tensor_infos.items():
        shape = tf.TensorShape(info.tensor_shape)
        dims = shape.as_list() if shape.rank is not None else None
        types[alias] = (tf.as_dtype(info.dtype), dims)
    return types


class _PredictionClient(abc.ABC):
    """What the gRPC and REST clients share: finding a signature among a model's."""

    @abc.abstractmethod
    def signature_defs(self, model_name: str, version: Optional[int] = None,
                       version_label: Optional[str] = None):
        """{signature name: signature} of a served model version."""

    def signature_def(self, model_name: str, signature_name: str = DEFAULT_SIGNATURE,
                      version: Optional[int] = None, version_label: Optional[str] = None):
        """One served signature: a SignatureDef proto over gRPC, its JSON over REST."""
        signatures = self.signature_defs(model_name, version, version_label)
        if signature_name not in signatures:
            raise ServingClientError(
                "NOT_FOUND", f"model {model_name} has no signature '{signature_name}' "
                f"(has {sorted(signatures)})")
        return signatures[signature_name]


# -- gRPC -----------------------------------------------------------------------------------

class GrpcPredictionClient(_PredictionClient):
    """A PredictionService client over one insecure channel; signatures are cached."""

    def __init__(self, address: str, timeout: float = 10.0,
                 max_message_bytes: int = _MAX_MESSAGE_BYTES):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ])
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._signatures: Dict[tuple, Any] = {}

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "GrpcPredictionClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as error:
            details = error.details() or ""
            if error.code() == grpc.StatusCode.UNAVAILABLE:
                details = f"cannot reach {self.address}: {details}"
            raise ServingClientError(error.code().name, details) from error

    def signature_defs(self, model_name: str, version: Optional[int] = None,
                       version_label: Optional[str] = None) -> Dict[str, Any]:
        """{name: SignatureDef proto} of the served version (GetModelMetadata; cached)."""
        key = (model_name, version, version_label)
        if key not in self._signatures:
            request = get_model_metadata_pb2.GetModelMetadataRequest()
            request.model_spec.name = model_name
            if version is not None:
                request.model_spec.version.value = int(version)
            if version_label is not None:
                request.model_spec.version_label = version_label
            request.metadata_field.append("signature_def")
            response = self._call(self._stub.GetModelMetadata, request)
            signature_map = get_model_metadata_pb2.SignatureDefMap()
            response.metadata["signature_def"].Unpack(signature_map)
            self._signatures[key] = dict(signature_map.signature_def)
        return self._signatures[key]

    def input_types(self, model_name: str, signature_name: str = DEFAULT_SIGNATURE,
                    version: Optional[int] = None, version_label: Optional[str] = None
                    ) -> TensorTypes:
        """{input alias: (dtype, shape as a list or None)} of a served signature."""
        return _tensor_types(
            self.signature_def(model_name, signature_name, version, version_label).inputs)

    def predict(self, model_name: str, inputs: Optional[Inputs] = None,
                signature_name: str = DEFAULT_SIGNATURE, version: Optional[int] = None,
                version_label: Optional[str] = None, input_name: str = DEFAULT_EXAMPLES_INPUT,
                output_filter: Sequence[str] = (), pad_value=SEQUENCE_PADDING_VALUE, *,
                examples: Optional[Sequence] = None,
                instances: Optional[Sequence[Mapping[str, Any]]] = None
                ) -> Dict[str, np.ndarray]:
        """Predict; see the module docstring for `inputs` / `examples` / `instances`."""
        inputs = collect_inputs(inputs, examples, instances)
        dtypes = None
        if not _is_example_sequence(inputs):
            signature = self.signature_def(model_name, signature_name, version, version_label)
            dtypes = {alias: dtype for alias, (dtype, _) in _tensor_types(signature.inputs).items()}
        arrays = input_arrays(inputs, input_name, dtypes, pad_value)
        request = build_predict_request(model_name, arrays, signature_name, version,
                                        version_label, output_filter)
        return predict_response_arrays(self._call(self._stub.Predict, request))


def predict_grpc(address: str, model_name: str, inputs: Optional[Inputs] = None,
                 signature_name: str = DEFAULT_SIGNATURE, version: Optional[int] = None, *,
                 examples: Optional[Sequence] = None,
                 instances: Optional[Sequence[Mapping[str, Any]]] = None,
                 version_label: Optional[str] = None, input_name: str = DEFAULT_EXAMPLES_INPUT,
                 timeout: float = 10.0) -> Dict[str, np.ndarray]:
    """One Predict call over gRPC (address host:port); returns {output name: np.ndarray}."""
    with GrpcPredictionClient(address, timeout=timeout) as client:
        return client.predict(model_name, inputs, signature_name, version, version_label,
                              input_name, examples=examples, instances=instances)


# -- REST -----------------------------------------------------------------------------------

def _json_value(array: np.ndarray):
    """A typed array as TensorFlow Serving's JSON (bytes as {"b64": ...})."""
    if array.dtype == object or array.dtype.kind == "S":
        def encode(item):
            if isinstance(item, list):
                return [encode(sub) for sub in item]
            return {"b64": base64.b64encode(_to_bytes(item)).decode("ascii")}
        return encode(array.tolist())
    return array.tolist()


def _decode_b64(value):
    if isinstance(value, list):
        return [_decode_b64(item) for item in value]
    if isinstance(value, dict) and set(value) == {"b64"}:
        return base64.b64decode(value["b64"])
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


class RestPredictionClient(_PredictionClient):
    """A client of TensorFlow Serving's REST API at `base_url` (http://host:port)."""

    def __init__(self, base_url: str, timeout: float = 10.0):
        if "://" not in base_url:
            base_url = "http://" + base_url
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._signatures: Dict[tuple, Mapping[str, Any]] = {}

    def _model_path(self, model_name: str, version: Optional[int],
                    version_label: Optional[str]) -> str:
        if version is not None and version_label is not None:
            raise ValueError("give a version or a version_label, not both")
        path = f"{self.base_url}/v1/models/{urllib.parse.quote(model_name, safe='')}"
        if version is not None:
            path += f"/versions/{int(version)}"
        elif version_label is not None:
            path += f"/labels/{urllib.parse.quote(version_label, safe='')}"
        return path

    def request(self, method: str, url: str, body: Optional[Mapping] = None) -> Any:
        """Sends one request; returns the decoded JSON answer or raises ServingClientError."""
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace")
            try:
                message = json.loads(text).get("error", text)
            except (ValueError, AttributeError):
                message = text
            raise ServingClientError(f"HTTP {error.code}", message,
                                     http_status=error.code) from error
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            reason = getattr(error, "reason", error)
            raise ServingClientError("UNAVAILABLE",
                                     f"cannot reach {self.base_url}: {reason}") from error

    def signature_defs(self, model_name: str, version: Optional[int] = None,
                       version_label: Optional[str] = None) -> Dict[str, Mapping[str, Any]]:
        """{name: JSON SignatureDef} of the served version (GET .../metadata; cached)."""
        key = (model_name, version, version_label)
        if key not in self._signatures:
            answer = self.request("GET", self._model_path(model_name, version, version_label)
                                  + "/metadata")
            self._signatures[key] = dict(answer["metadata"]["signature_def"]["signature_def"])
        return self._signatures[key]

    def input_types(self, model_name: str, signature_name: str = DEFAULT_SIGNATURE,
                    version: Optional[int] = None, version_label: Optional[str] = None
                    ) -> TensorTypes:
        """{input alias: (dtype, shape as a list or None)} of a served signature."""
        infos = self.signature_def(model_name, signature_name, version, version_label)["inputs"]
        types: TensorTypes = {}
        for alias, info in infos.items():
            shape = info.get("tensor_shape", {})
            dims = None if shape.get("unknown_rank") else [
                int(dim.get("size", -1)) for dim in shape.get("dim", [])]
            types[alias] = (tf.as_dtype(types_pb2.DataType.Value(info["dtype"])), dims)
        return types

    @staticmethod
    def _dtypes(tensor_infos: Mapping[str, Any]) -> Dict[str, tf.DType]:
        return {alias: tf.as_dtype(types_pb2.DataType.Value(info["dtype"]))
                for alias, info in tensor_infos.items()}

    def predict(self, model_name: str, inputs: Optional[Inputs] = None,
                signature_name: str = DEFAULT_SIGNATURE, version: Optional[int] = None,
                version_label: Optional[str] = None, input_name: str = DEFAULT_EXAMPLES_INPUT,
                pad_value=SEQUENCE_PADDING_VALUE, *, examples: Optional[Sequence] = None,
                instances: Optional[Sequence[Mapping[str, Any]]] = None
                ) -> Dict[str, np.ndarray]:
        """Predict (columnar JSON); see the module docstring for what to send."""
        inputs = collect_inputs(inputs, examples, instances)
        signature = self.signature_def(model_name, signature_name, version, version_label)
        arrays = input_arrays(inputs, input_name, self._dtypes(signature["inputs"]), pad_value)
        body = {"signature_name": signature_name,
                "inputs": {name: _json_value(array) for name, array in arrays.items()}}
        answer = self.request("POST", self._model_path(model_name, version, version_label)
                              + ":predict", body)
        output_dtypes = self._dtypes(signature["outputs"])
        outputs = answer["outputs"]
        if len(output_dtypes) == 1:
            outputs = {next(iter(output_dtypes)): outputs}
        result = {}
        for alias, value in outputs.items():
            dtype = output_dtypes.get(alias)
            if dtype == tf.string:
                result[alias] = np.asarray(_decode_b64(value), dtype=object)
            else:
                result[alias] = np.asarray(value, dtype=dtype.as_numpy_dtype if dtype else None)
        return result


def predict_rest(address: str, model_name: str, inputs: Optional[Inputs] = None,
                 signature_name: str = DEFAULT_SIGNATURE, version: Optional[int] = None, *,
                 examples: Optional[Sequence] = None,
                 instances: Optional[Sequence[Mapping[str, Any]]] = None,
                 version_label: Optional[str] = None, input_name: str = DEFAULT_EXAMPLES_INPUT,
                 timeout: float = 10.0) -> Dict[str, np.ndarray]:
    """One Predict call over REST (address http://host:port or host:port); returns
    {output name: np.ndarray}."""
    return RestPredictionClient(address, timeout=timeout).predict(
        model_name, inputs, signature_name, version, version_label, input_name,
        examples=examples, instances=instances)


# -- command line -------------------------------------------------------------------------

# The project's raw-feature signature: what JSON features go to unless told otherwise.
RAW_SIGNATURE = instances_lib.RAW_SIGNATURE

_TF_SERVING_BODY_KEYS = {"instances", "inputs", "signature_name"}


@dataclasses.dataclass(frozen=True)
class JsonRequest:
    """Raw feature values read from JSON: row-format `rows` or columnar `columns`.

    rows: [{input: value}, ...], or bare values when the signature has one input.
    columns: {input: [values]}, or the values of a signature's only input.
    signature_name: the body's "signature_name", if it named one.
    """

    rows: Optional[list] = None
    columns: Any = None
    signature_name: Optional[str] = None


def _json_text(source: str) -> Tuple[str, str]:
    """(text, where) of --json: a JSON string, @FILE or an existing FILE, or - (stdin)."""
    if source == "-":
        return sys.stdin.read(), "--json (stdin)"
    if source.startswith("@") or source.lstrip()[:1] not in ("[", "{"):
        path = source[1:] if source.startswith("@") else source
        if not os.path.isfile(path):
            raise ValueError(f"--json: no such file {path!r} (give a JSON string, a file, "
                             "@FILE, or - to read standard input)")
        with open(path, encoding="utf-8") as json_file:
            return json_file.read(), f"--json file {path}"
    return source, "--json"


def _parse_json(text: str, where: str) -> Any:
    """A JSON document, or the list of objects of a JSON Lines text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        whole_error = error
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    rows = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            if not rows:  # not JSON Lines either: the whole document's error says more
                break
            raise ValueError(f"{where}: line {number}: not JSON ({error.msg} at column "
                             f"{error.colno})") from None
        if not isinstance(row, dict):
            if not rows:
                break
            raise ValueError(f"{where}: line {number}: a JSON Lines row must be an object, "
                             f"got {type(row).__name__}")
        rows.append(row)
    if len(rows) > 1 and len(rows) == len(lines):
        return rows
    raise ValueError(f"{where}: not JSON ({whole_error.msg} at line {whole_error.lineno} "
                     f"column {whole_error.colno})")


def read_json_request(source: str) -> JsonRequest:
    """Reads --json SOURCE (see JSON_SHAPES for the accepted documents)."""
    text, where = _json_text(source)
    document = _parse_json(text, where)
    if isinstance(document, list):
        if not document:
            raise ValueError(f"{where}: the list of rows is empty")
        return JsonRequest(rows=document)
    if not isinstance(document, dict):
        raise ValueError(f"{where}: expected {JSON_SHAPES}; got a JSON {type(document).__name__}")
    if not {"instances", "inputs"} & set(document):
        return JsonRequest(rows=[document])
    if "instances" in document and "inputs" in document:
        raise ValueError(f'{where}: give "instances" (rows) or "inputs" (columns), not both')
    unexpected = sorted(set(document) - _TF_SERVING_BODY_KEYS)
    if unexpected:
        raise ValueError(f"{where}: unexpected keys {unexpected} in a TensorFlow Serving request "
                         f"body (allowed: {sorted(_TF_SERVING_BODY_KEYS)})")
    signature_name = document.get("signature_name")
    if signature_name is not None and not isinstance(signature_name, str):
        raise ValueError(f'{where}: "signature_name" must be a string')
    if "instances" in document:
        rows = document["instances"]
        if not isinstance(rows, list) or not rows:
            raise ValueError(f'{where}: "instances" must be a non-empty list of rows')
        return JsonRequest(rows=rows, signature_name=signature_name)
    return JsonRequest(columns=document["inputs"], signature_name=signature_name)


def _decode_b64_inputs(value):
    """TensorFlow Serving's {"b64": "..."} binary values -> bytes, anywhere in `value`."""
    if isinstance(value, list):
        return [_decode_b64_inputs(item) for item in value]
    if isinstance(value, dict) and set(value) == {"b64"}:
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (ValueError, TypeError) as error:
            raise ValueError(f"bad base64 value {value['b64']!r}: {error}") from None
    return value


def _name_mismatch(given, expected) -> str:
    missing, unexpected = sorted(set(expected) - set(given)), sorted(set(given) - set(expected))
    parts = ([f"lacks {missing}"] if missing else []) + (
        [f"has unexpected {unexpected}"] if unexpected else [])
    return " and ".join(parts)


def raw_feature_inputs(request: JsonRequest, input_types: TensorTypes,
                       signature_name: str) -> Dict[str, Any]:
    """{input: values} for a signature from a JsonRequest; names are checked row by row."""
    names = sorted(input_types)
    where = f"signature '{signature_name}' (inputs {names})"
    examples_input = _examples_input(input_types)
    given = request.columns if isinstance(request.columns, dict) else (
        request.rows[0] if request.rows and isinstance(request.rows[0], dict) else None)
    if examples_input is not None and given is not None and examples_input not in given:
        raise ValueError(f"signature '{signature_name}' takes serialized tf.Examples (input "
                         f"'{examples_input}'), not raw features: send TFRecords with "
                         f"--examples, or the features to a raw-feature signature such as "
                         f"{RAW_SIGNATURE}")
    if request.rows is not None:
        rows = request.rows
        objects = [isinstance(row, dict) for row in rows]
        if all(objects):
            for index, row in enumerate(rows):
                if set(row) != set(names):
                    raise ValueError(f"row {index} {_name_mismatch(row, names)} for {where}")
            columns = {name: [row[name] for row in rows] for name in names}
        elif any(objects):
            raise ValueError("rows mix objects and bare values; give one object per row")
        elif len(names) == 1:
            columns = {names[0]: rows}
        else:
            raise ValueError(f"rows are bare values, but {where} has {len(names)} inputs; give "
                             "one object per row")
    elif isinstance(request.columns, dict):
        if set(request.columns) != set(names):
            raise ValueError(f'"inputs" {_name_mismatch(request.columns, names)} for {where}')
        columns = dict(request.columns)
    elif len(names) == 1:
        columns = {names[0]: request.columns}
    else:
        raise ValueError(f'"inputs" must be an object {{input: values}} for {where}')
    decoded = {}
    for name, values in columns.items():
        try:
            decoded[name] = _decode_b64_inputs(values)
        except ValueError as error:
            raise ValueError(f"input '{name}': {error}") from None
    return decoded


def _tfrecord_files(patterns: Sequence[str]) -> list:
    files = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.exists(pattern) else [])
        if not matches:
            raise ValueError(f"--examples: {pattern!r} matches no file")
        for match in matches:
            if os.path.isdir(match):  # e.g. an Examples artifact's Split-eval directory
                found = sorted(os.path.join(root, name) for root, _, names in os.walk(match)
                               for name in names if not name.startswith("."))
                if not found:
                    raise ValueError(f"--examples: directory {match!r} holds no files")
                files.extend(found)
            else:
                files.append(match)
    return files


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as record_file:
        return record_file.read(2) == b"\x1f\x8b"


def read_examples(patterns: Sequence[str], limit: Optional[int] = None) -> list:
    """Serialized tf.Examples from TFRecord files, directories or globs (gzip or not; found
    by content, not by name); at most `limit` (None: all)."""
    examples = []
    for path in _tfrecord_files(patterns):
        compression = "GZIP" if _is_gzip(path) else ""
        try:
            for record in tf.data.TFRecordDataset(path, compression_type=compression):
                serialized = record.numpy()
                try:
                    tf.train.Example.FromString(serialized)
                except Exception:  # protobuf's DecodeError, whose module varies
                    raise ValueError(f"--examples: record {len(examples)} of {path} is not a "
                                     "serialized tf.Example") from None
                examples.append(serialized)
                if limit is not None and len(examples) >= limit:
                    return examples
        except tf.errors.OpError as error:
            raise ValueError(f"--examples: {path} is not a TFRecord file "
                             f"({error.message.strip()})") from None
    if not examples:
        raise ValueError(f"--examples: no records in {list(patterns)}")
    return examples


def _example_values(feature: tf.train.Feature) -> list:
    kind = feature.WhichOneof("kind")
    return list(getattr(feature, kind).value) if kind else []


def examples_as_raw_inputs(examples: Sequence[bytes], input_types: TensorTypes,
                           signature_name: str) -> Dict[str, list]:
    """Decodes tf.Examples into a raw-feature signature's inputs, by feature name: one
    value per example for [batch] inputs, the value list for [batch, n] inputs."""
    parsed = [tf.train.Example.FromString(example) for example in examples]
    columns: Dict[str, list] = {}
    for alias, (_, dims) in sorted(input_types.items()):
        scalar = dims is not None and len(dims) == 1
        values = []
        for index, example in enumerate(parsed):
            if alias not in example.features.feature:
                raise ValueError(f"example {index} has no feature '{alias}', an input of "
                                 f"signature '{signature_name}'")
            items = _example_values(example.features.feature[alias])
            if scalar and len(items) != 1:
                raise ValueError(f"example {index}: feature '{alias}' has {len(items)} values, "
                                 f"but signature '{signature_name}' takes one per example")
            values.append(items[0] if scalar else items)
        columns[alias] = values
    return columns


def _examples_input(input_types: TensorTypes) -> Optional[str]:
    """The input serialized examples go to: a signature's only input, if a string."""
    if len(input_types) == 1:
        alias, (dtype, _) = next(iter(input_types.items()))
        if dtype == tf.string:
            return alias
    return None


def _output_order(names) -> list:
    """Task outputs in feature_specs.TASKS order, then the others by name."""
    from feature_specs import TASKS

    tasks = [task.name for task in TASKS if task.name in names]
    return tasks + sorted(set(names) - set(tasks))


def _printable(value):
    """A JSON-ready value: text as strings, other bytes as {"b64": ...}."""
    if isinstance(value, list):
        return [_printable(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(value).decode("ascii")}
    return value


def _row_count(outputs: Mapping[str, np.ndarray]) -> Optional[int]:
    """The shared leading dimension of the outputs (None if they do not share one)."""
    rows = {array.shape[0] if array.ndim else None for array in outputs.values()}
    return rows.pop() if len(rows) == 1 else None


def format_json(outputs: Mapping[str, np.ndarray]) -> str:
    """TensorFlow Serving's response shapes: {"predictions": [{output: value}, ...]} when the
    outputs share their rows, else {"outputs": {output: values}}."""
    names = _output_order(outputs)
    columns = {name: _printable(outputs[name].tolist()) for name in names}
    rows = _row_count(outputs)
    if rows is None:
        return json.dumps({"outputs": columns})
    return json.dumps({"predictions": [{name: columns[name][row] for name in names}
                                       for row in range(rows)]})


def _cell(value) -> str:
    if isinstance(value, (list, np.ndarray)):
        items = list(value)
        shown = ", ".join(_cell(item) for item in items[:4])
        return f"[{shown}{', ...' if len(items) > 4 else ''}]"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4f}"
    if isinstance(value, bytes):
        printable = _printable(value)
        return printable if isinstance(printable, str) else json.dumps(printable)
    return str(value)


def format_table(outputs: Mapping[str, np.ndarray]) -> str:
    """One line per row, one column per output (tasks first, in TASKS order)."""
    names = _output_order(outputs)
    rows = _row_count(outputs)
    if rows is None:  # outputs of different lengths cannot share lines
        return "\n".join(f"{name}: {_cell(outputs[name])}" for name in names)
    header = ["row"] + names
    body = [[str(row)] + [_cell(outputs[name][row]) for name in names] for row in range(rows)]
    widths = [max(len(line[column]) for line in [header] + body) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths))
                     for line in [header] + body)


def _choose_signature(args, body_signature: Optional[str], available) -> str:
    if args.signature and body_signature and args.signature != body_signature:
        raise ValueError(f"--signature {args.signature} disagrees with the JSON's "
                         f"signature_name {body_signature!r}")
    chosen = args.signature or body_signature
    if chosen:
        return chosen
    if args.json is not None and RAW_SIGNATURE in available:
        return RAW_SIGNATURE
    return DEFAULT_SIGNATURE


def _predict(client, args) -> Dict[str, np.ndarray]:
    request = read_json_request(args.json) if args.json is not None else None
    examples = None
    if args.examples:
        if args.max_examples < 0:
            raise ValueError(f"--max-examples must be >= 0, got {args.max_examples}")
        examples = read_examples(args.examples, args.max_examples or None)
    available = client.signature_defs(args.model, args.version, args.label)
    signature = _choose_signature(args, request.signature_name if request else None, available)
    input_types = client.input_types(args.model, signature, args.version, args.label)
    if request is not None:
        inputs = raw_feature_inputs(request, input_types, signature)
    else:
        input_name = args.input_name or _examples_input(input_types)
        if input_name is not None:
            if input_name not in input_types:
                raise ValueError(f"signature '{signature}' has no input '{input_name}' (has "
                                 f"{sorted(input_types)})")
            inputs = {input_name: examples}
        else:
            inputs = examples_as_raw_inputs(examples, input_types, signature)
    return client.predict(args.model, inputs, signature, args.version, args.label)


def run(args: argparse.Namespace) -> int:
    """Sends one Predict request and prints the outputs; returns the exit code (0 ok, 1 the
    server refused or could not be reached, 2 bad input)."""
    try:
        if args.rest:
            outputs = _predict(RestPredictionClient(args.rest, timeout=args.timeout), args)
        else:
            with GrpcPredictionClient(args.grpc or DEFAULT_GRPC_ADDRESS,
                                      timeout=args.timeout) as grpc_client:
                outputs = _predict(grpc_client, args)
    except ServingClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_json(outputs) if args.format == "json" else format_table(outputs))
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "poso predict") -> int:
    """`poso predict ARGS`; returns the exit code (argparse's 2 for bad flags, 0 for --help)."""
    try:
        args = build_arg_parser(prog).parse_args(argv)
    except SystemExit as exit_request:
        code = exit_request.code
        return 0 if code is None else code if isinstance(code, int) else 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main(prog="python -m serving.client"))
