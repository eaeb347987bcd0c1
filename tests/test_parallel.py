"""benchmarks.parallel: calls run in spawned workers of one TensorFlow thread each, in order, and
the first error stops the rest and leaves no worker behind."""

import os
import time

import pytest

from benchmarks import parallel


def where_and_how(tag):
    """(tag, this process, TensorFlow's thread pools as the worker left them)."""
    import tensorflow as tf

    return (tag, os.getpid(), tf.config.threading.get_intra_op_parallelism_threads(),
            tf.config.threading.get_inter_op_parallelism_threads())


def fail_or_wait(tag):
    if tag == "bad":
        raise ValueError("bad call")
    time.sleep(60)  # would hold the run for a minute, were the workers not stopped
    return tag


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_calls_run_in_order_in_single_threaded_workers():
    results = parallel.run_all(where_and_how, [(tag,) for tag in "abcd"], jobs=2)
    assert [r[0] for r in results] == list("abcd")
    workers = {r[1] for r in results}
    assert os.getpid() not in workers and 1 <= len(workers) <= 2
    assert {r[2:] for r in results} == {(1, 1)}


def test_one_job_runs_here():
    assert [r[1] for r in parallel.run_all(where_and_how, [("a",), ("b",)], jobs=1)] == [os.getpid()] * 2


def test_the_first_error_is_raised_and_stops_every_worker():
    import concurrent.futures

    spawned = []
    real = concurrent.futures.ProcessPoolExecutor._adjust_process_count

    def record(executor):
        real(executor)
        spawned.extend(process.pid for process in executor._processes.values())

    started = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(concurrent.futures.ProcessPoolExecutor, "_adjust_process_count", record)
        with pytest.raises(ValueError, match="bad call"):
            parallel.run_all(fail_or_wait, [("bad",), ("slow",), ("slow",)], jobs=2)
    assert time.monotonic() - started < 45  # not the minute a sleeping call takes
    assert spawned
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in spawned) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in spawned)


def test_jobs_below_one_are_refused():
    with pytest.raises(ValueError, match="jobs=0"):
        parallel.run_all(where_and_how, [("a",)], jobs=0)
