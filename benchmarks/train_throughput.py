"""Train-step throughput (examples/s) of the model variants, measured side by side.

    bin/poso-env python -m benchmarks.train_throughput [--steps 30] [--batch-size 512] [--repeats 5]
        [--variants baseline,poso_all] [--warmup 5] [--config JSON] [--optimizer fused_adam] [--json OUT]

Every variant of `models.model.VARIANTS` (or --variants) is built with the same
hyper-parameters (the default `ModelConfig`, or --config overrides), compiled as the trainer
compiles it (`models.optimizers.FusedAdam`; `--optimizer keras_adam`: tf_keras' own Adam, the
same update in separate ops, the Trainer's until issue 22) and trained with Keras' own train
function (`make_train_function`, what `fit` runs per step) on the same in-memory batches of
random transformed features (valid per `feature_specs`; see
`models.model_summary.random_transformed_features`). The data pipeline is therefore not
measured, only the training step.

Each variant first runs --warmup steps (the first traces the step function), then one
untimed round of --steps steps per variant (so that no timed round starts on caches the other
variants evicted). Then --repeats rounds each time --steps steps of every variant, one variant after the
other in a rotated order, so that load from other processes on a shared machine falls on
all variants alike. Per variant: the median and the min-max spread over rounds of the time
per step, and the median examples/s. The step-time ratio of POSO(all) to the baseline is the
median over rounds of the ratio within a round (paired, so a slow round slows both); the ratio
of the two variants' fastest rounds is printed beside it; the same paired ratio, the parameter
ratios and the dense network's FLOP ratio (`models.model_summary`) for every other variant too.
PIN's P(head) is measured on the batches (not stratified: that is data-pipeline work).
The figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from pipeline import argtypes

DISTINCT_BATCHES = 8  # the batches cycle; more distinct rows than this buys nothing for timing
BASELINE, POSO_ALL = "baseline", "poso_all"
STEP_TIME_GOAL, PARAMETER_GOAL = 1.05, 1.10
OPTIMIZERS = ("fused_adam", "keras_adam")


def _variant_list(value: str) -> List[str]:
    from models import model as model_lib

    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = [name for name in names if name not in model_lib.VARIANTS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"unknown or no variant(s) {unknown or value!r}; "
                                         f"known: {', '.join(model_lib.VARIANTS)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{value!r} names a variant twice")
    return names


def _config_overrides(value: str) -> Dict[str, Any]:
    overrides = argtypes.model_config_overrides(value)
    kinds = sorted(set(overrides) & {"mlp", "attention", "mmoe"})
    if kinds:
        raise argparse.ArgumentTypeError(f"must not set module kinds {kinds}: the variants set them")
    return overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=argtypes.positive_int, default=30, help="timed steps per variant per round")
    parser.add_argument("--batch-size", type=argtypes.positive_int, default=512, help="examples per step (trainer default)")
    parser.add_argument("--repeats", type=argtypes.positive_int, default=5, help="timed rounds, interleaved across variants")
    parser.add_argument("--warmup", type=argtypes.non_negative_int, default=5,
                        help="untimed steps per variant before the rounds (the first one traces)")
    parser.add_argument("--variants", type=_variant_list, default=None, metavar="A,B,...",
                        help="variants to measure (default: all of models.model.VARIANTS)")
    parser.add_argument("--config", type=_config_overrides, default=None, metavar="JSON",
                        help="ModelConfig overrides for every variant, e.g. '{\"gate_hidden_units\": 8}'")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of the initial weights")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=OPTIMIZERS[0],
                        help="fused_adam: the Trainer's; keras_adam: tf_keras' Adam, the same math "
                             "(default: %(default)s)")
    parser.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the results here")


class _Trainee:
    """One variant: its model, its Keras train function and an iterator over the shared batches."""

    def __init__(self, name: str, overrides: Mapping[str, Any], dataset, seed: int, optimizer: str):
        import tensorflow as tf

        import feature_specs as fs
        from models import model as model_lib
        from models import model_summary, pin
        from models.optimizers import FusedAdam

        tf.keras.utils.set_random_seed(seed)
        self.name = name
        config = model_lib.make_config(name, **overrides)
        if config.pin and config.pin_head_share is None:
            # PIN's P(head), measured on these batches as the Trainer does on its data. The batches
            # are not stratified: that is the data pipeline's work, which is not measured here.
            config = config.replace(pin_head_share=pin.head_share(dataset, fs.KUAIRAND, config.pin_head_min_pc_bucket,
                                                                  max_batches=DISTINCT_BATCHES))
        self.model = model_lib.RankingModel(config)
        adam = FusedAdam if optimizer == "fused_adam" else tf.keras.optimizers.Adam
        self.model.compile(optimizer=adam(self.model.config.learning_rate))
        self.batches = iter(dataset)
        self.train_function = self.model.make_train_function()
        started = time.perf_counter()
        self.step()  # builds the variables and traces the step
        self.first_step_seconds = time.perf_counter() - started
        self.parameters = model_summary.parameter_counts(self.model)
        self.flops = model_summary.flop_counts(self.model)

    def step(self) -> float:
        logs = self.train_function(self.batches)
        return float(logs["loss"])  # fetching the loss waits for the step to finish


def measure(variants: Sequence[str], *, steps: int = 30, batch_size: int = 512, repeats: int = 5,
            warmup: int = 5, overrides: Optional[Mapping[str, Any]] = None, seed: int = 0,
            optimizer: str = OPTIMIZERS[0],
            log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Times training steps of `variants` side by side; returns JSON-friendly results (see `run`)."""
    import tensorflow as tf

    from models import model_summary

    if not variants:
        raise ValueError("measure: no variants to measure")
    overrides = dict(overrides or {})
    features = model_summary.random_transformed_features(batch_size * DISTINCT_BATCHES, seed=seed)
    dataset = tf.data.Dataset.from_tensor_slices(features).batch(batch_size, drop_remainder=True).cache().repeat()

    trainees = []
    for name in variants:
        trainee = _Trainee(name, overrides, dataset, seed, optimizer)
        for _ in range(max(warmup - 1, 0)):
            trainee.step()
        log(f"  {name}: built, traced and warmed up in {trainee.first_step_seconds:.1f} s (first step)")
        trainees.append(trainee)

    # One untimed round first: a variant's first steps after the others were built and
    # warmed up run on cold caches (up to 3x slower), which would bias round 1.
    for trainee in trainees:
        for _ in range(steps):
            trainee.step()

    step_seconds: Dict[str, List[float]] = {name: [] for name in variants}
    for round_index in range(repeats):
        shift = round_index % len(trainees)
        for trainee in trainees[shift:] + trainees[:shift]:
            started = time.perf_counter()
            for _ in range(steps):
                loss = trainee.step()
            step_seconds[trainee.name].append((time.perf_counter() - started) / steps)
            if loss != loss:  # NaN: the timing would be meaningless
                raise FloatingPointError(f"variant {trainee.name!r}: the loss became NaN")
        log(f"  round {round_index + 1}/{repeats} done")

    results = {}
    for trainee in trainees:
        times = step_seconds[trainee.name]
        median = statistics.median(times)
        results[trainee.name] = dict(
            step_ms_median=1e3 * median, step_ms_min=1e3 * min(times), step_ms_max=1e3 * max(times),
            step_ms_rounds=[1e3 * t for t in times],
            examples_per_second_median=batch_size / median,
            first_step_seconds=trainee.first_step_seconds,
            dense_params=trainee.parameters["Dense network"], params=trainee.parameters["Whole model"],
            dense_flops=trainee.flops["Dense network"])
    # Every variant against the baseline: the paired step-time ratio (median over rounds of the
    # ratio within a round) and the parameter and FLOP ratios.
    vs_baseline = {}
    if BASELINE in results:
        base = results[BASELINE]
        for name in variants:
            if name == BASELINE:
                continue
            paired = [t / b for t, b in zip(step_seconds[name], step_seconds[BASELINE])]
            vs_baseline[name] = dict(step_time_ratio=statistics.median(paired),
                                     fastest_round_ratio=min(step_seconds[name]) / min(step_seconds[BASELINE]),
                                     dense_params_ratio=results[name]["dense_params"] / base["dense_params"],
                                     params_ratio=results[name]["params"] / base["params"],
                                     dense_flops_ratio=results[name]["dense_flops"] / base["dense_flops"])
    comparison = None
    if BASELINE in results and POSO_ALL in results:
        paired = [poso / base for poso, base in zip(step_seconds[POSO_ALL], step_seconds[BASELINE])]
        comparison = dict(
            step_time_ratio=statistics.median(paired),
            step_time_ratio_min=min(paired), step_time_ratio_max=max(paired),
            # Load from other processes only ever adds time: the fastest rounds are the least
            # disturbed, so their ratio is a second, independent estimate.
            fastest_round_ratio=min(step_seconds[POSO_ALL]) / min(step_seconds[BASELINE]),
            dense_params_ratio=results[POSO_ALL]["dense_params"] / results[BASELINE]["dense_params"],
            params_ratio=results[POSO_ALL]["params"] / results[BASELINE]["params"])
    return dict(
        settings=dict(variants=list(variants), steps=steps, batch_size=batch_size, repeats=repeats, warmup=warmup,
                      overrides=overrides, seed=seed, optimizer=optimizer, cpu_count=os.cpu_count(),
                      tensorflow=tf.__version__),
        variants=results, vs_baseline=vs_baseline, poso_all_vs_baseline=comparison)


def format_results(results: Mapping[str, Any]) -> str:
    from models import model as model_lib, model_summary

    settings = results["settings"]
    # Two ratios to the baseline: this column divides the medians; the lines under the table give
    # the median of the per-round (paired) ratios, the figure benchmarks/README.md quotes.
    header = ["variant", "dense params", "step ms (median)", "spread (min-max)", "examples/s (median)",
              f"step ms median / {BASELINE}'s"]
    base = results["variants"].get(BASELINE)
    lines = []
    for name, r in results["variants"].items():
        relative = f"{r['step_ms_median'] / base['step_ms_median']:.3f}" if base else "n/a"
        lines.append([name, f"{r['dense_params']:,}", f"{r['step_ms_median']:.1f}",
                      f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}", f"{r['examples_per_second_median']:,.0f}",
                      relative])
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]

    def render(cells):
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells))

    text = [f"Train-step throughput: batch {settings['batch_size']}, {settings['steps']} timed steps x "
            f"{settings['repeats']} interleaved rounds per variant, {settings['warmup']} warm-up steps, "
            f"{settings['cpu_count']} CPU cores, TF {settings['tensorflow']}, {settings['optimizer']}"
            + (f", overrides {json.dumps(settings['overrides'])}" if settings["overrides"] else ""),
            "", render(header), "-" * len(render(header))]
    text += [render(line) for line in lines]
    text.append("")
    for name, ratios in results.get("vs_baseline", {}).items():
        text.append(f"{name} vs {BASELINE}: step time {ratios['step_time_ratio']:.3f} (median of the per-round "
                    f"ratios; fastest rounds "
                    f"{ratios['fastest_round_ratio']:.3f}), dense parameters {ratios['dense_params_ratio']:.3f}, "
                    f"all parameters {ratios['params_ratio']:.3f}, dense FLOPs per example "
                    f"{ratios['dense_flops_ratio']:.3f}"
                    + (f" ({model_summary.MAIL_FLOPS_NOTE})" if model_lib.VARIANTS[name].mail else ""))
    comparison = results["poso_all_vs_baseline"]
    if comparison is None:
        text.append(f"(no POSO(all) vs baseline ratios: measure both {POSO_ALL} and {BASELINE} for them)")
    else:
        text.append(f"POSO(all) vs baseline step time: {comparison['step_time_ratio']:.3f} (goal <= {STEP_TIME_GOAL}) "
                    f"[paired per round; range {comparison['step_time_ratio_min']:.3f}-"
                    f"{comparison['step_time_ratio_max']:.3f}; fastest rounds "
                    f"{comparison['fastest_round_ratio']:.3f}]")
        text.append(f"POSO(all) vs baseline parameters: {comparison['dense_params_ratio']:.3f} (goal <= "
                    f"{PARAMETER_GOAL}) dense network; {comparison['params_ratio']:.3f} with embedding tables")
    return "\n".join(text)


def run(args: argparse.Namespace) -> int:
    from models import model as model_lib

    variants = args.variants or list(model_lib.VARIANTS)
    print(f"Measuring {', '.join(variants)} ...", flush=True)
    results = measure(variants, steps=args.steps, batch_size=args.batch_size, repeats=args.repeats,
                      warmup=args.warmup, overrides=args.config, seed=args.seed, optimizer=args.optimizer,
                      log=lambda message: print(message, flush=True))
    print()
    print(format_results(results))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":  # the same parser as the `poso` command's
    from pipeline import cli

    sys.exit(cli.main(["bench", "train", *sys.argv[1:]]))
