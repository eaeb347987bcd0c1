"""TensorProto conversion (serving/tensor_protos.py) and the server's direct signature call
agree with TensorFlow's own functions on every path, fast or not."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from serving import servable as servable_lib
from serving import tensor_protos, testing

ARRAYS = {
    "float32 matrix": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "int64 column": np.array([[3], [-(2**40)]], dtype=np.int64),
    "empty int64": np.zeros([0, 4], dtype=np.int64),
    "bool": np.array([True, False, True]),
    "float64 scalar": np.array(2.5),
    "big-endian int32": np.array([1, 256], dtype=">i4"),
    "bytes objects": np.array([b"a", b"\x00\xff", b""], dtype=object),
    "bytes matrix": np.array([[b"x", b"y"], [b"z", b"w"]], dtype=object),
    "numpy bytes": np.array([b"ab", b"c"], dtype="S2"),
    "str objects": np.array(["caf\u00e9", "b"], dtype=object),
    "float16": np.array([0.5, -1.0], dtype=np.float16),
}


def _written(array) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto()
    tensor_protos.fill_tensor_proto(proto, array)
    return proto


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_written_protos_read_back_by_tensorflow(name):
    array = ARRAYS[name]
    proto = _written(array)
    _same(tf.make_ndarray(proto), tf.make_ndarray(tf.make_tensor_proto(array)))


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_tensorflow_protos_read_like_tensorflow(name):
    proto = tf.make_tensor_proto(ARRAYS[name])
    _same(tensor_protos.make_ndarray(proto), tf.make_ndarray(proto))


def test_fast_paths_write_what_tf_serving_answers_with():
    numbers = _written(np.array([1.5, 2.5], dtype=np.float32))
    assert numbers.dtype == types_pb2.DT_FLOAT and numbers.tensor_content and not numbers.float_val
    strings = _written(np.array([b"a", b"b"], dtype=object))
    assert strings.dtype == types_pb2.DT_STRING and list(strings.string_val) == [b"a", b"b"]


def test_repeated_value_protos_are_expanded():
    # A client may send one float_val for a [3] tensor (TensorFlow fills the rest with it).
    proto = tf.make_tensor_proto(1.25, dtype=tf.float32, shape=[3])
    _same(tensor_protos.make_ndarray(proto), np.full([3], 1.25, dtype=np.float32))
    strings = tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, string_val=[b"s"])
    strings.tensor_shape.dim.add(size=2)
    assert tensor_protos.make_ndarray(strings).tolist() == tf.make_ndarray(strings).tolist()


def test_arrays_read_are_writable_copies():
    proto = _written(np.array([1, 2], dtype=np.int32))
    array = tensor_protos.make_ndarray(proto)
    array[0] = 7
    assert tensor_protos.make_ndarray(proto).tolist() == [1, 2]


def test_content_of_the_wrong_length_is_refused():
    proto = _written(np.array([1.0, 2.0], dtype=np.float32))
    proto.tensor_shape.dim[0].size = 3
    with pytest.raises(Exception, match="size|reshape|elements"):
        tensor_protos.make_ndarray(proto)


def test_direct_signature_call_equals_the_loaded_signature_and_shares_its_state(tmp_path):
    export_dir = testing.export_scaled_model(str(tmp_path / "model"), scale=3)
    loaded = tf.saved_model.load(export_dir)
    predict = servable_lib.fast_signature_call("serving_default",
                                               loaded.signatures["serving_default"])
    assert predict is not loaded.signatures["serving_default"]
    calls = loaded.signatures["calls"]
    before = int(calls()["calls"].numpy())
    x = tf.constant([1.0, 2.0], dtype=tf.float32)
    np.testing.assert_array_equal(predict(x=x)["y"].numpy(), [3.0, 6.0])
    # The traced call updates the loaded model's own variables, as the loaded call does.
    assert int(calls()["calls"].numpy()) == before + 1
    np.testing.assert_array_equal(loaded.signatures["serving_default"](x=x)["y"].numpy(),
                                  [3.0, 6.0])

def test_a_signature_that_cannot_be_traced_is_called_as_loaded(caplog):
    def untraceable(**inputs):
        return inputs

    with caplog.at_level(logging.WARNING, logger=servable_lib.__name__):
        assert servable_lib.fast_signature_call("odd", untraceable) is untraceable
    assert "signature 'odd' is called as loaded" in caplog.text
