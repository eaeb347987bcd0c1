"""Why POSO(all) does not beat the baseline on MovieLens: paired experiments on validation users.

Every experiment is a list of arms (a variant with a budget and ModelConfig overrides, on a
fraction of the training users); each arm is compared with its reference arm (the baseline
with the same budget and data) seed by seed. Runs with the same seed see the same data order,
so the per-seed difference POSO - baseline varies less than either model; the tables give its
mean, a 95% confidence interval (t distribution over seeds) and a paired t-test p-value.

    MovieLens zip --components.movielens.write_examples(validation=True)--> training users
      minus validation users / validation users (the test users never enter)
      --benchmarks.paper_movielens.analyze--> transform graph
      --RankingModel trained as models.trainer.train_and_export does (same datasets,
      optimizer, seeds; no export)--> predictions on the validation users
      --> GAUC per task, overall and by AVC regime (< 32 / >= 32 earlier ratings)

The models are scored in process, not through the exported serving signature as
`benchmarks.paper_movielens` does: the same transform graph and model, without ~10 s of
export per run. `--test` scores on the test users instead (only for the final table:
never choose anything on it).

Runs are cached (one JSON line per run, task and scored epoch in <work-dir>/runs.jsonl, keyed
by arm, seed, data and a hash of the model code), so arms shared between experiments (the baseline) train once and an
interrupted experiment resumes.

Run: `bin/poso-env nice -n 5 python -m benchmarks.movielens_diagnosis --experiment modules`
(`--list` names the experiments and their cost in model trainings).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from benchmarks import paper_movielens
from benchmarks.stats import paired_difference

__all__ = ["Arm", "EXPERIMENTS", "prepare", "train_and_score", "run_experiment",
           "format_experiment", "main"]

NEW_USER_AVC = 32  # the new-user regime of paper_movielens: fewer than 32 earlier ratings
_DEFAULT_CACHE_DIR = "/tmp/diagnosis"
_SUBSET_SEED_OFFSET = 7_777  # the users kept in a data-size subset: another hash of the user ids
_CODE_FILES = ("models/layers.py", "models/model.py", "models/trainer.py", "models/preprocessing.py",
               "components/movielens.py", "feature_specs/movielens.py")


@dataclasses.dataclass(frozen=True)
class Arm:
    """One model configuration to train with every seed.

    overrides: ModelConfig fields on top of paper_movielens.DEFAULT_BUDGET's overrides.
    user_fraction: the share of the training users trained on (a fixed hash of the user id).
    max_avc: if set, train only on ratings with fewer earlier ratings (AVC < max_avc).
    curve: also score after every epoch (see `expand_curves`).
    """

    label: str
    variant: str
    overrides: Tuple[Tuple[str, Any], ...] = ()
    epochs: int = paper_movielens.DEFAULT_BUDGET["epochs"]
    batch_size: int = paper_movielens.DEFAULT_BUDGET["batch_size"]
    user_fraction: float = 1.0
    max_avc: Optional[int] = None
    curve: bool = False  # score after every epoch: arms "<label> e<k>" for k = 1..epochs
    reference: Optional[str] = None  # label of the arm it is compared with (None: not compared)

    def config_overrides(self) -> Dict[str, Any]:
        return {**paper_movielens.DEFAULT_BUDGET["overrides"], **dict(self.overrides)}

    def key(self) -> Dict[str, Any]:
        """What determines the run (besides seed, data and code): the cache key."""
        return dict(variant=self.variant, overrides=self.config_overrides(), epochs=self.epochs,
                    batch_size=self.batch_size, user_fraction=self.user_fraction,
                    **({"max_avc": self.max_avc} if self.max_avc is not None else {}),
                    **({"curve": True} if self.curve else {}))


def _arm(label: str, variant: str, reference: Optional[str] = "baseline", **options: Any) -> Arm:
    overrides = tuple(sorted(options.pop("overrides", {}).items()))
    return Arm(label, variant, overrides, reference=reference, **options)


def _with_baseline(arms: Sequence[Arm], **budget: Any) -> List[Arm]:
    return [_arm("baseline", "baseline", reference=None, **budget)] + list(arms)


def _budget_arms() -> List[Arm]:
    """Learning curves (scored after every epoch) to 4 epochs at the default learning rate and at 3x it."""
    arms = []
    for rate, epochs in ((1e-3, 4), (3e-3, 4)):
        base = f"baseline lr{rate:g}"
        arms += [_arm(base, "baseline", reference=None, epochs=epochs, curve=True,
                      overrides={"learning_rate": rate}),
                 _arm(f"poso_all lr{rate:g}", "poso_all", reference=base, epochs=epochs, curve=True,
                      overrides={"learning_rate": rate})]
    return arms


def _data_size_arms() -> List[Arm]:
    arms = []
    for fraction in (0.25, 0.5, 1.0):
        base = f"baseline {fraction:.0%}"
        arms += [_arm(base, "baseline", reference=None, user_fraction=fraction),
                 _arm(f"poso_all {fraction:.0%}", "poso_all", reference=base, user_fraction=fraction)]
    return arms


# name -> (what it answers, arms). The baseline ignores the PC and gate options, so one
# baseline arm serves every POSO arm of the same budget and data.
EXPERIMENTS: Dict[str, Tuple[str, List[Arm]]] = {
    "modules": ("every POSO module against the baseline at the defaults", _with_baseline(
        [_arm(v, v) for v in ("poso_all", "poso_mha", "poso_mlp", "poso_mmoe")])),
    "headline": ("baseline and POSO(all) at the defaults", _with_baseline([_arm("poso_all", "poso_all")])),
    "value_projections": ("POSO(MHA)'s N value projections: N = 1 (one gated projection) against the default 4",
                          _with_baseline([_arm("poso_all", "poso_all"),  # N = 4, the default
                                          _arm("poso_all N=1", "poso_all", overrides={"num_value_projections": 1})])),
    "pc": ("the PC encoding POSO's gates read", _with_baseline(
        [_arm(f"poso_all pc={pc}", "poso_all", overrides={"pc_source": pc})
         for pc in ("avc_bucket_embedding", "avc_bucket_onehot", "avc_raw")])),
    "gates": ("the gates' hidden width and C (default 8 and 2)", _with_baseline(
        [_arm("poso_all", "poso_all")]
        + [_arm(f"poso_all h={h} C={c:g}", "poso_all", overrides={"gate_hidden_units": h, "gate_scale": c})
           for h, c in ((32, 2.0), (8, 1.0))])),
    "budget": ("the training budget (epochs, learning rate) given to both alike", _budget_arms()),
    "data_size": ("learning curve: 25 / 50 / 100% of the training users", _data_size_arms()),
    "specialist": ("is there new-user behaviour a shared model misses? the baseline trained only on ratings "
                   "with AVC < 32 against the baseline trained on all (compare the new-regime column)",
                   _with_baseline([_arm(f"baseline AVC<{NEW_USER_AVC} only", "baseline", max_avc=NEW_USER_AVC)])),
    "stop_gradient": ("gate_stop_gradient with the learned PC embedding", _with_baseline(
        [_arm("poso_all stop_gradient", "poso_all", overrides={"gate_stop_gradient": True})])),
}


# --------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------


# --------------------------------------------------------------------------
# Data, training, scoring.
# --------------------------------------------------------------------------


def code_hash(repo_root: Optional[str] = None) -> str:
    """Short hash of the model and data code: a cached run is reused only with the same code."""
    repo_root = repo_root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for name in _CODE_FILES:
        with open(os.path.join(repo_root, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def prepare(data_zip: str, work_dir: str, test: bool = False, split_seed: int = 0) -> Dict[str, Any]:
    """Examples (validation users, or test users with `test`), transform graph and the scored
    users' labels, user ids and AVC; written once per work_dir and reused."""
    from components import movielens as ml_data

    data_dir = os.path.join(work_dir, f"{'test' if test else 'validation'}_split{split_seed}")
    examples_dir = os.path.join(data_dir, "examples")
    transform_dir = os.path.join(data_dir, "transform")
    if not os.path.exists(os.path.join(transform_dir, "transform_fn")):
        ml_data.write_examples(data_zip, examples_dir, test_fraction=paper_movielens.DEFAULT_BUDGET["test_fraction"],
                               seed=split_seed, validation=not test)
        paper_movielens.analyze(os.path.join(examples_dir, ml_data.TRAIN, "*.tfrecord.gz"), transform_dir,
                                os.path.join(data_dir, "tft_tmp"))
    with open(os.path.join(examples_dir, "summary.json")) as f:
        summary = json.load(f)
    test_pattern = os.path.join(examples_dir, ml_data.TEST, "*.tfrecord.gz")
    _, scored = paper_movielens.read_test_examples(test_pattern)
    return dict(data_dir=data_dir, train_pattern=os.path.join(examples_dir, ml_data.TRAIN, "*.tfrecord.gz"),
                test_pattern=test_pattern, transform_dir=transform_dir, summary=summary, scored=scored,
                split=("test" if test else "validation"), split_seed=split_seed)


def training_subset(prepared: Mapping[str, Any], fraction: float, max_avc: Optional[int] = None) -> Tuple[str, int]:
    """(file pattern, example count) of the training examples of a `fraction` of the training
    users (a fixed hash of the user id, nested: 25% is inside 50%), only those with
    AVC < `max_avc` if given."""
    import tensorflow as tf

    from components import movielens as ml_data
    from feature_specs import movielens as ml

    if fraction >= 1.0 and max_avc is None:
        return prepared["train_pattern"], prepared["summary"][ml_data.TRAIN]["examples"]
    path = os.path.join(prepared["data_dir"], f"train_users_{fraction:g}_avc_below_{max_avc}.tfrecord.gz")
    count_path = path + ".count"
    if not os.path.exists(count_path):
        files = sorted(tf.io.gfile.glob(prepared["train_pattern"]))
        kept = 0
        with tf.io.TFRecordWriter(path, options="GZIP") as writer:
            for record in tf.data.TFRecordDataset(files, compression_type="GZIP"):
                example = tf.train.Example.FromString(record.numpy())
                user = example.features.feature[ml.USER_ID].int64_list.value[0]
                avc = example.features.feature[ml.AVC].int64_list.value[0]
                kept_user = fraction >= 1.0 or ml_data.test_user_mask(
                    np.array([user]), fraction, prepared["split_seed"] + _SUBSET_SEED_OFFSET)[0]
                if kept_user and (max_avc is None or avc < max_avc):
                    writer.write(record.numpy())
                    kept += 1
        with open(count_path, "w") as f:
            f.write(str(kept))
    with open(count_path) as f:
        return path, int(f.read())


def _scoring_dataset(prepared: Mapping[str, Any], batch_size: int = 4096):
    """The scored users' transformed features in file order (the order of `prepared['scored']`)."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from feature_specs import movielens as ml
    from models import preprocessing

    files = sorted(tf.io.gfile.glob(prepared["test_pattern"]))
    raw_spec = preprocessing.raw_feature_spec(include_labels=False, feature_set=ml.MOVIELENS)
    transform_layer = tft.TFTransformOutput(prepared["transform_dir"]).transform_features_layer()
    return (tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size)
            .map(lambda serialized: transform_layer(tf.io.parse_example(serialized, raw_spec))))


def train_and_score(prepared: Mapping[str, Any], arm: Arm, seed: int) -> List[Dict[str, Any]]:
    """Trains `arm` with `seed` as models.trainer.train_and_export does; one row per task with
    GAUC overall and per AVC regime on the scored users."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from feature_specs import movielens as ml
    from models import metrics, model as model_lib, trainer
    from models.optimizers import FusedAdam

    config = model_lib.make_config(arm.variant, feature_set=ml.MOVIELENS, **arm.config_overrides())
    train_pattern, train_examples = training_subset(prepared, arm.user_fraction, arm.max_avc)
    started = time.perf_counter()
    tf.keras.utils.set_random_seed(seed)
    train_data = trainer.make_dataset(train_pattern, tft.TFTransformOutput(prepared["transform_dir"]),
                                      arm.batch_size, shuffle=True, shuffle_buffer=train_examples, seed=seed,
                                      feature_set=ml.MOVIELENS)
    model = model_lib.RankingModel(config, ml.MOVIELENS)
    model.compile(optimizer=FusedAdam(learning_rate=config.learning_rate))
    scored = prepared["scored"]
    users, avc = scored[ml.USER_ID], scored[ml.AVC]
    regimes = {"gauc": np.ones_like(avc, bool), "gauc_new": avc < NEW_USER_AVC, "gauc_regular": avc >= NEW_USER_AVC}
    predict = tf.function(lambda features: model(features, training=False))
    rows = []

    def score(epoch: int) -> None:
        outputs: Dict[str, List[np.ndarray]] = {}
        for batch in _scoring_dataset(prepared):
            for name, value in predict(batch).items():
                outputs.setdefault(name, []).append(value.numpy())
        for task in ml.MOVIELENS.tasks:
            labels, scores = scored[task.label], np.concatenate(outputs[task.name])
            row = dict(label=arm.label, seed=seed, task=task.name, epoch=epoch,
                       train_seconds=time.perf_counter() - started, train_examples=train_examples)
            for column, rows_in in regimes.items():
                row[column] = metrics.grouped_auc(labels[rows_in], scores[rows_in], users[rows_in])
            rows.append(row)

    # A curve arm is scored after every epoch: epoch k of a longer run is exactly a k-epoch
    # run (same seed, same per-epoch data order, constant learning rate).
    callbacks = [tf.keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: score(epoch + 1))
                 ] if arm.curve else []
    model.fit(train_data, epochs=arm.epochs, verbose=0, callbacks=callbacks)
    if not arm.curve:
        score(arm.epochs)
    tf.keras.backend.clear_session()
    return rows


def data_profile(prepared: Mapping[str, Any]) -> str:
    """Where the ratings fall by AVC bucket (training and scored users), the label rates in and
    out of the new-user regime, and how well the AVC alone ranks a user's ratings (GAUC of
    -AVC). No training."""
    from feature_specs import movielens as ml
    from models import metrics

    _, train = paper_movielens.read_test_examples(prepared["train_pattern"])
    scored = prepared["scored"]
    edges = (0,) + tuple(ml.MOVIELENS.pc.boundaries) + (np.inf,)
    lines = [f"{'AVC bucket':<14} {'train share':>11} {'scored share':>12}"]
    for low, high in zip(edges[:-1], edges[1:]):
        shares = [np.mean((d[ml.AVC] >= low) & (d[ml.AVC] < high)) for d in (train, scored)]
        lines.append(f"[{low:g}, {high:g}){'':<{12 - len(f'[{low:g}, {high:g})')}} {100 * shares[0]:>10.1f}% "
                     f"{100 * shares[1]:>11.1f}%")
    for name, data in (("train", train), ("scored", scored)):
        new = data[ml.AVC] < NEW_USER_AVC
        rates = ", ".join(f"{task.name} {100 * data[task.label][new].mean():.1f}% (AVC < {NEW_USER_AVC}) vs "
                          f"{100 * data[task.label][~new].mean():.1f}%" for task in ml.MOVIELENS.tasks)
        lines.append(f"{name}: {data[ml.AVC].size} ratings, {np.unique(data[ml.USER_ID]).size} users, "
                     f"{100 * new.mean():.1f}% with AVC < {NEW_USER_AVC}; label rates {rates}")
    users, avc = scored[ml.USER_ID], scored[ml.AVC]
    for task in ml.MOVIELENS.tasks:
        cells = []
        for regime, rows in (("all", avc >= 0), (f"AVC < {NEW_USER_AVC}", avc < NEW_USER_AVC),
                             (f"AVC >= {NEW_USER_AVC}", avc >= NEW_USER_AVC)):
            gauc = metrics.grouped_auc(scored[task.label][rows], -avc[rows].astype(float), users[rows])
            cells.append(f"{regime} {100 * gauc:.2f}")
        lines.append(f"scored users, GAUC % of the score -AVC, {task.name}: " + ", ".join(cells))
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Experiments: cached runs, paired tables.
# --------------------------------------------------------------------------


def _run_key(arm: Arm, prepared: Mapping[str, Any], code: str, seed: int) -> str:
    return json.dumps(dict(arm.key(), split=prepared["split"], split_seed=prepared["split_seed"], code=code,
                           seed=seed), sort_keys=True)


def _read_cache(cache_path: str) -> pd.DataFrame:
    if not os.path.exists(cache_path):
        return pd.DataFrame(columns=["key"])
    with open(cache_path) as f:
        return pd.DataFrame([json.loads(line) for line in f if line.strip()])


def run_experiment(arms: Sequence[Arm], seeds: Sequence[int], prepared: Mapping[str, Any], cache_path: str,
                   log=print, train: bool = True) -> pd.DataFrame:
    """Rows (label, seed, task, epoch, gauc, gauc_new, gauc_regular, ...) of every arm and seed,
    trained now or read from `cache_path` (JSON lines, appended to as runs finish); with
    `train=False` only the cached runs."""
    code = code_hash()
    cache = _read_cache(cache_path)
    frames = []
    for seed in seeds:  # seed-major: an interrupted run leaves complete pairs
        for arm in arms:
            key = _run_key(arm, prepared, code, seed)
            hit = cache[cache["key"] == key] if len(cache) else cache
            if hit.empty and not train:
                continue
            if hit.empty:
                rows = pd.DataFrame(train_and_score(prepared, arm, seed))
                rows["key"], rows["code"] = key, code
                with open(cache_path, "a") as f:
                    f.writelines(json.dumps(record, default=lambda value: value.item()) + "\n"
                                for record in rows.to_dict("records"))
                cache = pd.concat([cache, rows], ignore_index=True)
                hit = rows
                log(f"[diagnosis] {arm.label} seed {seed}: GAUC % "
                    f"{ {r.task: round(100 * r.gauc, 2) for r in rows.itertuples()} } "
                    f"({rows['train_seconds'].iloc[0]:.0f} s)")
            if arm.curve:
                frames.append(hit.assign(label=[f"{arm.label} e{int(e)}" for e in hit["epoch"]]))
            else:
                frames.append(hit.assign(label=arm.label))
    if not frames:
        return pd.DataFrame(columns=["label", "seed", "task", "epoch", "gauc", "gauc_new", "gauc_regular"])
    return pd.concat(frames, ignore_index=True)


def expand_curves(arms: Sequence[Arm]) -> List[Arm]:
    """Each curve arm as one arm per epoch, "<label> e<k>", compared with "<reference> e<k>"."""
    expanded = []
    for arm in arms:
        if not arm.curve:
            expanded.append(arm)
            continue
        for epoch in range(1, arm.epochs + 1):
            reference = f"{arm.reference} e{epoch}" if arm.reference else None
            expanded.append(dataclasses.replace(arm, label=f"{arm.label} e{epoch}", epochs=epoch, curve=False,
                                                reference=reference))
    return expanded


def format_experiment(results: pd.DataFrame, arms: Sequence[Arm], title: str = "") -> str:
    """Per arm and task: seeds, mean GAUC %, and the paired difference with its reference arm
    (pp, 95% CI, p), overall and in each AVC regime."""
    lines = [title] if title else []
    header = (f"{'arm':<34} {'task':<10} {'n':>2} {'GAUC %':>7}  {'diff pp [95% CI]':<26} {'p':>6}  "
              f"{'new (AVC<32) pp':<26} {'regular pp':<26}")
    lines += [header, "-" * len(header)]
    for arm in arms:
        mine = results[results["label"] == arm.label]
        for task in mine["task"].unique():
            rows = mine[mine["task"] == task].set_index("seed")
            cells = [f"{arm.label:<34} {task:<10} {len(rows):>2} {100 * rows['gauc'].mean():>7.2f}"]
            if arm.reference is not None:
                ref = results[(results["label"] == arm.reference) & (results["task"] == task)].set_index("seed")
                seeds = sorted(set(rows.index) & set(ref.index))
                for i, column in enumerate(("gauc", "gauc_new", "gauc_regular")):
                    d = paired_difference(100 * rows.loc[seeds, column], 100 * ref.loc[seeds, column])
                    cell = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
                    cells.append(f" {cell:<26}" + (f" {d['p']:>6.3f} " if i == 0 else ""))
            lines.append("".join(cells))
    lines.append("diff = arm - its reference arm (the baseline of the same budget and data), paired by seed; "
                 "CI: t over seeds; p: paired t-test.")
    return "\n".join(lines)


def compare_codes(arms: Sequence[Arm], seeds: Sequence[int], prepared: Mapping[str, Any], cache_path: str,
                  before: str, after: str) -> str:
    """Each arm's cached runs under model code `after` minus the same arm and seed under
    `before` (code hashes, as printed in the experiment titles): what a code change did."""
    cache = _read_cache(cache_path)
    lines = [f"{'arm':<28} {'task':<10} {'n':>2}  {'after - before pp [95% CI]':<28} {'p':>6}"]
    for arm in arms:
        values = {}
        for code in (before, after):
            keys = {_run_key(arm, prepared, code, seed): seed for seed in seeds}
            runs = cache[cache["key"].isin(keys)] if len(cache) else cache
            values[code] = {(keys[r.key], r.task): 100 * r.gauc for r in runs.itertuples()}
        for task in sorted({task for _, task in values[after]}):
            paired = sorted(k for k in values[after] if k[1] == task and k in values[before])
            d = paired_difference([values[after][k] for k in paired], [values[before][k] for k in paired])
            cell = f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
            lines.append(f"{arm.label:<28} {task:<10} {d['n']:>2}  {cell:<28} {d['p']:>6.3f}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), help="which experiment to run")
    parser.add_argument("--list", action="store_true", help="list the experiments and their cost, then exit")
    parser.add_argument("--epochs", type=int, default=None,
                        help="train every arm (curves excepted) this many epochs instead of its own "
                             f"(default: paper_movielens.DEFAULT_BUDGET's, {paper_movielens.DEFAULT_BUDGET['epochs']})")
    parser.add_argument("--report", action="store_true",
                        help="only print the table of the runs already cached (no training)")
    parser.add_argument("--compare-codes", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                        help="print each arm's cached GAUC under code hash AFTER minus BEFORE, paired by seed")
    parser.add_argument("--profile", action="store_true",
                        help="print the data's AVC profile (no training), then exit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--arms", nargs="+", default=None, help="only these arm labels (and their references)")
    parser.add_argument("--data", default=None, help="MovieLens zip (default: paper_movielens.default_data_zip())")
    parser.add_argument("--work-dir", default=_DEFAULT_CACHE_DIR, help="examples, transform graphs, run cache")
    parser.add_argument("--test", action="store_true",
                        help="score on the TEST users (final table only; never choose on it)")
    args = parser.parse_args(argv)

    if args.profile:
        prepared = prepare(args.data or paper_movielens.default_data_zip(), args.work_dir, test=args.test)
        print(data_profile(prepared))
        return 0
    if args.list or not args.experiment:
        for name, (what, arms) in EXPERIMENTS.items():
            cost = sum(arm.epochs / 3 * arm.user_fraction for arm in arms)
            print(f"{name:<14} {what}: {len(arms)} arms, ~{cost:.1f} default-model trainings per seed")
        return 0 if args.list else 2
    what, arms = EXPERIMENTS[args.experiment]
    if args.arms:
        wanted = set(args.arms)
        wanted |= {arm.reference for arm in arms if arm.label in wanted and arm.reference}
        unknown = sorted(set(args.arms) - {arm.label for arm in arms})
        if unknown:
            parser.error(f"--arms: unknown arm(s) {unknown}; experiment {args.experiment} has "
                         f"{[arm.label for arm in arms]}")
        arms = [arm for arm in arms if arm.label in wanted]
    if args.epochs is not None:
        arms = [arm if arm.curve else dataclasses.replace(arm, epochs=args.epochs) for arm in arms]
    os.makedirs(args.work_dir, exist_ok=True)
    if args.compare_codes:
        prepared = prepare(args.data or paper_movielens.default_data_zip(), args.work_dir, test=args.test)
        print(compare_codes(arms, args.seeds, prepared, os.path.join(args.work_dir, "runs.jsonl"),
                            *args.compare_codes))
        return 0
    started, code = time.perf_counter(), code_hash()  # the runs' code: read before any training
    prepared = prepare(args.data or paper_movielens.default_data_zip(), args.work_dir, test=args.test)
    results = run_experiment(arms, args.seeds, prepared, os.path.join(args.work_dir, "runs.jsonl"),
                             log=lambda line: print(line, file=sys.stderr, flush=True), train=not args.report)
    minutes = (time.perf_counter() - started) / 60
    print(format_experiment(results, expand_curves(arms), title=(
        f"{args.experiment}: {what}. {prepared['split']} users ({prepared['summary']['test']['users']} users, "
        f"{prepared['summary']['test']['examples']} ratings), seeds {args.seeds}, code {code}, "
        f"{minutes:.1f} min")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
