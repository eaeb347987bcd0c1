"""The daily Evaluator: each model scores the day once, in large batches; every metric and slice
is then computed from the score columns with NumPy and written in TFMA's own format.

TFX's Evaluator (TFMA) is not used because its per-example Python, not the model, is the cost:
on a 50,000-impression day with one model `tfma.run_model_analysis` took 101 s against 4.7 s of
plain batched `serving_default` inference (21.6x; 1.3-2.8 ms per example around a 0.09 ms model
call). TFMA without a model, on the predictions computed beforehand (model-agnostic: the
EvalConfig's prediction_keys over an Arrow batch of the score, label and slice columns, as
`tfma.analyze_raw_data` runs it, which itself takes one output only) took 196 s for the same day
and model against 2.7 s of inference and parsing (loaded cores): TFMA's extraction, slicing and
combiners walk every example in Python whatever produced the scores (benchmarks/README.md,
"Whole-window training (issue 22)").

What it computes is what TFMA computes with the same EvalConfig (tests/test_batch_evaluator.py
compares the two on every task, slice and both models):
- the EvalConfig as TFX's Evaluator completes it (`tfma.utils.update_eval_config_with_defaults`):
  with a baseline the models are "candidate" and "baseline", and every metric of the candidate
  also gets its change against the baseline (TFMA's `is_diff` keys);
- slices: one per slicing spec and value of its feature keys (the overall slice for a spec without
  keys); an example without the feature is in none of that spec's slices;
- metrics: those of models/metrics.py (`ScoreColumnsMetric`: GAUC, exact AUC, log loss, count and
  means), each on the (group, label, score) columns of one model output and slice, through the
  same functions TFMA's derived metrics call.
The output files are TFMA's (metrics as MetricsForSlice records, validations, eval_config.json with
the model locations), so `tfma.load_eval_result` and the BlessingGate read them unchanged. No plots
or attributions are written (the EvalConfig asks for none). An EvalConfig using anything else
(thresholds, example weights, other metrics, slices by feature values or SQL) is refused, naming it.

Memory: the serialized examples stream through in batches; what is kept is a few columns per
example (each output's score per model, the labels, the user id, the slice keys as codes).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

from feature_specs import specs

DEFAULT_BATCH_SIZE = 4096
METRICS_FILE = "metrics-00000-of-00001.tfrecord"
VALIDATIONS_FILE = "validations.tfrecord"
EVAL_CONFIG_FILE = "eval_config.json"


class EvaluationError(ValueError):
    """A model, the examples or the EvalConfig cannot be evaluated; the message says which."""


@dataclasses.dataclass(frozen=True)
class _MetricsSpec:
    models: Tuple[str, ...]
    outputs: Tuple[str, ...]
    metrics: Tuple[object, ...]  # models.metrics.ScoreColumnsMetric instances


@dataclasses.dataclass(frozen=True)
class Plan:
    """What an EvalConfig asks for, in the terms this evaluator computes."""

    signatures: Dict[str, str]                  # model name -> signature name
    labels: Dict[Tuple[str, str], str]          # (model, output) -> label feature
    slices: Tuple[Tuple[str, ...], ...]         # feature keys of each slicing spec, () = overall
    metrics_specs: Tuple[_MetricsSpec, ...]
    baseline: Optional[str]

    @property
    def group_keys(self) -> Tuple[str, ...]:
        return tuple(sorted({m.group_key for s in self.metrics_specs for m in s.metrics}))

    @property
    def slice_keys(self) -> Tuple[str, ...]:
        return tuple(sorted({k for keys in self.slices for k in keys}))


def _metric(config) -> object:
    from models import metrics as metrics_lib

    try:
        cls = getattr(importlib.import_module(config.module or "tensorflow_model_analysis.metrics"),
                      config.class_name)
    except (ImportError, AttributeError) as e:
        raise EvaluationError(f"metric {config.class_name!r} (module {config.module!r}) not found: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, metrics_lib.ScoreColumnsMetric)):
        raise EvaluationError(f"metric {config.class_name!r} is not computed from score columns "
                              f"(models.metrics.ScoreColumnsMetric); use TFX's Evaluator for it")
    return cls(**json.loads(config.config or "{}"))


def plan_of(eval_config) -> Plan:
    """The Plan of a completed EvalConfig (update_eval_config_with_defaults); EvaluationError
    naming the first setting this evaluator does not compute."""
    def refuse(what: str):
        raise EvaluationError(f"EvalConfig: {what} is not supported by the batch evaluator "
                              f"(components/batch_evaluator.py)")

    signatures, labels = {}, {}
    baseline = None
    for spec in eval_config.model_specs:
        for field in ("prediction_key", "prediction_keys", "example_weight_key", "example_weight_keys",
                      "label_key", "preprocessing_function_names"):
            if getattr(spec, field):
                refuse(f"model_specs[{spec.name!r}].{field}")
        signatures[spec.name] = spec.signature_name or "serving_default"
        for output, label in spec.label_keys.items():
            labels[(spec.name, output)] = label
        if spec.is_baseline:
            baseline = spec.name
    slices = []
    for spec in eval_config.slicing_specs:
        if spec.feature_values or spec.slice_keys_sql:
            refuse("slicing by feature_values or slice_keys_sql")
        slices.append(tuple(sorted(spec.feature_keys)))
    if eval_config.cross_slicing_specs:
        refuse("cross_slicing_specs")
    metrics_specs = []
    for spec in eval_config.metrics_specs:
        if spec.thresholds or any(m.HasField("threshold") or m.per_slice_thresholds or m.cross_slice_thresholds
                                  for m in spec.metrics):
            refuse("thresholds (the BlessingGate decides)")
        if spec.example_weights.weighted or spec.HasField("binarize") or spec.HasField("aggregate"):
            refuse("example weights, binarize or aggregate")
        models = tuple(spec.model_names) or tuple(signatures)
        outputs = tuple(spec.output_names) or ("",)
        for model in models:
            for output in outputs:
                if (model, output) not in labels:
                    raise EvaluationError(f"EvalConfig: no label for output {output!r} of model {model!r} "
                                          f"(ModelSpec.label_keys)")
        metrics_specs.append(_MetricsSpec(models, outputs, tuple(_metric(m) for m in spec.metrics)))
    return Plan(signatures, labels, tuple(slices), tuple(metrics_specs), baseline)


# ---------------------------------------------------------------------------
# Scoring: one pass over the examples, every model on each batch
# ---------------------------------------------------------------------------
def load_signature(model_name: str, path: str, signature_name: str, outputs: Sequence[str]):
    """(the signature, its string input's name); EvaluationError naming the model and its path."""
    import tensorflow as tf

    try:
        signature = tf.saved_model.load(path).signatures[signature_name]
    except KeyError:
        raise EvaluationError(f"the {model_name or 'model'} at {path} has no signature {signature_name!r}") from None
    except Exception as e:  # pylint: disable=broad-except  (OSError, DecodeError, ... all mean "cannot load")
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EvaluationError(f"cannot load the {model_name or 'model'} at {path}: {message}") from None
    inputs = signature.structured_input_signature[1]
    if len(inputs) != 1 or next(iter(inputs.values())).dtype != tf.string:
        raise EvaluationError(f"the {model_name or 'model'} at {path}: signature {signature_name!r} must take "
                              f"one string tensor of serialized tf.Examples; it takes {sorted(inputs)}")
    missing = sorted(set(outputs) - set(signature.structured_outputs))
    if missing:
        raise EvaluationError(f"the {model_name or 'model'} at {path}: signature {signature_name!r} has no "
                              f"output {missing}; it has {sorted(signature.structured_outputs)}")
    return signature, next(iter(inputs))


class _Codes:
    """A string or int column kept as int32 codes into the values seen so far (-1: absent)."""

    def __init__(self):
        self._index: Dict[object, int] = {}
        self.chunks: List[np.ndarray] = []

    @property
    def values(self) -> List[object]:
        """The values in code order."""
        return list(self._index)

    def add(self, values: np.ndarray, present: np.ndarray) -> None:
        codes = np.full(present.size, -1, dtype=np.int32)
        if values.size:
            unique, inverse = np.unique(values, return_inverse=True)
            mapped = np.array([self._index.setdefault(v.item() if isinstance(v, np.generic) else v,
                                                      len(self._index)) for v in unique], dtype=np.int32)
            codes[present] = mapped[inverse.reshape(-1)]
        self.chunks.append(codes)

    def column(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)


@dataclasses.dataclass
class ScoredDay:
    """The day's columns: scores[(model, output)], labels[feature], groups[feature], slice codes."""

    scores: Dict[Tuple[str, str], np.ndarray]
    labels: Dict[str, np.ndarray]
    groups: Dict[str, np.ndarray]
    slice_codes: Dict[str, np.ndarray]
    slice_values: Dict[str, List[object]]

    def __len__(self) -> int:
        return next(iter(self.labels.values())).size


def _parse_spec(plan: Plan):
    import tensorflow as tf

    def dtype(name):
        return {specs.Dtype.INT64: tf.int64, specs.Dtype.FLOAT32: tf.float32,
                specs.Dtype.STRING: tf.string}[specs.feature(name).dtype]

    spec = {name: tf.io.FixedLenFeature([], dtype(name)) for name in set(plan.labels.values()) | set(plan.group_keys)}
    spec.update({name: tf.io.VarLenFeature(dtype(name)) for name in plan.slice_keys})
    return spec


def score_examples(plan: Plan, models: Dict[str, str], example_files: Sequence[str],
                   batch_size: int = DEFAULT_BATCH_SIZE) -> ScoredDay:
    """Every model's outputs over the gzip TFRecord files' examples, read once in batches, beside
    the labels, group ids and slice keys the plan needs (parsed with feature_specs' dtypes)."""
    import tensorflow as tf

    if set(models) != set(plan.signatures):
        raise EvaluationError(f"models {sorted(models)} do not match the EvalConfig's {sorted(plan.signatures)}")
    if not example_files:
        raise EvaluationError("no example files to evaluate on")
    outputs = {m: sorted({o for (model, o) in plan.labels if model == m}) for m in models}
    served = {m: load_signature(m, path, plan.signatures[m], outputs[m]) for m, path in models.items()}
    parse_spec = _parse_spec(plan)
    dataset = (tf.data.TFRecordDataset(list(example_files), compression_type="GZIP")
               .batch(batch_size)
               .map(lambda s: (s, tf.io.parse_example(s, parse_spec)), num_parallel_calls=tf.data.AUTOTUNE)
               .prefetch(2))
    scores: Dict[Tuple[str, str], List[np.ndarray]] = {(m, o): [] for m in models for o in outputs[m]}
    columns: Dict[str, List[np.ndarray]] = {name: [] for name in set(plan.labels.values()) | set(plan.group_keys)}
    codes = {name: _Codes() for name in plan.slice_keys}
    try:
        for serialized, parsed in dataset:
            rows = int(serialized.shape[0])
            for model, (signature, input_name) in served.items():
                result = signature(**{input_name: serialized})
                for output in outputs[model]:
                    value = result[output].numpy().reshape(-1)
                    if value.size != rows:
                        raise EvaluationError(f"the {model or 'model'} at {models[model]}: output {output!r} gives "
                                              f"{value.size} values for {rows} examples")
                    scores[(model, output)].append(value)
            for name in columns:
                columns[name].append(parsed[name].numpy())
            for name, column in codes.items():
                sparse = parsed[name]
                row_ids = sparse.indices[:, 0].numpy()
                counts = np.bincount(row_ids, minlength=rows)
                if np.any(counts > 1):
                    raise EvaluationError(f"slice feature {name!r} holds several values in one example")
                values = sparse.values.numpy()
                column.add(values, counts == 1)
    except tf.errors.OpError as e:
        raise EvaluationError(f"cannot read the examples ({', '.join(example_files)}): "
                              f"{e.message.splitlines()[0]}") from None
    concatenated = {name: np.concatenate(chunks) if chunks else np.zeros(0) for name, chunks in columns.items()}
    return ScoredDay(
        scores={key: np.concatenate(chunks) if chunks else np.zeros(0, np.float32) for key, chunks in scores.items()},
        labels={name: concatenated[name] for name in set(plan.labels.values())},
        groups={name: concatenated[name] for name in plan.group_keys},
        slice_codes={name: c.column() for name, c in codes.items()},
        slice_values={name: c.values for name, c in codes.items()})


# ---------------------------------------------------------------------------
# Metrics per slice from the columns
# ---------------------------------------------------------------------------
def check_columns(day: ScoredDay, plan: Plan) -> None:
    """EvaluationError when a label is not 0/1 or a prediction is not finite, once over the day
    (not per slice)."""
    for (model, output), label in plan.labels.items():
        labels, scores = day.labels[label], day.scores[(model, output)]
        if np.any((labels != 0) & (labels != 1)):
            raise EvaluationError(f"output {output!r}: label {label!r} must be 0 "
                                  f"or 1; found {labels[(labels != 0) & (labels != 1)][0]}")
        if not np.all(np.isfinite(scores)):
            raise EvaluationError(f"output {output!r} of the {model or 'model'}: a prediction is not finite")


def slices_of(day: ScoredDay, plan: Plan) -> Iterator[Tuple[tuple, np.ndarray]]:
    """(TFMA slice key, row indices) of every slice of every slicing spec."""
    for keys in plan.slices:
        if not keys:
            yield (), np.arange(len(day))
            continue
        stacked = np.stack([day.slice_codes[k] for k in keys], axis=1)
        present = np.flatnonzero(np.all(stacked >= 0, axis=1))
        if not present.size:
            continue
        combinations, inverse = np.unique(stacked[present], axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        for combination, rows in zip(combinations, np.split(present[order], bounds)):
            yield tuple((k, day.slice_values[k][c]) for k, c in zip(keys, combination)), rows


def slice_metrics(day: ScoredDay, plan: Plan) -> Iterator[Tuple[tuple, Dict[object, float]]]:
    """(slice key, {tfma MetricKey: value}) per slice, the candidate's changes included."""
    import tensorflow_model_analysis as tfma
    from models.metrics import ScoreColumns

    for slice_key, rows in slices_of(day, plan):
        values: Dict[object, float] = {}
        for spec in plan.metrics_specs:
            for model in spec.models:
                for output in spec.outputs:
                    labels = day.labels[plan.labels[(model, output)]][rows].astype(np.int8)
                    scores = day.scores[(model, output)][rows].astype(np.float64)
                    for metric in spec.metrics:
                        columns = ScoreColumns(day.groups[metric.group_key][rows], labels, scores, None)
                        for name, value in metric.values(columns).items():
                            values[tfma.metrics.MetricKey(name=name, model_name=model, output_name=output,
                                                          example_weighted=False)] = value
        if plan.baseline is not None:
            for key in list(values):
                if key.model_name != plan.baseline:
                    base = values.get(key._replace(model_name=plan.baseline))
                    if base is not None:
                        values[key.make_diff_key()] = values[key] - base
        yield slice_key, values


def write_evaluation(output_dir: str, eval_config, slices: Iterator[Tuple[tuple, Dict[object, float]]],
                     data_location: str, model_locations: Dict[str, str]) -> int:
    """TFMA's output files: metrics, validations and the eval config. Returns the slices written."""
    import tensorflow as tf
    import tensorflow_model_analysis as tfma
    from google.protobuf import json_format
    from tensorflow_model_analysis.proto import config_pb2, validation_result_pb2
    from tensorflow_model_analysis.writers import metrics_plots_and_validations_writer as writer

    os.makedirs(output_dir, exist_ok=True)
    count = 0
    with tf.io.TFRecordWriter(os.path.join(output_dir, METRICS_FILE)) as records:
        for slice_key, values in slices:
            records.write(writer.convert_slice_metrics_to_proto((slice_key, values), None).SerializeToString())
            count += 1
    # What TFMA writes without thresholds: nothing validated (the BlessingGate decides).
    with tf.io.TFRecordWriter(os.path.join(output_dir, VALIDATIONS_FILE)) as records:
        records.write(validation_result_pb2.ValidationResult(missing_thresholds=True).SerializeToString())
    run = config_pb2.EvalRun(eval_config=eval_config, version=tfma.version.VERSION, data_location=data_location,
                             file_format="tfrecords", model_locations=model_locations)
    with open(os.path.join(output_dir, EVAL_CONFIG_FILE), "w") as f:
        f.write(json_format.MessageToJson(run))
    return count


def evaluate(eval_config, models: Dict[str, str], example_files: Sequence[str], output_dir: str,
             batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Scores `example_files` with `models` ({model name in the EvalConfig: SavedModel path}) and
    writes the EvalConfig's metrics under `output_dir` as TFMA does; returns the examples scored.
    `eval_config` must already name the models (TFX: update_eval_config_with_defaults)."""
    plan = plan_of(eval_config)
    day = score_examples(plan, models, example_files, batch_size)
    if not len(day):
        raise EvaluationError(f"no examples in {', '.join(example_files)}")
    check_columns(day, plan)
    write_evaluation(output_dir, eval_config, slice_metrics(day, plan), ",".join(example_files), models)
    return len(day)


def completed_eval_config(eval_config_json: str, has_baseline: bool):
    """The EvalConfig as TFX's Evaluator completes it: model names "candidate" and "baseline"
    with a baseline, metrics specs naming the models."""
    import tensorflow_model_analysis as tfma
    from tensorflow_model_analysis.proto import config_pb2
    from tfx.utils import proto_utils

    eval_config = proto_utils.json_to_proto(eval_config_json, config_pb2.EvalConfig())
    eval_config = tfma.utils.update_eval_config_with_defaults(eval_config, has_baseline=has_baseline,
                                                               rubber_stamp=True)
    tfma.utils.verify_eval_config(eval_config)
    return eval_config


# ---------------------------------------------------------------------------
# The TFX component
# ---------------------------------------------------------------------------
class BatchEvaluatorSpec(ComponentSpec):
    PARAMETERS = {
        "eval_config": ExecutionParameter(type=str),      # tfma.EvalConfig as JSON
        "example_splits": ExecutionParameter(type=str),   # JSON list of split names
        "batch_size": ExecutionParameter(type=int),
    }
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),
        "model": ChannelParameter(type=standard_artifacts.Model),
        "baseline_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
    }
    OUTPUTS = {"evaluation": ChannelParameter(type=standard_artifacts.ModelEvaluation)}


class BatchEvaluatorExecutor(base_executor.BaseExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, object]) -> None:
        import glob

        from tfx.utils import io_utils, path_utils

        baselines = input_dict.get("baseline_model") or []
        eval_config = completed_eval_config(str(exec_properties["eval_config"]), bool(baselines))
        artifacts = {"model": artifact_utils.get_single_instance(input_dict["model"])}
        if baselines:
            artifacts["baseline_model"] = baselines[0]
        models = {}
        for spec in eval_config.model_specs:
            artifact = artifacts["baseline_model" if spec.is_baseline else "model"]
            models[spec.name] = path_utils.serving_model_path(
                artifact.uri, path_utils.is_old_model_artifact(artifact))
        files = []
        for split in json.loads(str(exec_properties["example_splits"])):
            for uri in artifact_utils.get_split_uris(input_dict["examples"], split):
                files += sorted(glob.glob(io_utils.all_files_pattern(uri)))
        evaluation = artifact_utils.get_single_instance(output_dict["evaluation"])
        evaluate(eval_config, models, files, evaluation.uri, int(exec_properties["batch_size"]))


class BatchEvaluator(base_component.BaseComponent):
    """TFX's Evaluator's inputs and ModelEvaluation output, computed as the module docstring says."""

    SPEC_CLASS = BatchEvaluatorSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(BatchEvaluatorExecutor)

    def __init__(self, examples: types.BaseChannel, model: types.BaseChannel,
                 baseline_model: Optional[types.BaseChannel], eval_config, example_splits: Sequence[str],
                 batch_size: int = DEFAULT_BATCH_SIZE):
        from tfx.utils import proto_utils

        super().__init__(spec=BatchEvaluatorSpec(
            examples=examples, model=model, baseline_model=baseline_model,
            eval_config=proto_utils.proto_to_json(eval_config), example_splits=json.dumps(list(example_splits)),
            batch_size=batch_size, evaluation=types.Channel(type=standard_artifacts.ModelEvaluation)))
