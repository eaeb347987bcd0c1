"""The REST API contract: TensorFlow Serving's documented requests, responses and errors."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from serving import testing


def b64(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def error_of(body) -> str:
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"], body
    return body["error"]


# -- status and metadata ------------------------------------------------------------------

def test_status_lists_the_available_version(rest, endpoint):
    status, body = rest.get(rest.model_path())
    assert status == 200, body
    by_version = {int(entry["version"]): entry for entry in body["model_version_status"]}
    assert by_version[endpoint.version]["state"] == "AVAILABLE"
    assert by_version[endpoint.version]["status"]["error_code"] == "OK"


def test_status_of_one_version(rest, endpoint):
    status, body = rest.get(rest.model_path(f"/versions/{endpoint.version}"))
    assert status == 200, body
    assert [entry["version"] for entry in body["model_version_status"]] == [str(endpoint.version)]


def test_metadata_describes_every_signature(rest, endpoint):
    status, body = rest.get(rest.model_path("/metadata"))
    assert status == 200, body
    assert body["model_spec"]["name"] == endpoint.model
    assert body["model_spec"]["version"] == str(endpoint.version)
    signatures = body["metadata"]["signature_def"]["signature_def"]
    default = signatures["serving_default"]
    assert default["method_name"] == "tensorflow/serving/predict"
    assert default["inputs"]["examples"]["dtype"] == "DT_STRING"
    assert set(default["outputs"]) == {"score", "count"}
    assert signatures["raw"]["inputs"]["ids"]["dtype"] == "DT_INT64"
    assert len(signatures["raw"]["inputs"]["ids"]["tensor_shape"]["dim"]) == 2
    assert signatures["classify"]["method_name"] == "tensorflow/serving/classify"
    assert signatures["regress"]["method_name"] == "tensorflow/serving/regress"


# -- predict ----------------------------------------------------------------------------------

X, N = [1.5, -1.0, 0.25], [2, 0, 7]
EXAMPLES = [testing.make_example(x, n) for x, n in zip(X, N)]


def test_predict_row_format_of_b64_examples(rest):
    status, body = rest.post(rest.model_path(":predict"),
                             {"instances": [b64(example) for example in EXAMPLES]})
    assert status == 200, body
    predictions = body["predictions"]
    assert len(predictions) == len(X)
    np.testing.assert_allclose([row["score"] for row in predictions], testing.contract_score(X, N))
    assert [row["count"] for row in predictions] == testing.contract_count(N).tolist()


def test_predict_columnar_format_of_b64_examples(rest):
    status, body = rest.post(rest.model_path(":predict"), {
        "signature_name": "serving_default", "inputs": [b64(example) for example in EXAMPLES]})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["score"], testing.contract_score(X, N))
    assert body["outputs"]["count"] == testing.contract_count(N).tolist()


def test_predict_row_format_of_named_raw_inputs(rest):
    instances = [
        {"x": 1.0, "ids": [3, 4, -1], "tag": "café"},
        {"x": -2.0, "ids": [-1, -1, -1], "tag": b64(b"\x00\xffbin")},
    ]
    status, body = rest.post(rest.model_path(":predict"),
                             {"signature_name": "raw", "instances": instances})
    assert status == 200, body
    ids = [[3, 4, -1], [-1, -1, -1]]
    predictions = body["predictions"]
    np.testing.assert_allclose([row["total"] for row in predictions],
                               testing.contract_total([1.0, -2.0], ids))
    assert [row["id_count"] for row in predictions] == testing.contract_id_count(ids).tolist()
    # A string output named *_bytes comes back base64-encoded.
    assert [base64.b64decode(row["tag_bytes"]["b64"]) for row in predictions] == [
        "café".encode(), b"\x00\xffbin"]


def test_predict_columnar_format_of_named_raw_inputs(rest):
    ids = [[5, -1], [1, 2], [-1, -1]]
    status, body = rest.post(rest.model_path(":predict"), {
        "signature_name": "raw",
        "inputs": {"x": [0.5, 1.5, 2.5], "ids": ids, "tag": ["a", "b", "c"]}})
    assert status == 200, body
    np.testing.assert_allclose(body["outputs"]["total"],
                               testing.contract_total([0.5, 1.5, 2.5], ids))
    assert body["outputs"]["id_count"] == testing.contract_id_count(ids).tolist()


def test_predict_plain_values_for_a_single_input_signature(rest):
    status, rows = rest.post(rest.model_path(":predict"),
                             {"signature_name": "single", "instances": [1.0, 2.5, -4]})
    assert status == 200, rows
    np.testing.assert_allclose(rows["predictions"], testing.contract_single([1.0, 2.5, -4]))
    status, columns = rest.post(rest.model_path(":predict"),
                                {"signature_name": "single", "inputs": [1.0, 2.5, -4]})
    assert status == 200, columns
    assert columns["outputs"] == rows["predictions"]


def test_predict_on_an_explicit_version(rest, endpoint):
    status, body = rest.post(rest.model_path(f"/versions/{endpoint.version}:predict"),
                             {"signature_name": "single", "instances": [0.0]})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], [1.0])


# -- classify and regress ------------------------------------------------------------------

def test_classify_examples(rest):
    status, body = rest.post(rest.model_path(":classify"), {
        "signature_name": "classify", "examples": [{"x": 0.0}, {"x": 2.0, "n": 1}]})
    assert status == 200, body
    results = body["results"]
    assert [[label for label, _ in result] for result in results] == [
        list(testing.CONTRACT_CLASSES)] * 2
    positive = testing.contract_positive_probability([0.0, 2.0])
    np.testing.assert_allclose([[score for _, score in result] for result in results],
                               np.stack([1 - positive, positive], axis=1), rtol=1e-6)


def test_regress_examples_with_context(rest):
    status, body = rest.post(rest.model_path(":regress"), {
        "signature_name": "regress", "context": {"n": 3},
        "examples": [{"x": 1.0}, {"x": -0.5}, {"x": 2.0, "n": 0}]})
    assert status == 200, body
    np.testing.assert_allclose(body["results"], testing.contract_score([1.0, -0.5, 2.0], [3, 3, 0]))


# -- errors: the right code, a message, and the server keeps serving ------------------------

BAD_PREDICT_BODIES = {
    "malformed JSON": (b'{"instances": [1.0,', "JSON"),
    "empty body": (b"", "JSON"),
    "JSON that is not an object": (b"[1.0, 2.0]", None),
    "string for a float input": (b'{"signature_name": "single", "instances": ["a"]}', "float"),
    "float for an int64 input": (
        b'{"signature_name": "raw", "inputs": {"x": [1.0], "ids": [[1.5]], "tag": ["a"]}}', None),
    "ragged instances": (b'{"signature_name": "single", "instances": [[1.0], [2.0, 3.0]]}', None),
    "rank-1 value for a rank-2 input": (
        b'{"signature_name": "raw", "inputs": {"x": [1.0], "ids": [1, 2], "tag": ["a"]}}', None),
    "missing named input": (
        b'{"signature_name": "raw", "inputs": {"x": [1.0], "ids": [[1]]}}', "tag"),
    "both inputs and instances": (
        b'{"signature_name": "single", "inputs": [1.0], "instances": [1.0]}', None),
    "neither inputs nor instances": (b'{"signature_name": "single"}', None),
    "plain list for a multi-input signature": (
        b'{"signature_name": "raw", "instances": [1.0]}', None),
    "unknown signature": (b'{"signature_name": "no_such_signature", "instances": [1.0]}',
                          "no_such_signature"),
    "non-string signature_name": (b'{"signature_name": 7, "instances": [1.0]}', "signature_name"),
    "invalid base64": (b'{"instances": [{"b64": "%%%"}]}', None),
    # RapidJSON refuses a number beyond a double; Python's json would make it inf.
    "number too big for a double": (b'{"signature_name": "single", "instances": [1e400]}',
                                    None),
    # Undecodable bytes where a serialized tf.Example is expected: TF's parse error, not a
    # codec error about the error message.
    "bytes that are not a tf.Example": (b'{"instances": [{"b64": "//4AZ2FyYmFnZQ=="}]}',
                                        "Could not parse example input"),
}


@pytest.mark.parametrize("raw, expected_words", BAD_PREDICT_BODIES.values(),
                         ids=BAD_PREDICT_BODIES.keys())
def test_bad_predict_request_is_400(rest, still_serving, raw, expected_words):
    status, body = rest.post(rest.model_path(":predict"), raw=raw)
    assert status == 400, body
    message = error_of(body)
    if expected_words:
        assert expected_words in message
    still_serving()


def test_bad_predict_messages_name_the_problem(rest, endpoint):
    if not endpoint.own_server:
        pytest.skip("exact wording is this server's")
    _, body = rest.post(rest.model_path(":predict"), raw=BAD_PREDICT_BODIES[
        "rank-1 value for a rank-2 input"][0])
    assert "ids" in error_of(body) and "[?,?]" in body["error"]
    _, body = rest.post(rest.model_path(":predict"), raw=BAD_PREDICT_BODIES[
        "float for an int64 input"][0])
    assert "ids" in error_of(body) and "int64" in body["error"]


@pytest.mark.parametrize("path_suffix, status_code, expected_words", [
    ("/versions/987654:predict", 404, None),
    ("/labels/no_such_label:predict", 400, "no_such_label"),
], ids=["unknown version", "unknown label"])
def test_unknown_version_or_label(rest, still_serving, path_suffix, status_code, expected_words):
    status, body = rest.post(rest.model_path(path_suffix),
                             {"signature_name": "single", "instances": [1.0]})
    assert status == status_code, body
    message = error_of(body)
    if expected_words:
        assert expected_words in message
    still_serving()


def test_unknown_model_is_404_everywhere(rest, still_serving):
    for method, path, body in [
        ("POST", "/v1/models/no_such_model:predict", {"instances": [1.0]}),
        ("GET", "/v1/models/no_such_model", None),
        ("GET", "/v1/models/no_such_model/metadata", None),
    ]:
        status, answer = rest.call(method, path, body)
        assert status == 404, (path, answer)
        assert "no_such_model" in error_of(answer)
    still_serving()


def test_status_of_an_unknown_version_is_404(rest):
    status, body = rest.get(rest.model_path("/versions/987654"))
    assert status == 404, body
    assert "987654" in error_of(body)


def test_malformed_paths_are_400(rest, still_serving):
    for method, path in [("POST", "/v1/models/x/versions/abc:predict"),
                         ("POST", "/v1/models:predict"),
                         ("GET", "/v1/models/x:predict"),
                         ("POST", "/v1/models/x:explain")]:
        status, body = rest.call(method, path, {"instances": [1.0]})
        assert status == 400, (method, path, body)
        error_of(body)
    still_serving()


def test_classify_on_a_predict_signature_is_400(rest, still_serving):
    status, body = rest.post(rest.model_path(":classify"),
                             {"signature_name": "serving_default", "examples": [{"x": 1.0}]})
    assert status == 400, body
    assert "classif" in error_of(body)
    still_serving()


def test_classify_with_mixed_feature_types_is_400(rest, still_serving):
    status, body = rest.post(rest.model_path(":classify"),
                             {"signature_name": "classify", "examples": [{"x": [1.0, "a"]}]})
    assert status == 400, body
    assert "feature" in error_of(body)
    still_serving()


def test_oversized_body_is_refused(rest, endpoint, still_serving):
    if endpoint.max_request_bytes is None:
        pytest.skip("the server's request limit is unknown (set POSO_SERVING_MAX_REQUEST_BYTES)")
    padding = "a" * (endpoint.max_request_bytes + 1024)
    status, body = rest.post(rest.model_path(":predict"),
                             {"signature_name": "single", "instances": [1.0], "pad": padding})
    assert status in (413, 400), body
    if endpoint.own_server:
        assert status == 413
        assert str(endpoint.max_request_bytes) in error_of(body)
    still_serving()
