"""Serving latency and throughput over loopback, beside the in-process SavedModel call.

    bin/poso bench serving --home /tmp/bench_demo
    bin/poso bench serving --model-dir HOME/serving/poso_ranking/<v>

Serves a pushed ranking model (the latest under HOME/serving/poso_ranking unless
--model-dir names one; `bin/poso demo --home /tmp/bench_demo --rows-per-day 800
--train-steps 20` makes one in about 3 minutes) with this project's server in a separate
process on 127.0.0.1, once without and once with server-side batching
(deploy/batching_parameters.txt), and measures on the same random raw tf.Examples:

* latency: p50 / p99 of sequential 1-row and 100-row Predict calls over gRPC and REST,
  beside the same call on the SavedModel loaded in this process (the limit; made the
  way the server makes it, through `servable.fast_signature_call` and with malloc's
  thresholds fixed by `serving/allocator.py`, so the gap is transport, TensorProto
  conversion and batching, not a slower way of calling the model);
* throughput: rows/s of 1-row and 100-row requests from 8 and 32 concurrent callers,
  beside the in-process call from as many threads, and "in-process batched": the model
  called on the rows of as many requests as server-side batching could merge
  (min(callers, max_batch_size // rows) requests) from num_batch_threads threads, i.e.
  what the server's batching would reach with no transport and perfectly filled batches.

The two goal lines at the end compare the gRPC single-row p50 with the in-process one,
and the rows/s of gRPC with batching at the most callers, on the largest requests, with
the better of the two in-process figures of that row.

Every call starts from numpy arrays and ends with numpy arrays: in-process, tensors are
made and results fetched; over gRPC the request proto is built and the outputs decoded;
over REST the JSON body is encoded and the answer decoded (one keep-alive connection per
caller). Each case is bounded by --requests and --seconds. Client and server share the
machine's CPUs, as on one host, so a throughput case moves by 10-20% from one 2-second
window to the next, and a 1-row p50 by 0.2-0.5 ms from one minute to the next: every case
runs in --rounds rounds, every way once per round in a rotated order. Throughput prints the
median over rounds, latency the p50 / p99 of all rounds' calls; the goal lines compare ways
round by round and print the median and the spread. The figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
DEPLOY_BATCHING_PARAMETERS = REPO_ROOT / "deploy" / "batching_parameters.txt"
SIGNATURES = ("serving_default", "serving_raw")
GOAL_OVERHEAD_MS = 1.0
GOAL_BATCHED_FRACTION = 0.70


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from pipeline import config as pipeline_config

    parser.add_argument("--home", default=pipeline_config.DEFAULT_HOME,
                        help="pipeline home: serves its latest pushed version (default "
                             "%(default)s)")
    parser.add_argument("--model-dir",
                        help="a SavedModel version directory (HOME/serving/poso_ranking/<v>) "
                             "or a model base directory (its latest version); overrides --home")
    parser.add_argument("--signature", choices=SIGNATURES, default="serving_default",
                        help="serialized tf.Examples (default) or raw feature tensors")
    parser.add_argument("--rows", default="1,100",
                        help="rows per request in the latency cases (default 1,100)")
    parser.add_argument("--concurrency", default="8,32",
                        help="concurrent callers in the throughput cases (default 8,32)")
    parser.add_argument("--throughput-rows", default="1,100",
                        help="rows per request in the throughput cases (default 1,100)")
    parser.add_argument("--requests", type=int, default=300,
                        help="requests per latency case over all rounds, at most (default 300)")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time limit of each throughput case and of each latency case over all rounds "
                             "(default 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every case (default 3)")
    parser.add_argument("--batching-parameters", default=str(DEPLOY_BATCHING_PARAMETERS),
                        help="the server's batching in the batched runs (TF Serving's format; "
                             "default deploy/batching_parameters.txt)")
    parser.add_argument("--num-batch-threads", type=int,
                        help="override the parameters' num_batch_threads (e.g. to this "
                             "machine's CPUs)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _int_list(text: str, flag: str) -> List[int]:
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{flag} must be positive integers separated by commas, got {text!r}")
    return values


def resolve_model_dir(model_dir: Optional[str], home: str) -> str:
    """The SavedModel version directory to serve."""
    from pipeline import config as pipeline_config
    from serving import config as serving_config

    path = model_dir or os.path.join(home, "serving", pipeline_config.MODEL_NAME)
    if any(os.path.exists(os.path.join(path, name))
           for name in serving_config.SAVED_MODEL_FILENAMES):
        return os.path.abspath(path)
    versions = serving_config.list_versions(path)
    if not versions:
        raise ValueError(
            f"no SavedModel at {path} (neither a version directory nor a base directory with "
            "numbered versions). Make one with `bin/poso demo --home /tmp/bench_demo "
            "--rows-per-day 800 --train-steps 20` and pass --home /tmp/bench_demo")
    return os.path.abspath(versions[max(versions)])


# -- inputs -------------------------------------------------------------------------------------

def synthetic_examples(count: int, seed: int) -> List[bytes]:
    """Random serialized raw tf.Examples carrying every model input of feature_specs."""
    import numpy as np
    import tensorflow as tf

    import feature_specs as fs

    rng = np.random.default_rng(seed)

    def value(feature):
        if feature.kind is fs.Kind.SEQUENCE:
            length = int(rng.integers(0, feature.max_length + 1))
            return [int(v) for v in rng.integers(0, 10_000, length)]
        if feature.vocabulary is not None:
            return [feature.vocabulary[int(rng.integers(len(feature.vocabulary)))]]
        if feature.dtype is fs.Dtype.FLOAT32:
            return [float(rng.exponential(1000.0))]
        if feature.name == fs.PC.source:
            return [int(rng.integers(0, 2 * fs.PC.boundaries[-1]))]
        return [int(rng.integers(0, 2 if feature.kind is fs.Kind.PERSONALIZATION else 10_000))]

    examples = []
    for _ in range(count):
        features = {}
        for feature in fs.model_input_features():
            values = value(feature)
            if feature.dtype is fs.Dtype.STRING:
                features[feature.name] = tf.train.Feature(
                    bytes_list=tf.train.BytesList(value=[v.encode() for v in values]))
            elif feature.dtype is fs.Dtype.FLOAT32:
                features[feature.name] = tf.train.Feature(
                    float_list=tf.train.FloatList(value=values))
            else:
                features[feature.name] = tf.train.Feature(
                    int64_list=tf.train.Int64List(value=[int(v) for v in values]))
        examples.append(tf.train.Example(
            features=tf.train.Features(feature=features)).SerializeToString())
    return examples


def request_arrays(examples: Sequence[bytes], signature, signature_name: str):
    """{input: numpy array} of `examples` for the signature (a concrete function)."""
    import numpy as np

    from serving import client, instances

    specs = signature.structured_input_signature[1]
    if signature_name == "serving_default":
        (name,) = specs
        array = np.empty(len(examples), dtype=object)
        array[:] = list(examples)
        return {name: array}
    rows = instances.raw_instances(examples)
    columns = {name: [row[name] for row in rows] for name in specs}
    return client.input_arrays(columns, dtypes={name: spec.dtype for name, spec in specs.items()})


def _json_inputs(arrays) -> Dict[str, object]:
    def encode(array):
        if array.dtype == object:
            return [{"b64": base64.b64encode(item).decode("ascii")} for item in array.tolist()]
        return array.tolist()
    return {name: encode(array) for name, array in arrays.items()}


# -- the callers --------------------------------------------------------------------------------

def in_process_call(signature, arrays) -> Callable[[], object]:
    import tensorflow as tf

    def call():
        outputs = signature(**{name: tf.constant(array) for name, array in arrays.items()})
        return {name: tensor.numpy() for name, tensor in outputs.items()}
    return call


def grpc_call(stub, model: str, signature_name: str, arrays) -> Callable[[], object]:
    from serving import client

    def call():
        request = client.build_predict_request(model, arrays, signature_name)
        return client.predict_response_arrays(stub.Predict(request, timeout=30))
    return call


class RestCaller:
    """POSTs to :predict over one keep-alive connection (one per calling thread)."""

    def __init__(self, url: str, model: str, signature_name: str, arrays):
        import numpy as np

        self._np = np
        host, port = url.split("://", 1)[1].rsplit(":", 1)
        self._connection = http.client.HTTPConnection(host, int(port), timeout=30)
        self._path = f"/v1/models/{model}:predict"
        self._signature_name, self._arrays = signature_name, arrays

    def __call__(self):
        body = json.dumps({"signature_name": self._signature_name,
                           "inputs": _json_inputs(self._arrays)})
        self._connection.request("POST", self._path, body,
                                 {"Content-Type": "application/json"})
        answer = self._connection.getresponse()
        document = json.loads(answer.read())
        if answer.status != 200:
            raise RuntimeError(f"REST predict failed ({answer.status}): {document}")
        outputs = document["outputs"]
        if not isinstance(outputs, dict):  # a signature with one output answers its value
            outputs = {"output": outputs}
        return {name: self._np.asarray(value) for name, value in outputs.items()}

    def close(self):
        self._connection.close()


# -- measuring ----------------------------------------------------------------------------------

def latency_ms(call: Callable[[], object], requests: int, seconds: float, warmup: int = 10):
    """Per-call milliseconds of up to `requests` sequential calls within `seconds`."""
    for _ in range(warmup):
        call()
    samples = []
    deadline = time.perf_counter() + seconds
    while len(samples) < requests and time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def throughput_rows_per_s(make_call: Callable[[], Callable[[], object]], concurrency: int,
                          rows: int, seconds: float, warmup_s: float = 0.5) -> float:
    """Rows/s completed by `concurrency` threads calling back to back for `seconds` (the
    first `warmup_s` not counted). `make_call` gives each thread its own caller."""
    callers = [make_call() for _ in range(concurrency)]
    barrier = threading.Barrier(concurrency + 1)
    counted = [0] * concurrency
    failures: List[BaseException] = []
    window: Dict[str, float] = {}

    def work(index: int):
        call = callers[index]
        barrier.wait()
        while time.perf_counter() < window["end"]:
            try:
                call()
            except BaseException as error:  # report, do not hang the others
                failures.append(error)
                return
            if window["start"] <= time.perf_counter() <= window["end"]:
                counted[index] += 1

    threads = [threading.Thread(target=work, args=(index,), daemon=True)
               for index in range(concurrency)]
    for thread in threads:
        thread.start()
    now = time.perf_counter()
    window.update(start=now + warmup_s, end=now + warmup_s + seconds)
    barrier.wait()
    for thread in threads:
        thread.join()
    for caller in callers:
        if hasattr(caller, "close"):
            caller.close()
    if failures:
        raise RuntimeError(f"{len(failures)} calls failed, e.g. {failures[0]!r}")
    return sum(counted) * rows / seconds


# -- the server process -------------------------------------------------------------------------

class ServerProcess:
    """`python -m serving.server` on a models.config, with ports picked by the server."""

    _ADDRESS = re.compile(r"Serving (gRPC|REST) on (\S+)")

    def __init__(self, models_config: str, flags: Sequence[str] = (),
                 start_timeout_s: float = 180.0):
        command = [sys.executable, "-m", "serving.server", "--model_config_file", models_config,
                   "--port", "0", "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0",
                   "--log_level", "INFO", *flags]
        self._process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, text=True)
        self._log: List[str] = []
        addresses: Dict[str, str] = {}
        found = threading.Event()

        def read_log():
            for line in self._process.stderr:
                self._log.append(line.rstrip())
                del self._log[:-50]
                match = self._ADDRESS.search(line)
                if match:
                    addresses[match.group(1)] = match.group(2)
                    if len(addresses) == 2:
                        found.set()
            found.set()  # the process ended

        threading.Thread(target=read_log, daemon=True).start()
        if not found.wait(start_timeout_s) or len(addresses) < 2:
            self.stop()
            raise RuntimeError("the server did not start:\n  " + "\n  ".join(self._log[-15:]))
        self.grpc_address, self.rest_url = addresses["gRPC"], addresses["REST"]

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _models_config(directory: str, model: str, version_dir: str) -> str:
    """A models.config serving `version_dir` as version 1 of `model` (through a symlink, so
    any SavedModel directory works)."""
    base = os.path.join(directory, model)
    os.makedirs(base)
    os.symlink(version_dir, os.path.join(base, "1"))
    path = os.path.join(directory, "models.config")
    with open(path, "w", encoding="utf-8") as config_file:
        config_file.write(f'model_config_list {{ config {{ name: "{model}" base_path: "{base}" '
                          'model_platform: "tensorflow" } }\n')
    return path


# -- the run ------------------------------------------------------------------------------------

def _p(samples, q: float) -> float:
    import numpy as np

    return float(np.percentile(samples, q))


def _median(values) -> float:
    import numpy as np

    return float(np.median(values))


def _pair(samples) -> str:
    return f"{_p(samples, 50):7.2f} /{_p(samples, 99):7.2f}"


def _server_batching_flags(parameters_file: str, num_batch_threads: Optional[int]):
    """The server flags of the batched runs, and the options they stand for."""
    from serving import batching

    options = batching.load_batching_parameters(parameters_file)
    if num_batch_threads is None:
        return ["--enable_batching", "--batching_parameters_file", parameters_file], options
    options = batching.BatchingOptions(
        max_batch_size=options.max_batch_size, batch_timeout_s=options.batch_timeout_s,
        num_batch_threads=num_batch_threads, max_enqueued_batches=options.max_enqueued_batches)
    return ["--enable_batching", "--max_batch_size", str(options.max_batch_size),
            "--batch_timeout_micros", str(round(options.batch_timeout_s * 1e6)),
            "--num_batch_threads", str(num_batch_threads),
            "--max_enqueued_batches", str(options.max_enqueued_batches)], options


def run(args: argparse.Namespace) -> int:
    try:
        rows_cases = _int_list(args.rows, "--rows")
        throughput_rows = _int_list(args.throughput_rows, "--throughput-rows")
        concurrencies = _int_list(args.concurrency, "--concurrency")
        if args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
            raise ValueError("--requests, --seconds and --rounds must be positive")
        if not os.path.isfile(args.batching_parameters):
            raise ValueError(f"--batching-parameters: no such file {args.batching_parameters}")
        batching_flags, options = _server_batching_flags(args.batching_parameters,
                                                         args.num_batch_threads)
        version_dir = resolve_model_dir(args.model_dir, args.home)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from pipeline.config import MODEL_NAME

    started = time.perf_counter()
    from serving.allocator import retain_freed_memory
    from serving.servable import fast_signature_call

    # The server fixes malloc's thresholds (serving/allocator.py); the in-process limit
    # runs the same way, or it would not be the limit.
    retain_freed_memory()
    loaded = tf.saved_model.load(version_dir)
    # Called as the server calls it, so that the gap to the server is transport and protos.
    signature = fast_signature_call(args.signature, loaded.signatures[args.signature])
    merged = {(rows, callers): min(callers, max(1, options.max_batch_size // rows)) * rows
              for rows in throughput_rows for callers in concurrencies}
    examples = synthetic_examples(max(rows_cases + throughput_rows + list(merged.values())),
                                  args.seed)
    arrays = {rows: request_arrays(examples[:rows], signature, args.signature)
              for rows in set(rows_cases + throughput_rows + list(merged.values()))}
    print(f"Serving benchmark: {version_dir}\n  signature {args.signature}, loopback 127.0.0.1, "
          f"{os.cpu_count()} CPUs shared by client and server (load average "
          f"{os.getloadavg()[0]:.1f} at start), TensorFlow {tf.__version__}\n"
          f"  batching: max_batch_size {options.max_batch_size}, timeout "
          f"{options.batch_timeout_s * 1e3:g} ms, {options.num_batch_threads} threads, from "
          f"{args.batching_parameters}", flush=True)

    latency: Dict[tuple, list] = {}
    throughput: Dict[tuple, List[float]] = {}  # rows/s per round
    # Both servers run for the whole benchmark (idle when not asked), so every case is
    # measured in-process and over each server back to back: a change in the machine's load
    # shifts them together.
    with tempfile.TemporaryDirectory(prefix="serving_bench_") as scratch, \
            contextlib.ExitStack() as stack:
        models_config = _models_config(scratch, MODEL_NAME, version_dir)
        servers = {mode: stack.enter_context(ServerProcess(models_config, flags))
                   for mode, flags in (("", []), ("+batching", batching_flags))}
        stubs = {mode: prediction_service_pb2_grpc.PredictionServiceStub(
                     stack.enter_context(grpc.insecure_channel(server.grpc_address)))
                 for mode, server in servers.items()}
        for rows in rows_cases:
            callers = {"in-process": in_process_call(signature, arrays[rows])}
            for mode, server in servers.items():
                callers["gRPC" + mode] = grpc_call(stubs[mode], MODEL_NAME, args.signature,
                                                   arrays[rows])
                callers["REST" + mode] = stack.enter_context(contextlib.closing(
                    RestCaller(server.rest_url, MODEL_NAME, args.signature, arrays[rows])))
            # In rounds, every way once per round in a rotated order, as the throughput cases:
            # a change in the machine's load then shifts all the ways of a round together.
            names = list(callers)
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for way in names[shift:] + names[:shift]:
                    latency.setdefault((way, rows), []).append(latency_ms(
                        callers[way], max(1, args.requests // args.rounds),
                        args.seconds / args.rounds))
        for rows in throughput_rows:
            for callers in concurrencies:
                batch = merged[(rows, callers)]
                ways = {
                    "in-process": (lambda: in_process_call(signature, arrays[rows]),
                                   callers, rows),
                    "in-process batched": (lambda: in_process_call(signature, arrays[batch]),
                                           options.num_batch_threads, batch),
                }
                for mode, server in servers.items():
                    ways["gRPC" + mode] = (
                        lambda stub=stubs[mode]: grpc_call(stub, MODEL_NAME, args.signature,
                                                           arrays[rows]), callers, rows)
                    ways["REST" + mode] = (
                        lambda url=server.rest_url: RestCaller(url, MODEL_NAME, args.signature,
                                                               arrays[rows]), callers, rows)
                names = list(ways)
                for round_index in range(args.rounds):
                    shift = round_index % len(names)
                    for way in names[shift:] + names[:shift]:
                        make_call, threads, rows_per_call = ways[way]
                        throughput.setdefault((way, rows, callers), []).append(
                            throughput_rows_per_s(make_call, threads, rows_per_call,
                                                  args.seconds))

    print(f"\nLatency, ms p50 / p99 (sequential calls, up to {args.requests} per case in "
          f"{args.rounds} rounds)")
    ways = ["in-process", "gRPC", "REST", "gRPC+batching", "REST+batching"]
    print(f"  {'rows':>4}  " + "  ".join(f"{way:>17}" for way in ways))
    for rows in rows_cases:
        print(f"  {rows:>4}  " + "  ".join(
            f"{_pair([ms for part in latency[(way, rows)] for ms in part]):>17}"
            for way in ways))
    print(f"\nThroughput, rows/s (median of {args.rounds} rounds of {args.seconds:g} s per case; "
          "in-process batched: "
          f"{options.num_batch_threads} callers, each call on the rows of the requests "
          "batching could merge)")
    columns = ["in-process", "in-process batched", "gRPC", "gRPC+batching", "REST",
               "REST+batching"]
    print(f"  {'rows':>4}  {'callers':>7}  " + "  ".join(f"{column:>18}" for column in columns))
    for rows in throughput_rows:
        for callers in concurrencies:
            print(f"  {rows:>4}  {callers:>7}  " + "  ".join(
                f"{_median(throughput[(column, rows, callers)]):>18,.0f}" for column in columns))

    print(f"\n(took {time.perf_counter() - started:.0f} s)")
    if 1 in rows_cases:
        overheads = [_p(served, 50) - _p(local, 50)
                     for served, local in zip(latency[("gRPC", 1)], latency[("in-process", 1)])]
        print(f"gRPC single-row p50 overhead vs in-process: {_median(overheads):.2f} ms "
              f"(goal <= {GOAL_OVERHEAD_MS:g} ms; median of the rounds' p50 differences, "
              f"rounds {min(overheads):.2f}-{max(overheads):.2f} ms)")
    rows, callers = max(throughput_rows), max(concurrencies)
    # Merged batches are not always faster per row than concurrent smaller calls, so the
    # limit is the better of the two in-process figures.
    limit = max(_median(throughput[("in-process batched", rows, callers)]),
                _median(throughput[("in-process", rows, callers)]))
    served = throughput[("gRPC+batching", rows, callers)]
    print(f"batched throughput vs in-process batched: {100 * _median(served) / limit:.0f}% "
          f"(goal >= {100 * GOAL_BATCHED_FRACTION:.0f}%; gRPC with batching over the better "
          f"in-process figure, {rows}-row requests, {callers} callers; rounds "
          f"{100 * min(served) / limit:.0f}-{100 * max(served) / limit:.0f}%)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m benchmarks.serving_latency", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
