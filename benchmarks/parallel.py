"""Trains benchmark models side by side, one process and one TensorFlow thread each.

The benchmark models are small (batches of 512, dense layers of 32-256 units): one training does
not keep two cores busy. On these 2 cores two single-threaded trainings together make about 1.7
times the examples per second of one two-threaded training (`bin/poso bench train`, run once alone
and twice at once with one thread; benchmarks/README.md, "Time"). A model trained in a worker
differs from one trained in the parent only by the floating-point order of a reduction over
one thread instead of two.

Workers are spawned, not forked (TensorFlow's runtime does not survive a fork), and end with the
process that started them (Linux's parent-death signal), so a stopped benchmark leaves none behind.
"""
import concurrent.futures
import ctypes
import multiprocessing
import os
import signal
from typing import Any, Callable, List, Sequence, Tuple

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def default_jobs(limit: int = 4) -> int:
    """One job per core this process may run on, at most `limit` (each holds its own copy of the data)."""
    return max(1, min(limit, len(os.sched_getaffinity(0))))


def _start_worker(threads: int) -> None:
    try:  # a worker whose parent died would otherwise train on, unseen, to the end of its queue
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the executor still stops idle workers
        pass
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def run_all(function: Callable[..., Any], calls: Sequence[Tuple[Any, ...]], jobs: int) -> List[Any]:
    """[function(*args) for args in calls], in that order; with jobs > 1, in `jobs` worker
    processes of one TensorFlow thread each. `function` must be importable by name (module level).
    The first call that raises stops the rest: the calls not started are cancelled and its error
    is raised here."""
    if jobs < 1:
        raise ValueError(f"jobs={jobs!r}: expected >= 1")
    if jobs == 1 or len(calls) < 2:
        return [function(*args) for args in calls]
    executor = concurrent.futures.ProcessPoolExecutor(
        max_workers=min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=(1,))
    try:
        futures = [executor.submit(function, *args) for args in calls]
        results = [future.result() for future in futures]
    except BaseException:
        # Not the executor's own shutdown, which would wait for the trainings under way.
        workers = list(getattr(executor, "_processes", {}).values())
        executor.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.terminate()
        raise
    executor.shutdown()
    return results
