"""The gRPC API contract: PredictionService and ModelService, their answers and status codes."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, inference_pb2, predict_pb2,
                                     regression_pb2)

from serving import testing

X, N = [0.5, -2.0, 3.0], [1, 4, 0]
EXAMPLES = [testing.make_example(x, n) for x, n in zip(X, N)]


def predict_request(endpoint, signature_name="serving_default", version=None, **inputs):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = signature_name
    if version is not None:
        request.model_spec.version.value = version
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
    return request


def examples_input(request, examples, context=None):
    if context is None:
        for example in examples:
            request.input.example_list.examples.add().ParseFromString(example)
    else:
        request.input.example_list_with_context.context.ParseFromString(context)
        for example in examples:
            request.input.example_list_with_context.examples.add().ParseFromString(example)
    return request


def raises_code(code, call, *args):
    with pytest.raises(grpc.RpcError) as caught:
        call(*args, timeout=30)
    assert caught.value.code() == code, caught.value.details()
    assert caught.value.details()
    return caught.value.details()


# -- Predict ------------------------------------------------------------------------------

def test_predict_serialized_examples(prediction_stub, endpoint):
    response = prediction_stub.Predict(predict_request(
        endpoint, examples=np.array(EXAMPLES, dtype=object)), timeout=30)
    assert response.model_spec.name == endpoint.model
    assert response.model_spec.version.value == endpoint.version
    assert response.model_spec.signature_name == "serving_default"
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["score"]),
                               testing.contract_score(X, N))
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["count"]),
                                  testing.contract_count(N))


def test_predict_answers_in_typed_fields(prediction_stub, endpoint):
    # TF Serving answers with Tensor::AsProtoField: its example clients (mnist_client.py,
    # resnet_client_grpc.py) read outputs[...].float_val directly, not tensor_content.
    response = prediction_stub.Predict(predict_request(
        endpoint, examples=np.array(EXAMPLES, dtype=object)), timeout=30)
    score, count = response.outputs["score"], response.outputs["count"]
    np.testing.assert_allclose(score.float_val, testing.contract_score(X, N))
    assert list(count.int64_val) == testing.contract_count(N).tolist()
    assert not score.tensor_content and not count.tensor_content
    assert [dim.size for dim in score.tensor_shape.dim] == [len(X)]
    raw = prediction_stub.Predict(predict_request(
        endpoint, "raw", x=np.array([1.0], np.float32), ids=np.array([[2, -1]], np.int64),
        tag=np.array([b"\x00\xff"], dtype=object)), timeout=30)
    assert list(raw.outputs["id_count"].int64_val) == [1]
    assert list(raw.outputs["tag_bytes"].string_val) == [b"\x00\xff"]
    np.testing.assert_allclose(raw.outputs["total"].float_val, [3.0])


def test_predict_default_signature_when_unnamed(prediction_stub, endpoint):
    request = predict_request(endpoint, signature_name="", examples=np.array(EXAMPLES, object))
    response = prediction_stub.Predict(request, timeout=30)
    assert set(response.outputs) == {"score", "count"}


def test_predict_output_filter(prediction_stub, endpoint):
    request = predict_request(endpoint, examples=np.array(EXAMPLES, dtype=object))
    request.output_filter.append("count")
    response = prediction_stub.Predict(request, timeout=30)
    assert set(response.outputs) == {"count"}


def test_predict_raw_inputs(prediction_stub, endpoint):
    ids = np.array([[1, 2, -1], [-1, -1, -1]], np.int64)
    response = prediction_stub.Predict(predict_request(
        endpoint, "raw", x=np.array([1.0, 0.5], np.float32), ids=ids,
        tag=np.array([b"a", b"\x00\xff"], dtype=object)), timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["total"]),
                               testing.contract_total([1.0, 0.5], ids))
    np.testing.assert_array_equal(tf.make_ndarray(response.outputs["id_count"]),
                                  testing.contract_id_count(ids))
    assert tf.make_ndarray(response.outputs["tag_bytes"]).tolist() == [b"a", b"\x00\xff"]


# -- Classify, Regress, MultiInference ---------------------------------------------------------

def test_classify(prediction_stub, endpoint):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = "classify"
    response = prediction_stub.Classify(examples_input(request, EXAMPLES), timeout=30)
    assert response.model_spec.version.value == endpoint.version
    positive = testing.contract_positive_probability(X)
    classifications = response.result.classifications
    assert len(classifications) == len(X)
    for row, item in enumerate(classifications):
        assert [entry.label for entry in item.classes] == list(testing.CONTRACT_CLASSES)
        np.testing.assert_allclose([entry.score for entry in item.classes],
                                   [1 - positive[row], positive[row]], rtol=1e-6)


def test_regress_with_context(prediction_stub, endpoint):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = "regress"
    context = testing.make_example(0.0, 5)
    own = [tf.train.Example.FromString(e) for e in EXAMPLES]
    for example in own:  # the examples carry x only; n comes from the context
        del example.features.feature["n"]
    response = prediction_stub.Regress(
        examples_input(request, [e.SerializeToString() for e in own], context=context),
        timeout=30)
    np.testing.assert_allclose([r.value for r in response.result.regressions],
                               testing.contract_score(X, [5] * len(X)))


def test_multi_inference(prediction_stub, endpoint):
    request = inference_pb2.MultiInferenceRequest()
    for signature, method in [("classify", "tensorflow/serving/classify"),
                              ("regress", "tensorflow/serving/regress")]:
        task = request.tasks.add()
        task.model_spec.name = endpoint.model
        task.model_spec.signature_name = signature
        task.method_name = method
    examples_input(request, EXAMPLES)
    response = prediction_stub.MultiInference(request, timeout=30)
    assert len(response.results) == 2
    np.testing.assert_allclose([r.value for r in response.results[1].regression_result.regressions],
                               testing.contract_score(X, N))
    assert len(response.results[0].classification_result.classifications) == len(X)


# -- metadata and status ----------------------------------------------------------------------

def test_model_metadata(prediction_stub, endpoint):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = endpoint.model
    request.metadata_field.append("signature_def")
    response = prediction_stub.GetModelMetadata(request, timeout=30)
    assert response.model_spec.version.value == endpoint.version
    signatures = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signatures)
    signature_defs = signatures.signature_def
    assert signature_defs["serving_default"].inputs["examples"].dtype == tf.string.as_datatype_enum
    assert signature_defs["classify"].method_name == "tensorflow/serving/classify"
    assert set(signature_defs["raw"].inputs) == {"x", "ids", "tag"}


def test_model_metadata_of_an_unsupported_field(prediction_stub, endpoint):
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = endpoint.model
    request.metadata_field.append("no_such_field")
    details = raises_code(grpc.StatusCode.INVALID_ARGUMENT, prediction_stub.GetModelMetadata,
                          request)
    assert "no_such_field" in details


def test_model_status(model_stub, endpoint):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = endpoint.model
    response = model_stub.GetModelStatus(request, timeout=30)
    states = {status.version: status for status in response.model_version_status}
    assert states[endpoint.version].state == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states[endpoint.version].status.error_code == 0


@pytest.mark.parametrize("name, version, words", [
    ("no_such_model", None, "no_such_model"),
    (None, 987654, "987654"),
])
def test_model_status_not_found(model_stub, endpoint, name, version, words):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = name or endpoint.model
    if version is not None:
        request.model_spec.version.value = version
    assert words in raises_code(grpc.StatusCode.NOT_FOUND, model_stub.GetModelStatus, request)


# -- errors ---------------------------------------------------------------------------------------

def test_unknown_model_and_version_are_not_found(prediction_stub, endpoint, still_serving):
    request = predict_request(endpoint, "single", x=np.array([1.0], np.float32))
    request.model_spec.name = "no_such_model"
    assert "no_such_model" in raises_code(grpc.StatusCode.NOT_FOUND, prediction_stub.Predict,
                                          request)
    request = predict_request(endpoint, "single", version=987654, x=np.array([1.0], np.float32))
    raises_code(grpc.StatusCode.NOT_FOUND, prediction_stub.Predict, request)
    still_serving()


def test_unknown_signature_is_refused(prediction_stub, endpoint, still_serving):
    request = predict_request(endpoint, "no_such_signature", x=np.array([1.0], np.float32))
    details = raises_code(grpc.StatusCode.FAILED_PRECONDITION, prediction_stub.Predict, request)
    assert "no_such_signature" in details
    still_serving()


BAD_INPUTS = {
    "wrong dtype": ("single", dict(x=np.array([1, 2], np.int64)), None),
    "wrong rank": ("raw", dict(x=np.array([1.0], np.float32), ids=np.array([1], np.int64),
                               tag=np.array([b"a"], object)), None),
    "missing input": ("raw", dict(x=np.array([1.0], np.float32),
                                  ids=np.array([[1]], np.int64)), "tag"),
    "unexpected input": ("single", dict(x=np.array([1.0], np.float32),
                                        z=np.array([1.0], np.float32)), "z"),
    "not a serialized example": ("serving_default", dict(
        examples=np.array([b"\xff\xfe not a proto"], object)), None),
}


@pytest.mark.parametrize("signature, inputs, words", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_inputs_are_invalid_argument(prediction_stub, endpoint, still_serving, signature,
                                         inputs, words):
    details = raises_code(grpc.StatusCode.INVALID_ARGUMENT, prediction_stub.Predict,
                          predict_request(endpoint, signature, **inputs))
    if words:
        assert words in details
    still_serving()


def test_bad_input_messages_name_the_input(prediction_stub, endpoint):
    if not endpoint.own_server:
        pytest.skip("exact wording is this server's")
    for name in ("wrong dtype", "wrong rank"):
        signature, inputs, _ = BAD_INPUTS[name]
        details = raises_code(grpc.StatusCode.INVALID_ARGUMENT, prediction_stub.Predict,
                              predict_request(endpoint, signature, **inputs))
        assert ("'x'" if name == "wrong dtype" else "'ids'") in details, details


def test_unknown_output_filter_is_invalid_argument(prediction_stub, endpoint):
    request = predict_request(endpoint, examples=np.array(EXAMPLES, dtype=object))
    request.output_filter.append("no_such_output")
    assert "no_such_output" in raises_code(grpc.StatusCode.INVALID_ARGUMENT,
                                           prediction_stub.Predict, request)


def test_classify_on_a_predict_signature_is_invalid_argument(prediction_stub, endpoint):
    request = classification_pb2.ClassificationRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = "serving_default"
    details = raises_code(grpc.StatusCode.INVALID_ARGUMENT, prediction_stub.Classify,
                          examples_input(request, EXAMPLES))
    assert "tensorflow/serving/classify" in details


def test_regress_without_examples_is_invalid_argument(prediction_stub, endpoint):
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = "regress"
    raises_code(grpc.StatusCode.INVALID_ARGUMENT, prediction_stub.Regress, request)


def test_oversized_message_is_resource_exhausted(prediction_stub, endpoint, still_serving):
    if endpoint.max_request_bytes is None:
        pytest.skip("the server's request limit is unknown (set POSO_SERVING_MAX_REQUEST_BYTES)")
    rows = endpoint.max_request_bytes // 4 + 1024
    request = predict_request(endpoint, "single", x=np.zeros(rows, np.float32))
    raises_code(grpc.StatusCode.RESOURCE_EXHAUSTED, prediction_stub.Predict, request)
    still_serving()


def test_bytes_that_are_not_a_tf_example_are_invalid_argument(prediction_stub, endpoint):
    request = predict_request(endpoint, examples=np.array([b"\xff\xfe\x00garbage"], object))
    details = raises_code(grpc.StatusCode.INVALID_ARGUMENT, prediction_stub.Predict, request)
    assert "Could not parse example input" in details
    assert "codec" not in details
