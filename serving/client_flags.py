"""The `poso predict` flags, apart from the client so that `poso predict --help` imports no
TensorFlow."""

from __future__ import annotations

import argparse

from feature_specs import SERVING_MODEL_NAME

DEFAULT_GRPC_ADDRESS = "127.0.0.1:8500"
DEFAULT_REST_URL = "http://127.0.0.1:8501"
# Signature names (serving/instances.py's, TF Serving's default): tests/test_serving_cli.py
# checks that they agree.
RAW_SIGNATURE = "serving_raw"
DEFAULT_SIGNATURE = "serving_default"
JSON_SHAPES = ('a list of objects (one per row), JSON Lines (one object per line), one object '
               '(one row), or a TensorFlow Serving request body {"instances": [...]} or '
               '{"inputs": {...}} (optionally with "signature_name")')


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `poso predict` flags."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--grpc", metavar="HOST:PORT", nargs="?", const=DEFAULT_GRPC_ADDRESS,
                       help=f"send over gRPC (the default; address default {DEFAULT_GRPC_ADDRESS})")
    where.add_argument("--rest", metavar="URL", nargs="?", const=DEFAULT_REST_URL,
                       help=f"send over REST (address default {DEFAULT_REST_URL})")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--json", metavar="JSON", help=(
        f"raw feature values: {JSON_SHAPES}; given as a JSON string, a file, @FILE, or - for "
        f"standard input. Sent to signature {RAW_SIGNATURE} if the model has it"))
    what.add_argument("--examples", metavar="TFRECORD", nargs="+", help=(
        "serialized tf.Examples: TFRecord files (gzip or not), directories of them, or globs. "
        f"Sent to signature {DEFAULT_SIGNATURE}"))
    parser.add_argument("--model", "--model-name", "--model_name", dest="model",
                        default=SERVING_MODEL_NAME, help="served model name (default %(default)s)")
    parser.add_argument("--signature", "--signature-name", "--signature_name", dest="signature",
                        help="signature to call (default: see --json and --examples); a raw-"
                             "feature signature given --examples gets the examples' features")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int, help="model version (default: the latest)")
    version.add_argument("--label", help="version label, e.g. stable")
    parser.add_argument("--max-examples", "--max_examples", dest="max_examples", type=int,
                        default=10, metavar="N",
                        help="send at most N examples of --examples (default 10; 0: all)")
    parser.add_argument("--input-name", "--input_name", dest="input_name", metavar="NAME",
                        help="the input serialized examples go to (default: the signature's "
                             "only string input)")
    parser.add_argument("--format", choices=("table", "json"), default="table",
                        help="print a table (default) or TF Serving's JSON response")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    return parser


def build_arg_parser(prog: str = "poso predict") -> argparse.ArgumentParser:
    return add_arguments(argparse.ArgumentParser(prog=prog, description=(
        "Send one Predict request to a TensorFlow Serving API (this project's server or "
        "tensorflow/serving) and print per-task scores. Exit status: 0 ok, 1 the server "
        "refused or could not be reached, 2 bad arguments or input.")))
