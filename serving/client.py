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
From the command line: `python -m serving.client --help`.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
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

__all__ = [
    "ServingClientError", "GrpcPredictionClient", "RestPredictionClient", "predict_grpc",
    "predict_rest", "build_predict_request", "input_arrays", "collect_inputs",
    "DEFAULT_SIGNATURE", "DEFAULT_EXAMPLES_INPUT", "main",
]

DEFAULT_SIGNATURE = "serving_default"
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
    array = np.asarray(value)
    if dtype is None:  # no signature to go by: TensorFlow's usual dtypes
        kind = array.dtype.kind
        dtype = tf.bool if kind == "b" else tf.int64 if kind in "iu" else tf.float32
    target = dtype.as_numpy_dtype
    if array.dtype.kind == "f" and np.dtype(target).kind in "iu":
        if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
            raise ValueError(f"input '{name}' expects {dtype.name} but has non-integer values")
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
        request.inputs[name].CopyFrom(tf.make_tensor_proto(array))
    request.output_filter.extend(output_filter)
    return request


def _tensor_types(tensor_infos) -> TensorTypes:
    types: TensorTypes = {}
    for alias, info in tensor_infos.items():
        shape = tf.TensorShape(info.tensor_shape)
        dims = shape.as_list() if shape.rank is not None else None
        types[alias] = (tf.as_dtype(info.dtype), dims)
    return types


# -- gRPC -----------------------------------------------------------------------------------

class GrpcPredictionClient:
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
            raise ServingClientError(error.code().name, error.details() or "") from error

    def signature_def(self, model_name: str, signature_name: str = DEFAULT_SIGNATURE,
                      version: Optional[int] = None, version_label: Optional[str] = None):
        """The SignatureDef proto of a served signature (GetModelMetadata)."""
        key = (model_name, signature_name, version, version_label)
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
            if signature_name not in signature_map.signature_def:
                raise ServingClientError(
                    "NOT_FOUND", f"model {model_name} has no signature '{signature_name}' "
                    f"(has {sorted(signature_map.signature_def)})")
            self._signatures[key] = signature_map.signature_def[signature_name]
        return self._signatures[key]

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
        response = self._call(self._stub.Predict, request)
        return {alias: np.asarray(tf.make_ndarray(proto))
                for alias, proto in response.outputs.items()}


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


class RestPredictionClient:
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

    def signature_def(self, model_name: str, signature_name: str = DEFAULT_SIGNATURE,
                      version: Optional[int] = None, version_label: Optional[str] = None
                      ) -> Mapping[str, Any]:
        """The JSON SignatureDef of a served signature (GET .../metadata)."""
        key = (model_name, signature_name, version, version_label)
        if key not in self._signatures:
            answer = self.request("GET", self._model_path(model_name, version, version_label)
                                  + "/metadata")
            signatures = answer["metadata"]["signature_def"]["signature_def"]
            if signature_name not in signatures:
                raise ServingClientError(
                    "NOT_FOUND", f"model {model_name} has no signature '{signature_name}' "
                    f"(has {sorted(signatures)})")
            self._signatures[key] = signatures[signature_name]
        return self._signatures[key]

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

def _read_examples(patterns: Sequence[str], limit: Optional[int]) -> list:
    files = sorted({path for pattern in patterns for path in glob.glob(pattern)})
    if not files:
        raise ValueError(f"no TFRecord files match {list(patterns)}")
    examples = []
    for path in files:
        compression = "GZIP" if path.endswith(".gz") else None
        for record in tf.data.TFRecordDataset(path, compression_type=compression):
            examples.append(record.numpy())
            if limit is not None and len(examples) >= limit:
                return examples
    return examples


def _json_argument(text: str):
    if text.startswith("@"):
        with open(text[1:], encoding="utf-8") as json_file:
            return json.load(json_file)
    return json.loads(text)


def _printable(array: np.ndarray):
    """JSON-ready values: text as strings, other bytes as {"b64": ...}."""
    if array.dtype != object:
        return array.tolist()

    def text(item):
        if isinstance(item, list):
            return [text(sub) for sub in item]
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(item).decode("ascii")}
    return text(array.tolist())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m serving.client`: one Predict call; prints {output: values} as JSON."""
    parser = argparse.ArgumentParser(prog="python -m serving.client", description=(
        "Send one Predict request to a TensorFlow Serving API (gRPC or REST)."))
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--grpc", metavar="HOST:PORT", help="gRPC address, e.g. 127.0.0.1:8500")
    where.add_argument("--rest", metavar="URL", help="REST address, e.g. http://127.0.0.1:8501")
    parser.add_argument("--model", "--model-name", "--model_name", dest="model", required=True)
    parser.add_argument("--signature", "--signature-name", "--signature_name", dest="signature",
                        default=DEFAULT_SIGNATURE)
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int)
    version.add_argument("--label", help="version label")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--examples", nargs="+", metavar="TFRECORD",
                      help="TFRecord files (globs; .gz compressed) of serialized tf.Examples")
    what.add_argument("--instances", metavar="JSON",
                      help="row-format raw features: a JSON list of objects, or @file.json")
    what.add_argument("--inputs", metavar="JSON",
                      help="columnar raw features: a JSON object, or @file.json")
    parser.add_argument("--max-examples", "--max_examples", dest="max_examples", type=int,
                        default=10, help="send at most this many examples (default 10)")
    parser.add_argument("--input-name", "--input_name", dest="input_name",
                        default=DEFAULT_EXAMPLES_INPUT)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds")
    args = parser.parse_args(argv)
    try:
        sent = dict(
            examples=_read_examples(args.examples, args.max_examples) if args.examples else None,
            instances=_json_argument(args.instances) if args.instances else None,
            inputs=_json_argument(args.inputs) if args.inputs else None)
        call = predict_grpc if args.grpc else predict_rest
        outputs = call(args.grpc or args.rest, args.model, signature_name=args.signature,
                       version=args.version, version_label=args.label,
                       input_name=args.input_name, timeout=args.timeout, **sent)
    except ServingClientError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    printable = {name: _printable(array) for name, array in sorted(outputs.items())}
    print(json.dumps(printable))
    return 0


if __name__ == "__main__":
    sys.exit(main())
