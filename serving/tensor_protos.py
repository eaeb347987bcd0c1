"""numpy arrays to and from TensorProtos, for the server and the client alike.

`tf.make_tensor_proto` and `tf.make_ndarray` handle every dtype and layout, at a cost of
roughly 10-50 microseconds per tensor in Python. A Predict call converts a few tensors on
each side, and on one machine that time adds up to a visible part of a 1-row request's
latency. The two layouts almost every request and answer use get a direct path:

* numbers as raw little-endian bytes in `tensor_content` (what `tf.make_tensor_proto`
  itself writes for them, and what TF Serving answers with);
* byte strings as `string_val`, one entry per element.

Anything else (str elements, half precision, repeated-value fills such as a `float_val`
of one value for a [3] tensor, big-endian hosts) goes through TensorFlow's functions.
Results are the same either way; tests/test_serving_tensor_protos.py checks both paths.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

__all__ = ["fill_tensor_proto", "make_ndarray"]

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


def _raw_numbers(array: np.ndarray) -> bool:
    return (_LITTLE_ENDIAN_HOST and array.dtype in _RAW_DTYPES
            and array.dtype.byteorder in "=<|")


def _set_shape(target: tensor_pb2.TensorProto, shape) -> None:
    for size in shape:
        target.tensor_shape.dim.add(size=size)


def fill_tensor_proto(target: tensor_pb2.TensorProto, array) -> None:
    """Writes `array` into the (empty) TensorProto `target`."""
    array = np.asarray(array)
    if _raw_numbers(array):
        target.dtype = _ENUM_BY_RAW_DTYPE[array.dtype]
        _set_shape(target, array.shape)
        target.tensor_content = np.ascontiguousarray(array).tobytes()
        return
    if array.dtype == object or array.dtype.kind == "S":
        values = array.ravel().tolist()
        if all(type(value) is bytes for value in values):
            target.dtype = types_pb2.DT_STRING
            _set_shape(target, array.shape)
            target.string_val.extend(values)
            return
    target.CopyFrom(tf.make_tensor_proto(array))


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
    elif proto.tensor_content and _LITTLE_ENDIAN_HOST:
        dtype = _RAW_DTYPE_BY_ENUM.get(proto.dtype)  # None: TensorFlow's function decides
        if dtype is not None and len(proto.tensor_content) == count * dtype.itemsize:
            return np.frombuffer(proto.tensor_content, dtype=dtype).reshape(shape).copy()
    return tf.make_ndarray(proto)
