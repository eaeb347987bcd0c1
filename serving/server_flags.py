"""The `poso serve` flags (tensorflow_model_server's), apart from the server so that
`poso serve --help` imports no TensorFlow."""

from __future__ import annotations

import argparse

from serving.batching import BatchingOptions

DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
# Requests in the server at once: with batching, callers beyond it cannot join the batch
# being filled. `bench serving --server-cpus 0`, 32 callers of 100 rows: 48-52% of
# in-process batched throughput with 16, 55% with 32, 57-61% with 64.
DEFAULT_GRPC_MAX_THREADS = 64


def _bool_flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `poso serve` flags: tensorflow_model_server's, each also spelled with dashes."""

    def add(flag: str, *aliases: str, **kwargs):
        dashed = flag.replace("_", "-")
        names = [flag] + ([dashed] if dashed != flag else []) + list(aliases)
        parser.add_argument(*names, dest=flag[2:], **kwargs)

    add("--port", "--grpc-port", type=int, default=8500, help="gRPC port (0: any free port)")
    add("--rest_api_port", "--rest-port", type=int, default=8501,
        help="REST port (0: any free port, -1: no REST API)")
    add("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    add("--model_name", default="default", help="name of the model (with --model_base_path)")
    add("--model_base_path", "--model-base", help="directory of the model's numbered versions")
    add("--model_config_file", "--model-config",
        help="text-format ModelServerConfig (instead of the two above), e.g. the "
             "HOME/serving/models.config the pipeline writes")
    add("--model_config_file_poll_wait_seconds", type=float, default=0.0,
        help="re-read the config file this often (0: never)")
    add("--file_system_poll_wait_seconds", type=float, default=1.0,
        help="scan the base paths for new versions this often")
    add("--enable_batching", type=_bool_flag, nargs="?", const=True, default=False,
        help="merge concurrent requests into batches (see the batching flags)")
    add("--batching_parameters_file",
        help="text-format BatchingParameters (TF Serving's format, e.g. "
             "deploy/batching_parameters.txt); instead of the four flags below")
    add("--max_batch_size", type=int, help=f"default {BatchingOptions.max_batch_size}")
    add("--batch_timeout_micros", type=int,
        help=f"default {int(BatchingOptions.batch_timeout_s * 1e6)}")
    add("--num_batch_threads", type=int, help="default: the number of CPUs")
    add("--max_enqueued_batches", type=int,
        help=f"default {BatchingOptions.max_enqueued_batches}")
    add("--enable_model_warmup", type=_bool_flag, nargs="?", const=True, default=True,
        help="replay assets.extra/tf_serving_warmup_requests before serving a version")
    add("--num_request_iterations_for_warmup", type=int, default=1,
        help="times each warm-up request is replayed before a version takes traffic")
    add("--tensorflow_intra_op_parallelism", type=int, default=0,
        help="threads of one op (0: TensorFlow's choice, the machine's cores)")
    add("--tensorflow_inter_op_parallelism", type=int, default=0,
        help="ops run in parallel (0: TensorFlow's choice)")
    add("--retain_freed_memory", type=_bool_flag, nargs="?", const=True, default=True,
        help="fix glibc malloc's mmap and trim thresholds so that TensorFlow's buffers are "
             "reused, not returned to the kernel after every call (serving/allocator.py; "
             "default true; not a tensorflow_model_server flag)")
    add("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
        help="largest accepted request (gRPC message or REST body)")
    add("--grpc_max_threads", type=int, default=DEFAULT_GRPC_MAX_THREADS, help="gRPC worker threads")
    add("--rest_api_num_threads", type=int, default=8, help="REST worker threads")
    add("--rest_api_timeout_in_ms", type=int, default=30000, help="REST request timeout")
    add("--shutdown_grace_seconds", type=float, default=10.0,
        help="on SIGTERM, how long requests in flight may finish")
    add("--allow_version_labels_for_unavailable_models", type=_bool_flag, nargs="?", const=True,
        default=False, help="a new version label may name a version that is not loaded yet "
                            "(without it a config whose label does so is refused, at start too)")
    add("--monitoring_config_file",
        help='text-format MonitoringConfig, e.g. prometheus_config { enable: true path: '
             '"/monitoring/prometheus/metrics" }: Prometheus metrics on the REST port')
    add("--log_level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="server log level")
    return parser


def build_arg_parser(prog: str = "poso serve") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(
        prog=prog,
        description="Serve SavedModels over TensorFlow Serving's gRPC and REST APIs, from a "
                    "model base directory or a models.config. Flags are "
                    "tensorflow_model_server's."))
