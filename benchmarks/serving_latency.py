"""Serving latency and throughput over loopback, beside the in-process SavedModel call.

    bin/poso bench serving --home /tmp/bench_demo
    bin/poso bench serving --model-dir HOME/serving/poso_ranking/<v>

Serves a pushed ranking model (the latest under HOME/serving/poso_ranking unless
--model-dir names one; `bin/poso demo --home /tmp/bench_demo --rows-per-day 800
--train-steps 20` makes one in about 3 minutes) with this project's server in a separate
process on 127.0.0.1, once without and once with server-side batching
(deploy/batching_parameters.txt), and measures on the same random raw tf.Examples:

* latency: p50 / p99 of sequential 1-row and 100-row Predict calls over gRPC and REST,
  beside the same call on the SavedModel loaded in a process of its own (the limit; made
  the way the server makes it, through `servable.SessionSignatures`, with malloc's
  thresholds fixed by `serving/allocator.py` and the same TensorFlow thread pools, so the
  gap is transport, TensorProto conversion and batching, not a slower way of calling the
  model);
* throughput: rows/s of 1-row and 100-row requests from 8 and 32 concurrent callers,
  beside the in-process call from as many threads, and "in-process batched": the model
  called on the rows of as many requests as server-side batching could merge
  (min(callers, max_batch_size // rows) requests) from num_batch_threads threads, i.e.
  what the server's batching would reach with no transport and perfectly filled batches.

For the largest requests at the most callers, the CPU each way spends per 100 rows is
printed too: in the in-process worker, or in the server and in the callers' client.

The two goal lines at the end compare the gRPC single-row p50 with the in-process one,
and the rows/s of gRPC with batching at the most callers, on the largest requests, with
the better of the two in-process figures of that row.

CPUs (--server-cpus): the servers and the in-process limit run pinned to the same CPUs (by
default the upper half of those this process may use), and the callers, the load generator,
to the others, as a load generator on its own host would be. Without the split the callers'
gRPC client, about 0.4 ms of CPU per 100-row request in Python, is charged to the server but not to
the in-process limit, which has no client. The in-process limit therefore runs in a worker
process started on the server's CPUs (TensorFlow sizes its thread pools by the CPUs a process
may use). `--server-cpus 0` runs callers, servers and worker on all CPUs, shared (the method
before 2026-12-01, but for the worker). num_batch_threads defaults to the server's CPUs.

Every call starts from numpy arrays and ends with numpy arrays: in-process, tensors are
made and results fetched; over gRPC the request proto is built and the outputs decoded;
over REST the JSON body is encoded and the answer decoded (one keep-alive connection per
caller). Each case is bounded by --requests and --seconds. The machine's CPUs are shared
with other work, so a throughput case moves by 10-20% from one 2-second window to the
next, and a 1-row p50 by 0.2-0.5 ms from one minute to the next: every case
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
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import (Callable, Dict, FrozenSet, List, Mapping, NamedTuple, Optional,
                    Sequence, Tuple)

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
                        help="time limit of each throughput case and of each latency case over "
                             "all rounds (default 2)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of every case (default 3)")
    parser.add_argument("--batching-parameters", default=str(DEPLOY_BATCHING_PARAMETERS),
                        help="the server's batching in the batched runs (TF Serving's format; "
                             "default deploy/batching_parameters.txt)")
    parser.add_argument("--num-batch-threads", type=int,
                        help="override the parameters' num_batch_threads (default: the "
                             "server's CPUs, as deploy/batching_parameters.txt advises)")
    parser.add_argument("--server-cpus", type=int,
                        help="CPUs of the servers and of the in-process limit; the callers get "
                             "the others (default: half of this process's CPUs; 0: no split, "
                             "everything shares every CPU)")
    parser.add_argument("--tensorflow-intra-op-parallelism", type=int, default=0,
                        help="threads of one op, in the servers and the in-process limit alike "
                             "(the server flag of the same name; default 0, TensorFlow's choice)")
    parser.add_argument("--tensorflow-inter-op-parallelism", type=int, default=0,
                        help="ops run in parallel, in the servers and the in-process limit alike "
                             "(default 0, TensorFlow's choice)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the request examples")
    # The InProcessWorker's command line: the SavedModel and how many examples to make.
    parser.add_argument("--in-process-worker", metavar="MODEL_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--in-process-examples", type=int, default=1, help=argparse.SUPPRESS)
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


def request_arrays(examples: Sequence[bytes], input_specs: Mapping[str, object],
                   signature_name: str):
    """{input: numpy array} of `examples` for a signature with `input_specs` (`_input_specs`)."""
    from serving import client, instances

    if signature_name == "serving_default":
        (name,) = input_specs
        return client.input_arrays(list(examples), input_name=name)
    rows = instances.raw_instances(examples)
    columns = {name: [row[name] for row in rows] for name in input_specs}
    return client.input_arrays(columns, dtypes={name: spec.dtype
                                                for name, spec in input_specs.items()})


def _json_inputs(arrays) -> Dict[str, object]:
    def encode(array):
        if array.dtype == object:
            return [{"b64": base64.b64encode(item).decode("ascii")} for item in array.tolist()]
        return array.tolist()
    return {name: encode(array) for name, array in arrays.items()}


# -- the callers --------------------------------------------------------------------------------

def in_process_call(runner, signature_name: str, arrays) -> Callable[[], object]:
    """The model called as the server calls it: `runner` is a servable.SessionSignatures."""
    def call():
        return runner.run(signature_name, arrays)
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


class Throughput(NamedTuple):
    rows_per_s: float
    # CPU milliseconds per 100 rows in the counted window, by clock name (e.g. "server").
    cpu_ms_per_100_rows: Dict[str, float]


def measure_throughput(make_call: Callable[[], Callable[[], object]], concurrency: int,
                       rows: int, seconds: float, warmup_s: float = 0.5,
                       cpu_clocks: Optional[Mapping[str, Callable[[], float]]] = None
                       ) -> Throughput:
    """Rows/s completed by `concurrency` threads calling back to back for `seconds` (the
    first `warmup_s` not counted), and the CPU seconds each of `cpu_clocks` (process CPU
    time readers) spent per row in the counted window. `make_call` gives each thread its
    own caller."""
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
    clocks = dict(cpu_clocks or {})
    barrier.wait()
    time.sleep(max(0.0, window["start"] - time.perf_counter()))
    started = {name: clock() for name, clock in clocks.items()}
    time.sleep(max(0.0, window["end"] - time.perf_counter()))
    spent = {name: clock() - started[name] for name, clock in clocks.items()}
    for thread in threads:
        thread.join()
    for caller in callers:
        if hasattr(caller, "close"):
            caller.close()
    if failures:
        raise RuntimeError(f"{len(failures)} calls failed, e.g. {failures[0]!r}")
    done = sum(counted) * rows
    return Throughput(done / seconds, {name: 1e5 * cpu_s / done if done else float("nan")
                                       for name, cpu_s in spent.items()})


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_clocks(server_pid: int) -> Dict[str, Callable[[], float]]:
    """The CPU clocks of a served case: the server's (where /proc has it) and this process's,
    whose CPU is the callers' client (plus a few idle threads)."""
    clocks: Dict[str, Callable[[], float]] = {}
    if os.path.exists(f"/proc/{server_pid}/stat"):
        clocks["server"] = lambda: process_cpu_seconds(server_pid)
    clocks["callers"] = time.process_time
    return clocks


# -- the server process -------------------------------------------------------------------------

def split_cpus(server_cpus: Optional[int]) -> Tuple[Optional[FrozenSet[int]],
                                                    Optional[FrozenSet[int]]]:
    """(the servers' and in-process limit's CPUs, the callers' CPUs) out of those this
    process may use; (None, None) for no split: `server_cpus` 0, a single CPU, or no CPU
    affinity on this platform. Raises ValueError for a count that leaves no CPU to either."""
    if server_cpus is not None and server_cpus < 0:
        raise ValueError(f"--server-cpus must be >= 0, got {server_cpus}")
    if server_cpus == 0 or not hasattr(os, "sched_getaffinity"):
        return None, None
    available = sorted(os.sched_getaffinity(0))
    count = len(available) // 2 if server_cpus is None else server_cpus
    if server_cpus is None and count == 0:
        return None, None
    if not 0 < count < len(available):
        raise ValueError(f"--server-cpus {count} leaves no CPU for the callers or the server: this "
                         f"process may use {len(available)} CPUs (0: no split)")
    return frozenset(available[-count:]), frozenset(available[:-count])


def pinned_command(cpus: Optional[FrozenSet[int]], command: Sequence[str]) -> List[str]:
    """`command` run on `cpus` only: the affinity is set before exec, so the program and the
    thread pools it sizes by its CPUs (TensorFlow's, gRPC's) see only those."""
    if cpus is None:
        return list(command)
    cpu_set = "{" + ", ".join(str(cpu) for cpu in sorted(cpus)) + "}"
    return [sys.executable, "-c",
            f"import os, sys; os.sched_setaffinity(0, {cpu_set}); "
            "os.execvp(sys.argv[1], sys.argv[1:])", *command]


@contextlib.contextmanager
def process_pinned_to(cpus: Optional[FrozenSet[int]]):
    """Runs the block with every thread of this process on `cpus` (threads started meanwhile
    inherit it), then gives each thread still alive the CPUs it had."""
    if cpus is None:
        yield
        return
    previous = {}
    for task in os.listdir("/proc/self/task"):
        try:
            previous[int(task)] = os.sched_getaffinity(int(task))
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    try:
        yield
    finally:
        for task, mask in previous.items():
            try:
                os.sched_setaffinity(task, mask)
            except ProcessLookupError:
                pass
        for task in os.listdir("/proc/self/task"):
            if int(task) not in previous:  # started in the block: back to the process's CPUs
                try:
                    os.sched_setaffinity(int(task), previous[os.getpid()])
                except ProcessLookupError:
                    pass


class _LogTail:
    """Drains a child's stderr in a thread (a full pipe would stall it), keeping the last lines."""

    def __init__(self, stream, on_line: Callable[[str], None] = lambda line: None,
                 on_end: Callable[[], None] = lambda: None):
        self.lines: List[str] = []
        self.done = threading.Event()

        def read():
            for line in stream:
                self.lines.append(line.rstrip())
                del self.lines[:-50]
                on_line(line)
            self.done.set()
            on_end()

        threading.Thread(target=read, daemon=True).start()

    def text(self, count: int = 15) -> str:
        return "\n  ".join(self.lines[-count:])


class _ChildProcess:
    """A benchmark's child process (`self._process`), stopped when its block ends."""

    _process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self._process.pid

    def _ask_to_end(self) -> None:
        self._process.terminate()

    def stop(self) -> None:
        if self._process.poll() is None:
            self._ask_to_end()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class InProcessWorker(_ChildProcess):
    """The in-process limit, in a process of its own on the servers' CPUs.

    It loads the SavedModel as the server does (malloc thresholds fixed, thread pools sized by
    the same flags, the signature run by `servable.SessionSignatures`) and answers one
    JSON line per case on stdin: {"case": "latency", "rows", "requests", "seconds"} ->
    {"samples": [ms, ...]}; {"case": "throughput", "rows", "threads", "seconds"} ->
    a Throughput as a dict.
    """

    # Seconds an answer may take beyond the case's own time (the start: loading the model).
    START_TIMEOUT_S = 180.0
    ANSWER_MARGIN_S = 60.0

    def __init__(self, version_dir: str, signature_name: str, examples: int, seed: int,
                 cpus: Optional[FrozenSet[int]], thread_pool_flags: Sequence[str] = ()):
        command = pinned_command(cpus, [
            sys.executable, "-m", "benchmarks.serving_latency", "--in-process-worker",
            version_dir, "--signature", signature_name, "--seed", str(seed),
            "--in-process-examples", str(examples), *thread_pool_flags])
        self._process = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
        try:
            self._log = _LogTail(self._process.stderr)
            # Answers are JSON lines; anything else a library prints to stdout is skipped.
            self._answers: "queue.Queue[Optional[dict]]" = queue.Queue()
            threading.Thread(target=self._read_answers, daemon=True).start()
            self.cpus = self._receive(self.START_TIMEOUT_S)["cpus"]
            if cpus is not None and self.cpus is not None and set(self.cpus) != set(cpus):
                raise RuntimeError(f"in-process worker: runs on CPUs {self.cpus}, not on "
                                   f"{sorted(cpus)}")
        except BaseException:
            self.stop()
            raise

    def _read_answers(self) -> None:
        for line in self._process.stdout:
            if line.startswith("{"):
                self._answers.put(json.loads(line))
        self._answers.put(None)  # the worker ended

    def _fail(self, reason: str):
        self.stop()
        self._log.done.wait(5)
        raise RuntimeError(f"in-process worker: {reason} (exit code {self._process.poll()})"
                           f"\n  {self._log.text()}")

    def _receive(self, timeout_s: float) -> dict:
        try:
            answer = self._answers.get(timeout=timeout_s)
        except queue.Empty:
            self._fail(f"no answer within {timeout_s:g} s")
        if answer is None:
            self._fail("the worker ended")
        if "error" in answer:
            self._fail(answer["error"])
        return answer

    def _ask(self, seconds: float, **case) -> dict:
        try:
            self._process.stdin.write(json.dumps(dict(case, seconds=seconds)) + "\n")
            self._process.stdin.flush()
        except OSError as error:  # it ended between cases
            self._fail(f"cannot send a case: {error}")
        return self._receive(seconds + self.ANSWER_MARGIN_S)

    def latency_ms(self, rows: int, requests: int, seconds: float) -> List[float]:
        return self._ask(seconds, case="latency", rows=rows, requests=requests)["samples"]

    def throughput(self, rows: int, threads: int, seconds: float) -> Throughput:
        return Throughput(**self._ask(seconds, case="throughput", rows=rows, threads=threads))

    def _ask_to_end(self) -> None:
        self._process.stdin.close()  # its loop ends with stdin


def _worker_main(args: argparse.Namespace) -> int:
    """The InProcessWorker's side: serves cases until stdin ends."""
    try:
        from serving.allocator import retain_freed_memory
        from serving.server import set_thread_pools
        from serving.servable import SessionSignatures, read_serve_meta_graph

        # The server fixes malloc's thresholds (serving/allocator.py) and sizes TensorFlow's
        # thread pools by its flags; the in-process limit runs the same way, or it would not
        # be the limit.
        retain_freed_memory()
        set_thread_pools(args.tensorflow_intra_op_parallelism,
                         args.tensorflow_inter_op_parallelism)
        meta_graph = read_serve_meta_graph(args.in_process_worker)
        runner = SessionSignatures(args.in_process_worker, meta_graph)
        input_specs = _input_specs(args.in_process_worker, args.signature, meta_graph)
        examples = synthetic_examples(args.in_process_examples, args.seed)
        arrays: Dict[int, object] = {}

        def rows_arrays(rows: int):
            if rows not in arrays:
                arrays[rows] = request_arrays(examples[:rows], input_specs, args.signature)
            return arrays[rows]

        print(json.dumps({"cpus": sorted(os.sched_getaffinity(0))
                          if hasattr(os, "sched_getaffinity") else None}), flush=True)
    except Exception as error:  # noqa: BLE001 - the parent prints it
        print(json.dumps({"error": f"{type(error).__name__}: {error}"}), flush=True)
        return 1
    for line in sys.stdin:
        try:
            case = json.loads(line)
            call = in_process_call(runner, args.signature, rows_arrays(case["rows"]))
            if case["case"] == "latency":
                answer = {"samples": latency_ms(call, case["requests"], case["seconds"])}
            else:
                answer = measure_throughput(lambda: call, case["threads"], case["rows"],
                                            case["seconds"],
                                            cpu_clocks={"in-process": time.process_time}
                                            )._asdict()
        except Exception as error:  # noqa: BLE001 - the parent prints it
            answer = {"error": f"{type(error).__name__}: {error}"}
        print(json.dumps(answer), flush=True)
    return 0


class ServerProcess(_ChildProcess):
    """`python -m serving.server` on a models.config, with ports picked by the server."""

    _ADDRESS = re.compile(r"(?:Running (gRPC) ModelServer|Exporting HTTP/(REST) API) at (\S+)")

    def __init__(self, models_config: str, flags: Sequence[str] = (),
                 start_timeout_s: float = 180.0, cpus: Optional[FrozenSet[int]] = None):
        command = [sys.executable, "-m", "serving.server", "--model_config_file", models_config,
                   "--port", "0", "--rest_api_port", "0", "--file_system_poll_wait_seconds", "0",
                   "--log_level", "INFO", *flags]
        self._process = subprocess.Popen(pinned_command(cpus, command), cwd=REPO_ROOT,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
        addresses: Dict[str, str] = {}
        found = threading.Event()

        def on_line(line: str) -> None:
            match = self._ADDRESS.search(line)
            if match:
                addresses[match.group(1) or match.group(2)] = match.group(3)
                if len(addresses) == 2:
                    found.set()

        log = _LogTail(self._process.stderr, on_line, on_end=found.set)  # or the process ended
        try:
            if not found.wait(start_timeout_s) or len(addresses) < 2:
                raise RuntimeError("the server did not start:\n  " + log.text())
        except BaseException:  # Ctrl-C while it loads, too
            self.stop()
            raise
        self.grpc_address, self.rest_url = addresses["gRPC"], addresses["REST"]


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


def _thread_pool_flags(args: argparse.Namespace) -> List[str]:
    """TensorFlow's thread pool sizes as flags both the server and the worker accept."""
    return ["--tensorflow-intra-op-parallelism", str(args.tensorflow_intra_op_parallelism),
            "--tensorflow-inter-op-parallelism", str(args.tensorflow_inter_op_parallelism)]


def _server_batching_flags(parameters_file: str, num_batch_threads: int):
    """The server flags of the batched runs (the file's batching with `num_batch_threads`),
    and the options they stand for."""
    from serving import batching

    options = batching.load_batching_parameters(parameters_file)
    options = batching.BatchingOptions(
        max_batch_size=options.max_batch_size, batch_timeout_s=options.batch_timeout_s,
        num_batch_threads=num_batch_threads, max_enqueued_batches=options.max_enqueued_batches)
    return ["--enable_batching", "--max_batch_size", str(options.max_batch_size),
            "--batch_timeout_micros", str(round(options.batch_timeout_s * 1e6)),
            "--num_batch_threads", str(num_batch_threads),
            "--max_enqueued_batches", str(options.max_enqueued_batches)], options


def run(args: argparse.Namespace) -> int:
    if args.in_process_worker:
        return _worker_main(args)
    try:
        rows_cases = _int_list(args.rows, "--rows")
        throughput_rows = _int_list(args.throughput_rows, "--throughput-rows")
        concurrencies = _int_list(args.concurrency, "--concurrency")
        if args.requests < 1 or args.seconds <= 0 or args.rounds < 1:
            raise ValueError("--requests, --seconds and --rounds must be positive")
        if not os.path.isfile(args.batching_parameters):
            raise ValueError(f"--batching-parameters: no such file {args.batching_parameters}")
        server_cpus, caller_cpus = split_cpus(args.server_cpus)
        batching_flags, options = _server_batching_flags(
            args.batching_parameters,
            args.num_batch_threads if args.num_batch_threads is not None
            else len(server_cpus) if server_cpus else _usable_cpu_count())
        version_dir = resolve_model_dir(args.model_dir, args.home)
        input_specs = _input_specs(version_dir, args.signature)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    with process_pinned_to(caller_cpus):
        return _measure(args, version_dir, input_specs, rows_cases, throughput_rows,
                        concurrencies, batching_flags, options, server_cpus, caller_cpus)


def _usable_cpu_count() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _input_specs(version_dir: str, signature_name: str, meta_graph=None):
    """The signature's inputs as its SignatureDef declares them: the callers need no model.
    `meta_graph`: the export's serve MetaGraphDef when already read."""
    from serving.servable import Signature, read_serve_meta_graph

    signature_defs = (meta_graph or read_serve_meta_graph(version_dir)).signature_def
    if signature_name not in signature_defs:
        raise ValueError(f"{version_dir} has no signature {signature_name!r} (it has "
                         f"{sorted(signature_defs)})")
    return Signature.from_proto(signature_name, signature_defs[signature_name]).inputs


def _cpus_text(cpus) -> str:
    return ",".join(str(cpu) for cpu in sorted(cpus))


def _measure(args, version_dir, input_specs, rows_cases, throughput_rows, concurrencies,
             batching_flags, options, server_cpus, caller_cpus) -> int:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    from pipeline.config import MODEL_NAME

    started = time.perf_counter()
    merged = {(rows, callers): min(callers, max(1, options.max_batch_size // rows)) * rows
              for rows in throughput_rows for callers in concurrencies}
    example_count = max(rows_cases + throughput_rows + list(merged.values()))
    examples = synthetic_examples(example_count, args.seed)
    arrays = {rows: request_arrays(examples[:rows], input_specs, args.signature)
              for rows in set(rows_cases + throughput_rows)}
    if server_cpus is None:
        cpus = (f"{_usable_cpu_count()} CPUs shared by callers, servers and the in-process limit "
                "(no split)")
    else:
        cpus = (f"servers and in-process limit on CPU {_cpus_text(server_cpus)}, callers on "
                f"CPU {_cpus_text(caller_cpus)}")
    print(f"Serving benchmark: {version_dir}\n  signature {args.signature}, loopback 127.0.0.1, "
          f"{cpus} (load average {os.getloadavg()[0]:.1f} at start), TensorFlow "
          f"{tf.__version__}, intra-op threads {args.tensorflow_intra_op_parallelism}, "
          f"inter-op threads {args.tensorflow_inter_op_parallelism} (0: TensorFlow's choice)\n"
          f"  batching: max_batch_size {options.max_batch_size}, timeout "
          f"{options.batch_timeout_s * 1e3:g} ms, {options.num_batch_threads} batch "
          f"thread{'s' if options.num_batch_threads > 1 else ''}, from "
          f"{args.batching_parameters}", flush=True)

    latency: Dict[tuple, list] = {}
    throughput: Dict[tuple, List[Throughput]] = {}  # per round
    # Both servers and the worker run for the whole benchmark (idle when not asked), so every
    # case is measured in-process and over each server back to back: a change in the
    # machine's load shifts them together.
    with tempfile.TemporaryDirectory(prefix="serving_bench_") as scratch, \
            contextlib.ExitStack() as stack:
        models_config = _models_config(scratch, MODEL_NAME, version_dir)
        thread_pool_flags = _thread_pool_flags(args)
        worker = stack.enter_context(InProcessWorker(version_dir, args.signature, example_count,
                                                     args.seed, server_cpus, thread_pool_flags))
        servers = {mode: stack.enter_context(ServerProcess(
                       models_config, [*thread_pool_flags, *flags], cpus=server_cpus))
                   for mode, flags in (("", []), ("+batching", batching_flags))}
        stubs = {mode: prediction_service_pb2_grpc.PredictionServiceStub(
                     stack.enter_context(grpc.insecure_channel(server.grpc_address)))
                 for mode, server in servers.items()}
        for rows in rows_cases:
            # way -> measure(requests, seconds) -> per-call ms
            ways = {"in-process": lambda requests, seconds, rows=rows:
                    worker.latency_ms(rows, requests, seconds)}
            for mode, server in servers.items():
                for name, caller in (
                        ("gRPC" + mode, grpc_call(stubs[mode], MODEL_NAME, args.signature,
                                                  arrays[rows])),
                        ("REST" + mode, stack.enter_context(contextlib.closing(RestCaller(
                            server.rest_url, MODEL_NAME, args.signature, arrays[rows]))))):
                    ways[name] = lambda requests, seconds, caller=caller: latency_ms(
                        caller, requests, seconds)
            # In rounds, every way once per round in a rotated order, as the throughput cases:
            # a change in the machine's load then shifts all the ways of a round together.
            names = list(ways)
            for round_index in range(args.rounds):
                shift = round_index % len(names)
                for way in names[shift:] + names[:shift]:
                    latency.setdefault((way, rows), []).append(ways[way](
                        max(1, args.requests // args.rounds), args.seconds / args.rounds))
        for rows in throughput_rows:
            for callers in concurrencies:
                batch = merged[(rows, callers)]
                # way -> measure(seconds) -> Throughput
                ways = {
                    "in-process": lambda seconds, rows=rows, callers=callers:
                        worker.throughput(rows, callers, seconds),
                    "in-process batched": lambda seconds, batch=batch:
                        worker.throughput(batch, options.num_batch_threads, seconds),
                }
                for mode, server in servers.items():
                    for name, make_call in (
                            ("gRPC" + mode, lambda stub=stubs[mode], rows=rows: grpc_call(
                                stub, MODEL_NAME, args.signature, arrays[rows])),
                            ("REST" + mode, lambda url=server.rest_url, rows=rows: RestCaller(
                                url, MODEL_NAME, args.signature, arrays[rows]))):
                        ways[name] = (lambda seconds, make_call=make_call, rows=rows,
                                      callers=callers, clocks=cpu_clocks(server.pid):
                                      measure_throughput(make_call, callers, rows, seconds,
                                                         cpu_clocks=clocks))
                names = list(ways)
                for round_index in range(args.rounds):
                    shift = round_index % len(names)
                    for way in names[shift:] + names[:shift]:
                        throughput.setdefault((way, rows, callers), []).append(
                            ways[way](args.seconds))

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
          f"{options.num_batch_threads} caller{'s' if options.num_batch_threads > 1 else ''}, "
          "each call on the rows of the requests "
          "batching could merge)")
    columns = ["in-process", "in-process batched", "gRPC", "gRPC+batching", "REST",
               "REST+batching"]

    def rates(way: str, rows: int, callers: int) -> List[float]:
        return [case.rows_per_s for case in throughput[(way, rows, callers)]]

    print(f"  {'rows':>4}  {'callers':>7}  " + "  ".join(f"{column:>18}" for column in columns))
    for rows in throughput_rows:
        for callers in concurrencies:
            print(f"  {rows:>4}  {callers:>7}  " + "  ".join(
                f"{_median(rates(column, rows, callers)):>18,.0f}" for column in columns))
    rows, callers = max(throughput_rows), max(concurrencies)
    print(f"\nCPU ms per 100 rows in the {rows}-row, {callers}-caller cases (median of rounds; "
          "callers: this process, i.e. its gRPC or HTTP client)")
    for column in columns:
        cases = throughput[(column, rows, callers)]
        print(f"  {column:<20}" + " + ".join(
            f"{_median([case.cpu_ms_per_100_rows[part] for case in cases]):.2f} {part}"
            for part in cases[0].cpu_ms_per_100_rows))
    print(f"\n(took {time.perf_counter() - started:.0f} s)")
    if 1 in rows_cases:
        overheads = [_p(served, 50) - _p(local, 50)
                     for served, local in zip(latency[("gRPC", 1)], latency[("in-process", 1)])]
        print(f"gRPC single-row p50 overhead vs in-process: {_median(overheads):.2f} ms "
              f"(goal <= {GOAL_OVERHEAD_MS:g} ms; median of the rounds' p50 differences, "
              f"rounds {min(overheads):.2f}-{max(overheads):.2f} ms)")
    # Merged batches are not always faster per row than concurrent smaller calls, so the
    # limit is the better of the two in-process figures.
    limit = max(_median(rates("in-process batched", rows, callers)),
                _median(rates("in-process", rows, callers)))
    served = rates("gRPC+batching", rows, callers)
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
