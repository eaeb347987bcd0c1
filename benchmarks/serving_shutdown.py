"""How long `bin/poso serve` takes to stop: SIGTERM (or SIGINT) to the wrapper's PID -> "Server
stopped" in its log -> process exit.

Standard library only, so that it runs on the host, outside the environment, as an operator's
`kill` or an orchestrator would (bin/poso-env forwards the signal into the environment):

    python3 benchmarks/serving_shutdown.py --runs 3
    python3 benchmarks/serving_shutdown.py --signal INT

It exports the contract model into a temporary base directory first (through bin/poso-env)
and serves it with `--shutdown_grace_seconds 10`; no request is in flight when the signal is
sent, so the figures are the server's own stop and exit, not the grace period.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _one_run(base: str, sig: signal.Signals, start_timeout_s: float) -> tuple:
    """(seconds from the signal to "Server stopped", to the wrapper's exit, exit code)."""
    process = subprocess.Popen(
        [str(REPO_ROOT / "bin" / "poso"), "serve", "--port=0", "--rest-port=0",
         "--model_name=contract", f"--model-base-path={base}", "--shutdown_grace_seconds=10"],
        stderr=subprocess.PIPE, text=True)
    ready, stopped_at, lines = threading.Event(), [], []

    def read():
        for line in process.stderr:
            lines.append(line)
            if "Exporting HTTP/REST API at" in line:
                ready.set()
            if "Server stopped" in line:
                stopped_at.append(time.monotonic())
        ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not ready.wait(start_timeout_s) or process.poll() is not None:
            raise RuntimeError("the server did not start:\n" + "".join(lines[-20:]))
        signalled = time.monotonic()
        process.send_signal(sig)
        code = process.wait(timeout=60)
        exited = time.monotonic()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    reader.join(5)
    stopped = stopped_at[0] - signalled if stopped_at else float("nan")
    return stopped, exited - signalled, code


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--signal", choices=["TERM", "INT"], default="TERM")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    sig = signal.Signals[f"SIG{args.signal}"]
    with tempfile.TemporaryDirectory() as directory:
        base = os.path.join(directory, "contract")
        subprocess.run([str(REPO_ROOT / "bin" / "poso-env"), "python", "-m", "serving.testing",
                        os.path.join(base, "1")], check=True, capture_output=True)
        print(f"bin/poso serve, SIG{args.signal} to the wrapper's PID, {args.runs} runs:")
        for run in range(args.runs):
            stopped, exited, code = _one_run(base, sig, args.start_timeout)
            print(f"  run {run + 1}: 'Server stopped' after {stopped:.2f} s, process exited "
                  f"after {exited:.2f} s, exit code {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
