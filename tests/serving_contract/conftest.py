"""Fixtures of the serving contract suite.

The suite checks the TensorFlow Serving API contract our clients rely on. By default it
exports the contract model (`serving.testing.export_contract_model`) and starts this
project's server on 127.0.0.1 with free ports. To run the same tests against another server,
e.g. a real tensorflow/serving, export the model there as version 1:

    python -m serving.testing /models/contract/1
    docker run -p 8500:8500 -p 8501:8501 -v /models/contract:/models/contract \
        -e MODEL_NAME=contract tensorflow/serving

and set:

    POSO_SERVING_GRPC=127.0.0.1:8500  POSO_SERVING_REST=http://127.0.0.1:8501
    POSO_SERVING_MODEL=contract
    POSO_SERVING_MAX_REQUEST_BYTES=N   (optional: that server's request limit; without it
                                        the oversized-request tests are skipped)
    POSO_SERVING_METRICS_PATH=/monitoring/prometheus/metrics
                                       (optional: the server runs with a
                                        --monitoring_config_file enabling Prometheus at this
                                        path; without it the metrics test is skipped)
    POSO_SERVING_MODEL_BASE_PATH=/models/contract
                                       (optional: the model's base path as that server sees
                                        it; the config-reload tests need it, and restore a
                                        single-model config of it when done)

Checks of our server's exact error wording are skipped against another server; status
codes and the JSON error format are checked for both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.error
import urllib.request
from typing import Any, Optional, Tuple

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from serving import testing

GRPC_ENV = "POSO_SERVING_GRPC"
REST_ENV = "POSO_SERVING_REST"
MODEL_ENV = "POSO_SERVING_MODEL"
MAX_REQUEST_BYTES_ENV = "POSO_SERVING_MAX_REQUEST_BYTES"
METRICS_PATH_ENV = "POSO_SERVING_METRICS_PATH"
BASE_PATH_ENV = "POSO_SERVING_MODEL_BASE_PATH"
OWN_SERVER_MAX_REQUEST_BYTES = 1 << 20
CONTRACT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Endpoint:
    grpc_address: str
    rest_url: str
    model: str
    version: int
    max_request_bytes: Optional[int]
    own_server: bool  # this project's server: its exact messages may be checked
    metrics_path: Optional[str] = None  # Prometheus metrics on the REST port
    base_path: Optional[str] = None  # the model's base path, as the server sees it


@pytest.fixture(scope="session")
def endpoint(tmp_path_factory) -> Endpoint:
    grpc_address, rest_url = os.environ.get(GRPC_ENV), os.environ.get(REST_ENV)
    if grpc_address or rest_url:
        if not (grpc_address and rest_url and os.environ.get(MODEL_ENV)):
            pytest.fail(f"set all of {GRPC_ENV}, {REST_ENV} and {MODEL_ENV}, or none")
        limit = os.environ.get(MAX_REQUEST_BYTES_ENV)
        yield Endpoint(grpc_address, rest_url.rstrip("/"), os.environ[MODEL_ENV],
                       CONTRACT_VERSION, int(limit) if limit else None, own_server=False,
                       metrics_path=os.environ.get(METRICS_PATH_ENV),
                       base_path=os.environ.get(BASE_PATH_ENV))
        return
    from serving import metrics, server as server_lib

    base = tmp_path_factory.mktemp("contract_models") / "contract"
    testing.export_contract_model(str(base / str(CONTRACT_VERSION)))
    server = server_lib.start_server(
        str(base), "contract", grpc_port=0, rest_port=0,
        max_request_bytes=OWN_SERVER_MAX_REQUEST_BYTES, file_system_poll_wait_s=0,
        monitoring_path=metrics.DEFAULT_PATH)
    try:
        yield Endpoint(server.grpc_address, server.rest_url, "contract", CONTRACT_VERSION,
                       OWN_SERVER_MAX_REQUEST_BYTES, own_server=True,
                       metrics_path=metrics.DEFAULT_PATH, base_path=str(base))
    finally:
        server.stop(grace_s=1.0)


@pytest.fixture(scope="session")
def channel(endpoint):
    with grpc.insecure_channel(endpoint.grpc_address) as grpc_channel:
        yield grpc_channel


@pytest.fixture(scope="session")
def prediction_stub(channel):
    return prediction_service_pb2_grpc.PredictionServiceStub(channel)


@pytest.fixture(scope="session")
def model_stub(channel):
    return model_service_pb2_grpc.ModelServiceStub(channel)


class Rest:
    """Bare HTTP calls: (status, decoded JSON or None) — no client library in between."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint

    def call(self, method: str, path: str, body: Any = None,
             raw: Optional[bytes] = None) -> Tuple[int, Any]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.endpoint.rest_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                status, text = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read()
        try:
            return status, json.loads(text)
        except ValueError:
            return status, None

    def get(self, path: str) -> Tuple[int, Any]:
        return self.call("GET", path)

    def post(self, path: str, body: Any = None, raw: Optional[bytes] = None) -> Tuple[int, Any]:
        return self.call("POST", path, body, raw)

    def model_path(self, suffix: str = "") -> str:
        return f"/v1/models/{self.endpoint.model}{suffix}"


@pytest.fixture(scope="session")
def rest(endpoint) -> Rest:
    return Rest(endpoint)


@pytest.fixture(scope="session")
def still_serving(rest, prediction_stub, endpoint):
    """Call after provoking an error: a good REST and a good gRPC request both succeed."""
    return lambda: _assert_still_serving(rest, prediction_stub, endpoint)


def _assert_still_serving(rest: Rest, prediction_stub, endpoint: Endpoint) -> None:
    status, body = rest.post(rest.model_path(":predict"),
                             {"signature_name": "single", "instances": [1.0, 2.0]})
    assert status == 200, body
    np.testing.assert_allclose(body["predictions"], testing.contract_single([1.0, 2.0]))
    request = predict_pb2.PredictRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = "single"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([3.0], np.float32)))
    response = prediction_stub.Predict(request, timeout=30)
    np.testing.assert_allclose(tf.make_ndarray(response.outputs["y"]),
                               testing.contract_single([3.0]))
