"""TensorFlow Serving's gRPC services, on the stubs of the tensorflow-serving-api package.

PredictionService: Predict, Classify, Regress, MultiInference, GetModelMetadata.
ModelService: GetModelStatus, HandleReloadConfigRequest.

Every failure aborts the call with its canonical code and a message naming what is wrong.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional, TypeVar

import grpc
from tensorflow_serving.apis import (model_management_pb2, model_service_pb2_grpc,
                                     prediction_service_pb2_grpc)

from serving import errors
from serving.errors import ServingError
from serving.manager import ModelManager
from serving.metrics import ServerMetrics

__all__ = ["PredictionServicer", "ModelServicer", "add_services"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _answer(context: grpc.ServicerContext, method: str, work: Callable[[], T],
            on_done: Optional[Callable[[str, Optional[T]], None]] = None) -> T:
    """work()'s answer, or the call aborted with the error's code; then on_done(status name,
    answer or None)."""
    status, answer = "OK", None
    try:
        answer = work()
        return answer
    except ServingError as error:
        status = error.code.name
        logger.info("gRPC %s -> %s: %s", method, error.code.name, error.message)
        context.abort(error.code, error.message)
    except Exception as error:  # a bug must still end the call with a status
        status = grpc.StatusCode.INTERNAL.name
        logger.exception("%s failed", method)
        context.abort(grpc.StatusCode.INTERNAL, f"{method}: {type(error).__name__}: {error}")
    finally:
        if on_done is not None:
            on_done(status, answer)


def _require_model_spec(request) -> None:
    if not request.HasField("model_spec"):
        raise errors.invalid_argument("Missing ModelSpec")


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService over a ModelManager."""

    def __init__(self, manager: ModelManager, metrics: Optional[ServerMetrics] = None):
        self._manager = manager
        self._metrics = metrics

    def _counted(self, method: str, model_spec):
        """on_done for _answer: counts the call in the metrics (TF Serving's API names)."""
        if self._metrics is None:
            return None
        started = time.monotonic()

        def on_done(status, response):
            spec = model_spec
            if response is not None:  # the answer names the version that ran
                answered = getattr(response, "results", None)  # MultiInference's
                spec = (answered[0].model_spec if answered else model_spec
                        ) if answered is not None else response.model_spec
            version = spec.version.value if spec.HasField("version") else None
            self._metrics.record_request(
                spec.name, method, "GRPC", status, started,
                version="" if version is None else str(version),
                signature_name=spec.signature_name)
        return on_done

    def Predict(self, request, context):
        def work():
            _require_model_spec(request)
            return self._manager.servable(request.model_spec).predict(request)
        return _answer(context, "Predict", work, self._counted("Predict", request.model_spec))

    def Classify(self, request, context):
        def work():
            _require_model_spec(request)
            return self._manager.servable(request.model_spec).classify(request)
        return _answer(context, "Classify", work, self._counted("Classify", request.model_spec))

    def Regress(self, request, context):
        def work():
            _require_model_spec(request)
            return self._manager.servable(request.model_spec).regress(request)
        return _answer(context, "Regress", work, self._counted("Regress", request.model_spec))

    def MultiInference(self, request, context):
        def work():
            if not request.tasks:
                raise errors.invalid_argument("MultiInferenceRequest has no tasks")
            first = request.tasks[0].model_spec
            for index, task in enumerate(request.tasks):
                spec = task.model_spec
                if spec.name != first.name:
                    raise errors.invalid_argument(
                        f"All tasks of a MultiInferenceRequest must use the same model; task "
                        f"{index} names {spec.name!r}, task 0 {first.name!r}")
                if (spec.WhichOneof("version_choice") != first.WhichOneof("version_choice")
                        or spec.version.value != first.version.value
                        or spec.version_label != first.version_label):
                    raise errors.invalid_argument(
                        f"All tasks of a MultiInferenceRequest must use the same model version; "
                        f"task {index} differs from task 0")
            return self._manager.servable(first).multi_inference(request)
        first_spec = request.tasks[0].model_spec if request.tasks else None
        on_done = self._counted("MultiInference", first_spec) if first_spec else None
        return _answer(context, "MultiInference", work, on_done)

    def GetModelMetadata(self, request, context):
        def work():
            _require_model_spec(request)
            servable = self._manager.servable(request.model_spec)
            return servable.metadata(list(request.metadata_field))
        return _answer(context, "GetModelMetadata", work)


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService over a ModelManager."""

    def __init__(self, manager: ModelManager):
        self._manager = manager

    def GetModelStatus(self, request, context):
        def work():
            _require_model_spec(request)
            return self._manager.model_status(request.model_spec)
        return _answer(context, "GetModelStatus", work)

    def HandleReloadConfigRequest(self, request, context):
        def work():
            if not request.HasField("config"):
                raise errors.invalid_argument("ReloadConfigRequest has no config")
            try:
                self._manager.reload_config(request.config)
            except ValueError as error:
                raise errors.invalid_argument(str(error)) from error
            response = model_management_pb2.ReloadConfigResponse()
            response.status.error_code = grpc.StatusCode.OK.value[0]
            return response
        return _answer(context, "HandleReloadConfigRequest", work)


def add_services(server: grpc.Server, manager: ModelManager,
                 metrics: Optional[ServerMetrics] = None) -> None:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(manager, metrics), server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelServicer(manager), server)
