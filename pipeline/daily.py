"""`poso daily`: what the schedule (`poso schedule`) runs each day.

It runs `poso run --date DAY` (DAY: yesterday unless --date) in a child process whose output,
TensorFlow's native logs included, goes to HOME/logs/daily-DAY.log (appended when the day is
retried), deletes log files under HOME/logs older than --keep-logs days, and then runs a hook:
`--on-failure CMD` when the run failed (a step failed, bad input, another run held HOME's lock,
stopped), `--on-not-blessed CMD` when it finished without pushing. The outcome is read from the
day's run summary (HOME/runs/DAY.json) written by this run. Hooks run with bash and get
POSO_DATE, POSO_HOME, POSO_OUTCOME (failed | not-blessed), POSO_EXIT_CODE and POSO_LOG in their
environment. The exit code is the run's. TERM, INT or HUP sent to `poso daily` is passed on to the
run, which then stops cleanly (exit 5) instead of going on orphaned.
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Optional

from pipeline import argtypes

LOG_PATTERN = "*.log"


def add_hook_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `poso schedule` passes on to `poso daily`."""
    parser.add_argument("--keep-logs", type=argtypes.positive_int, default=30, metavar="DAYS",
                        help="delete log files under HOME/logs older than this many days")
    parser.add_argument("--on-failure", default="", metavar="CMD",
                        help="shell command run when the daily run fails (environment: POSO_DATE, POSO_HOME, "
                             "POSO_OUTCOME, POSO_EXIT_CODE, POSO_LOG)")
    parser.add_argument("--on-not-blessed", default="", metavar="CMD",
                        help="shell command run when the run finished without pushing (same environment)")
    parser.add_argument("--run-args", default="", metavar="ARGS",
                        help="extra arguments for `poso run`, e.g. '--variant poso_all --warm-start'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_home_argument(parser, "the pipeline home")
    parser.add_argument("--data", default=None, help="daily raw logs (default: HOME/data)")
    parser.add_argument("--date", type=datetime.date.fromisoformat, default=None,
                        help="the evaluation day YYYY-MM-DD (default: yesterday)")
    add_hook_arguments(parser)


def prune_logs(log_dir: str, keep_days: int, now: Optional[float] = None) -> list:
    """Deletes log files under `log_dir` (any depth) last written more than `keep_days` ago."""
    cutoff = (time.time() if now is None else now) - keep_days * 86400
    removed = []
    for path in glob.glob(os.path.join(log_dir, "**", LOG_PATTERN), recursive=True):
        if os.path.isfile(path) and os.path.getmtime(path) < cutoff:
            os.remove(path)
            removed.append(path)
    return removed


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def wait_passing_on_stops(child: subprocess.Popen) -> int:
    """Waits for `child`, sending it any TERM, INT or HUP this process gets, so a scheduler that
    stops `poso daily` (systemd, `timeout`) stops the run too instead of orphaning it; the run then
    cleans up and exits 5 (stopped)."""
    previous = {sig: signal.signal(sig, lambda signum, _frame: child.send_signal(signum)) for sig in STOP_SIGNALS}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


_MTIME_SLACK_SECONDS = 1.0


def outcome(summary_path: str, started: float, exit_code: int) -> str:
    """pushed | not-blessed | failed, from the summary this run wrote (if it wrote one)."""
    summary = None
    # A file's mtime comes from the kernel's coarse clock, a few ms behind time.time(): a summary
    # written right after `started` can look older. An earlier run's is minutes older.
    if os.path.exists(summary_path) and os.path.getmtime(summary_path) >= started - _MTIME_SLACK_SECONDS:
        with open(summary_path) as f:
            summary = json.load(f)
    if summary is not None and not summary.get("pushed"):
        return "not-blessed"
    return "pushed" if exit_code == 0 and summary is not None else "failed"


def run(args: argparse.Namespace) -> int:
    home = os.path.abspath(args.home)
    day = (args.date or datetime.date.today() - datetime.timedelta(days=1)).isoformat()
    data = os.path.abspath(args.data or os.path.join(home, "data"))
    log_dir = os.path.join(home, "logs")
    os.makedirs(log_dir, exist_ok=True)
    prune_logs(log_dir, args.keep_logs)
    log_path = os.path.join(log_dir, f"daily-{day}.log")
    command = [sys.executable, "-m", "pipeline.cli", "run", "--date", day, "--home", home, "--data", data,
               *shlex.split(args.run_args)]
    started = time.time()
    with open(log_path, "a") as log:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        log.write(f"== {stamp} poso daily: {shlex.join(command[1:])}\n")
        log.flush()
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        exit_code = wait_passing_on_stops(child)
        result = outcome(os.path.join(home, "runs", f"{day}.json"), started, exit_code)
        log.write(f"== exit code {exit_code}: {result}\n")
    hook = {"failed": args.on_failure, "not-blessed": args.on_not_blessed}.get(result)
    if hook:
        environment = dict(os.environ, POSO_DATE=day, POSO_HOME=home, POSO_OUTCOME=result,
                           POSO_EXIT_CODE=str(exit_code), POSO_LOG=log_path)
        with open(log_path, "a") as log:
            hook_code = subprocess.run(["bash", "-c", hook], env=environment, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL).returncode
            log.write(f"== {result} hook exited with {hook_code}\n")
    return exit_code
