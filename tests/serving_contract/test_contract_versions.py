"""Version labels and policies through HandleReloadConfigRequest, as tensorflow_model_server
has them: a label naming a version that is not AVAILABLE is refused with FAILED_PRECONDITION
(the config is kept), and a `specific` policy naming only an absent version unloads the one
serving (the availability-preserving policy unloads when nothing is aspired). The suite's
single-model config is restored after each test."""

from __future__ import annotations

import time

import grpc
import pytest
from tensorflow_serving.apis import get_model_status_pb2, model_management_pb2

ABSENT_VERSION = 987654
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE


@pytest.fixture
def reload(endpoint, model_stub):
    """reload(extra text-format ModelConfig fields) -> the call; restores the plain config."""
    if not endpoint.base_path:
        pytest.skip("the model's base path is unknown (set POSO_SERVING_MODEL_BASE_PATH)")

    def call(extra: str = ""):
        from google.protobuf import text_format

        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(f'model_config_list {{ config {{ name: "{endpoint.model}" '
                          f'base_path: "{endpoint.base_path}" model_platform: "tensorflow" '
                          f'{extra} }} }}', request.config)
        return model_stub.HandleReloadConfigRequest(request, timeout=60)

    yield call
    call()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and status_of(endpoint, model_stub) != AVAILABLE:
        time.sleep(0.2)
    assert status_of(endpoint, model_stub) == AVAILABLE


def status_of(endpoint, model_stub):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.version.value = endpoint.version
    try:
        response = model_stub.GetModelStatus(request, timeout=30)
    except grpc.RpcError:
        return None
    return response.model_version_status[0].state


def test_a_label_on_a_version_not_loaded_is_failed_precondition(reload, endpoint, model_stub,
                                                               still_serving):
    with pytest.raises(grpc.RpcError) as caught:
        reload(f'version_labels {{ key: "canary" value: {ABSENT_VERSION} }}')
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "not currently available" in caught.value.details()
    assert status_of(endpoint, model_stub) == AVAILABLE
    still_serving()
    reload(f'version_labels {{ key: "stable" value: {endpoint.version} }}')  # a loaded one


def test_a_specific_policy_naming_only_an_absent_version_unloads_the_served_one(
        reload, endpoint, model_stub):
    reload(f"model_version_policy {{ specific {{ versions: {ABSENT_VERSION} }} }}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and status_of(endpoint, model_stub) == AVAILABLE:
        time.sleep(0.2)
    assert status_of(endpoint, model_stub) != AVAILABLE
