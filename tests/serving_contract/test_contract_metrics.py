"""TF Serving's Prometheus endpoint (--monitoring_config_file with prometheus_config): request
counts and latencies under its metric names, scraped over HTTP as Prometheus does."""

from __future__ import annotations

import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorflow_serving.apis import predict_pb2

from serving import testing

import tensorflow as tf


def scrape(endpoint) -> dict:
    """{(sample name, frozenset of labels): value}; counters under their name with and
    without prometheus_client's _total suffix."""
    with urllib.request.urlopen(endpoint.rest_url + endpoint.metrics_path, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name[:-len("_total")] if sample.name.endswith("_total") else sample.name
            samples[(name, frozenset(sample.labels.items()))] = sample.value
    return samples


def total(samples: dict, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and wanted <= sample_labels)


def test_requests_are_counted_and_timed(endpoint, prediction_stub, rest):
    if not endpoint.metrics_path:
        pytest.skip("the server's metrics path is unknown (set POSO_SERVING_METRICS_PATH)")
    before = scrape(endpoint)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = endpoint.model
    request.model_spec.signature_name = "single"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    for _ in range(3):
        prediction_stub.Predict(request, timeout=30)
    status, _ = rest.post(rest.model_path(":predict"),
                          {"signature_name": "single", "instances": [1.0, 2.0]})
    assert status == 200
    status, _ = rest.post(rest.model_path(":predict"),
                          {"signature_name": "single", "instances": ["not a number"]})
    assert status == 400
    after = scrape(endpoint)

    count = ":tensorflow:serving:request_count"
    model = endpoint.model
    assert total(after, count, model_name=model, status="OK") - total(
        before, count, model_name=model, status="OK") == 4
    assert total(after, count, model_name=model, status="INVALID_ARGUMENT") - total(
        before, count, model_name=model, status="INVALID_ARGUMENT") == 1
    latency = ":tensorflow:serving:request_latency_count"
    assert total(after, latency, model_name=model) - total(before, latency, model_name=model) == 5
    if endpoint.own_server:  # this server's extra labels, and its gauge of loaded versions
        assert total(after, count, model_name=model, status="OK", version="1",
                     signature_name="single", entrypoint="GRPC", API="Predict") - total(
            before, count, model_name=model, status="OK", version="1",
            signature_name="single", entrypoint="GRPC", API="Predict") == 3
        assert total(after, "poso_serving_available_versions", model_name=model) == 1
        assert total(after, ":tensorflow:cc:saved_model:load_attempt_count",
                     status="success") >= 1
