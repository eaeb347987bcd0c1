"""TensorFlow Serving's REST JSON, to and from numpy arrays and protos.

Predict requests come in two layouts:

* row ("instances"): a list with one entry per example; an entry is the value of the single
  input, or an object {input name: value}. Entries are stacked: the tensor of input `a` has
  shape [len(instances)] + shape(entry[a]), and every entry must have the same shape.
* columnar ("inputs"): the value of the single input, or an object {input name: value}
  holding whole tensors.

A value is a scalar or a rectangular nested list; its leaves must fit the signature's dtype
exactly (no float for an integer input, no number for a string input, integers for float
inputs only when exactly representable). A DT_STRING leaf is a UTF-8 string or
{"b64": "<base64>"} for binary data. Responses mirror the request layout: "predictions"
(one entry per example) or "outputs"; string outputs whose name ends in "_bytes" are
written as {"b64": ...}.

Classify/Regress requests are {"signature_name"?, "context"?, "examples": [{feature:
value or list}]}; JSON integers become int64_list, other numbers float_list, strings and
{"b64"} objects bytes_list.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any, Dict, List, Mapping, Tuple

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow_serving.apis import input_pb2

from serving import errors
from serving.deadlines import check_deadline
from serving.servable import Signature, shape_string

__all__ = [
    "parse_json_body", "signature_name_from_json", "predict_inputs_from_json",
    "predict_outputs_to_json", "tensor_from_json", "input_from_json",
    "classification_result_to_json", "regression_result_to_json", "proto_to_json_dict",
    "dumps",
]

INSTANCES = "instances"
INPUTS = "inputs"
B64 = "b64"
_BYTES_SUFFIX = "_bytes"
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FLOAT32_EXACT_INT = 2 ** 24 - 1  # larger integers are not exactly representable
def _finite_float(text: str, _float=float) -> float:
    """A JSON number literal as a float; ValueError when it overflows a double (1e400), as
    TF Serving's parser refuses it, where Python's would give inf. (The literals NaN and
    Infinity do not come here.) Costs about a quarter of the parse time of a body of floats."""
    value = _float(text)
    if value - value:  # inf - inf is nan; finite values give 0.0
        raise ValueError(f"Number too big to be stored in double: {text[:40]}")
    return value


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value, allow_nan=True) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "Bool"
    if isinstance(value, (int, float)):
        return "Number"
    if isinstance(value, str):
        return "String"
    if isinstance(value, list):
        return "Array"
    return "Object"


def parse_json_body(body: bytes) -> Dict[str, Any]:
    """The request's top-level JSON object; INVALID_ARGUMENT for anything else."""
    if not body or not body.strip():
        raise errors.invalid_argument("JSON Parse error: The document is empty")
    try:
        document = json.loads(body, parse_float=_finite_float)
    except UnicodeDecodeError as error:
        raise errors.invalid_argument(f"JSON Parse error: invalid UTF-8: {error}") from error
    except json.JSONDecodeError as error:
        raise errors.invalid_argument(
            f"JSON Parse error: {error.msg} at offset: {error.pos}") from error
    except ValueError as error:  # _finite_float
        raise errors.invalid_argument(f"JSON Parse error: {error}") from error
    except RecursionError as error:
        raise errors.invalid_argument("JSON Parse error: nesting too deep") from error
    if not isinstance(document, dict):
        raise errors.invalid_argument(
            f"JSON Value: {_short(document)} Is not object; the request must be a JSON object")
    return document


def signature_name_from_json(document: Mapping[str, Any]) -> str:
    name = document.get("signature_name", "")
    if not isinstance(name, str):
        raise errors.invalid_argument(
            f"JSON Value: {_short(name)} not formatted correctly. 'signature_name' key must be "
            "a string value.")
    return name


def _is_b64(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(B64), str)


def _decode_b64(value: Dict[str, str], where: str) -> bytes:
    text = value[B64]
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError) as error:
        raise errors.invalid_argument(f"{where}: Unable to base64 decode {_short(value)}: "
                                      f"{error}") from error


def _type_error(value: Any, dtype: tf.DType, where: str) -> errors.ServingError:
    return errors.invalid_argument(
        f"{where}: JSON Value: {_short(value)} Type: {_json_type(value)} is not of expected "
        f"type: {dtype.name}")


def _leaf(value: Any, dtype: tf.DType, where: str):
    if dtype == tf.string:
        if isinstance(value, str):
            return value.encode("utf-8")
        if _is_b64(value):
            return _decode_b64(value, where)
        raise _type_error(value, dtype, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if dtype == tf.bool and isinstance(value, bool):
            return value
        raise _type_error(value, dtype, where)
    if dtype == tf.bool:
        raise _type_error(value, dtype, where)
    if dtype.is_floating:
        if dtype == tf.float32 or dtype == tf.float16 or dtype == tf.bfloat16:
            lossy = (abs(value) > _FLOAT32_EXACT_INT if isinstance(value, int)
                     else np.isfinite(value) and abs(value) > _FLOAT32_MAX)
            if lossy:
                raise errors.invalid_argument(
                    f"{where}: Cannot convert JSON value: {_short(value)} to {dtype.name} "
                    "without loss of precision.")
        return value
    if dtype.is_integer:
        if not isinstance(value, int) or not dtype.min <= value <= dtype.max:
            raise _type_error(value, dtype, where)
        return value
    raise errors.unimplemented(f"{where}: Conversion of JSON Value: {_short(value)} to type: "
                               f"{dtype.name} is not supported")


def tensor_from_json(value: Any, dtype: tf.DType, where: str) -> np.ndarray:
    """A scalar or rectangular nested list as an array of `dtype`; errors name `where`."""
    check_deadline()
    shape: List[int] = []
    probe = value
    while isinstance(probe, list):
        shape.append(len(probe))
        if not probe:
            break
        probe = probe[0]
    flat: List[Any] = []

    def fill(item: Any, level: int) -> None:
        if not isinstance(item, list):
            if level != len(shape):
                raise errors.invalid_argument(
                    f"{where}: JSON Value: {_short(item)} found at incorrect level: {level + 1} "
                    f"in the JSON DOM. Expected at level: {len(shape)} (lists must be "
                    "rectangular)")
            flat.append(item)
            return
        if level >= len(shape):
            raise errors.invalid_argument(
                f"{where}: Encountered list at unexpected level: {level} expected < {len(shape)}")
        if len(item) != shape[level]:
            raise errors.invalid_argument(
                f"{where}: Encountered list at unexpected size: {len(item)} at level: {level} "
                f"expected size: {shape[level]} (lists must be rectangular)")
        if level == len(shape) - 1:  # the innermost lists: their leaves at once
            flat.extend(item)
            return
        for index, element in enumerate(item):
            if index % 4096 == 0:
                check_deadline()
            fill(element, level + 1)

    fill(value, 0)
    array = _whole_array(flat, dtype)
    if array is None:  # some value needs a closer look: element by element, for the message
        flat = [_leaf(item, dtype, where) for item in flat]
        array = (_object_array(flat) if dtype == tf.string
                 else np.array(flat, dtype=dtype.as_numpy_dtype))
    return array.reshape(shape)


def _object_array(items: List[Any]) -> np.ndarray:
    """A 1-D object array of `items` (np.array would make nested lists a 2-D array)."""
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def _whole_array(flat: List[Any], dtype: tf.DType):
    """`flat` as an array of `dtype` when every value is plainly acceptable, checked with
    NumPy over the whole list (a raw request carries thousands of ids, and `_leaf` costs
    microseconds each); None when any value may be refused or needs converting one by one."""
    kinds = set(map(type, flat))
    try:
        if dtype == tf.string:
            if kinds <= {str}:
                return _object_array([item.encode("utf-8") for item in flat])
            return None
        if dtype == tf.bool:
            return np.array(flat, dtype=bool) if kinds <= {bool} else None
        if dtype.is_integer and kinds <= {int}:
            wide = np.array(flat, dtype=np.int64)  # OverflowError beyond int64
            if wide.size and (int(wide.min()) < dtype.min or int(wide.max()) > dtype.max):
                return None
            return wide.astype(dtype.as_numpy_dtype)
        if dtype.is_floating and kinds <= {int, float}:
            wide = np.array(flat, dtype=np.float64)  # OverflowError beyond float64
            if dtype in (tf.float32, tf.float16, tf.bfloat16):
                magnitude = np.abs(wide)
                if np.any(np.isfinite(wide) & (magnitude > _FLOAT32_MAX)):
                    return None
                if int in kinds and np.any(magnitude > _FLOAT32_EXACT_INT):
                    return None
            return wide.astype(dtype.as_numpy_dtype)
    except OverflowError:
        return None
    return None


def _is_named_object(value: Any) -> bool:
    return isinstance(value, dict) and not _is_b64(value)


def _check_names(names, signature: Signature, where: str) -> None:
    expected = set(signature.inputs)
    names = set(names)
    if names != expected:
        raise errors.invalid_argument(
            f"{where}: keys must be equal to the inputs of signature '{signature.name}': "
            f"missing {sorted(expected - names)}, unexpected {sorted(names - expected)}")


def _row_inputs(instances: Any, signature: Signature) -> Dict[str, np.ndarray]:
    """The row format's tensors: each input's column of values converted at once (as in
    the columnar format, [len(instances)] + the shape of one value); any problem is found
    again instance by instance, for a message naming the instance."""
    if isinstance(instances, list) and instances:
        named = _is_named_object(instances[0])
        expected = signature.inputs.keys()
        if named and all(type(instance) is dict and instance.keys() == expected
                         for instance in instances):
            columns = {alias: [instance[alias] for instance in instances]
                       for alias in signature.inputs}
        elif not named and len(signature.inputs) == 1 and not any(
                _is_named_object(instance) for instance in instances):
            columns = {next(iter(signature.inputs)): instances}
        else:
            columns = None
        if columns is not None:
            try:
                return {alias: tensor_from_json(column, signature.inputs[alias].dtype,
                                                f"'{INSTANCES}' key: {alias}")
                        for alias, column in columns.items()}
            except errors.ServingError as error:
                if error.code != grpc.StatusCode.INVALID_ARGUMENT:
                    raise
                _row_inputs_one_by_one(instances, signature)  # raises, naming the instance
                raise
    return _row_inputs_one_by_one(instances, signature)


def _row_inputs_one_by_one(instances: Any, signature: Signature) -> Dict[str, np.ndarray]:
    if not isinstance(instances, list):
        raise errors.invalid_argument(
            f"'{INSTANCES}' must be a list/array, got {_json_type(instances)}")
    if not instances:
        raise errors.invalid_argument(f"No values in '{INSTANCES}' array")
    named = _is_named_object(instances[0])
    if not named and len(signature.inputs) > 1:
        raise errors.invalid_argument(
            f"{INSTANCES} is a plain list, but expecting list of objects as multiple input "
            f"tensors required by signature '{signature.name}': {sorted(signature.inputs)}")
    rows: Dict[str, List[np.ndarray]] = {alias: [] for alias in signature.inputs}
    for index, instance in enumerate(instances):
        if index % 1024 == 0:
            check_deadline()
        if named:
            if not _is_named_object(instance):
                raise errors.invalid_argument(
                    f"Expecting object but got {_json_type(instance)} at item {index} of "
                    f"'{INSTANCES}' list")
            _check_names(instance, signature, f"Failed to process element: {index} of "
                                              f"'{INSTANCES}' list")
            items = instance.items()
        else:
            if _is_named_object(instance):
                raise errors.invalid_argument(
                    f"Expecting value/list but got object at item {index} of '{INSTANCES}' list")
            items = [(next(iter(signature.inputs)), instance)]
        for alias, value in items:
            where = f"Failed to process element: {index} key: {alias} of '{INSTANCES}' list"
            array = tensor_from_json(value, signature.inputs[alias].dtype, where)
            if rows[alias] and rows[alias][0].shape != array.shape:
                raise errors.invalid_argument(
                    f"{where}: Expecting shape {shape_string(rows[alias][0].shape)} but got: "
                    f"{shape_string(array.shape)} (every instance must have the same shape)")
            rows[alias].append(array)
    return {alias: np.stack(arrays) for alias, arrays in rows.items()}


def _columnar_inputs(value: Any, signature: Signature) -> Dict[str, np.ndarray]:
    if not _is_named_object(value):
        if len(signature.inputs) != 1:
            raise errors.invalid_argument(
                f"{INPUTS} is a plain value/list, but expecting an object as multiple input "
                f"tensors required by signature '{signature.name}': {sorted(signature.inputs)}")
        alias = next(iter(signature.inputs))
        return {alias: tensor_from_json(value, signature.inputs[alias].dtype,
                                        f"'{INPUTS}' of input {alias}")}
    for alias in signature.inputs:
        if alias not in value:
            raise errors.invalid_argument(f"Missing named input: {alias} in '{INPUTS}' object. "
                                          f"Signature '{signature.name}' expects "
                                          f"{sorted(signature.inputs)}")
    _check_names(value, signature, f"'{INPUTS}' object")
    return {alias: tensor_from_json(item, signature.inputs[alias].dtype,
                                    f"'{INPUTS}' key: {alias}")
            for alias, item in value.items()}


def predict_inputs_from_json(document: Mapping[str, Any], signature: Signature
                             ) -> Tuple[Dict[str, np.ndarray], bool]:
    """(inputs, row_format) of a :predict request body."""
    if not signature.inputs:
        raise errors.invalid_argument(f"Failed to get input map for signature: {signature.name}")
    has_rows, has_columns = INSTANCES in document, INPUTS in document
    if has_rows and has_columns:
        raise errors.invalid_argument(
            f"Not formatted correctly expecting only one of '{INPUTS}' or '{INSTANCES}' keys to "
            "exist")
    if has_rows:
        return _row_inputs(document[INSTANCES], signature), True
    if has_columns:
        return _columnar_inputs(document[INPUTS], signature), False
    raise errors.invalid_argument(f"Missing '{INPUTS}' or '{INSTANCES}' key")


def _json_from_array(array: np.ndarray, name: str) -> Any:
    if array.dtype == object or array.dtype.kind in "SU":
        as_b64 = name.endswith(_BYTES_SUFFIX)

        def encode(item):
            data = item if isinstance(item, bytes) else str(item).encode("utf-8")
            if not as_b64:
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError:  # not text: never emit invalid JSON strings
                    pass
            return {B64: base64.b64encode(data).decode("ascii")}
        flat = [encode(item) for item in array.reshape(-1)]
    elif array.dtype.kind == "f" and array.dtype.itemsize < 8:
        # Shortest repr of the float32 value (0.2, not 0.20000000298023224).
        flat = [float(str(item)) for item in array.reshape(-1)]
    else:
        return array.tolist()
    if array.ndim == 0:
        return flat[0]
    return _object_array(flat).reshape(array.shape).tolist()


def predict_outputs_to_json(outputs: Mapping[str, np.ndarray], row_format: bool
                            ) -> Dict[str, Any]:
    """{"predictions": [...]} (row format) or {"outputs": ...} (columnar)."""
    if not outputs:
        raise errors.invalid_argument("Cannot convert empty tensor map to JSON")
    single = len(outputs) == 1
    if not row_format:
        if single:
            (name, array), = outputs.items()
            return {"outputs": _json_from_array(array, name)}
        return {"outputs": {name: _json_from_array(array, name)
                            for name, array in outputs.items()}}
    batch = None
    for name, array in outputs.items():
        if array.ndim == 0:
            raise errors.invalid_argument(
                f"Tensor name: {name} has no shape information; a scalar output cannot be "
                "returned in row ('instances') format, use 'inputs'")
        if batch is not None and array.shape[0] != batch:
            raise errors.invalid_argument(
                f"Tensor name: {name} has inconsistent batch size: {array.shape[0]} expecting: "
                f"{batch}; use the columnar ('inputs') format")
        batch = array.shape[0]
    columns = {name: _json_from_array(array, name) for name, array in outputs.items()}
    if single:
        return {"predictions": next(iter(columns.values()))}
    return {"predictions": [{name: column[row] for name, column in columns.items()}
                            for row in range(batch)]}


def _feature_from_json(name: str, content: Any) -> tf.train.Feature:
    values = content if isinstance(content, list) else [content]
    feature = tf.train.Feature()
    kind = None
    for value in values:
        if isinstance(value, bool):
            value_kind, value = "int64", int(value)
        elif isinstance(value, int):
            value_kind = "int64"
            if not tf.int64.min <= value <= tf.int64.max:
                raise errors.invalid_argument(
                    f"Feature: {name} has element {value} outside the int64 range")
        elif isinstance(value, float):
            value_kind = "float"
            if np.isfinite(value) and abs(value) > _FLOAT32_MAX:
                raise errors.invalid_argument(
                    f"Cannot convert JSON value: {value} to float without loss of precision "
                    f"(feature {name})")
        elif isinstance(value, str):
            value_kind, value = "bytes", value.encode("utf-8")
        elif _is_b64(value):
            value_kind, value = "bytes", _decode_b64(value, f"Feature: {name}")
        else:
            raise errors.invalid_argument(
                f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
        if kind is not None and value_kind != kind:
            raise errors.invalid_argument(
                f"Unexpected element type in feature: {name} expecting type: {kind}")
        kind = value_kind
        getattr(feature, f"{kind}_list").value.append(value)
    return feature


def _example_from_json(value: Any, where: str) -> tf.train.Example:
    if not _is_named_object(value):
        raise errors.invalid_argument(
            f"{where}: Example must be JSON object but got JSON {_json_type(value)}")
    example = tf.train.Example()
    for name, content in value.items():
        example.features.feature[name].CopyFrom(_feature_from_json(name, content))
    return example


def input_from_json(document: Mapping[str, Any]) -> input_pb2.Input:
    """The Input proto of a :classify / :regress request body."""
    model_input = input_pb2.Input()
    examples = document.get("examples")
    if "examples" not in document:
        raise errors.invalid_argument("Key 'examples' is expected and was not found")
    if not isinstance(examples, list):
        raise errors.invalid_argument(
            f"Expecting 'examples' value to be an list/array, got {_json_type(examples)}")
    if not examples:
        raise errors.invalid_argument("'examples' value is an empty array")
    if "context" in document:
        with_context = model_input.example_list_with_context
        with_context.context.CopyFrom(_example_from_json(document["context"], "'context'"))
        target = with_context.examples
    else:
        target = model_input.example_list.examples
    for index, value in enumerate(examples):
        target.add().CopyFrom(_example_from_json(value, f"'examples'[{index}]"))
    return model_input


def _float(value: float) -> float:
    return float(str(np.float32(value)))


def classification_result_to_json(result) -> Dict[str, Any]:
    return {"results": [[[entry.label, _float(entry.score)] for entry in item.classes]
                        for item in result.classifications]}


def regression_result_to_json(result) -> Dict[str, Any]:
    return {"results": [_float(item.value) for item in result.regressions]}


def proto_to_json_dict(message) -> Dict[str, Any]:
    """A proto as TensorFlow Serving prints it (field names kept, defaults included)."""
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def dumps(document: Mapping[str, Any]) -> bytes:
    # NaN and Infinity are written bare, as TensorFlow Serving does.
    return json.dumps(document, allow_nan=True, separators=(",", ":")).encode("utf-8")
