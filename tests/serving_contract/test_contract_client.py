"""serving.client against the contract model, over both protocols."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tensorflow as tf

from feature_specs import SEQUENCE_PADDING_VALUE
from serving import client, testing

X, N = [0.75, -1.5], [3, 0]
EXAMPLES = [testing.make_example(x, n) for x, n in zip(X, N)]


def call(protocol, endpoint, *args, **kwargs):
    if protocol == "grpc":
        return client.predict_grpc(endpoint.grpc_address, endpoint.model, *args, **kwargs)
    return client.predict_rest(endpoint.rest_url, endpoint.model, *args, **kwargs)


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_predict_serialized_examples(protocol, endpoint):
    outputs = call(protocol, endpoint, EXAMPLES)
    assert set(outputs) == {"score", "count"}
    assert outputs["score"].dtype == np.float32 and outputs["count"].dtype == np.int64
    np.testing.assert_allclose(outputs["score"], testing.contract_score(X, N))
    np.testing.assert_array_equal(outputs["count"], testing.contract_count(N))


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_predict_tf_example_messages(protocol, endpoint):
    messages = [tf.train.Example.FromString(example) for example in EXAMPLES]
    outputs = call(protocol, endpoint, messages, version=endpoint.version)
    np.testing.assert_allclose(outputs["score"], testing.contract_score(X, N))


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_predict_raw_features_pads_ragged_lists(protocol, endpoint):
    features = {"x": [1, 2.5], "ids": [[4, 5, 6], [7]], "tag": ["a", b"\x00b"]}
    outputs = call(protocol, endpoint, features, signature_name="raw")
    padded = [[4, 5, 6], [7, SEQUENCE_PADDING_VALUE, SEQUENCE_PADDING_VALUE]]
    np.testing.assert_allclose(outputs["total"], testing.contract_total([1, 2.5], padded))
    np.testing.assert_array_equal(outputs["id_count"], [3, 1])
    assert outputs["tag_bytes"].tolist() == [b"a", b"\x00b"]


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_single_output_signature(protocol, endpoint):
    outputs = call(protocol, endpoint, {"x": np.array([0.5, 1.0])}, signature_name="single")
    np.testing.assert_allclose(outputs["y"], testing.contract_single([0.5, 1.0]))


@pytest.mark.parametrize("protocol, code", [("grpc", "NOT_FOUND"), ("rest", "HTTP 404")])
def test_errors_carry_the_server_code(protocol, endpoint, code):
    with pytest.raises(client.ServingClientError) as caught:
        call(protocol, endpoint, EXAMPLES, version=987654)
    assert caught.value.code == code
    assert caught.value.message


def test_protocols_agree(endpoint):
    features = {"x": [0.1, 0.2, 0.3], "ids": [[1], [2, 3], []], "tag": ["u", "v", "w"]}
    over_grpc = call("grpc", endpoint, features, signature_name="raw")
    over_rest = call("rest", endpoint, features, signature_name="raw")
    assert set(over_grpc) == set(over_rest)
    for name in over_grpc:
        np.testing.assert_array_equal(over_grpc[name], over_rest[name])


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_row_format_instances_and_examples_keywords(protocol, endpoint):
    rows = [{"x": 1.0, "ids": [2, 3], "tag": "p"}, {"x": -1.0, "ids": [4], "tag": "q"}]
    by_rows = call(protocol, endpoint, instances=rows, signature_name="raw")
    padded = [[2, 3], [4, SEQUENCE_PADDING_VALUE]]
    np.testing.assert_allclose(by_rows["total"], testing.contract_total([1.0, -1.0], padded))
    by_examples = call(protocol, endpoint, examples=EXAMPLES)
    np.testing.assert_allclose(by_examples["score"], testing.contract_score(X, N))
    with pytest.raises(ValueError, match="exactly one"):
        call(protocol, endpoint, {"x": [1.0]}, examples=EXAMPLES)


def test_command_line(endpoint, tmp_path, capsys):
    records = tmp_path / "examples.tfrecord"
    with tf.io.TFRecordWriter(str(records)) as writer:
        for example in EXAMPLES:
            writer.write(example)
    assert client.main(["--grpc", endpoint.grpc_address, "--model", endpoint.model,
                        "--examples", str(records), "--format", "json"]) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"]
    np.testing.assert_allclose([row["score"] for row in printed], testing.contract_score(X, N))
    assert [row["count"] for row in printed] == testing.contract_count(N).tolist()

    assert client.main(["--rest", endpoint.rest_url, "--model", endpoint.model,
                        "--signature", "raw", "--format", "json", "--json",
                        '[{"x": 1, "ids": [1, 2], "tag": "t"}]']) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"]
    assert printed == [{"total": 4.0, "id_count": 2, "tag_bytes": "t"}]

    # A single-input signature takes bare values, as TF Serving's row format does.
    assert client.main(["--grpc", endpoint.grpc_address, "--model", endpoint.model,
                        "--format", "json", "--json",
                        '{"signature_name": "single", "instances": [0.5, 2.0]}']) == 0
    printed = json.loads(capsys.readouterr().out)["predictions"]
    np.testing.assert_allclose([row["y"] for row in printed], testing.contract_single([0.5, 2.0]))

    assert client.main(["--grpc", endpoint.grpc_address, "--model", "no_such_model",
                        "--json", '{"inputs": {"x": [1.0]}}', "--signature", "single"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
