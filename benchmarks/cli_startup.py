"""Start-up time of the command line: `bin/poso --help`, `bin/poso serve --help` and
`bin/poso compile-kubeflow --help` (the commands whose flags sit beside the heaviest code) end to
end and the environment wrapper alone (`bin/poso-env true`; the difference is Python's part),
each the median of --runs runs, with the machine's load average beside them. Standard library only; run it on the host, not
inside bin/poso-env (which the figure includes):

    python3 benchmarks/cli_startup.py --runs 9
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _median_seconds(command, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, cwd=REPO_ROOT)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=int, default=9, help="runs of each command (the median is printed)")


def run(args: argparse.Namespace) -> int:
    poso, poso_env = os.path.join(REPO_ROOT, "bin", "poso"), os.path.join(REPO_ROOT, "bin", "poso-env")
    figures = {
        "bin/poso --help": _median_seconds([poso, "--help"], args.runs),
        "bin/poso serve --help": _median_seconds([poso, "serve", "--help"], args.runs),
        "bin/poso compile-kubeflow --help": _median_seconds([poso, "compile-kubeflow", "--help"], args.runs),
        "bin/poso-env true": _median_seconds([poso_env, "true"], args.runs),
    }
    load = os.getloadavg()[0]
    for name, seconds in figures.items():
        print(f"{name:34s} median {seconds:6.2f} s over {args.runs} runs (load average {load:.1f})")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
