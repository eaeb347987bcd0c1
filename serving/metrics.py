"""Prometheus metrics, under tensorflow_model_server's names and its monitoring config.

    --monitoring_config_file=monitoring.config   with
    prometheus_config { enable: true path: "/monitoring/prometheus/metrics" }

serves the metrics on the REST port at that path (TF Serving's MonitoringConfig text format;
its default path when `path` is empty). Names are TF Serving's where it has the metric (its
`/tensorflow/serving/...` names as its Prometheus exporter writes them, with ':'):

    :tensorflow:serving:request_count{model_name, status, version, signature_name, API,
                                      entrypoint}          Predict/Classify/Regress/
                                                           MultiInference calls (status: OK
                                                           or the canonical code's name)
    :tensorflow:serving:request_latency{model_name, API, entrypoint}
                                                           wall time per call, microseconds
                                                           (TF Serving's buckets: 10 * 1.8^k)
    :tensorflow:serving:batching:batch_size{model_name, op_name}
                                                           rows of each batch the batcher ran
                                                           (op_name: the signature)
    :tensorflow:cc:saved_model:load_attempt_count{model_path, status}
                                                           version loads, "success" or "fail"
    poso_serving_available_versions{model_name}            versions AVAILABLE now (this
                                                           server's own; TF Serving has none)

Counter samples carry prometheus_client's "_total" suffix
(:tensorflow:serving:request_count_total). version, signature_name, API and entrypoint are
labels TF Serving's request_count lacks;
queries that sum by (model_name, status) read both alike. Each ModelServer has its own
registry, so servers in one process (tests) do not mix their counts.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

__all__ = ["ServerMetrics", "load_monitoring_config", "DEFAULT_PATH", "CONTENT_TYPE_LATEST"]

DEFAULT_PATH = "/monitoring/prometheus/metrics"
_LATENCY_BUCKETS_US = tuple(10 * 1.8 ** k for k in range(33))
_BATCH_SIZE_BUCKETS = tuple(1.5 ** k for k in range(20))


def _monitoring_config_class():
    """tensorflow_serving/config/monitoring_config.proto's MonitoringConfig, which the
    tensorflow-serving-api package does not ship: built from its two messages here."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="poso_serving/monitoring_config.proto", package="tensorflow.serving",
        syntax="proto3")
    prometheus = proto.message_type.add(name="PrometheusConfig")
    prometheus.field.add(name="enable", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_BOOL,
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    prometheus.field.add(name="path", number=2,
                         type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    monitoring = proto.message_type.add(name="MonitoringConfig")
    monitoring.field.add(name="prometheus_config", number=1,
                         type=descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE,
                         type_name=".tensorflow.serving.PrometheusConfig",
                         label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))


MonitoringConfig = _monitoring_config_class()


def load_monitoring_config(path: str) -> Optional[str]:
    """The metrics path a text-format MonitoringConfig enables (None: Prometheus is off).
    ValueError naming the file for anything else."""
    config = MonitoringConfig()
    try:
        with open(path, encoding="utf-8") as config_file:
            text_format.Parse(config_file.read(), config)
    except OSError as error:
        raise ValueError(f"cannot read the monitoring config {path}: {error}") from error
    except text_format.ParseError as error:
        raise ValueError(f"{path}: not a text-format MonitoringConfig: {error}") from error
    prometheus = config.prometheus_config
    if not prometheus.enable:
        return None
    metrics_path = prometheus.path or DEFAULT_PATH
    if not metrics_path.startswith("/"):
        raise ValueError(f"{path}: prometheus_config.path must start with '/', got "
                         f"{metrics_path!r}")
    return metrics_path


class ServerMetrics:
    """The server's metrics in their own registry; `exposition()` is the scrape answer."""

    def __init__(self, available_versions: Callable[[], Iterable[tuple]] = lambda: ()):
        """`available_versions`: yields (model name, number of AVAILABLE versions)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._requests = Counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ["model_name", "status", "version", "signature_name", "API", "entrypoint"],
            registry=self.registry)
        self._latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ["model_name", "API", "entrypoint"], buckets=_LATENCY_BUCKETS_US,
            registry=self.registry)
        self._batch_size = Histogram(
            ":tensorflow:serving:batching:batch_size",
            "Tracks the batch size distribution on the batch result by model_name.",
            ["model_name", "op_name"], buckets=_BATCH_SIZE_BUCKETS, registry=self.registry)
        self._loads = Counter(
            ":tensorflow:cc:saved_model:load_attempt_count",
            "The number of times a SavedModel was successfully loaded.",
            ["model_path", "status"], registry=self.registry)
        available = available_versions

        class _Available:
            def collect(self):
                family = GaugeMetricFamily("poso_serving_available_versions",
                                           "Versions of each model AVAILABLE now.",
                                           labels=["model_name"])
                for name, count in available():
                    family.add_metric([name], count)
                yield family

        self.registry.register(_Available())

    def record_request(self, model_name: str, api: str, entrypoint: str, status: str,
                       started: float, version: str = "", signature_name: str = "") -> None:
        """One call, `started` from time.monotonic()."""
        self._requests.labels(model_name, status, version, signature_name, api,
                              entrypoint).inc()
        self._latency.labels(model_name, api, entrypoint).observe(
            (time.monotonic() - started) * 1e6)

    def record_batch(self, model_name: str, signature_name: str, rows: int) -> None:
        self._batch_size.labels(model_name, signature_name).observe(rows)

    def record_load(self, model_path: str, success: bool) -> None:
        self._loads.labels(model_path, "success" if success else "fail").inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
