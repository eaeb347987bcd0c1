"""Throughput of the synthetic generator and of the AVC Beam step (AvcExampleGen) on DirectRunner.

    bin/poso-env python -m benchmarks.data_throughput --rows 1000000

Prints rows/s and peak memory (resident set size of this process and its Beam worker processes,
sampled every 0.2 s). Two days are generated; day 2 is the one measured, so the carried user state
of day 1 is read as in a real daily run.
"""

from __future__ import annotations

import argparse
import datetime
import os
import tempfile
import time

from benchmarks.pipeline_scale import TreeMemorySampler

START = datetime.date(2022, 4, 8)


def _run_avc_day(data: str, out: str, date: datetime.date, previous, mode: str, workers: int):
    from components import avc_example_gen
    from pipeline import config

    return avc_example_gen.run_executor_for_day(data, date, os.path.join(out, f"{mode}-{date.isoformat()}"),
                                                config.direct_runner_args(mode, workers), previous)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="impressions per day")
    parser.add_argument("--modes", default="multi_processing,in_memory")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)

    from components import synthetic_logs

    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data")
        started = time.perf_counter()
        synthetic_logs.generate(data, START, 2, seed=1, impressions_per_day=args.rows)
        seconds = time.perf_counter() - started
        print(f"generator: {2 * args.rows:,} rows in {seconds:.1f} s = {2 * args.rows / seconds:,.0f} rows/s (goal >= 200,000)")
        for mode in args.modes.split(","):
            day1 = _run_avc_day(data, work, START, None, mode, args.workers)
            with TreeMemorySampler() as memory:
                started = time.perf_counter()
                _run_avc_day(data, work, START + datetime.timedelta(days=1), day1["user_state"][0], mode, args.workers)
                seconds = time.perf_counter() - started
            print(f"AvcExampleGen ({mode}, {args.workers} workers): {args.rows:,} rows in {seconds:.1f} s = "
                  f"{args.rows / seconds:,.0f} rows/s, peak memory {memory.peak() / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
