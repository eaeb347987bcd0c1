"""TFX Trainer module (`run_fn`) and a TFX-free `train_and_export` for benchmarks.

Training reads RAW gzip TFRecord tf.Examples (ExampleGen's output; possibly several
daily spans), parses them with `preprocessing.raw_feature_spec`, applies the
tf.Transform graph in the tf.data pipeline, trains a `RankingModel` and exports it
with `export.export_serving_model`.

`fn_args.custom_config` (all keys optional):

    variant         one of model.VARIANTS (default "baseline")
    batch_size      default 512
    epochs          default 1; with TrainArgs.num_steps, the steps are split over the epochs
    warm_start      default True: start from fn_args.base_model's variables when given
    shuffle_buffer  default 10000
    seed            default 0
    overrides       dict of ModelConfig fields, e.g. {"pc_source": "is_new_user", "learning_rate": 1e-3}

Several workers: when TF_CONFIG names more than one task (as TFX's Trainer on Vertex AI sets it for
worker pools), training runs under `tf.distribute.MultiWorkerMirroredStrategy`: every worker reads
its share of the batches (sharded by data), gradients are all-reduced, so all workers hold the same
weights, and only the chief writes the export (the others write theirs to a scratch folder and
delete it, as the strategy needs every worker to take part in saving).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow.core.framework import summary_pb2

import feature_specs as fs
from models import export, pin, preprocessing
from models.model import ModelConfig, RankingModel, make_config
from models.optimizers import FusedAdam

__all__ = ["run_fn", "train_and_export", "make_dataset", "warm_start", "parse_custom_config",
           "distribution_strategy", "EpochSummaries", "TrainingResult", "TRAINER_KEYS", "DEFAULT_BATCH_SIZE"]

DEFAULT_BATCH_SIZE = 512
TRAINER_KEYS = ("variant", "overrides", "batch_size", "epochs", "warm_start", "shuffle_buffer", "seed")
_MODEL_CONFIG_FILE = "model_config.json"

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainingResult:
    model: RankingModel
    history: Dict[str, List[float]]
    serving_model_dir: str
    warm_started_variables: int = 0


def _list_files(file_patterns: Sequence[str] | str) -> List[str]:
    patterns = [file_patterns] if isinstance(file_patterns, str) else list(file_patterns)
    files = set()
    for pattern in patterns:
        if tf.io.gfile.isdir(pattern):
            pattern = os.path.join(pattern, "*")
        files.update(f for f in tf.io.gfile.glob(pattern) if not tf.io.gfile.isdir(f))
    if not files:
        raise FileNotFoundError(f"no example files match {patterns}")
    return sorted(files)


def _cluster() -> Dict[str, Any]:
    """TF_CONFIG as a dict ({} when unset)."""
    text = os.environ.get("TF_CONFIG", "")
    try:
        return json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as error:
        raise ValueError(f"TF_CONFIG is not JSON ({error}): {text[:200]!r}") from None


def distribution_strategy() -> tf.distribute.Strategy:
    """MultiWorkerMirroredStrategy when TF_CONFIG names several tasks, else the default strategy."""
    cluster = _cluster().get("cluster", {})
    if sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")) > 1:
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def _is_chief() -> bool:
    """The chief task, or worker 0 when TF_CONFIG names no chief (TF's convention); True alone."""
    config = _cluster()
    task = config.get("task", {})
    if not task:
        return True
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("type") == "worker" and int(task.get("index", 0)) == 0


def _export_dir(serving_model_dir: str) -> str:
    """Where this worker writes its export: the real folder on the chief, scratch elsewhere."""
    if _is_chief():
        return serving_model_dir
    task = _cluster()["task"]
    return os.path.join(os.path.dirname(serving_model_dir.rstrip("/")),
                        f".worker-export-{task.get('type')}-{task.get('index', 0)}")


def make_dataset(file_patterns: Sequence[str] | str, tft_output: tft.TFTransformOutput, batch_size: int,
                 shuffle: bool = True, repeat: bool = False, shuffle_buffer: int = 10_000,
                 seed: int = 0, feature_set: fs.FeatureSet = fs.KUAIRAND) -> tf.data.Dataset:
    """Batches of transformed features (labels included) from raw gzip TFRecord files."""
    files = _list_files(file_patterns)
    dataset = tf.data.Dataset.from_tensor_slices(files)
    if shuffle:
        dataset = dataset.shuffle(len(files), seed=seed)
    dataset = dataset.interleave(lambda path: tf.data.TFRecordDataset(path, compression_type="GZIP"),
                                 cycle_length=min(len(files), 4), num_parallel_calls=tf.data.AUTOTUNE,
                                 deterministic=not shuffle)
    if shuffle:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed)
    if repeat:
        dataset = dataset.repeat()
    raw_spec = preprocessing.raw_feature_spec(include_labels=True, feature_set=feature_set)
    transform_layer = tft_output.transform_features_layer()
    dataset = dataset.batch(batch_size).map(
        lambda serialized: transform_layer(tf.io.parse_example(serialized, raw_spec)),
        num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


# Records of this logger are progress lines: pipeline/local_runner.py prints them during a run.
PROGRESS_LOGGER = "poso.progress"


class StepProgress(tf.keras.callbacks.Callback):
    """Logs "Trainer: step k of n, loss x" about `updates` times over training (every 100 steps
    when the total is unknown) and "Trainer: trained k steps in s s" at the end to PROGRESS_LOGGER."""

    def __init__(self, total_steps: Optional[int], updates: int = 10):
        super().__init__()
        self.total_steps = total_steps
        self.every = max(1, total_steps // updates) if total_steps else 100
        self.step, self.started = 0, time.time()

    def on_train_begin(self, logs=None) -> None:
        self.step, self.started = 0, time.time()

    def on_train_batch_end(self, batch: int, logs: Optional[Mapping[str, float]] = None) -> None:
        self.step += 1
        if self.step % self.every and self.step != self.total_steps:
            return
        loss = (logs or {}).get("loss")
        logging.getLogger(PROGRESS_LOGGER).info(
            "Trainer: step %d%s%s (%.0f s)", self.step, f" of {self.total_steps}" if self.total_steps else "",
            f", loss {float(loss):.4f}" if loss is not None else "", time.time() - self.started)

    def on_train_end(self, logs=None) -> None:
        # The exact count (the periodic lines above may stop short of it): benchmarks read it.
        logging.getLogger(PROGRESS_LOGGER).info(
            "Trainer: trained %d steps in %.1f s", self.step, time.time() - self.started)


class EpochSummaries(tf.keras.callbacks.Callback):
    """Writes every epoch's metrics as TensorBoard scalars under <log_dir>/{train,validation}.

    Uses tf.summary.write with the scalars plugin's metadata, so it needs no TensorBoard
    install (tf.keras.callbacks.TensorBoard does).
    """

    _SCALAR_METADATA = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"),
        data_class=summary_pb2.DATA_CLASS_SCALAR)

    def __init__(self, log_dir: str):
        super().__init__()
        self.log_dir = log_dir
        self._writers = {}

    def _writer(self, name: str):
        if name not in self._writers:
            self._writers[name] = tf.summary.create_file_writer(os.path.join(self.log_dir, name))
        return self._writers[name]

    def on_epoch_end(self, epoch: int, logs: Optional[Mapping[str, float]] = None) -> None:
        for key, value in (logs or {}).items():
            split, tag = ("validation", key[len("val_"):]) if key.startswith("val_") else ("train", key)
            with self._writer(split).as_default():
                tf.summary.write(f"epoch_{tag}", tf.constant(float(value)), step=epoch,
                                 metadata=self._SCALAR_METADATA)
        for writer in self._writers.values():
            writer.flush()

    def on_train_end(self, logs=None) -> None:
        for writer in self._writers.values():
            writer.close()


def warm_start(model: tf.keras.Model, base_model_dir: Optional[str]) -> int:
    """Copies variables with the same name and shape from a model exported by `export`.

    `model` must be built. Returns how many variables were restored; 0 (with a log line)
    when there is no usable base model, e.g. the first run or another architecture. The
    variables left at their initial values are named in a warning.
    """
    if not base_model_dir:
        return 0
    try:
        base_variables = tf.saved_model.load(base_model_dir).model_variables
    except (OSError, ValueError, AttributeError, tf.errors.OpError) as error:
        _log.warning("warm start skipped: cannot read variables of %s (%s)", base_model_dir, error)
        return 0
    names = collections.Counter(variable.name for variable in base_variables)
    # A name that occurs twice is ambiguous: leave such variables at their initial values.
    by_name = {variable.name: variable for variable in base_variables if names[variable.name] == 1}
    restored, kept = 0, []
    for variable in model.variables:
        source = by_name.get(variable.name)
        if source is not None and source.shape == variable.shape and source.dtype == variable.dtype:
            variable.assign(source)
            restored += 1
        else:
            kept.append(variable.name)
    _log.info("warm start from %s: restored %d of %d variables",
              base_model_dir, restored, len(model.variables))
    if restored and kept:  # e.g. PIN's towers from an export before they were fused (models.pin)
        _log.warning("warm start: %d variables not in %s (by name and shape) keep their initial values: %s",
                     len(kept), base_model_dir, ", ".join(kept))
    return restored


def train_and_export(train_files: Sequence[str] | str, eval_files: Sequence[str] | str,
                     transform_output_dir: str, serving_model_dir: str,
                     config: ModelConfig | str | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
                     epochs: int = 1, train_steps: Optional[int] = None, eval_steps: Optional[int] = None,
                     log_dir: Optional[str] = None, base_model: Optional[str] = None,
                     shuffle_buffer: int = 10_000, seed: int = 0, verbose: int = 2,
                     feature_set: fs.FeatureSet = fs.KUAIRAND) -> TrainingResult:
    """Trains a `RankingModel` on raw examples and exports it to `serving_model_dir`.

    config: a ModelConfig, a variant name of `model.VARIANTS`, or None for "baseline".
    train_steps: total training steps (split over `epochs`, data repeated); None = one
      pass over the training files per epoch.
    eval_steps: evaluation steps after each epoch; None = the whole eval set.
    base_model: a previous export to warm start from (matching variables only).
    feature_set: the raw examples' features and tasks (KuaiRand's by default).
    """
    if isinstance(config, str) or config is None:
        config = make_config(config or "baseline")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    # First: MultiWorkerMirroredStrategy must configure collective ops before TensorFlow runs any op.
    strategy = distribution_strategy()
    tf.keras.utils.set_random_seed(seed)
    tft_output = tft.TFTransformOutput(transform_output_dir)
    repeat = train_steps is not None
    train_data = make_dataset(train_files, tft_output, batch_size, shuffle=True, repeat=repeat,
                              shuffle_buffer=shuffle_buffer, seed=seed, feature_set=feature_set)
    eval_data = make_dataset(eval_files, tft_output, batch_size, shuffle=False, repeat=eval_steps is not None,
                             feature_set=feature_set)
    if config.pin:
        train_data, config = pin.training_data(train_data, config, batch_size, feature_set, seed)

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Whole batches to each worker: the files of a day are fewer than workers may be.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
        train_data, eval_data = train_data.with_options(options), eval_data.with_options(options)
    with strategy.scope():
        model = RankingModel(config, feature_set)
        model.compile(optimizer=FusedAdam(learning_rate=config.learning_rate))
        for batch in train_data.take(1):
            model(batch)  # build the variables so they can be warm started
        warm_started = warm_start(model, base_model)

    callbacks = [StepProgress(math.ceil(train_steps / epochs) * epochs if repeat else None)]
    callbacks += [EpochSummaries(log_dir)] if log_dir else []
    history = model.fit(
        train_data, epochs=epochs,
        steps_per_epoch=math.ceil(train_steps / epochs) if repeat else None,
        validation_data=eval_data, validation_steps=eval_steps,
        callbacks=callbacks, verbose=verbose)

    export_dir = _export_dir(serving_model_dir)
    export.export_serving_model(model, tft_output, export_dir)
    if export_dir != serving_model_dir:
        tf.io.gfile.rmtree(export_dir)
        return TrainingResult(model, dict(history.history), serving_model_dir, warm_started)
    _write_model_config(config, serving_model_dir)
    return TrainingResult(model, dict(history.history), serving_model_dir, warm_started)


def _write_model_config(config: ModelConfig, serving_model_dir: str) -> None:
    # Next to the SavedModel (assets.extra is ignored by TF Serving): which variant this is.
    extra_dir = os.path.join(serving_model_dir, "assets.extra")
    tf.io.gfile.makedirs(extra_dir)
    with tf.io.gfile.GFile(os.path.join(extra_dir, _MODEL_CONFIG_FILE), "w") as f:
        f.write(json.dumps(config.to_dict(), indent=2, sort_keys=True))


def parse_custom_config(custom_config: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Validates `fn_args.custom_config`; returns trainer options and the ModelConfig."""
    custom_config = dict(custom_config or {})
    unknown = sorted(set(custom_config) - set(TRAINER_KEYS))
    if unknown:
        raise ValueError(f"custom_config: unknown key(s) {unknown}; known keys are {list(TRAINER_KEYS)} "
                         "(model hyper-parameters go in 'overrides')")
    overrides = custom_config.get("overrides") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError(f"custom_config['overrides'] must be a dict of ModelConfig fields, "
                         f"got {overrides!r}")
    return {
        "config": make_config(custom_config.get("variant") or "baseline", **overrides),
        "batch_size": int(custom_config.get("batch_size", DEFAULT_BATCH_SIZE)),
        "epochs": int(custom_config.get("epochs", 1)),
        "warm_start": bool(custom_config.get("warm_start", True)),
        "shuffle_buffer": int(custom_config.get("shuffle_buffer", 10_000)),
        "seed": int(custom_config.get("seed", 0)),
    }


def run_fn(fn_args) -> None:
    """TFX Trainer entry point (GenericExecutor): see the module docstring for custom_config."""
    options = parse_custom_config(fn_args.custom_config)
    result = train_and_export(
        fn_args.train_files, fn_args.eval_files, fn_args.transform_output or fn_args.transform_graph_path,
        fn_args.serving_model_dir,
        options["config"], batch_size=options["batch_size"], epochs=options["epochs"],
        train_steps=fn_args.train_steps, eval_steps=fn_args.eval_steps, log_dir=fn_args.model_run_dir,
        base_model=fn_args.base_model if options["warm_start"] else None,
        shuffle_buffer=options["shuffle_buffer"], seed=options["seed"])
    _log.info("trained %s (warm started %d variables); final metrics %s", options["config"],
              result.warm_started_variables, {k: v[-1] for k, v in result.history.items()})
