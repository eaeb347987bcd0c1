"""Warm start from the day before's model against a cold start, on the evaluation day's GAUC.

    bin/poso bench warm-start [--rows-per-day 50000] [--seeds 0,1] [--work-dir DIR]

The data: benchmarks.paper_data.prepare (as `bench components`; the same cache). Per seed, with
the Trainer's own code (models.trainer.train_and_export, one full pass, the pipeline's batch and
validation steps, `--variant`):

    yesterday  trained cold on the window one day earlier (the warm-up day and the first 6
               training days): the model a daily run would have blessed the day before
    cold       trained from fresh weights on the 7 training days
    warm       the same, starting from yesterday's variables (models.trainer.warm_start, what
               `poso run --warm-start` does with the last blessed model)

Both are scored on the evaluation day: GAUC (models.metrics.grouped_auc, per user) per task for
new users, regular users and all, and the warm - cold difference in percentage points, per seed
and its mean. One transform graph (analyzed on the 7 training days) serves all three models; the
pipeline analyzes each day's window anew. Figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
from typing import Dict, List

from pipeline import argtypes

__all__ = ["add_arguments", "run"]

GROUPS = ("new", "regular", "all")


def _seeds(value: str) -> List[int]:
    try:
        seeds = [int(seed) for seed in value.split(",") if seed.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {value!r}")
    return seeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline import config as config_lib

    parser.add_argument("--rows-per-day", type=argtypes.positive_int, default=50_000,
                        help="synthetic impressions per day (default: %(default)s)")
    parser.add_argument("--seeds", type=_seeds, default=[0], help="model seeds, comma-separated (default: 0)")
    parser.add_argument("--variant", default=config_lib.DEFAULT_VARIANT, help="model variant (default: %(default)s)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "poso-bench-components"),
                        help="cache of the prepared data, shared with `bench components` (default: %(default)s)")


def _gauc(model, split) -> Dict[tuple, float]:
    """{(task, group): GAUC} of `model` on `split`."""
    from benchmarks import paper

    return {(row["task"], row["group"]): row["gauc"]
            for row in paper.gauc_rows(paper.predict(model, split.features), split)}


def run(args: argparse.Namespace) -> int:
    from benchmarks import paper_data
    from feature_specs import specs
    from models import trainer
    from models.model import VARIANTS
    from pipeline import config as config_lib

    if args.variant not in VARIANTS:
        print(f"error: --variant {args.variant!r} is not one of {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    data = paper_data.prepare(args.work_dir, paper_data.SyntheticSettings(rows_per_day=args.rows_per_day),
                              log=lambda message: print(message, flush=True))
    day_before = datetime.date.fromisoformat(data.train_dates[0]) - datetime.timedelta(days=1)
    yesterday_files = [f for date in [day_before.isoformat()] + data.train_dates[:-1]
                       for f in paper_data.day_files(data, date)]
    eval_split = paper_data.load_split(data.eval_files, data.transform_dir)
    settings = dict(batch_size=config_lib.RunConfig.batch_size, epochs=1, eval_steps=config_lib.RunConfig.eval_steps,
                    verbose=0)
    print(f"yesterday's window {day_before}..{data.train_dates[-2]}, today's {data.train_dates[0]}.."
          f"{data.train_dates[-1]}, evaluation day {data.eval_date} ({len(eval_split):,} examples); "
          f"variant {args.variant}, one pass, batch {settings['batch_size']}", flush=True)

    differences: Dict[tuple, List[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for seed in args.seeds:
            folder = lambda name: os.path.join(scratch, f"{name}-{seed}")
            trainer.train_and_export(yesterday_files, yesterday_files, data.transform_dir, folder("yesterday"),
                                     args.variant, seed=seed, **settings)
            cold = trainer.train_and_export(data.train_files, data.train_files, data.transform_dir, folder("cold"),
                                            args.variant, seed=seed, **settings)
            warm = trainer.train_and_export(data.train_files, data.train_files, data.transform_dir, folder("warm"),
                                            args.variant, seed=seed, base_model=folder("yesterday"), **settings)
            cold_gauc, warm_gauc = _gauc(cold.model, eval_split), _gauc(warm.model, eval_split)
            print(f"seed {seed} (warm start restored {warm.warm_started_variables} variables):", flush=True)
            for task in specs.TASKS:
                cells = []
                for group in GROUPS:
                    key = (task.name, group)
                    differences.setdefault(key, []).append(100 * (warm_gauc[key] - cold_gauc[key]))
                    cells.append(f"{group} {100 * cold_gauc[key]:.2f} -> {100 * warm_gauc[key]:.2f}")
                print(f"  {task.name:<10} cold -> warm GAUC %: " + "; ".join(cells), flush=True)
    print(f"\nwarm - cold GAUC, pp (mean over {len(args.seeds)} seed(s); per seed in brackets):")
    for task in specs.TASKS:
        cells = [f"{group} {statistics.mean(differences[(task.name, group)]):+.2f} "
                 f"({', '.join(f'{d:+.2f}' for d in differences[(task.name, group)])})" for group in GROUPS]
        print(f"  {task.name:<10} " + "; ".join(cells))
    return 0


if __name__ == "__main__":  # the same parser as the `poso` command's
    from pipeline import cli

    sys.exit(cli.main(["bench", "warm-start", *sys.argv[1:]]))
