"""The POSO paper's public-data protocol (its Table 5) on MovieLens, through the real pipeline code.

    MovieLens zip --components.movielens--> tf.Examples, train users / unseen test users
      --tf.Transform (models.preprocessing.preprocessing_fn for MOVIELENS, tft_beam)-->
      transform graph --models.trainer.train_and_export (per variant and seed)--> SavedModel
      --serving_default on the test users' raw examples--> GAUC per task (models.metrics)

Every variant is trained with the same hyper-parameters, data split and budget; only the
seed (initialization and shuffling) changes between runs of one variant. GAUC groups by
user over the test users, who never occur in training (the paper's protocol).

The paper's comparators: Meta-Embedding and MWUF are variants (the user id is an input of every
variant and the user's history stands for the user features they read: `VARIANT_OVERRIDES`);
MeLU (`melu`, benchmark-only) meta-trains the baseline's model and is scored in memory, each test
user adapting on their first ratings (benchmarks.melu), not through an export.

Run: `bin/poso-env python -m benchmarks.paper_movielens [--data ZIP] [--seeds 0 1 2]`.
The paper reports on MovieLens-20M (GAUC %, Favorite / Satisfied): Baseline 76.08 / 74.57,
MeLU 76.16 / 74.51, Meta-E 76.13 / 74.53, MWUF 76.20 / 74.51, POSO 76.89 / 75.29.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from feature_specs import movielens as ml_specs
from pipeline import argtypes

__all__ = ["run_movielens", "summarize", "goal_check", "format_table", "default_data_zip", "analyze",
           "read_test_examples", "VARIANT_LABELS", "VARIANT_OVERRIDES", "MELU",
           "DEFAULT_BUDGET", "PAPER_ML20M", "main"]

MELU = "melu"
# The paper's Table 5 rows, in its order, and the project's other variants: PIN (trained by the
# Trainer: P(head) measured, stratified batches). MeLU is no models.model variant (benchmark-only,
# see benchmarks.melu): it meta-trains the baseline's model. MAIL (mail): MovieLens has no user
# profile, so its only attribute is the user id, untrained for every test user (the split is by
# user); it generates a history only where there is none, at a user's first rating.
VARIANT_LABELS: Dict[str, str] = {
    "baseline": "Baseline (MLP + MHA + MMoE)",
    "moe": "MoE gated on all features",
    MELU: "MeLU (Lee et al. 2019; benchmark-only)",
    "meta_emb": "Meta-Embedding (Pan et al. 2019)",
    "mwuf": "MWUF (Zhu et al. 2021)",
    "poso_mlp": "POSO(MLP)",
    "poso_mha": "POSO(MHA)",
    "poso_mmoe": "POSO(MMoE)",
    "poso_all": "POSO(all)",
    "pin": "PIN (Lv et al. 2022, our interpretation)",
    "mail": "MAIL (Feng et al. 2021; the user id as the only attribute)",
}
# The user cold-start methods on MovieLens (feature_specs.movielens): the user id is an input of
# every variant, and the user features they generate / warm it from are the user's history (the
# rated movies and tags before the rating, mean-pooled; MovieLens has no profile). The protocol
# splits by user, so every test user's id embedding is untrained at every rating, not only at the
# first one: Meta-Embedding and MWUF therefore apply at every PC bucket here (the KuaiRand
# defaults, new users / AVC < 8, assume ids trained by earlier days). Fixed by the protocol, not
# chosen on any data.
_EVERY_PC_BUCKET = len(ml_specs.MOVIELENS.pc.boundaries)
VARIANT_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "meta_emb": {"meta_emb_max_pc_bucket": _EVERY_PC_BUCKET},
    "mwuf": {"mwuf_max_pc_bucket": _EVERY_PC_BUCKET},
}
# GAUC (%) on MovieLens-20M, Table 5 of Dai et al. 2021: {variant: (Favorite, Satisfied)}.
PAPER_ML20M = {"baseline": (76.08, 74.57), MELU: (76.16, 74.51), "meta_emb": (76.13, 74.53), "mwuf": (76.20, 74.51),
               "poso_all": (76.89, 75.29)}

# One budget for every variant: the project's default ModelConfig except the PC source. 6
# variants x 3 seeds on ml-latest-small took about 22 minutes at 3 epochs on 2 shared CPU cores. Chosen
# on validation users (validation=True: the test users are never seen), seeds 0 and 1:
# * epochs: mean GAUC of baseline and POSO(all) over both tasks 64.55 / 64.70 / 64.81 % for
#   1 / 2 / 3 epochs;
# * PC source: POSO(all) GAUC % Favorite / Satisfied 64.95 / 64.34 with the one-hot AVC
#   bucket (the model's default), 65.57 / 64.67 with a learned AVC-bucket embedding
#   (baseline 65.42 / 64.54). Only POSO variants read the PC. With seeds 0-4 (benchmarks/
#   README.md, "Diagnosis", finding 5) the two encodings are within 0.1 pp of each other.
# * epochs, again (benchmarks/README.md, "Diagnosis", finding 7; seeds 0-4, learning curves
#   of both models): 2 epochs beat 3 on Satisfied for the baseline (+0.83 pp, p 0.001) and
#   POSO(all) (+0.66 pp, p 0.013); Favorite shows no epoch effect (within +-0.5 pp). So 2.
DEFAULT_BUDGET: Dict[str, Any] = dict(
    epochs=2,
    batch_size=256,
    test_fraction=0.2,
    split_seed=0,
    validation=False,
    overrides={"pc_source": "avc_bucket_embedding"},
)
_SERVING_BATCH = 4096
_DATA_ENV = "POSO_MOVIELENS_ZIP"


def default_data_zip() -> str:
    """$POSO_MOVIELENS_ZIP, else ../shared/data/ml-latest-small/ml-latest-small.zip next to the checkout."""
    if os.environ.get(_DATA_ENV):
        return os.environ[_DATA_ENV]
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(os.path.dirname(repo_root), "shared", "data", "ml-latest-small", "ml-latest-small.zip")


def analyze(train_pattern: str, transform_dir: str, temp_dir: str) -> str:
    """tf.Transform analysis of the training examples with the MOVIELENS preprocessing_fn."""
    import functools

    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tfx_bsl.public import tfxio

    from feature_specs import schema as fs_schema
    from feature_specs.movielens import MOVIELENS
    from models import preprocessing

    raw = tfxio.TFExampleRecord(file_pattern=train_pattern, schema=fs_schema.make_schema(MOVIELENS))
    preprocessing_fn = functools.partial(preprocessing.preprocessing_fn, feature_set=MOVIELENS)
    with beam.Pipeline(runner="DirectRunner") as pipeline:
        with tft_beam.Context(temp_dir=temp_dir):
            records = pipeline | "ReadTrain" >> raw.BeamSource()
            transform_fn = ((records, raw.TensorAdapterConfig())
                            | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing_fn))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(transform_dir)
    return transform_dir


def read_test_examples(test_pattern: str):
    """(serialized examples, {user id, labels, avc}) of the test users, in file order."""
    import tensorflow as tf

    from feature_specs import movielens as ml

    files = sorted(tf.io.gfile.glob(test_pattern))
    serialized = [record.numpy() for record in tf.data.TFRecordDataset(files, compression_type="GZIP")]
    keys = [ml.USER_ID, ml.AVC] + [task.label for task in ml.MOVIELENS.tasks]
    parsed = tf.io.parse_example(tf.constant(serialized),
                                 {key: tf.io.FixedLenFeature([], tf.int64) for key in keys})
    return serialized, {key: value.numpy() for key, value in parsed.items()}


def _serve(serving_model_dir: str, serialized: Sequence[bytes]) -> Dict[str, np.ndarray]:
    """Predictions of the exported model's serving_default signature on raw examples."""
    import tensorflow as tf

    from models import export

    serve = tf.saved_model.load(serving_model_dir).signatures[export.SERVING_DEFAULT]
    outputs: Dict[str, List[np.ndarray]] = {}
    for start in range(0, len(serialized), _SERVING_BATCH):
        batch = tf.constant(list(serialized[start:start + _SERVING_BATCH]))
        for name, value in serve(examples=batch).items():
            outputs.setdefault(name, []).append(value.numpy())
    return {name: np.concatenate(parts) for name, parts in outputs.items()}


def run_movielens(data_zip: Optional[str] = None, seeds: Sequence[int] = (0, 1, 2),
                  variants: Sequence[str] = tuple(VARIANT_LABELS), work_dir: Optional[str] = None,
                  verbose: int = 0, jobs: int = 1, **budget: Any) -> pd.DataFrame:
    """Trains every variant with every seed; one row per (variant, seed, task).

    jobs: models trained at once, each in its own process with one TensorFlow thread
      (benchmarks.parallel); 1 trains them one after the other in this process.

    budget: epochs, batch_size, test_fraction, split_seed (the user split, the same for
      every run), validation (True: evaluate on validation users drawn from the training
      users, the test users left out; for choosing the budget) and overrides (ModelConfig
      fields applied to every variant); defaults in DEFAULT_BUDGET.
    Columns: variant, seed, task, gauc (on the unseen test users), auc (global),
      gauc_avc_lt_32 (test ratings with fewer than 32 earlier ones: the new-user regime),
      gauc_avc_ge_32 (the rest: the regular-user regime),
      gauc_after_support (test ratings after the user's first 8: MeLU's query set, see benchmarks.melu),
      train_seconds, test_examples, test_users.
    """
    from benchmarks import parallel
    from components import movielens as ml_data
    from models import model as model_lib

    unknown = sorted(set(budget) - set(DEFAULT_BUDGET))
    if unknown:
        raise ValueError(f"run_movielens: unknown budget key(s) {unknown}; known: {sorted(DEFAULT_BUDGET)}")
    unknown = sorted(set(variants) - set(model_lib.VARIANTS) - {MELU})
    if unknown:
        raise ValueError(f"run_movielens: unknown variant(s) {unknown}; known: {sorted(model_lib.VARIANTS) + [MELU]}")
    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"run_movielens: jobs={jobs!r}; expected an int >= 1")
    budget = {**DEFAULT_BUDGET, **budget}
    configs = {variant: _config(variant, budget["overrides"]) for variant in variants}  # bad ones said now
    data_zip = data_zip or default_data_zip()
    work_dir = work_dir or tempfile.mkdtemp(prefix="paper_movielens_")

    examples_dir = os.path.join(work_dir, "examples")
    summary = ml_data.write_examples(data_zip, examples_dir, test_fraction=budget["test_fraction"],
                                     seed=budget["split_seed"], validation=budget["validation"])
    train_pattern = os.path.join(examples_dir, ml_data.TRAIN, "*.tfrecord.gz")
    test_pattern = os.path.join(examples_dir, ml_data.TEST, "*.tfrecord.gz")
    transform_dir = analyze(train_pattern, os.path.join(work_dir, "transform"), os.path.join(work_dir, "tft_tmp"))
    data = _Data(train_pattern, test_pattern, transform_dir, summary[ml_data.TRAIN]["examples"])
    # The files were just (re)written: what an earlier run in this process read from them is stale.
    _test_set.cache_clear()
    _cached_melu_data.cache_clear()
    calls = [(data, variant, seed, configs[variant], budget, os.path.join(work_dir, "models"), verbose)
             for variant in variants for seed in seeds]
    return pd.DataFrame([row for rows in parallel.run_all(_train_and_score, calls, jobs) for row in rows])


@dataclasses.dataclass(frozen=True)
class _Data:
    """Where `run_movielens` wrote the examples and the transform graph (what a worker needs)."""

    train_pattern: str
    test_pattern: str
    transform_dir: str
    train_examples: int


@functools.lru_cache(maxsize=2)
def _test_set(test_pattern: str):
    """(serialized examples, their columns, the AVC < 32 mask, MeLU's after-support mask), read once per process."""
    serialized, test = read_test_examples(test_pattern)
    from benchmarks import melu

    return serialized, test, test[ml_specs.AVC] < 32, melu.after_support(test[ml_specs.USER_ID], test[ml_specs.AVC])


@functools.lru_cache(maxsize=1)
def _cached_melu_data(data: _Data):
    return _melu_data(data.train_pattern, data.test_pattern, data.transform_dir,
                      _test_set(data.test_pattern)[1][ml_specs.USER_ID])


def _train_and_score(data: _Data, variant: str, seed: int, config, budget: Mapping[str, Any], models_dir: str,
                     verbose: int) -> List[Dict[str, Any]]:
    """One (variant, seed) of `run_movielens`: trained, exported, served on the test users, scored."""
    from sklearn.metrics import roc_auc_score

    from models import metrics, trainer

    serialized, test, new_user_regime, after_support = _test_set(data.test_pattern)
    serving_dir = os.path.join(models_dir, f"{variant}_seed{seed}")
    started = time.perf_counter()
    if variant == MELU:
        predictions = _train_and_predict_melu(config, _cached_melu_data(data), budget, seed)
        train_seconds = time.perf_counter() - started  # with the scoring: it adapts per user
    else:
        trainer.train_and_export(
            data.train_pattern, data.test_pattern, data.transform_dir, serving_dir, config,
            batch_size=budget["batch_size"], epochs=budget["epochs"], eval_steps=1, seed=seed,
            shuffle_buffer=data.train_examples, verbose=verbose, feature_set=ml_specs.MOVIELENS)
        train_seconds = time.perf_counter() - started
        predictions = _serve(serving_dir, serialized)
    users = test[ml_specs.USER_ID]
    rows = []
    for task in ml_specs.MOVIELENS.tasks:
        labels, scores = test[task.label], predictions[task.name]
        rows.append(dict(
            variant=variant, seed=seed, task=task.name,
            gauc=metrics.grouped_auc(labels, scores, users),
            auc=float(roc_auc_score(labels, scores)),
            gauc_avc_lt_32=metrics.grouped_auc(labels[new_user_regime], scores[new_user_regime],
                                               users[new_user_regime]),
            gauc_avc_ge_32=metrics.grouped_auc(labels[~new_user_regime], scores[~new_user_regime],
                                               users[~new_user_regime]),
            gauc_after_support=metrics.grouped_auc(labels[after_support], scores[after_support],
                                                   users[after_support]),
            train_seconds=train_seconds,
            test_examples=int(labels.size),
            test_users=int(np.unique(users).size)))
    if verbose >= 0:
        last = {r["task"]: round(100 * r["gauc"], 2) for r in rows}
        print(f"[paper_movielens] {variant} seed {seed}: GAUC % {last} ({train_seconds:.0f} s)",
              file=sys.stderr, flush=True)
    return rows


def _config(variant: str, overrides: Mapping[str, Any]):
    """The variant's ModelConfig on MovieLens: `VARIANT_OVERRIDES`, then the budget's overrides;
    MeLU's is the baseline's (its backbone)."""
    from models import model as model_lib

    return model_lib.make_config("baseline" if variant == MELU else variant, ml_specs.MOVIELENS,
                                 **{**VARIANT_OVERRIDES.get(variant, {}), **overrides})


def _melu_data(train_pattern: str, test_pattern: str, transform_dir: str, test_users: np.ndarray):
    """Transformed train and test examples in memory, with raw user ids (MeLU trains on episodes)."""
    import tensorflow as tf

    from benchmarks import melu

    train = melu.load_examples(tf.io.gfile.glob(train_pattern), transform_dir, ml_specs.MOVIELENS, ml_specs.USER_ID)
    test = melu.load_examples(tf.io.gfile.glob(test_pattern), transform_dir, ml_specs.MOVIELENS, ml_specs.USER_ID)
    if not np.array_equal(test[1], test_users):
        raise RuntimeError("MeLU's test examples are not in the order of read_test_examples'")
    return train, test


def _train_and_predict_melu(config, data, budget: Mapping[str, Any], seed: int) -> Dict[str, np.ndarray]:
    """MeLU with the other rows' budget: as many steps of batch_size examples as `epochs` passes
    take; each test user adapts on their first ratings (benchmarks.melu)."""
    from benchmarks import melu

    (train_features, train_users), (test_features, test_users) = data
    steps = budget["epochs"] * -(-train_users.size // budget["batch_size"])
    ranking = melu.train(config, ml_specs.MOVIELENS, train_features, train_users, train_features[ml_specs.AVC],
                         steps, budget["batch_size"], seed)
    return melu.predict(ranking, ml_specs.MOVIELENS, test_features, test_users, test_features[ml_specs.AVC])


def summarize(results: pd.DataFrame, metric: str = "gauc") -> pd.DataFrame:
    """Mean and (sample) standard deviation over seeds of `metric`, in %, per variant and task."""
    grouped = results.groupby(["variant", "task"], sort=False)[metric]
    table = pd.DataFrame({"mean": 100 * grouped.mean(), "std": 100 * grouped.std(ddof=1), "seeds": grouped.size()})
    return table.reset_index()


def goal_check(results: pd.DataFrame, metric: str = "gauc") -> pd.DataFrame:
    """Per task: POSO(all) minus baseline (in % GAUC) against twice the larger seed std of the two.

    Also the paired view: runs with the same seed share the data order (and the initial
    values of layers both variants have), so the per-seed difference varies less than
    either variant; paired_mean / paired_std are its mean and std over seeds.
    """
    table = summarize(results, metric).set_index(["variant", "task"])
    rows = []
    for task in results["task"].unique():
        if ("baseline", task) not in table.index or ("poso_all", task) not in table.index:
            continue
        base, poso = table.loc[("baseline", task)], table.loc[("poso_all", task)]
        threshold = 2 * max(base["std"], poso["std"])
        gain = poso["mean"] - base["mean"]
        per_seed = results[results["task"] == task].pivot_table(index="seed", columns="variant", values=metric)
        paired = 100 * (per_seed["poso_all"] - per_seed["baseline"]).dropna()
        rows.append(dict(task=task, gain=gain, two_std=threshold, met=bool(gain > threshold),
                         paired_mean=paired.mean(), paired_std=paired.std(ddof=1)))
    return pd.DataFrame(rows)


def _metric_lines(results: pd.DataFrame, metric: str, heading: str) -> List[str]:
    table = summarize(results, metric)
    tasks = list(results["task"].unique())
    label_width = max(len(label) for label in VARIANT_LABELS.values())
    lines = [heading, f"{'variant':<{label_width}}  " + "  ".join(f"{task.capitalize():>15}" for task in tasks)]
    for variant in results["variant"].unique():
        cells = []
        for task in tasks:
            row = table[(table["variant"] == variant) & (table["task"] == task)].iloc[0]
            cells.append(f"{row['mean']:>7.2f} ± {row['std']:<5.2f}")
        lines.append(f"{VARIANT_LABELS.get(variant, variant):<{label_width}}  " + "  ".join(cells))
    return lines


def format_table(results: pd.DataFrame, title: str = "") -> str:
    """The Table 5-style text: GAUC % mean ± std per variant and task, the goal check, and
    the same table restricted to the new-user regime (test ratings with AVC < 32) and to the rest."""
    seeds = sorted(results["seed"].unique().tolist())
    lines = [title] if title else []
    lines += _metric_lines(results, "gauc", f"GAUC (%) on unseen test users, mean ± std over seeds {seeds}")
    check = goal_check(results)
    if not check.empty:
        lines.append("")
        for row in check.itertuples():
            lines.append(f"POSO(all) - Baseline, {row.task.capitalize()}: {row.gain:+.2f} "
                         f"(2 x max seed std = {row.two_std:.2f}): goal {'MET' if row.met else 'NOT met'}; "
                         f"paired by seed {row.paired_mean:+.2f} ± {row.paired_std:.2f}")
    lines.append("Paper (MovieLens-20M): " + ", ".join(f"{VARIANT_LABELS[v]} {fav:.2f} / {sat:.2f}"
                                                       for v, (fav, sat) in PAPER_ML20M.items())
                 + " (Favorite / Satisfied)")
    if "gauc_avc_lt_32" in results:
        lines.append("")
        lines += _metric_lines(results, "gauc_avc_lt_32",
                               "GAUC (%) on the test users' ratings with AVC < 32 (the new-user regime)")
    if "gauc_avc_ge_32" in results:
        lines.append("")
        lines += _metric_lines(results, "gauc_avc_ge_32",
                               "GAUC (%) on the test users' ratings with AVC >= 32 (the regular-user regime)")
    if "gauc_after_support" in results:
        lines.append("")
        lines += _metric_lines(results, "gauc_after_support",
                               "GAUC (%) on the test users' ratings after their first 8 (MeLU's protocol)")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None,
                        help=f"a GroupLens MovieLens zip: ML-100K, ML-1M, ML-10M, ML-20M/25M/32M or ml-latest(-small) "
                             f"(default: ${_DATA_ENV} or {default_data_zip()})")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANT_LABELS), choices=list(VARIANT_LABELS))
    parser.add_argument("--work-dir", default=None, help="examples, transform graph and models (default: a temp dir)")
    parser.add_argument("--epochs", type=int, default=DEFAULT_BUDGET["epochs"])
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BUDGET["batch_size"])
    parser.add_argument("--overrides", type=json.loads, default=DEFAULT_BUDGET["overrides"],
                        help="ModelConfig fields for every variant, as JSON (default: %(default)s)")
    parser.add_argument("--csv", default=None, help="also write the per-run rows to this CSV file")
    parser.add_argument("--jobs", type=argtypes.positive_int, default=1,
                        help="models trained at once, one process and one TensorFlow thread each (default: %(default)s)")
    args = parser.parse_args(argv)

    data_zip = args.data or default_data_zip()
    started = time.perf_counter()
    results = run_movielens(data_zip, args.seeds, args.variants, args.work_dir,
                            epochs=args.epochs, batch_size=args.batch_size, overrides=args.overrides, jobs=args.jobs)
    if args.csv:
        results.to_csv(args.csv, index=False)
    minutes = (time.perf_counter() - started) / 60
    print(format_table(results, title=f"MovieLens {os.path.basename(data_zip)}: the paper's Table 5 protocol "
                                      f"(epochs={args.epochs}, batch size={args.batch_size}, overrides={args.overrides}; "
                                      f"{minutes:.1f} min)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
