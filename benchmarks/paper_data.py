"""The paper reproduction's synthetic data, through the project's real code path, computed once.

    synthetic_logs.generate (KuaiRand-schema logs, new users behave differently)
      -> AvcExampleGen's executor, day by day with the user state carried (AVC, is_new_user, history)
      -> tf.Transform analysis with models.preprocessing.preprocessing_fn over the training days
      -> transformed features held in memory (trainer.make_dataset applies the transform graph)

The first `warmup_days` days of the generated logs are only ingested, never trained on: every
pre-existing user first appears on day 1, so day 1 flags them all as new and their AVC starts at 0
there; a few days of history let regular users' AVC (the PC) grow apart from new users' before
training starts. The next `train_days` days are the training window and the last day is the
evaluation day, as in the paper's offline protocol (train on 7 days, test on the 8th).

Everything is cached under `work_dir/<settings key>/`: a rerun with the same settings reuses
the examples and the transform graph.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np

from feature_specs import specs

START = datetime.date(2022, 4, 8)
_DONE = "done.json"


@dataclasses.dataclass(frozen=True)
class SyntheticSettings:
    """What the synthetic data depends on (the cache key)."""

    train_days: int = 7
    rows_per_day: int = 25_000
    new_user_share: float = 0.05
    data_seed: int = 1
    warmup_days: int = 1

    @property
    def days(self) -> int:
        return self.warmup_days + self.train_days + 1

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


@dataclasses.dataclass
class Split:
    """One split in memory: transformed features (model inputs and labels) and the slice keys."""

    features: Dict[str, np.ndarray]
    user_ids: np.ndarray
    user_groups: np.ndarray
    avc_buckets: np.ndarray
    # "new" (uploaded under specs.NEW_ITEM_DAYS days before the impression) or "regular"
    video_groups: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.user_ids.shape[0])

    def subset(self, mask: np.ndarray) -> "Split":
        """The rows where `mask` holds."""
        return dataclasses.replace(
            self, features={name: value[mask] for name, value in self.features.items()},
            user_ids=self.user_ids[mask], user_groups=self.user_groups[mask], avc_buckets=self.avc_buckets[mask],
            video_groups=None if self.video_groups is None else self.video_groups[mask])


@dataclasses.dataclass
class SyntheticData:
    settings: SyntheticSettings
    root: str
    logs_dir: str  # synthetic_logs.generate's out_dir (logs/DATE/log.csv and truth.arrow)
    train_files: List[str]
    eval_files: List[str]
    transform_dir: str
    train_dates: List[str]
    eval_date: str


def _run_avc_day(data_dir: str, out_dir: str, date: datetime.date, previous):
    """AvcExampleGen's executor for one date (in-process Beam), outputs under out_dir/<date>."""
    from components import avc_example_gen
    from pipeline import config

    return avc_example_gen.run_executor_for_day(data_dir, date, os.path.join(out_dir, date.isoformat()),
                                                config.direct_runner_args("in_memory"), previous)


def _example_files(out_dir: str, date: datetime.date) -> List[str]:
    from components import avc_example_gen

    files = sorted(glob.glob(os.path.join(out_dir, date.isoformat(), "examples",
                                          f"Split-{avc_example_gen.SPLIT}", "*")))
    if not files:
        raise FileNotFoundError(f"AvcExampleGen wrote no examples for {date.isoformat()} under {out_dir}")
    return files


def day_files(data: SyntheticData, date: str) -> List[str]:
    """The examples AvcExampleGen wrote for `date` (YYYY-MM-DD, any generated day, the warm-up days too)."""
    return _example_files(os.path.join(data.root, "examples"), datetime.date.fromisoformat(date))


def analyze(train_files: List[str], output_dir: str, temp_dir: str) -> str:
    """tf.Transform analysis of `preprocessing_fn` over the raw training examples (as the
    pipeline's Transform component, without its MLMD bookkeeping); returns `output_dir`."""
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tfx_bsl.public import tfxio

    from feature_specs import schema as fs_schema
    from models import preprocessing

    examples = tfxio.TFExampleRecord(file_pattern=train_files, schema=fs_schema.make_schema(),
                                     telemetry_descriptors=["poso", "paper"])
    options = beam.options.pipeline_options.PipelineOptions(
        ["--direct_running_mode=in_memory", "--direct_num_workers=1"])
    with beam.Pipeline(runner="DirectRunner", options=options) as pipeline:
        with tft_beam.Context(temp_dir=temp_dir):
            raw = pipeline | "ReadTrainingDays" >> examples.BeamSource()
            transform_fn = ((raw, examples.TensorAdapterConfig())
                            | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing.preprocessing_fn))
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
    return output_dir


def prepare(work_dir: str, settings: SyntheticSettings = SyntheticSettings(),
            log=print, preset: str = "default") -> SyntheticData:
    """Generates, ingests and analyzes the synthetic data once (cached by `settings` and the
    generator's `preset`, see components.synthetic_logs.PRESETS)."""
    from components import synthetic_logs

    behaviour = hashlib.sha1(repr(synthetic_logs.PRESETS[preset]).encode()).hexdigest()[:8]
    name = settings.key() if preset == "default" else f"{preset}-{behaviour}-{settings.key()}"
    root = os.path.join(os.path.abspath(work_dir), f"synthetic-{name}")
    dates = [START + datetime.timedelta(days=d) for d in range(settings.days)]
    train_dates = dates[settings.warmup_days:-1]
    examples_dir = os.path.join(root, "examples")
    transform_dir = os.path.join(root, "transform")
    done = os.path.join(root, _DONE)
    logs_dir = os.path.join(root, "logs")
    # Caches from before the generator wrote its truth files are made again.
    if not os.path.exists(done) or not glob.glob(os.path.join(logs_dir, "logs", "*", synthetic_logs.TRUTH_FILE)):
        # And the result rows of models trained on the data this replaces (benchmarks.paper).
        for stale in (examples_dir, transform_dir, os.path.join(root, "results")):
            maybe_remove(stale)
        log(f"  generating {settings.days} days x {settings.rows_per_day:,} impressions "
            f"(new-user share {settings.new_user_share}, preset {preset}) ...")
        synthetic_logs.generate(logs_dir, START, settings.days, seed=settings.data_seed,
                                impressions_per_day=settings.rows_per_day,
                                new_user_share=settings.new_user_share, preset=preset)
        previous = None
        for date in dates:
            log(f"  AvcExampleGen {date.isoformat()} ...")
            previous = _run_avc_day(logs_dir, examples_dir, date, previous)["user_state"][0]
        log("  tf.Transform analysis of the training days ...")
        analyze([f for d in train_dates for f in _example_files(examples_dir, d)], transform_dir,
                os.path.join(root, "tft_tmp"))
        with open(done, "w") as f:
            json.dump(dataclasses.asdict(settings), f)
    return SyntheticData(
        settings=settings, root=root, logs_dir=logs_dir,
        train_files=[f for d in train_dates for f in _example_files(examples_dir, d)],
        eval_files=_example_files(examples_dir, dates[-1]), transform_dir=transform_dir,
        train_dates=[d.isoformat() for d in train_dates], eval_date=dates[-1].isoformat())


def load_split(files: List[str], transform_dir: str, batch_size: int = 2048) -> Split:
    """Transformed features of every example in `files` (in file order) plus their slice keys."""
    import tensorflow as tf
    import tensorflow_transform as tft

    from models import trainer

    tft_output = tft.TFTransformOutput(transform_dir)
    parts: Dict[str, List[np.ndarray]] = {}
    for batch in trainer.make_dataset(files, tft_output, batch_size, shuffle=False):
        for name, value in batch.items():
            parts.setdefault(name, []).append(value.numpy())
    features = {name: np.concatenate(values) for name, values in parts.items()}

    slice_spec = {specs.USER_ID: tf.io.FixedLenFeature([], tf.int64),
                  specs.USER_GROUP: tf.io.FixedLenFeature([], tf.string),
                  specs.AVC_BUCKET: tf.io.FixedLenFeature([], tf.int64),
                  specs.ITEM_AGE_DAYS: tf.io.FixedLenFeature([], tf.float32)}
    records = tf.data.TFRecordDataset(files, compression_type="GZIP").batch(batch_size)
    keys: Dict[str, List[np.ndarray]] = {name: [] for name in slice_spec}
    for serialized in records:
        parsed = tf.io.parse_example(serialized, slice_spec)
        for name in slice_spec:
            keys[name].append(parsed[name].numpy())
    user_ids, groups, buckets, item_age_days = (np.concatenate(keys[name]) for name in slice_spec)
    split = Split(features, user_ids, groups.astype(str), buckets,
                  video_groups=video_groups(item_age_days))
    sizes = {name: len(value) for name, value in features.items()}
    if len(set(sizes.values()) | {len(split)}) != 1:
        raise RuntimeError(f"load_split: transformed features and slice keys differ in length: {sizes}, "
                           f"{len(split)} slice keys")
    return split


VIDEO_GROUPS = ("new", "regular")


def video_groups(item_age_days: np.ndarray) -> np.ndarray:
    """"new" for an impression of a video uploaded less than specs.NEW_ITEM_DAYS days before it,
    else "regular" (the paper's new videos; its further impression cap is not modelled here)."""
    return np.where(np.asarray(item_age_days) < specs.NEW_ITEM_DAYS, VIDEO_GROUPS[0], VIDEO_GROUPS[1])


def describe(split: Split) -> Dict[str, object]:
    """Counts of examples and users per user group (for the results' data description)."""
    out: Dict[str, object] = {"examples": len(split), "users": int(np.unique(split.user_ids).size)}
    for group in specs.USER_GROUPS:
        mask = split.user_groups == group
        out[f"{group}_examples"] = int(mask.sum())
        out[f"{group}_users"] = int(np.unique(split.user_ids[mask]).size)
    if split.video_groups is not None:
        for group in VIDEO_GROUPS:
            out[f"{group}_video_examples"] = int((split.video_groups == group).sum())
    return out


def maybe_remove(path: Optional[str]) -> None:
    import shutil

    if path and os.path.exists(path):
        shutil.rmtree(path)
