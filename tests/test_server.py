"""The model server's life cycle: version swaps, refusals, warm-up, policies, batching, shutdown."""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (get_model_status_pb2, model_management_pb2, model_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

import ranking_stub
from serving import batching as batching_lib
from serving import client, config as config_lib, errors, server as server_lib, testing, warmup
from serving.batching import BatchingOptions

REPO_ROOT = Path(__file__).resolve().parents[1]
AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
POLL_S = 0.1


@pytest.fixture(scope="module")
def scaled_exports(tmp_path_factory):
    """{scale: SavedModel dir} of y = scale * x models, exported once per module."""
    root = tmp_path_factory.mktemp("scaled_exports")
    return {scale: testing.export_scaled_model(str(root / f"scale_{scale}"), scale)
            for scale in (1, 2, 3)}


def install_version(base: Path, version: int, export_dir: str) -> Path:
    """Copies an export in as BASE/<version>, atomically (as a deployment should)."""
    staging = base / f".staging-{version}"
    shutil.copytree(export_dir, staging)
    target = base / str(version)
    os.rename(staging, target)
    return target


def wait_until(predicate, timeout_s=15.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


def statuses(server, model):
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    with grpc.insecure_channel(server.grpc_address) as channel:
        response = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(
            request, timeout=10)
    return {status.version: status for status in response.model_version_status}


def predict_y(stub, model, x, version=None, label=None):
    """(version that answered, y) of one gRPC Predict on a scaled model."""
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.asarray(x, np.float32)))
    response = stub.Predict(request, timeout=10)
    return response.model_spec.version.value, tf.make_ndarray(response.outputs["y"])


def call_count(server, model):
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        request = predict_pb2.PredictRequest()
        request.model_spec.name = model
        request.model_spec.signature_name = "calls"
        return int(tf.make_ndarray(stub.Predict(request, timeout=10).outputs["calls"]))


# -- version swap -------------------------------------------------------------------------------

@pytest.mark.parametrize("batching", [None, BatchingOptions(max_batch_size=8, batch_timeout_s=0.005,
                                                            num_batch_threads=2)],
                         ids=["unbatched", "batched"])
def test_new_version_swaps_in_with_no_failed_request(tmp_path, scaled_exports, batching):
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[1])
    server = server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=0,
                                     file_system_poll_wait_s=POLL_S, batching=batching)
    failures, answers = [], {}
    stop = threading.Event()
    max_requests_per_worker, deadline = 500, time.monotonic() + 10.0

    def worker(index):
        x = np.array([1.0, 2.0, 3.0], np.float32) + index
        seen = answers.setdefault(index, [])
        rest = client.RestPredictionClient(server.rest_url)
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for count in range(max_requests_per_worker):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    if count % 2:
                        y = rest.predict("ranker", {"x": x})["y"]
                        version = None
                    else:
                        version, y = predict_y(stub, "ranker", x)
                    scale = float(np.round(y[0] / x[0]))
                    np.testing.assert_allclose(y, scale * x)
                    assert version in (None, scale)
                    seen.append(scale)
                except Exception as error:  # every failure counts; none is expected
                    failures.append(repr(error))

    workers = [threading.Thread(target=worker, args=(index,)) for index in range(3)]
    try:
        for thread in workers:
            thread.start()
        wait_until(lambda: all(len(answers.get(i, [])) >= 50 for i in range(3)), 10,
                   "traffic on version 1")
        install_version(base, 2, scaled_exports[2])
        wait_until(lambda: all(answers[i].count(2.0) >= 50 for i in range(3)), 10,
                   "traffic on version 2")
    finally:
        stop.set()
        for thread in workers:
            thread.join()
        server_status = statuses(server, "ranker")
        server.stop(grace_s=1.0)

    assert failures == []
    for index, scales in answers.items():
        assert scales[0] == 1.0 and scales[-1] == 2.0
        first_new = scales.index(2.0)
        assert set(scales[first_new:]) == {2.0}, f"worker {index} went back to version 1"
    assert server_status[2].state == AVAILABLE
    assert server_status[1].state == END and server_status[1].status.error_code == 0


# -- refused versions ---------------------------------------------------------------------------

def test_corrupt_version_is_refused_while_the_previous_keeps_serving(
        tmp_path, scaled_exports, caplog):
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[1])
    caplog.set_level(logging.ERROR, logger="serving.manager")
    with server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=0,
                                 file_system_poll_wait_s=POLL_S) as server:
        staging = base / ".staging-2"
        testing.write_corrupt_version(str(staging))
        os.rename(staging, base / "2")
        wait_until(lambda: 2 in statuses(server, "ranker"), what="version 2 to be tried")
        wait_until(lambda: statuses(server, "ranker")[2].state == END, what="version 2 refused")

        status = statuses(server, "ranker")
        assert status[1].state == AVAILABLE
        assert status[2].status.error_code != 0
        assert "version 2" in status[2].status.error_message
        assert any("Loading servable version {name: ranker version: 2} failed"
                   in record.getMessage() for record in caplog.records)
        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert predict_y(stub, "ranker", [4.0])[0] == 1
            # The refusal sticks until the files change: then the version loads.
            time.sleep(3 * POLL_S)
            assert statuses(server, "ranker")[2].state == END
            shutil.rmtree(base / "2")
            install_version(base, 2, scaled_exports[2])
            wait_until(lambda: predict_y(stub, "ranker", [4.0])[0] == 2, what="fixed version 2")
        wait_until(lambda: statuses(server, "ranker")[1].state == END, what="version 1 unloaded")


def test_version_whose_warmup_fails_is_refused(tmp_path, scaled_exports):
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[1])
    bad = tmp_path / "bad_warmup"
    shutil.copytree(scaled_exports[2], bad)
    warmup.write_prediction_logs(str(bad), [warmup.predict_log(
        "ranker", {"x": np.array([[1.0]], np.float32)})])  # rank 2: the signature wants [?]
    with server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=None,
                                 file_system_poll_wait_s=POLL_S) as server:
        install_version(base, 2, str(bad))
        wait_until(lambda: statuses(server, "ranker").get(2) is not None
                   and statuses(server, "ranker")[2].state == END, what="version 2 refused")
        message = statuses(server, "ranker")[2].status.error_message
        assert "warm-up record 0" in message and "'x'" in message
        assert statuses(server, "ranker")[1].state == AVAILABLE
        assert server.manager.available_versions("ranker") == [1]


# -- warm-up -----------------------------------------------------------------------------------

def test_warmup_requests_are_replayed_on_load(tmp_path, scaled_exports):
    export = tmp_path / "export"
    shutil.copytree(scaled_exports[3], export)
    batches = [np.array([1.0, 2.0], np.float32), np.array([5.0], np.float32),
               np.array([0.0, 0.0, 1.0], np.float32)]
    path = warmup.write_prediction_logs(
        str(export), [warmup.predict_log("ranker", {"x": batch}) for batch in batches])
    assert path == warmup.warmup_file_path(str(export))
    logs = warmup.read_warmup_requests(str(export))
    assert [tf.make_ndarray(log.predict_log.request.inputs["x"]).tolist() for log in logs] == [
        batch.tolist() for batch in batches]

    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, str(export))
    with server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=None,
                                 file_system_poll_wait_s=0, warmup_iterations=2) as server:
        # The model counts its own calls: 3 records x 2 iterations ran before any traffic.
        assert call_count(server, "ranker") == 6
    with server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=None,
                                 file_system_poll_wait_s=0, enable_model_warmup=False) as server:
        assert call_count(server, "ranker") == 0


def test_warmup_of_serialized_examples(tmp_path):
    export = testing.export_contract_model(str(tmp_path / "contract" / "1"))
    examples = [testing.make_example(float(x), x) for x in range(5)]
    warmup_file = os.path.join(export, "assets.extra", "tf_serving_warmup_requests")
    assert warmup.write_warmup_requests(warmup_file, examples, model_name="contract",
                                        batch_size=2) == warmup_file
    logs = warmup.read_warmup_requests(export)
    assert [len(log.predict_log.request.inputs["examples"].string_val) for log in logs] == [2, 2, 1]
    assert logs[0].predict_log.request.model_spec.signature_name == "serving_default"
    with server_lib.start_server(str(tmp_path / "contract"), "contract", grpc_port=0,
                                 rest_port=None, file_system_poll_wait_s=0) as server:
        servable = server.manager.servable(model_pb2.ModelSpec(name="contract"))
        assert servable.warmup_requests_replayed == 3


def test_corrupt_warmup_file_is_reported(tmp_path):
    path = Path(warmup.warmup_file_path(str(tmp_path)))
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="corrupt warm-up file"):
        warmup.read_warmup_requests(str(tmp_path))


# -- models.config: policies and labels -----------------------------------------------------------

CONFIG = """
model_config_list {{
  config {{
    name: "ranker"  base_path: "{base}"  model_platform: "tensorflow"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 2 }}
  }}
  config {{
    name: "every_version"  base_path: "{base}"
    model_version_policy {{ all {{}} }}
  }}
  config {{
    name: "newest_two"  base_path: "{base}"
    model_version_policy {{ latest {{ num_versions: 2 }} }}
  }}
}}
"""


def test_models_config_policies_and_labels(tmp_path, scaled_exports, caplog):
    base = tmp_path / "shared_base"
    base.mkdir()
    for version in (1, 2, 3):
        install_version(base, version, scaled_exports[version])
    config_file = tmp_path / "models.config"
    config_file.write_text(CONFIG.format(base=base))
    # As tensorflow_model_server: labels name AVAILABLE versions, and none is at start.
    with pytest.raises(errors.ServingError, match="Request to assign label to version 2 of "
                                                  "model ranker, which is not currently"):
        server_lib.start_server(model_config_file=str(config_file), grpc_port=0, rest_port=None,
                                file_system_poll_wait_s=0)
    with server_lib.start_server(model_config_file=str(config_file), grpc_port=0, rest_port=0,
                                 file_system_poll_wait_s=0, model_config_file_poll_wait_s=POLL_S,
                                 allow_version_labels_for_unavailable_models=True) as server:
        assert set(statuses(server, "ranker")) == {1, 2}
        assert set(statuses(server, "every_version")) == {1, 2, 3}
        assert set(statuses(server, "newest_two")) == {2, 3}

        with grpc.insecure_channel(server.grpc_address) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            assert predict_y(stub, "ranker", [1.0])[0] == 2  # latest of the specific ones
            assert predict_y(stub, "ranker", [1.0], label="stable")[0] == 1
            version, y = predict_y(stub, "ranker", [1.5], label="canary")
            assert version == 2 and y.tolist() == [3.0]
            with pytest.raises(grpc.RpcError) as caught:
                predict_y(stub, "ranker", [1.0], label="nightly")
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "nightly" in caught.value.details()
            with pytest.raises(grpc.RpcError) as caught:
                predict_y(stub, "ranker", [1.0], version=3)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND

            stable = client.predict_rest(server.rest_url, "ranker", {"x": [2.0]},
                                         version_label="stable")
            assert stable["y"].tolist() == [2.0]

            # Editing the file: moving a label to a version not loaded is refused (logged,
            # the config kept); loading it first, then moving the label, is taken.
            moved = CONFIG.format(base=base).replace(
                "versions: 1 versions: 2", "versions: 2 versions: 3").replace(
                'key: "stable" value: 1', 'key: "stable" value: 3')
            caplog.set_level(logging.ERROR, logger="serving.manager")
            config_file.write_text(moved)
            wait_until(lambda: "Keeping the current config: FAILED_PRECONDITION: Request to "
                               "assign label to version 3" in caplog.text,
                       what="the label move refused")
            assert set(statuses(server, "ranker")) == {1, 2}
            config_file.write_text(CONFIG.format(base=base).replace(
                "versions: 1 versions: 2", "versions: 1 versions: 2 versions: 3"))
            wait_until(lambda: 3 in server.manager.available_versions("ranker"),
                       what="version 3 loaded")
            config_file.write_text(moved)
            wait_until(lambda: predict_y(stub, "ranker", [1.0], label="stable")[0] == 3,
                       what="label moved by the config file")
            wait_until(lambda: statuses(server, "ranker")[1].state == END,
                       what="version 1 unloaded")

            # And over gRPC: HandleReloadConfigRequest, refused for a label on the unloaded
            # version 1, then taken: it drops two models.
            reload = model_management_pb2.ReloadConfigRequest()
            reload.config.CopyFrom(config_lib.parse_model_server_config(
                CONFIG.format(base=base)))
            del reload.config.model_config_list.config[1:]
            models = model_service_pb2_grpc.ModelServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                models.HandleReloadConfigRequest(reload, timeout=30)
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert server.manager.model_names() == ["every_version", "newest_two", "ranker"]
            reload.config.model_config_list.config[0].version_labels["stable"] = 2
            models.HandleReloadConfigRequest(reload, timeout=30)
            assert server.manager.model_names() == ["ranker"]
            assert predict_y(stub, "ranker", [1.0], label="stable")[0] == 2
            with pytest.raises(grpc.RpcError) as caught:
                predict_y(stub, "every_version", [1.0])
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_availability_preserving_unloads_and_empty_version_folders(tmp_path, scaled_exports,
                                                                   caplog):
    """TF Serving's AvailabilityPreservingPolicy: with no aspired version at all (a specific
    policy naming an absent one) the old version is unloaded; while an aspired one exists but
    is not available, the highest other version keeps serving. Empty version folders are
    logged, once."""
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[1])
    (base / "2").mkdir()  # e.g. a copy that has not written its graph yet
    caplog.set_level(logging.INFO, logger="serving.manager")

    def config(policy):
        return config_lib.parse_model_server_config(
            f'model_config_list {{ config {{ name: "ranker" base_path: "{base}" '
            f'model_version_policy {{ {policy} }} }} }}')

    with server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=None,
                                 file_system_poll_wait_s=0) as server:
        manager = server.manager
        manager.poll_once()
        assert caplog.text.count(f"Version directory {base / '2'} of servable ranker has no "
                                 "saved_model.pb") == 1
        assert manager.available_versions("ranker") == [1]
        testing.write_corrupt_version(str(base / "3"))
        manager.reload_config(config("latest { num_versions: 1 }"))  # 3: aspired, refused
        assert manager.available_versions("ranker") == [1]
        manager.reload_config(config("specific { versions: 7 }"))  # nothing aspired
        assert manager.available_versions("ranker") == []
        assert statuses(server, "ranker")[1].state == END
        assert "Done unloading servable version {name: ranker version: 1}" in caplog.text


def test_invalid_config_is_refused_with_its_location(tmp_path):
    with pytest.raises(ValueError, match="models.config"):
        config_lib.load_model_server_config(
            _write(tmp_path / "models.config", "model_config_list {"))
    with pytest.raises(ValueError, match="duplicate model name 'a'"):
        config_lib.parse_model_server_config(
            'model_config_list { config { name: "a" base_path: "/x" } '
            'config { name: "a" base_path: "/y" } }')
    assert server_lib.main(["--model_config_file", str(tmp_path / "models.config"),
                            "--port", "0", "--rest_api_port", "-1"]) == 2


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("policy, expected", [
    ("", {5}),
    ("model_version_policy { latest { num_versions: 2 } }", {5, 3}),
    ("model_version_policy { all {} }", {1, 3, 5}),
    ("model_version_policy { specific { versions: 1 versions: 4 } }", {1}),
])
def test_version_policies(policy, expected):
    config = config_lib.parse_model_server_config(
        f'model_config_list {{ config {{ name: "m" base_path: "/m" {policy} }} }}')
    model = config.model_config_list.config[0]
    assert config_lib.aspired_versions([1, 3, 5], model) == expected


# -- batching ----------------------------------------------------------------------------------

def test_batching_merges_concurrent_requests(tmp_path, scaled_exports):
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[3])
    batching = BatchingOptions(max_batch_size=64, batch_timeout_s=0.05, num_batch_threads=1)
    with server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=None,
                                 file_system_poll_wait_s=0, batching=batching) as server:
        barrier = threading.Barrier(8)
        results, failures = {}, []

        def send(index):
            x = np.arange(index + 1, dtype=np.float32) + 10 * index
            try:
                with grpc.insecure_channel(server.grpc_address) as channel:
                    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                    barrier.wait()
                    results[index] = (x, predict_y(stub, "ranker", x)[1])
            except Exception as error:
                failures.append(repr(error))

        threads = [threading.Thread(target=send, args=(index,)) for index in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        for x, y in results.values():  # each caller got its own rows back
            np.testing.assert_allclose(y, 3.0 * x)
        # The model counts its calls: 8 requests arrived within one timeout, so fewer ran.
        assert call_count(server, "ranker") < 8
        batcher = server.manager.servable(model_pb2.ModelSpec(name="ranker")).batcher
        assert batcher.requests_run == 8 and batcher.batches_run < 8
        # Every batch run is in the batch size histogram (the warm-up's and calls' too).
        scraped = server.metrics.exposition().decode()
        found = re.search(r':tensorflow:serving:batching:batch_size_count\{model_name="ranker",'
                          r'op_name="serving_default"\} (\S+)', scraped)
        assert found and float(found.group(1)) == batcher.batches_run


def test_batching_parameters_file_in_tf_serving_format(tmp_path):
    options = batching_lib.parse_batching_parameters("""
        max_batch_size { value: 64 }
        batch_timeout_micros { value: 1500 }  # comments are allowed
        num_batch_threads { value: 3 }
        pad_variable_length_inputs: false
        allowed_batch_sizes: 32
        allowed_batch_sizes: 64
    """)
    default = BatchingOptions()
    assert options == BatchingOptions(max_batch_size=64, batch_timeout_s=0.0015,
                                      num_batch_threads=3,
                                      max_enqueued_batches=default.max_enqueued_batches)
    with pytest.raises(ValueError, match=r"params.txt: .*no field named \"max_batch\""):
        batching_lib.parse_batching_parameters("max_batch { value: 1 }", "params.txt")
    with pytest.raises(ValueError, match="params.txt: max_batch_size must be >= 1"):
        batching_lib.parse_batching_parameters("max_batch_size { value: 0 }", "params.txt")

    parameters = _write(tmp_path / "params.txt", "max_batch_size { value: 7 }")
    parse = server_lib.build_arg_parser().parse_args
    chosen = server_lib.batching_options(parse(["--enable_batching", "--batching_parameters_file",
                                                parameters]))
    assert chosen.max_batch_size == 7
    assert server_lib.batching_options(parse(["--batching_parameters_file", parameters])) is None
    assert server_lib.batching_options(parse(["--enable_batching", "--max_batch_size", "5"])
                                       ).max_batch_size == 5
    with pytest.raises(ValueError, match="not both"):
        server_lib.batching_options(parse(["--enable_batching", "--batching_parameters_file",
                                           parameters, "--max_batch_size", "5"]))


# -- deploy/: tensorflow/serving in production, on what this server serves in development -------

DEPLOY = REPO_ROOT / "deploy"


def _flag_values(args):
    """{--flag: value} of --flag=value arguments."""
    assert all(arg.startswith("--") and "=" in arg for arg in args), args
    return dict(arg.split("=", 1) for arg in args)


@pytest.fixture(scope="module")
def manifests():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    documents = [document for path in sorted((DEPLOY / "k8s").glob("*.yaml"))
                 for document in yaml.safe_load_all(path.read_text())]
    kinds = {document["kind"]: document for document in documents}
    assert len(kinds) == len(documents), "one object of each kind"
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    return {"compose": compose["tf-serving"], **kinds, "kustomization": kustomization}


def test_compose_and_kubernetes_run_tensorflow_serving_alike(manifests):
    service = manifests["compose"]
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert service["entrypoint"] == container["command"] == ["tensorflow_model_server"]
    in_compose, in_k8s = _flag_values(service["command"]), _flag_values(container["args"])
    assert in_compose.items() <= in_k8s.items()
    assert {key: in_compose[key] for key in ("--port", "--rest_api_port", "--enable_batching",
                                             "--enable_model_warmup")} == {
        "--port": "8500", "--rest_api_port": "8501", "--enable_batching": "true",
        "--enable_model_warmup": "true"}
    assert float(in_compose["--file_system_poll_wait_seconds"]) > 0
    # Every flag is one this server knows too (both take tensorflow_model_server's flags).
    server_lib.build_arg_parser().parse_args(container["args"])

    # The config files named by the flags are this folder's, mounted where the flags say.
    config_files = [in_k8s["--model_config_file"], in_k8s["--batching_parameters_file"]]
    mounts = {mount["target"]: mount["source"] for mount in service["volumes"]}
    assert [mounts[path] for path in config_files] == ["./models.config",
                                                       "./batching_parameters.txt"]
    (generated,) = manifests["kustomization"]["configMapGenerator"]
    assert sorted(generated["files"]) == sorted(os.path.basename(p) for p in config_files)
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounted = {mount["mountPath"]: volumes[mount["name"]] for mount in container["volumeMounts"]}
    assert {os.path.dirname(path) for path in config_files} == {"/etc/poso"}
    assert mounted["/etc/poso"]["configMap"]["name"] == generated["name"]
    models_claim = mounted["/models"]["persistentVolumeClaim"]["claimName"]
    assert models_claim == manifests["PersistentVolumeClaim"]["metadata"]["name"]
    assert "/models" in mounts and mounts["/models"].endswith("/serving")

    # The Service exposes the container's ports by name.
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"grpc": 8500, "http": 8501}
    assert {(port["port"], port["targetPort"])
            for port in manifests["Service"]["spec"]["ports"]} == {(8500, "grpc"), (8501, "http")}
    assert manifests["Service"]["spec"]["selector"].items() <= \
        manifests["Deployment"]["spec"]["template"]["metadata"]["labels"].items()


def test_probes_ask_for_the_pipelines_model(manifests):
    from pipeline.config import MODEL_NAME

    status_path = f"/v1/models/{MODEL_NAME}"
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert container["startupProbe"]["httpGet"] == {"path": status_path, "port": "http"}
    assert container["livenessProbe"]["tcpSocket"] == {"port": "grpc"}
    readiness = container["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["bash", "-c"] and f"GET {status_path} " in readiness[2]
    assert manifests["compose"]["healthcheck"]["test"][1:] == readiness


def test_servers_wait_for_the_first_push_instead_of_restarting(manifests, tmp_path):
    """The init container (Kubernetes) and the one-shot service (Compose) run the same wait,
    which loops while the base directory has no version and ends once the Pusher wrote one."""
    import subprocess

    from pipeline.config import MODEL_NAME

    (init,) = manifests["Deployment"]["spec"]["template"]["spec"]["initContainers"]
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    assert compose["wait-for-first-push"]["entrypoint"] == init["command"]
    assert manifests["compose"]["depends_on"]["wait-for-first-push"] == {"condition": "service_completed_successfully"}
    script = init["command"][2].replace("/models/", f"{tmp_path}/")
    base = tmp_path / MODEL_NAME
    base.mkdir()
    assert subprocess.run(["timeout", "2", "bash", "-c", script], capture_output=True).returncode == 124
    (base / "1700000000").mkdir()
    assert subprocess.run(["timeout", "2", "bash", "-c", script], capture_output=True).returncode == 124
    (base / "1700000000" / "saved_model.pb").write_bytes(b"")
    assert subprocess.run(["timeout", "10", "bash", "-c", script], capture_output=True).returncode == 0


def _bash_probe_answer(command: str, port: int) -> bytes:
    """What the probe's bash /dev/tcp request gets from 127.0.0.1:port, sent the same way."""
    request = re.search(r"printf '([^']*)'", command).group(1).replace("\\r\\n", "\r\n")
    assert "127.0.0.1/8501" in command
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request.encode())
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_deploy_config_serves_on_this_server(manifests, tmp_path):
    """deploy/models.config and batching_parameters.txt, with /models pointing at a served
    directory, load a model here; the readiness probe's request sees it AVAILABLE."""
    from pipeline.config import MODEL_NAME

    serving_dir = tmp_path / "serving"
    ranking_stub.export_ranking_stub_model(str(serving_dir / MODEL_NAME / "1"))
    config_text = (DEPLOY / "models.config").read_text()
    assert f'base_path: "/models/{MODEL_NAME}"' in config_text
    models_config = _write(tmp_path / "models.config",
                           config_text.replace('"/models/', f'"{serving_dir}/'))
    (container,) = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    args = server_lib.build_arg_parser().parse_args(
        [arg.replace("/etc/poso/", f"{DEPLOY}/") for arg in container["args"]])
    options = server_lib.ServerOptions(grpc_port=0, rest_port=0, file_system_poll_wait_s=0,
                                       batching=server_lib.batching_options(args))
    with server_lib.ModelServer.from_config_file(models_config, options).start() as server:
        servable = server.manager.servable(model_pb2.ModelSpec(name=MODEL_NAME))
        assert servable.batcher is not None
        assert servable.batcher.options == batching_lib.load_batching_parameters(
            DEPLOY / "batching_parameters.txt")
        answer = _bash_probe_answer(container["readinessProbe"]["exec"]["command"][2],
                                    server.rest_port)
        assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0]
        assert b'"AVAILABLE"' in answer


# -- the process: binding and graceful shutdown ----------------------------------------------------

def test_binds_loopback_by_default(tmp_path, scaled_exports):
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[1])
    with server_lib.start_in_background(model_base=str(base), model_name="ranker", grpc_port=0,
                                        rest_port=0, file_system_poll_wait_s=0) as server:
        assert server.grpc_address.startswith("127.0.0.1:")
        assert server.rest_url.startswith("http://127.0.0.1:")
        with pytest.raises(OSError):  # a taken port is an error, not a shared socket
            server_lib.start_server(str(base), "ranker", grpc_port=server.grpc_port,
                                    rest_port=None, file_system_poll_wait_s=0)


def test_stop_lets_in_flight_requests_finish(tmp_path, scaled_exports):
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[2])
    # A long batch timeout holds each request in the server while stop() begins.
    batching = BatchingOptions(max_batch_size=1000, batch_timeout_s=1.0, num_batch_threads=1)
    server = server_lib.start_server(str(base), "ranker", grpc_port=0, rest_port=0,
                                     file_system_poll_wait_s=0, batching=batching,
                                     enable_model_warmup=False)
    results = {}

    def over_grpc():
        results["grpc"] = client.predict_grpc(server.grpc_address, "ranker", {"x": [1.0]})

    def over_rest():
        rest = client.RestPredictionClient(server.rest_url)
        rest.signature_def("ranker")  # metadata first, so only the predict is in flight
        started.set()
        results["rest"] = rest.predict("ranker", {"x": [2.0]})

    started = threading.Event()
    threads = [threading.Thread(target=over_grpc), threading.Thread(target=over_rest)]
    for thread in threads:
        thread.start()
    started.wait(10)
    time.sleep(0.3)  # both predicts are now waiting in the batcher
    stopped_at = time.monotonic()
    server.stop(grace_s=5.0)
    for thread in threads:
        thread.join(10)
    assert results["grpc"]["y"].tolist() == [2.0]
    assert results["rest"]["y"].tolist() == [4.0]
    assert time.monotonic() - stopped_at < 5.0
    with pytest.raises(client.ServingClientError):  # and nothing is accepted any more
        client.predict_grpc(server.grpc_address, "ranker", {"x": [1.0]}, timeout=2)


def test_poso_serve_logs_like_tensorflow_model_server_and_stops_on_sigterm(tmp_path,
                                                                          scaled_exports):
    """`bin/poso serve` through the environment wrapper: timestamped INFO lines for start,
    ports, each version's load and unload and request errors; SIGTERM to the wrapper's PID
    stops it within the grace period, exit code 0."""
    base = tmp_path / "ranker"
    base.mkdir()
    install_version(base, 1, scaled_exports[2])
    monitoring = _write(tmp_path / "monitoring.config",
                        'prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }')
    process = subprocess.Popen(
        [str(REPO_ROOT / "bin" / "poso"), "serve", "--port=0", "--rest-port=0",
         "--model_name=ranker", f"--model-base-path={base}", "--shutdown_grace_seconds=2",
         f"--monitoring_config_file={monitoring}"],
        stderr=subprocess.PIPE, text=True, cwd=str(tmp_path))
    log_lines = []
    try:
        rest_url = None
        deadline = time.monotonic() + 120
        while rest_url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            log_lines.append(line)
            found = re.search(r"Exporting HTTP/REST API at (http://\S+) \.\.\.", line)
            rest_url = found.group(1) if found else None
        assert rest_url, "".join(log_lines[-20:])
        assert client.predict_rest(rest_url, "ranker", {"x": [1.5]})["y"].tolist() == [3.0]
        with pytest.raises(client.ServingClientError):
            client.predict_rest(rest_url, "no_such_model", {"x": [1.5]})
        with urllib.request.urlopen(rest_url + "/monitoring/prometheus/metrics",
                                    timeout=10) as answer:
            scraped = answer.read().decode()
        assert re.search(r':tensorflow:serving:request_count_total\{API="Predict",'
                         r'entrypoint="REST",model_name="ranker",signature_name="serving_default",'
                         r'status="OK",version="1"\} 1\.0', scraped), scraped
        assert 'poso_serving_available_versions{model_name="ranker"} 1.0' in scraped
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        _, remaining = process.communicate(timeout=30)
        stopped_s = time.monotonic() - signalled
        log_lines.append(remaining)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = "".join(log_lines)
    assert process.returncode == 0, log[-2000:]
    assert stopped_s < 2 + 10, f"{stopped_s:.1f} s from SIGTERM to exit"
    timestamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}: I "
    for expected in [r"Adding model ranker from base path",
                     r"Successfully loaded servable version \{name: ranker version: 1\}: "
                     r"AVAILABLE",
                     r"Running gRPC ModelServer at 127\.0\.0\.1:\d+ \.\.\.",
                     r"REST \w+ /v1/models/no_such_model\S* -> 404: Servable not found",
                     r"Received SIGTERM",
                     r"Done unloading servable version \{name: ranker version: 1\}",
                     r"Server stopped"]:
        assert re.search(timestamp + r"serving\.\w+\] " + expected, log), (expected, log[-3000:])


def test_logging_setup_replaces_a_handler_installed_before_it():
    """absl calls logging.basicConfig() at WARNING when something logs through it early (as
    `poso`'s imports do): --log_level must still take effect, with timestamps."""
    import io

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging.basicConfig(force=True)
        server_lib.configure_logging("DEBUG")
        stream = io.StringIO()
        root.handlers[0].setStream(stream)
        logging.getLogger("serving.test").debug("one %s", "line")
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}: D serving\.test\] one line\n",
                            stream.getvalue())
        server_lib.configure_logging("WARNING")
        assert root.level == logging.WARNING and len(root.handlers) == 1
    finally:
        root.handlers[:], _ = saved[0], root.setLevel(saved[1])


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs CPU affinity and two CPUs")
def test_serving_benchmark_gives_callers_and_servers_their_own_cpus():
    """The bench's CPU split: disjoint halves, children started on theirs, this process's
    threads moved for the block and given their CPUs back."""
    from benchmarks import serving_latency

    available = os.sched_getaffinity(0)
    server_cpus, caller_cpus = serving_latency.split_cpus(None)
    assert server_cpus | caller_cpus == available and not server_cpus & caller_cpus
    assert len(server_cpus) == len(available) // 2
    assert serving_latency.split_cpus(0) == (None, None)
    with pytest.raises(ValueError, match="leaves no CPU"):
        serving_latency.split_cpus(len(available))

    child = subprocess.run(serving_latency.pinned_command(server_cpus, [
        sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]),
        capture_output=True, text=True, check=True)
    assert child.stdout.strip() == str(sorted(server_cpus))

    release = threading.Event()
    started_inside = threading.Thread(target=release.wait, daemon=True)
    with serving_latency.process_pinned_to(caller_cpus):
        assert os.sched_getaffinity(0) == caller_cpus
        started_inside.start()
        assert os.sched_getaffinity(started_inside.native_id) == caller_cpus
    try:
        assert os.sched_getaffinity(0) == available
        assert os.sched_getaffinity(started_inside.native_id) == available
    finally:
        release.set()


def test_serving_benchmark_sizes_the_servers_thread_pools_as_the_limits():
    """The bench's thread pool flags mean the same to the server as to its in-process worker."""
    import argparse

    from benchmarks import serving_latency

    bench = serving_latency.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--tensorflow-intra-op-parallelism", "1", "--tensorflow-inter-op-parallelism", "2"])
    flags = serving_latency._thread_pool_flags(bench)
    served = server_lib.build_arg_parser().parse_args(flags)
    worker = serving_latency.add_arguments(argparse.ArgumentParser()).parse_args(flags)
    for args in (served, worker):
        assert (args.tensorflow_intra_op_parallelism, args.tensorflow_inter_op_parallelism) == (1, 2)
    with pytest.raises(ValueError, match="must be >= 0"):
        server_lib.set_thread_pools(-1, 0)


@pytest.mark.slow
def test_serving_benchmark_runs_end_to_end(tmp_path, capsys):
    """benchmarks/serving_latency.py on a stub ranking model, with tiny bounds."""
    from benchmarks import serving_latency

    model_dir = ranking_stub.export_ranking_stub_model(str(tmp_path / "stub"))
    assert serving_latency.main(["--model-dir", model_dir, "--rows", "1,3", "--throughput-rows",
                                 "2", "--concurrency", "2", "--requests", "3", "--seconds",
                                 "0.2", "--tensorflow-intra-op-parallelism", "1"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"gRPC single-row p50 overhead vs in-process: -?\d+\.\d+ ms", printed)
    assert re.search(r"batched throughput vs in-process batched: \d+%", printed)
    assert serving_latency.main(["--model-dir", str(tmp_path / "nothing")]) == 2
    assert "poso demo" in capsys.readouterr().err
