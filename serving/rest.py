"""TensorFlow Serving's REST API (aiohttp front end).

    GET  /v1/models/NAME[/versions/N | /labels/L]             model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata    signature defs
    POST /v1/models/NAME[/versions/N | /labels/L]:predict     {"instances": ...} | {"inputs": ...}
    POST /v1/models/NAME[/versions/N | /labels/L]:classify    {"examples": [...], "context"?}
    POST /v1/models/NAME[/versions/N | /labels/L]:regress

Errors are {"error": "<message>"} with the HTTP status of the canonical code (400 invalid
argument, 404 not found, ...); a body over the size limit is 413.

`RestApiHandler` holds the logic and knows nothing of HTTP servers; `RestServer` runs it on
an aiohttp event loop in a thread, with the model work in a thread pool.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import re
import socket
import threading
import time
import urllib.parse
from typing import Any, Dict, Optional, Tuple

from aiohttp import web
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2, model_pb2,
                                     regression_pb2)

from serving import allocator, errors, json_codec
from serving.deadlines import deadline
from serving.errors import ServingError
from serving.manager import ModelManager
from serving.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from serving.servable import DEFAULT_SIGNATURE, SIGNATURE_DEF_FIELD

__all__ = ["RestApiHandler", "RestServer"]

logger = logging.getLogger(__name__)

_MODEL = r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
_POST_PATH = re.compile(_MODEL + r":(?P<method>classify|regress|predict)", re.IGNORECASE)
_GET_PATH = re.compile(
    r"/v1/models(?:/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?:/(?P<resource>metadata))?)?", re.IGNORECASE)
_API_PREFIX = re.compile(r"/v1/", re.IGNORECASE)
_MAX_INT64 = 2 ** 63 - 1
# How much of an oversized body is read and dropped so the client sees the 413 rather than
# a reset connection; past this the connection is simply closed.
_DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
# After a request with a body this large its decoded objects are freed: give the memory back.
_RELEASE_AFTER_BYTES = 16 * 1024 * 1024

Answer = Tuple[int, Dict[str, Any]]


class RestApiHandler:
    """Maps (method, path, body) to (HTTP status, JSON document)."""

    def __init__(self, manager: ModelManager, metrics: Optional[ServerMetrics] = None):
        self._manager = manager
        self._metrics = metrics

    def handle(self, method: str, raw_path: str, body: bytes) -> Answer:
        call: Dict[str, str] = {}  # what _dispatch learns of a :predict/:classify/:regress
        started, status = time.monotonic(), "OK"
        try:
            return 200, self._dispatch(method.upper(), raw_path, body, call)
        except ServingError as error:
            status = error.code.name
            return error.http_status, {"error": error.message}
        except Exception as error:  # a bug must still answer in the API's error format
            status = "INTERNAL"
            logger.exception("REST %s %s failed", method, raw_path)
            return 500, {"error": f"Internal error: {type(error).__name__}: {error}"}
        finally:
            if self._metrics is not None and "api" in call:
                self._metrics.record_request(call["model"], call["api"], "REST", status, started,
                                             call.get("version", ""), call.get("signature", ""))

    def _model_spec(self, match: re.Match) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=urllib.parse.unquote(match.group("name")))
        if match.group("version") is not None:
            version = int(match.group("version"))
            if version > _MAX_INT64:
                raise errors.invalid_argument(
                    f"Failed to convert version: {match.group('version')} to numeric.")
            spec.version.value = version
        elif match.group("label") is not None:
            spec.version_label = urllib.parse.unquote(match.group("label"))
        return spec

    def _dispatch(self, method: str, raw_path: str, body: bytes,
                  call: Dict[str, str]) -> Dict[str, Any]:
        if not _API_PREFIX.match(raw_path):
            raise errors.not_found(f"Not found: {raw_path}; the API is under /v1/models/")
        malformed = errors.invalid_argument(f"Malformed request: {method} {raw_path}")
        if method == "POST":
            match = _POST_PATH.fullmatch(raw_path)
            if match is None:
                raise malformed
            action = match.group("method").lower()
            call.update(model=urllib.parse.unquote(match.group("name")),
                        api=action.capitalize(), version=match.group("version") or "")
            spec = self._model_spec(match)
            document = json_codec.parse_json_body(body)
            spec.signature_name = json_codec.signature_name_from_json(document)
            call["signature"] = spec.signature_name or DEFAULT_SIGNATURE
            servable = self._manager.servable(spec)
            call["version"] = str(servable.version)
            if action == "predict":
                return self._predict(servable, spec, document)
            if action == "classify":
                return self._classify(servable, spec, document)
            return self._regress(servable, spec, document)
        if method == "GET":
            match = _GET_PATH.fullmatch(raw_path)
            if match is None:
                raise malformed
            if match.group("name") is None:
                raise errors.invalid_argument("Missing model name in request.")
            spec = self._model_spec(match)
            if match.group("resource"):
                return self._metadata(spec)
            return json_codec.proto_to_json_dict(self._manager.model_status(spec))
        raise malformed

    def _predict(self, servable, spec: model_pb2.ModelSpec,
                 document: Dict[str, Any]) -> Dict[str, Any]:
        name = spec.signature_name or DEFAULT_SIGNATURE
        if name not in servable.signatures:
            raise errors.invalid_argument(
                f"Serving signature name: \"{name}\" not found in signature def; model "
                f"{servable.model_name} version {servable.version} has "
                f"{sorted(servable.signatures)}")
        signature = servable.signatures[name]
        inputs, row_format = json_codec.predict_inputs_from_json(document, signature)
        outputs = servable.run(name, inputs)
        return json_codec.predict_outputs_to_json(outputs, row_format)

    def _classify(self, servable, spec: model_pb2.ModelSpec,
                  document: Dict[str, Any]) -> Dict[str, Any]:
        request = classification_pb2.ClassificationRequest(
            model_spec=spec, input=json_codec.input_from_json(document))
        response = servable.classify(request)
        return json_codec.classification_result_to_json(response.result)

    def _regress(self, servable, spec: model_pb2.ModelSpec,
                 document: Dict[str, Any]) -> Dict[str, Any]:
        request = regression_pb2.RegressionRequest(
            model_spec=spec, input=json_codec.input_from_json(document))
        response = servable.regress(request)
        return json_codec.regression_result_to_json(response.result)

    def _metadata(self, spec: model_pb2.ModelSpec) -> Dict[str, Any]:
        response = self._manager.servable(spec).metadata([SIGNATURE_DEF_FIELD])
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_map)
        return {"model_spec": json_codec.proto_to_json_dict(response.model_spec),
                "metadata": {SIGNATURE_DEF_FIELD: json_codec.proto_to_json_dict(signature_map)}}


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class RestServer:
    """Serves a RestApiHandler on host:port from a background event loop.

    Args:
      max_request_bytes: larger bodies are answered 413 without being parsed.
      num_threads: threads running model work (JSON decoding, inference, encoding).
      timeout_s: requests running longer are answered 504 (<= 0: no limit); the thread
        working on one stops at its next deadline check (serving/deadlines.py).
      shutdown_grace_s: how long `stop` lets in-flight requests finish.
      max_bytes_in_work: the bodies being decoded and run at once add up to at most this
        (one larger body runs alone); others wait, within their timeout. Decoded JSON takes
        several times its size in memory, so this bounds what large requests can take.
        Default: twice max_request_bytes.
      metrics, metrics_path: GET metrics_path answers metrics' Prometheus exposition.
    """

    def __init__(self, handler: RestApiHandler, host: str = "127.0.0.1", port: int = 8501, *,
                 max_request_bytes: int = 64 * 1024 * 1024, num_threads: int = 8,
                 timeout_s: float = 30.0, shutdown_grace_s: float = 10.0,
                 max_bytes_in_work: Optional[int] = None,
                 metrics: Optional[ServerMetrics] = None, metrics_path: Optional[str] = None):
        self._handler = handler
        self._host = host
        self._requested_port = port
        self._max_request_bytes = max_request_bytes
        self._timeout_s = timeout_s
        self._shutdown_grace_s = shutdown_grace_s
        self._max_bytes_in_work = max_bytes_in_work or 2 * max_request_bytes
        self._metrics = metrics if metrics_path else None
        self._metrics_path = metrics_path
        self._bytes_in_work = 0
        self._work_done: Optional[asyncio.Condition] = None
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=num_threads, thread_name_prefix="rest")
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._runner: Optional[web.AppRunner] = None
        self.port: Optional[int] = None

    def start(self) -> int:
        """Binds and starts serving; returns the bound port."""
        sock = _bind(self._host, self._requested_port)
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        failure = []

        def run():
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._start_site(sock))
            except BaseException as error:  # report to start()
                failure.append(error)
                started.set()
                return
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="rest-server", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return self.port

    def _handle(self, method: str, raw_path: str, body: bytes) -> Answer:
        """The handler's answer, on an executor thread, under the request's deadline."""
        try:
            with deadline(self._timeout_s):
                return self._handler.handle(method, raw_path, body)
        finally:
            if len(body) >= _RELEASE_AFTER_BYTES:
                del body
                allocator.release_free_memory()

    async def _run(self, method: str, raw_path: str, body: bytes) -> Answer:
        """Waits for room in the bytes-in-work budget, then runs the request."""
        size = min(len(body), self._max_bytes_in_work)
        async with self._work_done:
            await self._work_done.wait_for(
                lambda: self._bytes_in_work + size <= self._max_bytes_in_work)
            self._bytes_in_work += size
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._handle, method, raw_path, body)
        finally:
            async with self._work_done:
                self._bytes_in_work -= size
                self._work_done.notify_all()

    async def _start_site(self, sock: socket.socket) -> None:
        self._work_done = asyncio.Condition()
        # Bodies are read by _serve itself, so aiohttp's own limit is off.
        app = web.Application(client_max_size=0)
        if self._metrics is not None:
            app.router.add_get(self._metrics_path, self._serve_metrics)
        app.router.add_route("*", "/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None,
                                    shutdown_timeout=self._shutdown_grace_s)
        await self._runner.setup()
        await web.SockSite(self._runner, sock).start()

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        text = await asyncio.get_running_loop().run_in_executor(
            self._executor, self._metrics.exposition)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _read_body(self, request: web.Request) -> Optional[bytes]:
        """The body, or None when it exceeds the limit (the excess is drained)."""
        declared = request.content_length
        if declared is not None and declared > self._max_request_bytes:
            await self._drain(request, declared)
            return None
        chunks, size = [], 0
        while True:
            chunk = await request.content.readany()
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > self._max_request_bytes:
                await self._drain(request, size)
                return None
            chunks.append(chunk)

    @staticmethod
    async def _drain(request: web.Request, seen: int) -> None:
        if seen > _DRAIN_LIMIT_BYTES:
            return
        read = 0
        while read < _DRAIN_LIMIT_BYTES:
            chunk = await request.content.readany()
            if not chunk:
                return
            read += len(chunk)

    async def _serve(self, request: web.Request) -> web.Response:
        raw_path = request.rel_url.raw_path
        body = await self._read_body(request)
        if body is None:
            size = request.content_length
            status, document = 413, {"error": (
                f"Request body {'of ' + str(size) + ' bytes ' if size else ''}exceeds the "
                f"limit of {self._max_request_bytes} bytes")}
        else:
            work = self._run(request.method, raw_path, body)
            try:
                if self._timeout_s > 0:
                    status, document = await asyncio.wait_for(work, self._timeout_s)
                else:
                    status, document = await work
            except asyncio.TimeoutError:
                status, document = 504, {"error": f"Request timed out after {self._timeout_s} s"}
        if status != 200:
            logger.info("REST %s %s -> %d: %s", request.method, raw_path, status,
                        document.get("error"))
        response = web.Response(body=json_codec.dumps(document), status=status,
                                content_type="application/json")
        if body is None:
            response.force_close()
        return response

    def stop(self) -> None:
        """Stops accepting, lets in-flight requests finish (up to the grace), shuts down."""
        if self._loop is None or self._runner is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop)
        try:
            future.result(timeout=self._shutdown_grace_s + 5)
        except Exception:
            logger.exception("REST server shutdown")
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._loop.close()
        self._loop = None
