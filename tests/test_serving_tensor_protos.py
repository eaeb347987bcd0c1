"""TensorProto conversion (serving/tensor_protos.py) agrees with TensorFlow's own functions on
every path, fast or not; the server's Session signatures agree with the loaded SavedModel's."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow.core.protobuf import saved_model_pb2

from serving import servable as servable_lib
from serving import errors, tensor_protos, testing

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


def _written(array, as_field: bool = False) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto()
    if as_field:
        tensor_protos.fill_tensor_proto_field(proto, array)
    else:
        tensor_protos.fill_tensor_proto(proto, array)
    return proto


def _same(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype
    assert actual.tolist() == expected.tolist()


@pytest.mark.parametrize("as_field", [False, True], ids=["content", "field"])
@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_written_protos_read_back_by_tensorflow(name, as_field):
    array = ARRAYS[name]
    proto = _written(array, as_field)
    if as_field and array.dtype != object:
        # TensorFlow itself misreads a big-endian array: compare with the native one's.
        array = array.astype(array.dtype.newbyteorder("="))
    expected = tf.make_ndarray(tf.make_tensor_proto(array))
    _same(tf.make_ndarray(proto), expected)
    _same(tensor_protos.make_ndarray(proto), expected)


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_tensorflow_protos_read_like_tensorflow(name):
    proto = tf.make_tensor_proto(ARRAYS[name])
    _same(tensor_protos.make_ndarray(proto), tf.make_ndarray(proto))


def test_requests_are_written_as_tensorflow_writes_them():
    numbers = _written(np.array([1.5, 2.5], dtype=np.float32))
    assert numbers.dtype == types_pb2.DT_FLOAT and numbers.tensor_content and not numbers.float_val
    assert numbers == tf.make_tensor_proto(np.array([1.5, 2.5], dtype=np.float32))
    strings = _written(np.array([b"a", b"b"], dtype=object))
    assert strings.dtype == types_pb2.DT_STRING and list(strings.string_val) == [b"a", b"b"]


@pytest.mark.parametrize("array, field, values", [
    (np.array([[1.5], [2.5]], np.float32), "float_val", [1.5, 2.5]),
    (np.array([2.5], np.float64), "double_val", [2.5]),
    (np.array([3, -(2**40)], np.int64), "int64_val", [3, -(2**40)]),
    (np.array([7, -8], np.int32), "int_val", [7, -8]),
    (np.array([1, 256], ">i4"), "int_val", [1, 256]),
    (np.array([255], np.uint8), "int_val", [255]),
    (np.array([2**63], np.uint64), "uint64_val", [2**63]),
    (np.array([True, False]), "bool_val", [True, False]),
    (np.array([1.0], np.float16), "half_val", [0x3C00]),
    (np.array([1 + 2j], np.complex64), "scomplex_val", [1.0, 2.0]),
    (np.array([b"a", b"\xff"], object), "string_val", [b"a", b"\xff"]),
    (np.array(["caf\u00e9"], object), "string_val", ["caf\u00e9".encode()]),
])
def test_answers_fill_the_typed_field_as_tf_serving_does(array, field, values):
    # Tensor::AsProtoField: every element in the dtype's own repeated field, no
    # tensor_content, so that clients can read e.g. outputs["y"].float_val.
    proto = _written(array, as_field=True)
    assert list(getattr(proto, field)) == values
    assert not proto.tensor_content
    assert [dim.size for dim in proto.tensor_shape.dim] == list(array.shape)
    assert proto.dtype == tf.as_dtype(array.dtype.newbyteorder("=")).as_datatype_enum \
        if array.dtype != object else proto.dtype == types_pb2.DT_STRING


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


def test_session_signatures_equal_the_loaded_functions_and_share_their_state(tmp_path):
    export_dir = testing.export_scaled_model(str(tmp_path / "model"), scale=3)
    meta_graph = servable_lib.read_serve_meta_graph(export_dir)
    session = servable_lib.SessionSignatures(export_dir, meta_graph)
    # The init op's SignatureDef is in the file (and in GetModelMetadata), not a signature.
    assert "__saved_model_init_op" in meta_graph.signature_def
    assert session.names == ["calls", "serving_default"]
    x = np.array([1.0, 2.0], dtype=np.float32)
    loaded = tf.saved_model.load(export_dir)
    np.testing.assert_array_equal(
        session.run("serving_default", {"x": x})["y"],
        loaded.signatures["serving_default"](x=tf.constant(x))["y"].numpy())
    # Both signatures run in one Session: a call is counted by the model's own variable.
    before = int(session.run("calls", {})["calls"])
    session.run("serving_default", {"x": x})
    assert int(session.run("calls", {})["calls"]) == before + 1


def test_a_signature_naming_a_missing_tensor_is_left_out_with_its_reason(tmp_path, caplog):
    export_dir = testing.export_scaled_model(str(tmp_path / "model"), scale=3)
    saved_model = saved_model_pb2.SavedModel()
    path = tmp_path / "model" / "saved_model.pb"
    saved_model.ParseFromString(path.read_bytes())
    saved_model.meta_graphs[0].signature_def["serving_default"].outputs["y"].name = "nowhere:0"
    path.write_bytes(saved_model.SerializeToString())
    with caplog.at_level(logging.WARNING, logger=servable_lib.__name__):
        session = servable_lib.SessionSignatures(export_dir,
                                                 servable_lib.read_serve_meta_graph(export_dir))
    assert session.names == ["calls"]  # the other signature is still served
    assert session.unusable["serving_default"].startswith(
        "output 'y' names a tensor the graph does not have")
    assert "signature 'serving_default' cannot be run and is not served" in caplog.text

    # A load that fails inside TensorFlow's loader leaves TensorFlow's logging as it was.
    filters = list(tf.get_logger().filters)
    shutil.rmtree(tmp_path / "model" / "variables")
    with pytest.raises(Exception):
        servable_lib.SessionSignatures(export_dir, servable_lib.read_serve_meta_graph(export_dir))
    assert tf.get_logger().filters == filters


def _export_tf1_model(export_dir: str, with_dense_signature: bool = True) -> str:
    """A TF1 SavedModel: serving_default(x) -> {y: 2x, x: x passed through}, and a signature
    with a sparse input, which a Session callable cannot feed."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        x = v1.placeholder(tf.float32, [None], name="x")
        ids = v1.sparse.placeholder(tf.int64, name="ids")
        signatures = {"sparse": v1.saved_model.build_signature_def(
            inputs={"ids": v1.saved_model.build_tensor_info(ids)},
            outputs={"total": v1.saved_model.build_tensor_info(tf.sparse.reduce_sum(ids))},
            method_name=servable_lib.PREDICT_METHOD)}
        if with_dense_signature:
            signatures["serving_default"] = v1.saved_model.predict_signature_def(
                {"x": x}, {"y": 2.0 * x, "x": x})
        with v1.Session(graph=graph) as session:
            builder = v1.saved_model.Builder(export_dir)
            builder.add_meta_graph_and_variables(session, [tf.saved_model.SERVING],
                                                 signature_def_map=signatures)
            builder.save()
    return export_dir


def test_a_signature_that_cannot_be_run_is_refused_alone_and_pass_throughs_are_answered(
        tmp_path):
    export_dir = _export_tf1_model(str(tmp_path / "model"))
    served = servable_lib.SavedModelServable.load("m", 1, export_dir)
    outputs = served.run("serving_default", {"x": np.array([1.5, -2.0], dtype=np.float32)})
    np.testing.assert_array_equal(outputs["y"], [3.0, -4.0])
    np.testing.assert_array_equal(outputs["x"], [1.5, -2.0])  # fed and fetched: the input
    with pytest.raises(errors.ServingError, match="signature 'sparse' of model m version 1 "
                                                  "cannot be run: input 'ids' is not a dense"):
        served.signature("sparse")
    assert "sparse" in served.signature_defs  # still reported by GetModelMetadata
    with pytest.raises(ValueError, match="no serving signatures that can be run.*sparse: input"):
        servable_lib.SavedModelServable.load(
            "m", 2, _export_tf1_model(str(tmp_path / "sparse_only"), with_dense_signature=False))
