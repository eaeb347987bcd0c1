"""Wall time and peak memory of one daily run, per component, against the size of the window.

    bin/poso bench pipeline --windows 100000,1000000
    bin/poso-env python -m benchmarks.pipeline_scale --windows 100000 --train-steps 400
    bin/poso bench pipeline --windows 7000000     # the goal's window (about an hour on 2 cores)

For each window of N impressions it writes 9 days x N/7 synthetic impressions, then calls the
real `local_runner.run_day` on a fresh home, as `poso run` does, for two consecutive days:
the 7 earlier days are ingested first (a one-off here; in production each day was ingested by its
own daily run); then the first daily run (day 8) ingests its day, and Transform and Trainer read
the whole window, with no earlier model to compare with; then THE daily run (day 9), the steady
state: a new window, and the Evaluator scores the candidate and the model blessed the day before.
All three phases are reported, but only the daily run is held against the goal (issue 22): a window
of 7 days x 1M impressions retrains on one full pass over the window (the default --epochs 1),
validates and pushes in at most 15 minutes on 2 cores, in at most 6 GiB.

Per component: wall time between TFX's "Component X is running." and "... is finished." log
records, and the peak resident set size of this process plus every child process (Beam's
multi-processing workers, the infra validator's server) sampled every 0.25 s within that span.
A run's wall time also counts the runner's own work between components (resolvers, MLMD).
And the examples each component went through, from the run summary: the day's rows for
AvcExampleGen, StatisticsGen and ExampleValidator, the rows Transform analyzed (those of the days
its analyzer cache lacked: the whole window on the first run, the newest day after), the training
examples seen for the Trainer (the window's rows times the passes, checked against the steps the
Trainer counted: models.trainer.StepProgress's last line; or steps x batch with --train-steps), and
the day's rows times the models scored for the Evaluator; with examples/s over the component's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

import psutil

START = datetime.date(2022, 4, 8)
GOAL_SECONDS = 15 * 60
GOAL_BYTES = 6 * 2**30
GOAL_WINDOW = 7_000_000  # 7 days x 1M impressions
GIB = 2**30
TRAINED_STEPS = re.compile(r"Trainer: trained (\d+) steps")
DAY_READERS = ("AvcExampleGen", "StatisticsGen", "ExampleValidator")


class TreeMemorySampler:
    """Samples the RSS of this process plus all its descendants: (time, bytes) pairs."""

    def __init__(self, interval: float = 0.25):
        self.samples: List[Tuple[float, int]] = []
        self._interval, self._stop = interval, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me] + me.children(recursive=True):
                try:
                    total += proc.memory_info().rss
                except psutil.Error:  # a worker that just exited
                    pass
            self.samples.append((time.time(), total))
            self._stop.wait(self._interval)

    def peak(self, start: float = float("-inf"), end: float = float("inf")) -> int:
        """The largest sample in [start, end] (default: all), widened by one interval so that a span
        shorter than the interval still sees its neighbouring samples."""
        inside = [rss for t, rss in self.samples if start - self._interval <= t <= end + self._interval]
        return max(inside) if inside else 0

    def __enter__(self) -> "TreeMemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclasses.dataclass
class Span:
    """One timed piece: a component within a pipeline run, or a whole pipeline run."""
    phase: str       # "ingest" (the earlier days), "first" (day 8, no baseline) or "daily" (day 9)
    name: str
    start: float
    end: float = 0.0
    peak_bytes: int = 0
    examples: Optional[int] = None  # see `count_examples`
    trainer_steps: Optional[int] = None  # the Trainer's own count of its training steps

    @property
    def seconds(self) -> float:
        return self.end - self.start


class ComponentTimer(logging.Handler):
    """Turns TFX's per-component 'is running.' / 'is finished.' log records into Spans."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.phase = "ingest"
        self.spans: List[Span] = []
        self._open: Dict[str, Span] = {}

    def emit(self, record: logging.LogRecord) -> None:
        from models.trainer import PROGRESS_LOGGER

        message = record.getMessage()
        trained = TRAINED_STEPS.match(message) if record.name == PROGRESS_LOGGER else None
        if trained and "Trainer" in self._open:
            self._open["Trainer"].trainer_steps = int(trained.group(1))
        if not message.startswith("Component "):
            return
        if message.endswith(" is running."):
            name = message[len("Component "):-len(" is running.")]
            self._open[name] = Span(self.phase, name, record.created)
        elif message.endswith(" is finished.") and message[len("Component "):-len(" is finished.")] in self._open:
            span = self._open.pop(message[len("Component "):-len(" is finished.")])
            span.end = record.created
            self.spans.append(span)


def count_examples(span: Span, summary: Dict[str, object], epochs: int, train_steps: Optional[int],
                   batch_size: int) -> Optional[int]:
    """The examples `span`'s component went through in the run `summary` describes (None: not
    counted, e.g. the infra validator's few requests); see the module docstring."""
    day, window = int(summary.get("eval_rows") or 0), int(summary.get("train_rows") or 0)
    if span.name in DAY_READERS:
        return day
    if span.name == "Transform":  # the spans it analyzed; the others came from the analyzer cache
        return int(summary.get("transform_analyzed_rows", window))
    if span.name == "Evaluator":
        return day * (2 if summary.get("baseline_metrics") else 1)  # the candidate, and the baseline
    if span.name == "Trainer":
        if train_steps is not None:
            return train_steps * batch_size
        expected = epochs * math.ceil(window / batch_size)
        if span.trainer_steps is not None and span.trainer_steps != expected:
            print(f"warning: the Trainer counted {span.trainer_steps} steps, not {expected} "
                  f"({epochs} pass(es) over {window:,} examples in batches of {batch_size})", flush=True)
            return span.trainer_steps * batch_size
        return epochs * window
    return None


def measure_window(window: int, work: str, train_steps: Optional[int], beam_mode: str, seed: int = 42,
                   epochs: int = 1, batch_size: int = 512) -> List[Span]:
    """Generates the window's logs and measures one `run_day` on a fresh home under `work`."""
    from components import synthetic_logs
    from pipeline import config as config_lib
    from pipeline import local_runner

    train_days = config_lib.TRAIN_DAYS
    per_day = window // train_days
    data, home = os.path.join(work, "data"), os.path.join(work, "home")
    started = time.perf_counter()
    synthetic_logs.generate(data, START, train_days + 2, seed=seed, impressions_per_day=per_day)
    print(f"window {window:,}: wrote {train_days + 2} days x {per_day:,} impressions in "
          f"{time.perf_counter() - started:.0f} s", flush=True)

    timer = ComponentTimer()
    runs: List[Span] = []
    original_run = local_runner._run
    daily_phase = ["first"]
    summaries: Dict[str, Dict[str, object]] = {}

    def timed_run(run_cfg, label):  # each pipeline run of run_day: the ingests, then the daily run
        timer.phase = "ingest" if run_cfg.ingest_only else daily_phase[0]
        span = Span(timer.phase, "(whole run)", time.time())
        try:
            return original_run(run_cfg, label)
        finally:
            span.end = time.time()
            runs.append(span)

    logging.getLogger().addHandler(timer)
    local_runner._run = timed_run
    try:
        with TreeMemorySampler() as memory:
            for phase, offset in (("first", train_days), ("daily", train_days + 1)):
                daily_phase[0] = phase
                cfg = config_lib.RunConfig(date=START + datetime.timedelta(days=offset), data_dir=data,
                                           home=home, train_steps=train_steps, epochs=epochs,
                                           batch_size=batch_size, beam_direct_running_mode=beam_mode)
                summaries[phase] = local_runner.run_day(cfg)
                print(f"window {window:,}, {cfg.date} ({phase}): pushed={summaries[phase].get('pushed')}, "
                      f"trained on {summaries[phase].get('train_rows'):,} examples, evaluated on "
                      f"{summaries[phase].get('eval_rows'):,}", flush=True)
    finally:
        local_runner._run = original_run
        logging.getLogger().removeHandler(timer)
    for span in timer.spans + runs:
        span.peak_bytes = memory.peak(span.start, span.end)
        if span.phase in summaries and span.name != "(whole run)":
            span.examples = count_examples(span, summaries[span.phase], epochs, train_steps, batch_size)
    return timer.spans + runs


def summarize(window: int, spans: List[Span]) -> List[Tuple[int, str, str, float, float, Optional[int]]]:
    """Rows (window, phase, component, wall s, peak GiB, examples or None): each daily-run
    component, the ingest phase summed per component over the earlier days, and each phase's total."""
    rows = []
    for phase in ("ingest", "first", "daily"):
        by_name: Dict[str, List[Span]] = {}
        for span in spans:
            if span.phase == phase and span.name != "(whole run)":
                by_name.setdefault(span.name, []).append(span)
        for name, group in sorted(by_name.items(), key=lambda item: item[1][0].start):
            counted = [s.examples for s in group if s.examples is not None]
            rows.append((window, phase, name, sum(s.seconds for s in group), max(s.peak_bytes for s in group) / GIB,
                         sum(counted) if counted else None))
        whole = [s for s in spans if s.phase == phase and s.name == "(whole run)"]
        if whole:
            rows.append((window, phase, f"TOTAL ({len(whole)} run{'s' * (len(whole) > 1)})",
                         sum(s.seconds for s in whole), max(s.peak_bytes for s in whole) / GIB, None))
    return rows


def print_table(rows) -> None:
    print(f"\n{'window':>10}  {'phase':<7} {'component':<28} {'wall s':>8} {'peak GiB':>9} {'examples':>11} "
          f"{'examples/s':>10}")
    for window, phase, name, seconds, peak, examples in rows:
        counted = f"{examples:>11,} {examples / seconds if seconds > 0 else 0:>10,.0f}" if examples is not None else ""
        print(f"{window:>10,}  {phase:<7} {name:<28} {seconds:>8.1f} {peak:>9.2f} {counted}".rstrip())


def verdict(rows) -> None:
    """The daily run's total against the goal, measured or extrapolated linearly to 7M."""
    totals = {w: (s, p) for w, phase, name, s, p, _ in rows if phase == "daily" and name.startswith("TOTAL")}
    print()
    for window, (seconds, peak) in sorted(totals.items()):
        print(f"daily run, window {window:,}: {seconds / 60:.1f} min, peak {peak:.2f} GiB "
              f"(goal for 7M: <= {GOAL_SECONDS // 60} min, <= {GOAL_BYTES // GIB} GiB)")
    if GOAL_WINDOW in totals:
        seconds, peak = totals[GOAL_WINDOW]
        met = seconds <= GOAL_SECONDS and peak <= GOAL_BYTES / GIB
        print(f"7M window measured: goal {'MET' if met else 'NOT met'}")
    elif len(totals) >= 2:
        (w0, (s0, p0)), (w1, (s1, p1)) = sorted(totals.items())[-2:]
        # Linear in the window through the two largest measurements (a fixed cost plus a cost per
        # impression); an estimate, not a measurement.
        slope_s, slope_p = (s1 - s0) / (w1 - w0), (p1 - p0) / (w1 - w0)
        est_s, est_p = s1 + slope_s * (GOAL_WINDOW - w1), p1 + slope_p * (GOAL_WINDOW - w1)
        print(f"7M window NOT measured; linear extrapolation from {w0:,} and {w1:,}: about "
              f"{est_s / 60:.0f} min, {est_p:.1f} GiB (an estimate, not a measurement)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline import cli
    from pipeline import config as config_lib

    parser.add_argument("--windows", default="100000,1000000",
                        help="impressions per 7-day window, comma-separated (default: %(default)s)")
    cli.add_training_arguments(parser)
    parser.add_argument("--beam-mode", default=config_lib.RunConfig.beam_direct_running_mode,
                        choices=["multi_processing", "multi_threading", "in_memory"], help="DirectRunner running mode")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true",
                        help="keep each window's data and pipeline home under --work (for profiling)")
    parser.add_argument("--verbose", action="store_true", help="show TFX, TensorFlow and Beam logs")


def run(args: argparse.Namespace) -> int:
    from pipeline import local_runner

    try:
        windows = [int(w) for w in args.windows.split(",")]
    except ValueError:
        windows = []
    if not windows or min(windows) < 7:
        print(f"error: --windows must be impression counts of at least 7 (one per day), separated by "
              f"commas; got {args.windows!r}", file=sys.stderr)
        return 2
    if args.work:
        os.makedirs(args.work, exist_ok=True)
    local_runner.setup_logging(args.verbose)
    rows = []
    for window in windows:
        work = tempfile.mkdtemp(prefix=f"poso-scale-{window}-", dir=args.work)
        try:
            rows += summarize(window, measure_window(window, work, args.train_steps, args.beam_mode,
                                                     epochs=args.epochs, batch_size=args.batch_size))
        finally:
            if args.keep:
                print(f"kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
        print_table(rows)
    verdict(rows)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
