"""Examples/s of the Trainer against its limits, and of the Evaluator against plain inference.

    bin/poso bench components [--rows-per-day 50000] [--sections trainer,evaluator] [--repeats 1]
                              [--day-copies 1]

The data take the paper benchmark's path once (benchmarks.paper_data.prepare: generator ->
AvcExampleGen -> tf.Transform analysis, cached under --work-dir): 7 training days and an
evaluation day. The model is --variant (the pipeline's default) with the default ModelConfig,
batch --batch-size, one full pass over the training days.

trainer (issue 22: the Trainer at >= 80% of the bare fit's examples/s)
  input pipeline  one pass of models.trainer.make_dataset over the training days, exactly as the
                  Trainer builds it (read gzip TFRecords, shuffle, batch, parse, the tf.Transform
                  graph), with no model: what tf.data and parsing alone can feed
  bare Keras fit  the same model compiled the same way, `fit` for one epoch on the same examples'
                  transformed features held in memory as whole batches (shuffled once, before
                  timing): the model's limit
  Trainer         models.trainer.train_and_export, what the Trainer component's run_fn calls, with
                  the pipeline's settings (one pass, RunConfig.eval_steps validation steps)
  Both fits are timed by the same callback, from Keras' on_train_begin to on_train_end (the
  first step's tracing included; the Trainer's validation steps too); the Trainer's whole call
  (building, warm-start check, export) is printed beside it.

evaluator (issue 22: the Evaluator within 3x of plain batched inference)
  TFMA            tfma.run_model_analysis with the pipeline's EvalConfig (pipeline.evaluation) on
                  the evaluation day, one model (the Trainer's export from above), Beam in one
                  process as the pipeline runs the Evaluator (RunConfig.beam_single_process_components)
  inference       the same SavedModel's serving_default over the same serialized examples read
                  from the same files, in batches of --inference-batch, the scores fetched
  batch evaluator the pipeline's Evaluator (components/batch_evaluator.py): the same EvalConfig,
                  day and model, scored in batches of --inference-batch, metrics and slices from
                  the score columns, TFMA's output files; its whole call, the model load included.
                  Also with a baseline (the same SavedModel loaded again as "baseline"), as the
                  daily run evaluates: against twice the inference time
  The ratios are each evaluator's wall time over the inference pass's (whose model load is printed
  apart).

--day-copies K reads the evaluation day K times over (e.g. 20 x 50,000 = a 1M-impression day,
for time and memory at scale), without TFMA. The process's peak RSS is printed at the end.

With --repeats N every measurement runs N times (the sections' measurements one after the other
within a repeat) and the median is printed. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import resource
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from pipeline import argtypes

__all__ = ["input_pipeline_pass", "bare_fit", "trainer_fit", "tfma_evaluation", "batch_evaluation",
           "batched_inference", "add_arguments", "run"]

SECTIONS = ("trainer", "evaluator")
TRAINER_GOAL, EVALUATOR_GOAL = 0.80, 3.0


class _TrainedSteps(logging.Handler):
    """Keeps the Trainer's last "trained N steps in S s" line (models.trainer.StepProgress)."""

    def __init__(self):
        super().__init__(level=logging.INFO)
        self.steps: Optional[int] = None
        self.seconds: Optional[float] = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Trainer: trained "):
            self.steps, self.seconds = int(record.args[0]), float(record.args[1])


def _listening():
    from models.trainer import PROGRESS_LOGGER

    handler = _TrainedSteps()
    logger = logging.getLogger(PROGRESS_LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the periodic step lines are not this benchmark's output
    logger.addHandler(handler)
    return logger, handler


def input_pipeline_pass(train_files: List[str], transform_dir: str, batch_size: int) -> Dict[str, float]:
    """One pass of the Trainer's own tf.data pipeline with nothing consuming it but a count."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import trainer

    dataset = trainer.make_dataset(train_files, tft.TFTransformOutput(transform_dir), batch_size, shuffle=True)
    examples, started = 0, time.perf_counter()
    for batch in dataset:
        examples += int(tf.shape(next(iter(batch.values())))[0])
    return dict(examples=examples, seconds=time.perf_counter() - started)


def in_memory_batches(train_files: List[str], transform_dir: str, batch_size: int, seed: int):
    """The training days' transformed features as a dataset of whole in-memory batches, shuffled
    once (the last partial batch dropped), and its number of examples."""
    import tensorflow as tf

    from benchmarks import paper_data

    features = paper_data.load_split(train_files, transform_dir).features
    rows = len(next(iter(features.values())))
    batches = rows // batch_size
    order = np.random.default_rng(seed).permutation(rows)[:batches * batch_size]
    stacked = {name: tf.constant(value[order].reshape((batches, batch_size) + value.shape[1:]))
               for name, value in features.items()}
    return tf.data.Dataset.from_tensor_slices(stacked).prefetch(2), batches * batch_size


def bare_fit(batches, examples: int, variant: str, batch_size: int, seed: int) -> Dict[str, float]:
    """Keras `fit`, one epoch over in-memory batches, the model compiled as the Trainer compiles it."""
    import tensorflow as tf

    from models import trainer
    from models.model import RankingModel, make_config
    from models.optimizers import FusedAdam

    tf.keras.utils.set_random_seed(seed)
    model = RankingModel(make_config(variant))
    model.compile(optimizer=FusedAdam(learning_rate=model.config.learning_rate))
    logger, handler = _listening()
    try:
        model.fit(batches, epochs=1, verbose=0, callbacks=[trainer.StepProgress(examples // batch_size)])
    finally:
        logger.removeHandler(handler)
    return dict(examples=handler.steps * batch_size, seconds=handler.seconds)


def trainer_fit(train_files: List[str], transform_dir: str, model_dir: str, variant: str, batch_size: int,
                eval_steps: int, rows: int, seed: int) -> Dict[str, float]:
    """models.trainer.train_and_export, one pass over `rows` examples: its fit's and whole call's time."""
    from models import trainer

    logger, handler = _listening()
    started = time.perf_counter()
    try:
        trainer.train_and_export(train_files, train_files, transform_dir, model_dir, variant,
                                 batch_size=batch_size, epochs=1, eval_steps=eval_steps, seed=seed, verbose=0)
    finally:
        logger.removeHandler(handler)
    return dict(examples=rows, seconds=handler.seconds, steps=handler.steps,
                call_seconds=time.perf_counter() - started)


def tfma_evaluation(model_dir: str, eval_files: List[str], output_dir: str) -> Dict[str, float]:
    """The pipeline's EvalConfig over the evaluation day, Beam in one process (as the Evaluator)."""
    import apache_beam as beam
    import tensorflow_model_analysis as tfma

    from pipeline import blessing, evaluation

    eval_config = evaluation.make_eval_config()
    options = beam.options.pipeline_options.PipelineOptions(
        ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    started = time.perf_counter()
    tfma.run_model_analysis(
        eval_shared_model=tfma.default_eval_shared_model(eval_saved_model_path=model_dir, eval_config=eval_config),
        eval_config=eval_config, data_location=os.path.join(os.path.dirname(eval_files[0]), "*"),
        output_path=output_dir, pipeline_options=options)
    seconds = time.perf_counter() - started
    overall = [row for row in blessing.metric_rows(output_dir) if row["slice"] == "overall"]
    return dict(seconds=seconds, examples=int(overall[0]["example_count"]))


def batch_evaluation(model_dir: str, eval_files: List[str], output_dir: str, batch_size: int,
                     with_baseline: bool) -> Dict[str, float]:
    """components.batch_evaluator.evaluate with the pipeline's EvalConfig, as the Evaluator runs it."""
    from tfx.utils import proto_utils

    from components import batch_evaluator
    from pipeline import evaluation

    eval_config = batch_evaluator.completed_eval_config(proto_utils.proto_to_json(evaluation.make_eval_config()),
                                                        has_baseline=with_baseline)
    models = {"candidate": model_dir, "baseline": model_dir} if with_baseline else {"": model_dir}
    started = time.perf_counter()
    examples = batch_evaluator.evaluate(eval_config, models, eval_files, output_dir, batch_size)
    return dict(seconds=time.perf_counter() - started, examples=examples)


def batched_inference(model_dir: str, eval_files: List[str], batch_size: int) -> Dict[str, float]:
    """serving_default over every serialized example of `eval_files`, in batches; scores fetched."""
    import tensorflow as tf

    started = time.perf_counter()
    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    loaded = time.perf_counter()
    examples = 0
    for serialized in tf.data.TFRecordDataset(eval_files, compression_type="GZIP").batch(batch_size).prefetch(2):
        scores = {name: value.numpy() for name, value in serve(examples=serialized).items()}
        examples += len(next(iter(scores.values())))
    return dict(examples=examples, seconds=time.perf_counter() - loaded, load_seconds=loaded - started)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline import config as config_lib

    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help="comma-separated, of: %(default)s")
    parser.add_argument("--rows-per-day", type=argtypes.positive_int, default=50_000,
                        help="synthetic impressions per day (7 training days and an evaluation day)")
    parser.add_argument("--variant", default=config_lib.DEFAULT_VARIANT, help="model variant (default: %(default)s)")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=config_lib.RunConfig.batch_size,
                        help="training batch size (default: %(default)s)")
    parser.add_argument("--inference-batch", type=argtypes.positive_int, default=4096,
                        help="examples per call of the plain inference pass (default: %(default)s)")
    parser.add_argument("--repeats", type=argtypes.positive_int, default=1, help="runs of each measurement")
    parser.add_argument("--day-copies", type=argtypes.positive_int, default=1,
                        help="evaluator: read the evaluation day's files this many times over, a day that "
                             "many times larger (TFMA then not run); default: %(default)s")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "poso-bench-components"),
                        help="cache of the prepared data (reused by later runs; default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")


def _median_row(name: str, runs: List[Dict[str, float]], note: str = "") -> Dict[str, float]:
    seconds = statistics.median(r["seconds"] for r in runs)
    examples = runs[0]["examples"]
    each = ", ".join(f"{r['seconds']:.1f}" for r in runs)
    spread = f" (median of {each} s)" if len(runs) > 1 else ""
    print(f"  {name:<16} {examples:>11,} examples {seconds:>8.1f} s {examples / seconds:>10,.0f} examples/s"
          f"{spread}{'  ' + note if note else ''}", flush=True)
    return dict(examples=examples, seconds=seconds, rate=examples / seconds)


def run(args: argparse.Namespace) -> int:
    from benchmarks import paper_data
    from models.model import VARIANTS
    from pipeline import config as config_lib

    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if not sections or unknown:
        print(f"error: --sections: unknown or none {unknown or args.sections!r}; known: {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if args.variant not in VARIANTS:
        print(f"error: --variant {args.variant!r} is not one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    data = paper_data.prepare(args.work_dir, paper_data.SyntheticSettings(rows_per_day=args.rows_per_day),
                              log=lambda message: print(message, flush=True))
    model_dir = os.path.join(data.root, f"model-{args.variant}-{args.batch_size}-{args.seed}")
    eval_steps = config_lib.RunConfig.eval_steps
    print(f"data: {len(data.train_dates)} training days ({data.train_dates[0]}..{data.train_dates[-1]}), evaluation "
          f"day {data.eval_date}, {args.rows_per_day:,} impressions a day; variant {args.variant}, batch "
          f"{args.batch_size}; {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}", flush=True)

    runs: Dict[str, List[Dict[str, float]]] = {}
    batches = None
    for repeat in range(args.repeats):
        if "trainer" in sections:
            runs.setdefault("input", []).append(
                input_pipeline_pass(data.train_files, data.transform_dir, args.batch_size))
            if batches is None:
                batches, in_memory = in_memory_batches(data.train_files, data.transform_dir, args.batch_size,
                                                       args.seed)
            runs.setdefault("bare", []).append(bare_fit(batches, in_memory, args.variant, args.batch_size, args.seed))
            runs.setdefault("trainer", []).append(trainer_fit(
                data.train_files, data.transform_dir, model_dir, args.variant, args.batch_size, eval_steps,
                runs["input"][0]["examples"], args.seed))
        if "evaluator" in sections:
            if not glob.glob(os.path.join(model_dir, "saved_model.pb")):
                print("  (training the model to evaluate)", flush=True)
                trainer_fit(data.train_files, data.transform_dir, model_dir, args.variant, args.batch_size,
                            eval_steps, 0, args.seed)
            eval_files = data.eval_files * args.day_copies
            if args.day_copies == 1:  # TFMA on a day many times larger: tens of minutes
                with tempfile.TemporaryDirectory() as output_dir:
                    runs.setdefault("tfma", []).append(tfma_evaluation(model_dir, eval_files, output_dir))
            runs.setdefault("inference", []).append(batched_inference(model_dir, eval_files, args.inference_batch))
            for with_baseline, name in ((False, "batch"), (True, "batch2")):
                with tempfile.TemporaryDirectory() as output_dir:
                    runs.setdefault(name, []).append(batch_evaluation(
                        model_dir, eval_files, output_dir, args.inference_batch, with_baseline))
        print(f"  repeat {repeat + 1}/{args.repeats} done (load average {os.getloadavg()[0]:.1f})", flush=True)

    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if "trainer" in sections:
        print("Trainer (one pass over the training days):")
        _median_row("input pipeline", runs["input"], "tf.data alone: read, shuffle, batch, parse, transform")
        bare = _median_row("bare Keras fit", runs["bare"], "in-memory batches")
        steps = runs["trainer"][0]["steps"]
        trained = _median_row("Trainer", runs["trainer"], f"{steps:,} steps; whole train_and_export call "
                              f"{statistics.median(r['call_seconds'] for r in runs['trainer']):.1f} s")
        print(f"  Trainer / bare fit: {trained['rate'] / bare['rate']:.2f} of the examples/s "
              f"(goal >= {TRAINER_GOAL:.2f})")
    if "evaluator" in sections:
        copies = f" x {args.day_copies} copies" if args.day_copies > 1 else ""
        print(f"Evaluator (the evaluation day{copies}, one model):")
        inference = _median_row("inference", runs["inference"], f"batches of {args.inference_batch}; model load "
                                f"{statistics.median(r['load_seconds'] for r in runs['inference']):.1f} s apart")
        ratios = []
        if "tfma" in runs:
            tfma = _median_row("TFMA Evaluator", runs["tfma"], "run_model_analysis, the pipeline's EvalConfig")
            ratios.append(f"TFMA {tfma['seconds'] / inference['seconds']:.1f}x")
        batch = _median_row("batch evaluator", runs["batch"], "components.batch_evaluator, model load included")
        batch2 = _median_row("  + baseline", runs["batch2"], "candidate and baseline (examples: the day's), "
                             "as the daily run")
        ratios += [f"batch evaluator {batch['seconds'] / inference['seconds']:.2f}x",
                   f"with a baseline {batch2['seconds'] / (2 * inference['seconds']):.2f}x of two inference passes"]
        print(f"  time / inference time: {', '.join(ratios)} (goal <= {EVALUATOR_GOAL:.0f}x)")
    print(f"peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    return 0


if __name__ == "__main__":  # the same parser as the `poso` command's
    from pipeline import cli

    sys.exit(cli.main(["bench", "components", *sys.argv[1:]]))
