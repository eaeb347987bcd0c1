"""numpy arrays to and from TensorProtos, for the server and the client alike.

A TensorProto holds its values in one of two layouts, and each side writes the one
TensorFlow does:

* `fill_tensor_proto` (requests, the client) writes what `tf.make_tensor_proto` writes:
  numbers as raw little-endian bytes in `tensor_content`, byte strings as `string_val`;
* `fill_tensor_proto_field` (answers, the server) writes the typed repeated field of the
  dtype (`float_val`, `int64_val`, `int_val`, `string_val`, ...), one entry per element:
  `Tensor::AsProtoField`, which tensorflow_model_server's Predict answers with by default
  (its predict_util.cc; `kAsProtoContent`, i.e. tensor_content, is an internal option the
  open-source server does not select). Clients such as TF Serving's examples read
  `outputs['y'].float_val` directly.

`tf.make_tensor_proto` and `tf.make_ndarray` handle every dtype and layout, at a cost of
roughly 10-50 microseconds per tensor in Python; a Predict call converts a few tensors on
each side, so the layouts above get direct paths. Anything else (str elements written by
the client, bfloat16, repeated-value fills such as a `float_val` of one value for a [3]
tensor, big-endian hosts) goes through TensorFlow's functions. Results are the same either
way; tests/test_serving_tensor_protos.py checks both paths.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

__all__ = ["fill_tensor_proto", "fill_tensor_proto_field", "make_ndarray"]

_LITTLE_ENDIAN_HOST = sys.byteorder == "little"
# Numeric dtypes whose tensor_content is the numpy array's own bytes. (float16 and bfloat16
# are left to TensorFlow: bfloat16 has no numpy dtype of its own.)
_RAW_DTYPES = frozenset(
    np.dtype(name) for name in ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16",
                                "uint32", "uint64", "float32", "float64", "complex64",
                                "complex128"))
# The raw-byte dtypes by DataType enum and back (tf.as_dtype per tensor costs microseconds).
_RAW_DTYPE_BY_ENUM = {tf.as_dtype(dtype).as_datatype_enum: dtype for dtype in _RAW_DTYPES}
_ENUM_BY_RAW_DTYPE = {dtype: enum for enum, dtype in _RAW_DTYPE_BY_ENUM.items()}
# The typed field of each numeric dtype, as TensorFlow's tensor.cc ProtoHelper has it:
# the small integer types share int_val, float16 is its bit pattern in half_val, complex
# numbers are (real, imaginary) pairs.
_FIELD_BY_DTYPE = {np.dtype(name): field for name, field in (
    ("float32", "float_val"), ("float64", "double_val"), ("int64", "int64_val"),
    ("int32", "int_val"), ("int16", "int_val"), ("int8", "int_val"), ("uint8", "int_val"),
    ("uint16", "int_val"), ("uint32", "uint32_val"), ("uint64", "uint64_val"),
    ("bool", "bool_val"), ("float16", "half_val"), ("complex64", "scomplex_val"),
    ("complex128", "dcomplex_val"))}
_ENUM_BY_FIELD_DTYPE = {dtype: tf.as_dtype(dtype).as_datatype_enum for dtype in _FIELD_BY_DTYPE}
# What make_ndarray reads directly from a typed field (complex pairs go to TensorFlow).
_FIELD_BY_ENUM = {_ENUM_BY_FIELD_DTYPE[dtype]: (field, dtype.newbyteorder("="))
                  for dtype, field in _FIELD_BY_DTYPE.items() if dtype.kind != "c"}


def _raw_numbers(array: np.ndarray) -> bool:
    return (_LITTLE_ENDIAN_HOST and array.dtype in _RAW_DTYPES
            and array.dtype.byteorder in "=<|")


def _set_shape(target: tensor_pb2.TensorProto, shape) -> None:
    for size in shape:
        target.tensor_shape.dim.add(size=size)


def _fill_strings(target: tensor_pb2.TensorProto, array: np.ndarray, encode: bool) -> bool:
    """Writes an array of bytes (and of str when `encode`) as string_val; False if it is not
    one."""
    if array.dtype.kind == "U" and encode:
        values = [value.encode("utf-8") for value in array.ravel().tolist()]
    elif array.dtype == object or array.dtype.kind == "S":
        values = array.ravel().tolist()
        if encode:
            values = [value.encode("utf-8") if type(value) is str else value
                      for value in values]
        if not all(type(value) is bytes for value in values):
            return False
    else:
        return False
    target.dtype = types_pb2.DT_STRING
    _set_shape(target, array.shape)
    target.string_val.extend(values)
    return True


def fill_tensor_proto(target: tensor_pb2.TensorProto, array) -> None:
    """Writes `array` into the (empty) TensorProto `target` as `tf.make_tensor_proto` does
    (numbers in tensor_content): the layout of a request."""
    array = np.asarray(array)
    if _raw_numbers(array):
        target.dtype = _ENUM_BY_RAW_DTYPE[array.dtype]
        _set_shape(target, array.shape)
        target.tensor_content = np.ascontiguousarray(array).tobytes()
        return
    if _fill_strings(target, array, encode=False):
        return
    target.CopyFrom(tf.make_tensor_proto(array))


def fill_tensor_proto_field(target: tensor_pb2.TensorProto, array) -> None:
    """Writes `array` into the (empty) TensorProto `target` in its dtype's typed field
    (`Tensor::AsProtoField`): the layout of tensorflow_model_server's answers."""
    array = np.asarray(array)
    field = _FIELD_BY_DTYPE.get(array.dtype.newbyteorder("="))
    if field is not None:
        values = np.ascontiguousarray(array).ravel()
        if values.dtype.kind == "c":  # (real, imaginary) pairs
            values = values.astype(values.dtype.newbyteorder("=")).view(
                values.real.dtype.newbyteorder("="))
        elif values.dtype.kind == "f" and values.dtype.itemsize == 2:
            values = values.astype(np.float16).view(np.uint16)
        target.dtype = _ENUM_BY_FIELD_DTYPE[array.dtype.newbyteorder("=")]
        _set_shape(target, array.shape)
        getattr(target, field).extend(values.tolist())
        return
    if _fill_strings(target, array, encode=True):
        return
    proto = tf.make_tensor_proto(array)  # e.g. bfloat16: TensorFlow decides the layout
    if proto.tensor_content:
        proto.ClearField("tensor_content")
        field = {types_pb2.DT_BFLOAT16: "half_val"}.get(proto.dtype)
        if field is None:
            raise TypeError(f"no typed TensorProto field for dtype {array.dtype}")
        getattr(proto, field).extend(np.asarray(array).ravel().view(np.uint16).tolist())
    target.CopyFrom(proto)


def make_ndarray(proto: tensor_pb2.TensorProto) -> np.ndarray:
    """The numpy array a TensorProto holds (a copy, writable). Raises what
    `tf.make_ndarray` raises for a malformed proto."""
    shape = [dim.size for dim in proto.tensor_shape.dim]
    count = math.prod(shape)
    if proto.dtype == types_pb2.DT_STRING:
        if len(proto.string_val) == count and not proto.tensor_content:
            array = np.empty(count, dtype=object)
            array[:] = list(proto.string_val)
            return array.reshape(shape)
    elif proto.tensor_content:
        if _LITTLE_ENDIAN_HOST:
            dtype = _RAW_DTYPE_BY_ENUM.get(proto.dtype)  # None: TensorFlow's function decides
            if dtype is not None and len(proto.tensor_content) == count * dtype.itemsize:
                return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).copy()
    elif proto.dtype in _FIELD_BY_ENUM:
        field, dtype = _FIELD_BY_ENUM[proto.dtype]
        values = getattr(proto, field)
        if len(values) == count:
            if field == "half_val":
                return np.array(values, dtype=np.uint16).view(np.float16).reshape(shape)
            return np.array(values, dtype=dtype).reshape(shape)
    return tf.make_ndarray(proto)
