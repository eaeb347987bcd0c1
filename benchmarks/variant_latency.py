"""Served latency of the model variants against the baseline, in-process, side by side.

    bin/poso bench variant-latency [--variants baseline,poso_all,mail,pin,meta_emb,mwuf]
        [--rounds 30] [--calls 24] [--block 6] [--rows 1,100] [--train-steps 5] [--work-dir DIR] [--json OUT]

Models: every variant is trained and exported as the pipeline's Trainer does it
(`models.trainer.train_and_export`: the default ModelConfig, the tf.Transform graph inside the
SavedModel, the serving_default and serving_raw signatures) on small synthetic data that took
the pipeline's path (`benchmarks.paper_data.prepare`: generator -> AvcExampleGen -> tf.Transform
analysis; one warm-up day, one training day, the evaluation day), for --train-steps steps only:
latency does not depend on the weights. Exports are cached under --work-dir, keyed by the
variant's configuration, the training settings and the source of models/ and feature_specs/.

Requests: serialized tf.Examples of the evaluation day, model inputs only (no labels, no slice
keys), the same bytes for every variant, in two kinds:
  with behaviour  users who are not new and have a history (what most requests are);
  new users       is_new_user = 1 with the history emptied and AVC 0, as at a new user's first
                  request: MAIL generates their behaviour (pool_a, E1, D2 on their rows),
                  Meta-Embedding and MWUF replace their id embedding, PIN routes them to the tail.
Each kind in requests of every --rows size, cycling over up to 8 distinct requests.

Calls: each SavedModel's `serving_default` in a `serving.servable.SessionSignatures`, the way
the model server runs it (with its malloc thresholds, `serving.allocator`), from numpy arrays to
numpy arrays; one call at a time. A second Session of the baseline's export ("baseline, A/A")
is measured like a variant: two identical models, so its ratio to the baseline shows the
method's noise. After --warmup untimed calls per variant and case, --rounds rounds: in each, for
every case (kind x rows), --calls calls of every variant, --block consecutive calls of one
variant after the other's, in an order rotated from block to block, so that load from other
processes falls on all variants alike (and a model's caches are warm after a block's first
call, as on a server that serves one model). Per variant and case:
p50 and p99 over all rounds' calls, and the p50 ratio to the baseline: the median over rounds of
the ratio of the round's p50s (paired), with its range over rounds and the 95% t interval of the
geometric mean ratio over rounds (`benchmarks.stats.paired_difference` of the logarithms).
"unchanged" when that interval holds 1. The figures are printed, never asserted.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

from pipeline import argtypes

BASELINE = "baseline"
CONTROL = "baseline, A/A"  # a second Session of the baseline's export: the method's noise
DEFAULT_VARIANTS = ("baseline", "poso_all", "mail", "pin", "meta_emb", "mwuf")
KINDS = ("with behaviour", "new users")
DISTINCT_REQUESTS = 8
# Enough new users on one day for 100-row requests of new users only.
NEW_USER_SHARE = 0.1


def _variant_list(value: str) -> List[str]:
    from benchmarks import train_throughput

    names = train_throughput._variant_list(value)
    if BASELINE not in names:
        raise argparse.ArgumentTypeError(f"{value!r} lacks {BASELINE!r}, the reference of every ratio")
    return names


def _rows_list(value: str) -> List[int]:
    try:
        rows = [int(part) for part in value.split(",") if part.strip()]
    except ValueError:
        rows = []
    if not rows or min(rows) < 1:
        raise argparse.ArgumentTypeError(f"expected positive ints separated by commas, got {value!r}")
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--variants", type=_variant_list, default=list(DEFAULT_VARIANTS), metavar="A,B,...",
                        help="variants to serve, the baseline among them (default: %s)" % ",".join(DEFAULT_VARIANTS))
    parser.add_argument("--rows", type=_rows_list, default=[1, 100], metavar="N,M,...",
                        help="rows per request (default: 1,100)")
    parser.add_argument("--rounds", type=argtypes.positive_int, default=30,
                        help="timed rounds (the ratios' interval is over rounds)")
    parser.add_argument("--calls", type=argtypes.positive_int, default=24,
                        help="timed calls per variant and case in each round")
    parser.add_argument("--block", type=argtypes.positive_int, default=6,
                        help="consecutive calls of one variant before the next variant's")
    parser.add_argument("--warmup", type=argtypes.non_negative_int, default=10,
                        help="untimed calls per variant and case before the rounds")
    parser.add_argument("--train-steps", type=argtypes.positive_int, default=5,
                        help="training steps before each export (latency does not depend on the weights)")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=256, help="training batch size")
    parser.add_argument("--rows-per-day", type=argtypes.positive_int, default=3000,
                        help="impressions per day of the synthetic data (3 days)")
    parser.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "poso-bench-variant-latency"),
                        help="cache of the data and the exports")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results here")


# -- models and requests ------------------------------------------------------------------------

def _source_digest() -> str:
    """A digest of the code an export depends on, so that a changed model is exported again."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha1()
    for path in sorted(glob.glob(os.path.join(root, "models", "*.py")) + glob.glob(os.path.join(root, "feature_specs", "*.py"))):
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def export_variant(variant: str, data, work_dir: str, *, train_steps: int, batch_size: int, seed: int,
                   log: Callable[[str], None] = print) -> str:
    """The variant trained for `train_steps` steps and exported by `models.trainer.train_and_export`
    (cached under work_dir/models); returns the export directory."""
    import shutil

    from models import model as model_lib
    from models import trainer

    key = hashlib.sha1(json.dumps([model_lib.make_config(variant).to_dict(), data.settings.key(), train_steps,
                                   batch_size, seed, _source_digest()], sort_keys=True).encode()).hexdigest()[:12]
    export_dir = os.path.join(work_dir, "models", f"{variant}-{key}")
    if os.path.exists(os.path.join(export_dir, "saved_model.pb")):
        return export_dir
    partial = export_dir + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    started = time.perf_counter()
    trainer.train_and_export(data.train_files, data.eval_files, data.transform_dir, partial, variant,
                             batch_size=batch_size, train_steps=train_steps, eval_steps=1, seed=seed, verbose=0)
    os.replace(partial, export_dir)
    log(f"  {variant}: trained {train_steps} steps and exported in {time.perf_counter() - started:.0f} s")
    return export_dir


def request_examples(files: Sequence[str]) -> Dict[str, List[bytes]]:
    """{kind: serialized tf.Examples} of `files` (see the module docstring), model inputs only."""
    import tensorflow as tf

    import feature_specs as fs

    inputs = {feature.name for feature in fs.model_input_features()}
    history = set(fs.KUAIRAND.behaviour_sequence)
    examples: Dict[str, List[bytes]] = {kind: [] for kind in KINDS}
    for record in tf.data.TFRecordDataset(list(files), compression_type="GZIP"):
        example = tf.train.Example.FromString(record.numpy())
        features = example.features.feature
        for name in list(features):
            if name not in inputs:
                del features[name]
        if features[fs.IS_NEW_USER].int64_list.value[0] == 1:
            for name in history:
                del features[name].int64_list.value[:]
            features[fs.PC.source].int64_list.value[:] = [0]
            examples[KINDS[1]].append(example.SerializeToString())
        elif any(features[name].int64_list.value for name in history):
            examples[KINDS[0]].append(example.SerializeToString())
    return examples


def request_batches(examples: Sequence[bytes], rows: int) -> List[Any]:
    """Up to DISTINCT_REQUESTS disjoint requests of `rows` examples, as serving_default's input array."""
    import numpy as np

    count = min(DISTINCT_REQUESTS, len(examples) // rows)
    if count == 0:
        raise ValueError(f"only {len(examples)} examples for requests of {rows} rows: raise --rows-per-day")
    return [np.array(examples[i * rows:(i + 1) * rows], dtype=object) for i in range(count)]


# -- measurement --------------------------------------------------------------------------------

def _p(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(runners: Mapping[str, Any], requests: Mapping[Tuple[str, int], List[Any]], *, rounds: int,
            calls: int, warmup: int, block: int = 6, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Times `runners` ({name: SessionSignatures}, BASELINE among them) on every case of `requests`
    ({(kind, rows): [input arrays]}); returns {"cases": {case: {name: figures}}} (see the docstring)."""
    from benchmarks import stats
    from models import export

    names = list(runners)

    def call(name: str, batch) -> float:
        started = time.perf_counter()
        runners[name].run(export.SERVING_DEFAULT, {export.EXAMPLES_INPUT: batch})
        return 1e3 * (time.perf_counter() - started)

    for case, batches in requests.items():
        for name in names:
            for i in range(warmup):
                call(name, batches[i % len(batches)])
    samples = {case: {name: [] for name in names} for case in requests}
    round_p50 = {case: {name: [] for name in names} for case in requests}
    for round_index in range(rounds):
        for case, batches in requests.items():
            times = {name: [] for name in names}
            for first in range(0, calls, block):
                # Block by block, every variant in turn (the order rotated each time): a burst of
                # load from other processes falls on all of them alike, and all but a block's
                # first call find the caches warm with their own model, as on a server.
                shift = (round_index + first // block) % len(names)
                for name in names[shift:] + names[:shift]:
                    for i in range(first, min(first + block, calls)):
                        times[name].append(call(name, batches[i % len(batches)]))
            for name in names:
                samples[case][name] += times[name]
                round_p50[case][name].append(statistics.median(times[name]))
        log(f"  round {round_index + 1}/{rounds} done")

    results = {}
    for case in requests:
        base = round_p50[case][BASELINE]
        figures = {}
        for name in names:
            paired = [t / b for t, b in zip(round_p50[case][name], base)]
            # A 95% t interval of the geometric mean ratio, over rounds (benchmarks.stats).
            log_ratio = stats.paired_difference([math.log(t) for t in round_p50[case][name]],
                                                [math.log(b) for b in base])
            figures[name] = dict(p50_ms=_p(samples[case][name], 0.5), p99_ms=_p(samples[case][name], 0.99),
                                 calls=len(samples[case][name]), p50_ratio=statistics.median(paired),
                                 p50_ratio_min=min(paired), p50_ratio_max=max(paired),
                                 p50_ratio_low=math.exp(log_ratio["low"]), p50_ratio_high=math.exp(log_ratio["high"]))
        results[f"{case[0]}, {case[1]} rows"] = figures
    return dict(cases=results)


def format_results(results: Mapping[str, Any]) -> str:
    settings = results["settings"]
    lines = [f"Served latency in-process (serving_default in a SessionSignatures, one call at a time): "
             f"{settings['rounds']} rounds x {settings['calls']} calls per variant and case in blocks of "
             f"{settings['block']}, {settings['cpu_count']} "
             f"CPU cores, TF {settings['tensorflow']}; exports after {settings['train_steps']} training steps",
             "p50 / p99 ms; p50 ratio to the baseline: median over rounds of the paired ratio [its range over rounds] "
             "(95% CI of the geometric mean ratio); 'unchanged' when the CI holds 1", ""]
    for case, figures in results["cases"].items():
        lines.append(f"{case}:")
        width = max(len(name) for name in figures)
        for name, f in figures.items():
            text = f"  {name.ljust(width)}  {f['p50_ms']:7.2f} / {f['p99_ms']:7.2f}"
            if name != BASELINE:
                low, high = f["p50_ratio_low"], f["p50_ratio_high"]
                verdict = "unchanged" if low <= 1 <= high else ("SLOWER" if low > 1 else "faster")
                text += (f"  ratio {f['p50_ratio']:.3f} [{f['p50_ratio_min']:.3f}-{f['p50_ratio_max']:.3f}] "
                         f"(CI {low:.3f}-{high:.3f}) {verdict}")
            lines.append(text)
        lines.append("")
    return "\n".join(lines).rstrip()


def run(args: argparse.Namespace) -> int:
    import tensorflow as tf

    from benchmarks import paper_data
    from serving.allocator import retain_freed_memory
    from serving.servable import SessionSignatures, read_serve_meta_graph

    def log(message: str) -> None:
        print(message, flush=True)

    retain_freed_memory()  # as the model server does
    log(f"Data under {args.work_dir} ...")
    data = paper_data.prepare(args.work_dir, paper_data.SyntheticSettings(
        train_days=1, rows_per_day=args.rows_per_day, new_user_share=NEW_USER_SHARE, warmup_days=1), log=log)
    exports = {variant: export_variant(variant, data, args.work_dir, train_steps=args.train_steps,
                                       batch_size=args.batch_size, seed=args.seed, log=log)
               for variant in args.variants}
    examples = request_examples(data.eval_files)
    requests = {(kind, rows): request_batches(examples[kind], rows) for kind in KINDS for rows in args.rows}
    runners = {}
    for name in [*args.variants, CONTROL]:
        export_dir = exports[BASELINE if name == CONTROL else name]
        runners[name] = SessionSignatures(export_dir, read_serve_meta_graph(export_dir))
    log(f"Measuring {', '.join(runners)} on {', '.join(f'{k}: {len(v)}' for k, v in examples.items())} examples ...")
    results = measure(runners, requests, rounds=args.rounds, calls=args.calls, warmup=args.warmup,
                      block=args.block, log=log)
    results["settings"] = dict(variants=list(args.variants), rows=list(args.rows), rounds=args.rounds,
                               calls=args.calls, block=args.block, warmup=args.warmup, train_steps=args.train_steps,
                               rows_per_day=args.rows_per_day, cpu_count=os.cpu_count(),
                               tensorflow=tf.__version__, exports=exports)
    print()
    print(format_results(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":  # the same parser as the `poso` command's
    from pipeline import cli

    sys.exit(cli.main(["bench", "variant-latency", *sys.argv[1:]]))
