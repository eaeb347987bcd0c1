"""A model server speaking TensorFlow Serving's gRPC and REST APIs.

It reads the same base directory (`BASE/NAME/<version>/saved_model.pb`) or models.config as
`tensorflow_model_server`, so development and tests run against this server while
production runs the real tensorflow/serving on the same files. The flags are the real
server's where they overlap:

    python -m serving.server --port=8500 --rest_api_port=8501 \\
        --model_name=ranker --model_base_path=/models/ranker
    python -m serving.server --model_config_file=models.config \\
        --model_config_file_poll_wait_seconds=30 --enable_batching \\
        --batching_parameters_file=deploy/batching_parameters.txt

In-process, for tests and notebooks (port 0 picks a free port):

    with start_server("/models/ranker", "ranker", grpc_port=0, rest_port=0) as server:
        client.predict_grpc(server.grpc_address, "ranker", examples)

Differences from tensorflow_model_server: the default host is 127.0.0.1, not every
interface; `--rest_api_port=0` picks a free port (-1 disables REST); requests are limited
to `--max_request_bytes` over both gRPC (RESOURCE_EXHAUSTED) and REST (413).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Optional, Sequence

import grpc

from serving import allocator, config as config_lib
from serving.batching import BatchingOptions
from serving.errors import ServingError
from serving.grpc_service import add_services
from serving.manager import ModelManager
from serving.metrics import ServerMetrics, load_monitoring_config
from serving.rest import RestApiHandler, RestServer
from serving.server_flags import (DEFAULT_GRPC_MAX_THREADS, DEFAULT_MAX_REQUEST_BYTES, add_arguments,
                                  build_arg_parser)

__all__ = ["ServerOptions", "ModelServer", "start_server", "start_in_background", "serve", "main",
           "build_arg_parser", "add_arguments", "batching_options", "set_thread_pools", "run",
           "run_and_exit", "exit_process", "configure_logging"]

logger = logging.getLogger(__name__)

# tensorflow_model_server's (glog's) layout: "2026-12-02 19:33:49.123: I serving.manager] ...".
LOG_FORMAT = "%(asctime)s.%(msecs)03d: %(levelname).1s %(name)s] %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"



@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How the server listens, polls, batches and shuts down.

    grpc_port / rest_port: 0 picks a free port; rest_port None serves no REST API.
    max_request_bytes: limit of one request (gRPC message or REST body).
    file_system_poll_wait_s: seconds between scans of the model base paths (<= 0: only at
      start).
    model_config_file_poll_wait_s: seconds between re-reads of the models.config (<= 0:
      never).
    batching: batch Predict calls on batchable signatures (None: no batching).
    """

    host: str = "127.0.0.1"
    grpc_port: int = 8500
    rest_port: Optional[int] = 8501
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    grpc_max_threads: int = DEFAULT_GRPC_MAX_THREADS
    rest_num_threads: int = 8
    rest_timeout_s: float = 30.0
    file_system_poll_wait_s: float = 1.0
    model_config_file_poll_wait_s: float = 0.0
    batching: Optional[BatchingOptions] = None
    enable_model_warmup: bool = True
    warmup_iterations: int = 1
    shutdown_grace_s: float = 10.0
    allow_version_labels_for_unavailable_models: bool = False
    # GET this path on the REST port answers the Prometheus metrics (None: not served).
    monitoring_path: Optional[str] = None

    def __post_init__(self):
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        for name in ("grpc_port", "rest_port"):
            port = getattr(self, name)
            if port is not None and not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ModelServer:
    """The gRPC and REST front ends over one ModelManager.

    `start()` loads the initial model versions (blocking), then binds; the bound ports are
    `grpc_port` and `rest_port`. `stop()` stops accepting, lets in-flight requests finish
    for `shutdown_grace_s`, and unloads the models.
    """

    def __init__(self, config: config_lib.ModelServerConfig,
                 options: ServerOptions = ServerOptions(),
                 config_file: Optional[str] = None):
        self.options = options
        self.metrics = ServerMetrics(self._available_versions)
        self.manager = ModelManager(
            config,
            batching=options.batching,
            enable_warmup=options.enable_model_warmup,
            warmup_iterations=options.warmup_iterations,
            poll_interval_s=options.file_system_poll_wait_s,
            config_file=config_file,
            config_poll_interval_s=options.model_config_file_poll_wait_s,
            allow_version_labels_for_unavailable_models=(
                options.allow_version_labels_for_unavailable_models),
            metrics=self.metrics,
        )
        self._grpc_server: Optional[grpc.Server] = None
        self._rest_server: Optional[RestServer] = None
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self.grpc_port: Optional[int] = None
        self.rest_port: Optional[int] = None

    def _available_versions(self):
        manager = getattr(self, "manager", None)  # the registry asks before there is one
        for name in manager.model_names() if manager is not None else ():
            yield name, len(manager.available_versions(name))

    @classmethod
    def for_model(cls, model_base_path: str, model_name: str,
                  options: ServerOptions = ServerOptions()) -> "ModelServer":
        """Serves one model's base directory with the latest-version policy."""
        return cls(config_lib.single_model_config(model_name, model_base_path), options)

    @classmethod
    def from_config_file(cls, model_config_file: str,
                         options: ServerOptions = ServerOptions()) -> "ModelServer":
        return cls(config_lib.load_model_server_config(model_config_file), options,
                   config_file=model_config_file)

    @property
    def grpc_address(self) -> str:
        return _host_port(self.options.host, self.grpc_port)

    @property
    def rest_url(self) -> Optional[str]:
        if self.rest_port is None:
            return None
        return "http://" + _host_port(self.options.host, self.rest_port)

    def start(self) -> "ModelServer":
        options = self.options
        self.manager.start()
        try:
            self._grpc_server = grpc.server(
                futures.ThreadPoolExecutor(max_workers=options.grpc_max_threads,
                                           thread_name_prefix="grpc"),
                options=[
                    ("grpc.max_receive_message_length", options.max_request_bytes),
                    ("grpc.max_send_message_length", -1),
                    ("grpc.so_reuseport", 0),  # a taken port must fail, not be shared
                ])
            add_services(self._grpc_server, self.manager, self.metrics)
            address = _host_port(options.host, options.grpc_port)
            try:
                self.grpc_port = self._grpc_server.add_insecure_port(address)
            except RuntimeError as error:
                raise OSError(f"cannot bind gRPC to {address}: {error}") from error
            if not self.grpc_port:
                raise OSError(f"cannot bind gRPC to {address}")
            self._grpc_server.start()
            logger.info("Running gRPC ModelServer at %s ...", self.grpc_address)
            if options.rest_port is not None:
                self._rest_server = RestServer(
                    RestApiHandler(self.manager, self.metrics), options.host, options.rest_port,
                    max_request_bytes=options.max_request_bytes,
                    num_threads=options.rest_num_threads, timeout_s=options.rest_timeout_s,
                    shutdown_grace_s=options.shutdown_grace_s, metrics=self.metrics,
                    metrics_path=options.monitoring_path)
                self.rest_port = self._rest_server.start()
                logger.info("Exporting HTTP/REST API at %s ...", self.rest_url)
                if options.monitoring_path:
                    logger.info("Prometheus metrics at %s%s", self.rest_url,
                                options.monitoring_path)
            elif options.monitoring_path:
                logger.warning("No REST port: the Prometheus metrics are not served")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: Optional[float] = None) -> None:
        """Graceful shutdown; safe to call more than once."""
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.options.shutdown_grace_s if grace_s is None else grace_s
            logger.info("Shutting down (grace %.1f s)", grace)
            grpc_done = self._grpc_server.stop(grace) if self._grpc_server else None
            if self._rest_server is not None:
                self._rest_server.stop()
            if grpc_done is not None:
                grpc_done.wait(grace + 5)
            self.manager.stop()
            self._stopped.set()
            logger.info("Server stopped")

    def wait(self, timeout: Optional[float] = None) -> bool:
        """Blocks until the server is stopped; returns whether it is."""
        return self._stopped.wait(timeout)

    def __enter__(self) -> "ModelServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _server(model_base: Optional[str], model_name: Optional[str],
            model_config_file: Optional[str], options: ServerOptions) -> ModelServer:
    if model_config_file:
        if model_base:
            raise ValueError("give a model base path or a model config file, not both")
        return ModelServer.from_config_file(model_config_file, options)
    if not model_base or not model_name:
        raise ValueError("give a model base path and a model name, or a model config file")
    return ModelServer.for_model(model_base, model_name, options)


def start_server(model_base: Optional[str] = None, model_name: Optional[str] = None, *,
                 model_config_file: Optional[str] = None, **options) -> ModelServer:
    """Starts a server in background threads and returns it (ports bound, models loaded).

    `options` are ServerOptions fields, e.g. grpc_port=0, rest_port=0.
    """
    return _server(model_base, model_name, model_config_file, ServerOptions(**options)).start()


start_in_background = start_server


def serve(model_base: Optional[str] = None, model_name: Optional[str] = None,
          grpc_port: int = 8500, rest_port: Optional[int] = 8501, host: str = "127.0.0.1",
          model_config_file: Optional[str] = None, **options) -> None:
    """Serves until SIGTERM or SIGINT, then shuts down gracefully (call from the main thread)."""
    server = _server(model_base, model_name, model_config_file,
                     ServerOptions(host=host, grpc_port=grpc_port, rest_port=rest_port, **options))
    stop_requested = threading.Event()

    def on_signal(signum, _frame):
        logger.info("Received %s; a second signal stops at once", signal.Signals(signum).name)
        stop_requested.set()
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.start()
        while not stop_requested.wait(0.5):
            pass
    finally:
        server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_INDIVIDUAL_BATCHING_FLAGS = ("max_batch_size", "batch_timeout_micros", "num_batch_threads",
                              "max_enqueued_batches")


def batching_options(args: argparse.Namespace) -> Optional[BatchingOptions]:
    """The batching the flags ask for (None: no batching); ValueError if they conflict."""
    individual = [name for name in _INDIVIDUAL_BATCHING_FLAGS if getattr(args, name) is not None]
    if args.batching_parameters_file and individual:
        raise ValueError(f"give --batching_parameters_file or --{', --'.join(individual)}, "
                         "not both")
    if not args.enable_batching:
        if args.batching_parameters_file or individual:
            logger.warning("Batching flags are ignored without --enable_batching")
        return None
    if args.batching_parameters_file:
        from serving.batching import load_batching_parameters

        return load_batching_parameters(args.batching_parameters_file)
    values = {name: getattr(args, name) for name in individual if name != "batch_timeout_micros"}
    if args.batch_timeout_micros is not None:
        values["batch_timeout_s"] = args.batch_timeout_micros / 1e6
    return BatchingOptions(**values)


def set_thread_pools(intra_op: int, inter_op: int) -> None:
    """Sizes TensorFlow's thread pools (0 keeps its default); only possible before the
    runtime starts, i.e. before any model is loaded in this process."""
    if intra_op < 0 or inter_op < 0:
        raise ValueError("--tensorflow_intra_op_parallelism and "
                         "--tensorflow_inter_op_parallelism must be >= 0")
    if not intra_op and not inter_op:
        return
    import tensorflow as tf

    try:
        if intra_op:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError as error:  # the runtime is already up in this process
        logger.warning("Cannot size TensorFlow's thread pools now: %s", error)


def configure_logging(level: str) -> None:
    """Timestamped lines on stderr at `level` and above, for the whole process.

    Whatever handler is already on the root logger is replaced: absl installs one (by calling
    logging.basicConfig() at WARNING) the first time anything logs through it before its
    flags are parsed, e.g. while TFX modules are imported for `poso`'s parser, and a plain
    basicConfig would then do nothing."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATE_FORMAT, force=True)
    # TensorFlow's logger has its own handler when it was first used before any root
    # handler: its lines would be printed twice, once without a timestamp.
    logging.getLogger("tensorflow").handlers.clear()


def run(args: argparse.Namespace) -> int:
    """Serves until SIGTERM or SIGINT; returns the exit code (2: bad flags or files)."""
    configure_logging(args.log_level)
    try:
        if args.retain_freed_memory:
            allocator.retain_freed_memory()
        set_thread_pools(args.tensorflow_intra_op_parallelism,
                         args.tensorflow_inter_op_parallelism)
        serve(
            model_base=None if args.model_config_file else args.model_base_path,
            model_name=args.model_name,
            grpc_port=args.port,
            rest_port=None if args.rest_api_port < 0 else args.rest_api_port,
            host=args.host,
            model_config_file=args.model_config_file,
            max_request_bytes=args.max_request_bytes,
            grpc_max_threads=args.grpc_max_threads,
            rest_num_threads=args.rest_api_num_threads,
            rest_timeout_s=args.rest_api_timeout_in_ms / 1000.0,
            file_system_poll_wait_s=args.file_system_poll_wait_seconds,
            model_config_file_poll_wait_s=args.model_config_file_poll_wait_seconds,
            batching=batching_options(args),
            enable_model_warmup=args.enable_model_warmup,
            warmup_iterations=args.num_request_iterations_for_warmup,
            shutdown_grace_s=args.shutdown_grace_seconds,
            allow_version_labels_for_unavailable_models=(
                args.allow_version_labels_for_unavailable_models),
            monitoring_path=(load_monitoring_config(args.monitoring_config_file)
                             if args.monitoring_config_file else None),
        )
    except (ValueError, OSError) as error:
        logger.error("%s", error)
        return 2
    except ServingError as error:
        logger.error("Failed to start server. Error: %s: %s", error.code.name, error.message)
        return 2
    return 0


def exit_process(code: int) -> None:
    """Ends the process now with `code`, once logs and stdio are flushed.

    The server has stopped by then; what an ordinary exit would still do is the interpreter's
    teardown, and with TensorFlow imported that alone takes over 5 s here (measured: a
    process that only imports tensorflow takes 5.5 s from its last line to its exit, with
    no Python frame running), which an orchestrator waiting on the PID counts against the
    grace period."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def run_and_exit(args: argparse.Namespace) -> int:
    """`run`, then `exit_process` (the `poso serve` entry point; never returns)."""
    exit_process(run(args))
    return 0  # not reached


def main(argv: Optional[Sequence[str]] = None, prog: str = "poso serve") -> int:
    """`poso serve ARGS`; returns the process exit code (argparse's 2 for bad flags, 0 for
    --help)."""
    try:
        args = build_arg_parser(prog).parse_args(argv)
    except SystemExit as exit_request:
        code = exit_request.code
        return 0 if code is None else code if isinstance(code, int) else 2
    return run(args)


if __name__ == "__main__":
    exit_process(main(prog="python -m serving.server"))
