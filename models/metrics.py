"""The Evaluator's metrics: grouped AUC (GAUC), the POSO paper's per-user ranking quality, and
beside it exact AUC, log loss, count and means, all as TFMA custom metrics from one pass.

Global AUC mixes users: a model that only learns which users click a lot scores well
without ranking anything within a user's feed. GAUC measures what the ranker actually
does, ordering one user's candidates, by averaging per-user AUCs:

    GAUC = sum_g n_g * AUC_g / sum_g n_g

over the groups g (users) that have both a positive and a negative impression, where
n_g is the group's number of impressions (its total example weight when weighted) and
AUC_g is the group's ROC AUC with ties counted as one half, i.e. the probability that
a random positive of the group scores above a random negative of the group:

    AUC_g = sum_{i in pos_g, j in neg_g} w_i w_j ([s_i > s_j] + 0.5 [s_i = s_j])
            / (sum_{i in pos_g} w_i * sum_{j in neg_g} w_j)

This equals `sklearn.metrics.roc_auc_score(y_g, s_g, sample_weight=w_g)`.

`grouped_auc` computes it with NumPy. `GroupedAUC` is the same metric as a TFMA custom
metric, so TFX's Evaluator reports it per model output and per slice; reference it
from an EvalConfig with `gauc_metric_config()`, or take every metric of this module with
`ranking_metric_configs()`. Why these replace TFMA's own AUC and log loss: see "TFMA metrics".
"""

from __future__ import annotations

import array
import json
from typing import Any, Callable, Dict, Hashable, Iterable, List, Mapping, Optional, Tuple

import apache_beam as beam
import numpy as np
import tensorflow_model_analysis as tfma
# Not `tfma.EvalConfig` etc.: this TFMA build exports the config protos at top level only
# after TFX has been imported (TFX patches them in).
from tensorflow_model_analysis.proto import config_pb2

from feature_specs import KUAIRAND, USER_ID, FeatureSet

__all__ = ["grouped_auc", "exact_auc", "log_loss", "GroupedAUC", "ExactAUC", "LogLoss",
           "CountAndMeans", "ScoreColumns", "ScoreColumnsMetric", "gauc_metric_config", "ranking_metric_configs",
           "GAUC_NAME"]

# Metric key names, as TFMA names its own metrics of the same meaning.
GAUC_NAME = "gauc"
AUC_NAME = "auc"
LOG_LOSS_NAME = "log_loss"
EXAMPLE_COUNT_NAME = "example_count"
MEAN_LABEL_NAME = "mean_label"
MEAN_PREDICTION_NAME = "mean_prediction"
LOG_LOSS_EPSILON = 1e-7  # Keras' backend epsilon, as its binary cross-entropy uses it


# ---------------------------------------------------------------------------
# NumPy implementation
# ---------------------------------------------------------------------------
def _as_vector(name: str, values: Any) -> np.ndarray:
    """Returns `values` as a 1-D array; a trailing axis of size 1 is dropped."""
    result = np.asarray(values)
    if result.ndim == 2 and result.shape[1] == 1:
        result = result[:, 0]
    if result.ndim != 1:
        raise ValueError(f"{name} must be 1-D (or of shape [n, 1]); got shape {np.shape(values)}")
    return result


def _check_binary_labels(labels: np.ndarray) -> np.ndarray:
    labels = labels.astype(np.float64)
    bad = (labels != 0) & (labels != 1)
    if np.any(bad):
        raise ValueError(
            f"labels must be 0 or 1; found {labels[bad][0]!r} at index {int(np.flatnonzero(bad)[0])}")
    return labels.astype(np.int8)


def _grouped_auc_from_codes(
    codes: np.ndarray, labels: np.ndarray, scores: np.ndarray, weights: Optional[np.ndarray]
) -> float:
    """GAUC for integer group codes, 0/1 labels and finite scores (already validated).

    Vectorized over all groups at once: after sorting by (group, score), every run of
    equal (group, score) is a tie block. A positive in a block beats the negatives of
    the earlier blocks of its group and ties with the negatives of its own block.
    """
    if codes.size == 0:
        return float("nan")
    order = np.lexsort((scores, codes))
    codes, scores, labels = codes[order], scores[order], labels[order]
    weights = np.ones(codes.size) if weights is None else weights[order]
    positive_weight = np.where(labels == 1, weights, 0.0)
    negative_weight = weights - positive_weight

    new_block = np.empty(codes.size, dtype=bool)
    new_block[0] = True
    new_block[1:] = (codes[1:] != codes[:-1]) | (scores[1:] != scores[:-1])
    block_starts = np.flatnonzero(new_block)
    block_positives = np.add.reduceat(positive_weight, block_starts)
    block_negatives = np.add.reduceat(negative_weight, block_starts)
    block_codes = codes[block_starts]

    new_group = np.empty(block_codes.size, dtype=bool)
    new_group[0] = True
    new_group[1:] = block_codes[1:] != block_codes[:-1]
    group_starts = np.flatnonzero(new_group)
    block_group = np.cumsum(new_group) - 1

    # Negatives below each block within its group: a running sum that restarts per group.
    negatives_before = np.cumsum(block_negatives) - block_negatives
    negatives_below = negatives_before - negatives_before[group_starts][block_group]
    wins = block_positives * (negatives_below + 0.5 * block_negatives)

    group_wins = np.add.reduceat(wins, group_starts)
    group_positives = np.add.reduceat(block_positives, group_starts)
    group_negatives = np.add.reduceat(block_negatives, group_starts)
    has_both = (group_positives > 0) & (group_negatives > 0)
    if not np.any(has_both):
        return float("nan")
    impressions = (group_positives + group_negatives)[has_both]
    aucs = group_wins[has_both] / (group_positives[has_both] * group_negatives[has_both])
    return float(np.sum(impressions * aucs) / np.sum(impressions))


def grouped_auc(labels, predictions, groups, weights=None) -> float:
    """Impression-weighted mean of per-group ROC AUCs (GAUC); see the module docstring.

    Args:
      labels: 0/1 (or boolean) labels, shape [n] or [n, 1].
      predictions: finite scores, shape [n] or [n, 1]; only their order within a group
        matters, and equal scores count as half a correctly ordered pair (as sklearn).
      groups: the group (e.g. user id) of each example, shape [n]; ints or strings.
      weights: optional non-negative example weights, shape [n]. They weight the pairs
        inside a group's AUC and make a group's weight its total example weight.

    Returns:
      GAUC over the groups with both a positive and a negative example (of positive
      weight), or NaN when there is no such group.

    Raises:
      ValueError: on mismatched lengths, non-binary labels, non-finite predictions, or
        negative / non-finite weights.
    """
    labels = _as_vector("labels", labels)
    predictions = _as_vector("predictions", predictions)
    groups = _as_vector("groups", groups)
    lengths = {"labels": labels.size, "predictions": predictions.size, "groups": groups.size}
    if weights is not None:
        weights = _as_vector("weights", weights).astype(np.float64)
        lengths["weights"] = weights.size
    if len(set(lengths.values())) > 1:
        raise ValueError(f"grouped_auc inputs must have the same length; got {lengths}")

    labels = _check_binary_labels(labels)
    predictions = predictions.astype(np.float64)
    if not np.all(np.isfinite(predictions)):
        index = int(np.flatnonzero(~np.isfinite(predictions))[0])
        raise ValueError(f"predictions must be finite; found {predictions[index]} at index {index}")
    if weights is not None and not np.all(np.isfinite(weights) & (weights >= 0)):
        index = int(np.flatnonzero(~(np.isfinite(weights) & (weights >= 0)))[0])
        raise ValueError(f"weights must be finite and non-negative; found {weights[index]} at index {index}")
    if groups.size == 0:
        return float("nan")
    _, codes = np.unique(groups, return_inverse=True)
    return _grouped_auc_from_codes(codes.reshape(-1), labels, predictions, weights)


# ---------------------------------------------------------------------------
# Other per-output metrics from the same columns
# ---------------------------------------------------------------------------
def _weighted_mean(values: np.ndarray, weights: Optional[np.ndarray]) -> float:
    if values.size == 0:
        return float("nan")
    if weights is None:
        return float(np.mean(values))
    total = float(np.sum(weights))
    return float(np.dot(weights, values) / total) if total > 0 else float("nan")


def exact_auc(labels: np.ndarray, scores: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """ROC AUC over all examples, ties as one half (GAUC with a single group); NaN for one class."""
    return _grouped_auc_from_codes(np.zeros(labels.size, dtype=np.int64), labels, scores, weights)


def log_loss(labels: np.ndarray, scores: np.ndarray, weights: Optional[np.ndarray] = None) -> float:
    """Mean binary cross-entropy as Keras computes it from probabilities: p clipped to
    [eps, 1 - eps], then -(y log(p + eps) + (1 - y) log(1 - p + eps)), eps = 1e-7."""
    p = np.clip(scores, LOG_LOSS_EPSILON, 1.0 - LOG_LOSS_EPSILON)
    losses = -(labels * np.log(p + LOG_LOSS_EPSILON) + (1 - labels) * np.log(1 - p + LOG_LOSS_EPSILON))
    return _weighted_mean(losses, weights)


# ---------------------------------------------------------------------------
# TFMA metrics
# ---------------------------------------------------------------------------
# TFMA's own AUC, log loss and means each walk every example in Python, per output and per slice
# (about 30 us a walk); with four tasks and three slicing specs a 143k-impression day took 229 s.
# Here one combiner per (model, output, slice) collects the examples' (group, label, score[,
# weight]) as columns, and every metric below is a DerivedMetricComputation on those columns:
# TFMA de-duplicates the shared computation, so adding a metric costs no second walk.
SCORE_COLUMNS_NAME = "_score_columns"  # private: TFMA drops "_"-names from its output


class ScoreColumns:
    """One slice's examples of one model output as NumPy columns (the shared computation's value)."""

    __slots__ = ("groups", "labels", "scores", "weights")

    def __init__(self, groups: np.ndarray, labels: np.ndarray, scores: np.ndarray,
                 weights: Optional[np.ndarray]):
        self.groups, self.labels, self.scores, self.weights = groups, labels, scores, weights

    def __len__(self) -> int:
        return self.labels.size


class _GroupedScores:
    """Accumulator: a slice's examples as flat columns (group, label, score[, weight]).

    Flat typed arrays, not a dict of per-group lists: Beam pickles accumulators between the
    partial and the final combine, and a slice of 14k examples over 3k users pickles and
    unpickles in 0.06 ms this way against 10.6 ms as per-group objects. Groups are kept as
    int64 while they are ints (user ids), as a list otherwise; labels take 1 byte and scores
    (and weights) 8 per example.
    """

    __slots__ = ("groups", "labels", "scores", "weights")

    def __init__(self, weighted: bool):
        self.groups: Any = array.array("q")
        self.labels = array.array("b")
        self.scores = array.array("d")
        self.weights = array.array("d") if weighted else None

    def add(self, group: Hashable, label: int, score: float, weight: Optional[float]) -> None:
        try:
            self.groups.append(group)
        except (TypeError, OverflowError):  # not an int64: keep groups as objects from now on
            self.groups = list(self.groups)
            self.groups.append(group)
        self.labels.append(label)
        self.scores.append(score)
        if self.weights is not None:
            self.weights.append(weight)

    def extend(self, other: "_GroupedScores") -> None:
        if isinstance(self.groups, array.array) and isinstance(other.groups, array.array):
            self.groups.extend(other.groups)
        else:
            self.groups = list(self.groups) + list(other.groups)
        self.labels.extend(other.labels)
        self.scores.extend(other.scores)
        if self.weights is not None:
            self.weights.extend(other.weights)

    def __len__(self) -> int:
        return len(self.labels)

    def columns(self) -> ScoreColumns:
        groups = self.groups
        groups = np.frombuffer(groups, dtype=np.int64) if isinstance(groups, array.array) else np.asarray(groups)
        weights = None if self.weights is None else np.frombuffer(self.weights, dtype=np.float64)
        return ScoreColumns(groups, np.frombuffer(self.labels, dtype=np.int8),
                            np.frombuffer(self.scores, dtype=np.float64), weights)

    # A tuple, not a dict: pickle skips __setstate__ for a falsy state.
    def __getstate__(self):
        return (self.groups, self.labels, self.scores, self.weights)

    def __setstate__(self, state):
        self.groups, self.labels, self.scores, self.weights = state


def _select(value: Any, model_name: str, output_name: str) -> Any:
    """value[model_name][output_name], each level only where the extract has it (as TFMA does)."""
    if model_name and isinstance(value, Mapping) and model_name in value:
        value = value[model_name]
    if output_name and isinstance(value, Mapping):
        value = value.get(output_name)
    return value


def _single_number(value: Any) -> Optional[float]:
    """The one number of a scalar or 1-element array, else None (left to TFMA's general path)."""
    if isinstance(value, np.ndarray):
        return float(value.reshape(-1)[0]) if value.size == 1 and value.dtype.kind in "biuf" else None
    if isinstance(value, (int, float, np.number)):
        return float(value)
    return None


class _ScoreColumnsCombiner(beam.CombineFn):
    """Collects (group, label, score[, weight]) of one model output per slice."""

    def __init__(
        self,
        key: tfma.metrics.MetricKey,
        eval_config: Optional[config_pb2.EvalConfig],
        group_key: str,
        aggregation_type: Optional[Any],
        example_weighted: bool,
    ):
        self._key = key
        self._eval_config = eval_config
        self._group_key = group_key
        self._aggregation_type = aggregation_type
        self._example_weighted = example_weighted
        # Binary outputs read one number each, straight from the extracts (a few us); anything
        # else (sub keys, aggregation, multi-value outputs) takes TFMA's general path.
        self._direct = key.sub_key is None and aggregation_type is None

    def create_accumulator(self) -> _GroupedScores:
        return _GroupedScores(self._example_weighted)

    def _group_of(self, element: tfma.metrics.StandardMetricInputs) -> Hashable:
        features = element.get("features") or {}
        if self._group_key not in features:
            raise ValueError(
                f"metric {self._key.name!r}: group feature {self._group_key!r} is not among the "
                f"example's features {sorted(features)}")
        value = features[self._group_key]
        # Sparse / varlen feature values carry their entries in `.values`.
        values = np.asarray(getattr(value, "values", value)).reshape(-1)
        if values.size != 1:
            raise ValueError(
                f"metric {self._key.name!r}: group feature {self._group_key!r} must hold exactly one "
                f"value per example; got {values.tolist()!r}")
        return values[0].item() if isinstance(values[0], np.generic) else values[0]

    def _direct_triples(self, element) -> Optional[List[Tuple[Any, Any, Any]]]:
        model, output = self._key.model_name, self._key.output_name
        label = _single_number(_select(element.get("labels"), model, output))
        score = _single_number(_select(element.get("predictions"), model, output))
        weight = 1.0
        if self._example_weighted:
            weight = _single_number(_select(element.get("example_weights"), model, output))
        if label is None or score is None or weight is None:
            return None
        return [(label, score, weight)]

    def _triples(self, element) -> Iterable[Tuple[Any, Any, Any]]:
        triples = self._direct_triples(element) if self._direct else None
        if triples is not None:
            return triples
        return tfma.metrics.to_label_prediction_example_weight(
            element,
            eval_config=self._eval_config,
            model_name=self._key.model_name,
            output_name=self._key.output_name,
            sub_key=self._key.sub_key,
            aggregation_type=self._aggregation_type,
            example_weighted=self._example_weighted,
            flatten=True,
        )

    def add_input(self, accumulator: _GroupedScores, element: tfma.metrics.StandardMetricInputs) -> _GroupedScores:
        group = self._group_of(element)
        output = self._key.output_name
        for label, prediction, example_weight in self._triples(element):
            label = float(np.asarray(label).item())
            score = float(np.asarray(prediction).item())
            if label not in (0.0, 1.0):
                raise ValueError(
                    f"output {output!r}: labels must be 0 or 1; got {label} for group {group!r}")
            if not np.isfinite(score):
                raise ValueError(f"output {output!r}: prediction {score} for group {group!r} is not finite")
            weight = None
            if self._example_weighted:
                weight = float(np.asarray(example_weight).item())
                if not (np.isfinite(weight) and weight >= 0):
                    raise ValueError(
                        f"output {output!r}: example weight {weight} for group {group!r} must be "
                        "finite and non-negative")
            accumulator.add(group, int(label), score, weight)
        return accumulator

    def merge_accumulators(self, accumulators: Iterable[_GroupedScores]) -> _GroupedScores:
        accumulators = iter(accumulators)
        result = next(accumulators)
        for accumulator in accumulators:
            result.extend(accumulator)
        return result

    def extract_output(self, accumulator: _GroupedScores) -> Dict[tfma.metrics.MetricKey, ScoreColumns]:
        return {self._key: accumulator.columns()}


def _values_or_nan(value_fn: Callable[[ScoreColumns], Tuple[float, ...]], columns: ScoreColumns,
                   count: int) -> Tuple[float, ...]:
    return tuple(value_fn(columns)) if len(columns) else (float("nan"),) * count


def score_columns_computations(
    metric_name: str,
    value_names: Tuple[str, ...],
    value_fn: Callable[[ScoreColumns], Tuple[float, ...]],
    group_key: str,
    eval_config: Optional[config_pb2.EvalConfig],
    model_name: str,
    output_name: str,
    sub_key: Optional[tfma.metrics.SubKey],
    aggregation_type: Optional[Any],
    example_weighted: bool,
) -> tfma.metrics.MetricComputations:
    """The shared column computation plus one derived computation giving `value_names`."""
    def key(name: str) -> tfma.metrics.MetricKey:
        return tfma.metrics.MetricKey(name=name, model_name=model_name, output_name=output_name,
                                      sub_key=sub_key, aggregation_type=aggregation_type,
                                      example_weighted=example_weighted)

    # The group key is part of the private name, so that metrics grouping by different
    # features do not share (and so mix up) their columns.
    columns_key = key(f"{SCORE_COLUMNS_NAME}_{group_key}")
    keys = [key(name) for name in value_names]

    def result(metrics: Dict[tfma.metrics.MetricKey, Any]) -> Dict[tfma.metrics.MetricKey, float]:
        return dict(zip(keys, _values_or_nan(value_fn, metrics[columns_key], len(keys))))

    # TFMA tells derived computations apart by their result function's name.
    result.__name__ = f"_{metric_name}_from_score_columns"
    return [
        tfma.metrics.MetricComputation(
            keys=[columns_key],
            # Keeps the group feature in StandardMetricInputs.features, next to the
            # default labels, predictions and example weights.
            preprocessors=[tfma.metrics.FeaturePreprocessor(feature_keys=[group_key])],
            combiner=_ScoreColumnsCombiner(columns_key, eval_config, group_key, aggregation_type,
                                           example_weighted),
        ),
        tfma.metrics.DerivedMetricComputation(keys=keys, result=result),
    ]


class ScoreColumnsMetric(tfma.metrics.Metric):
    """A metric computed from the shared score columns of each model output and slice."""

    DEFAULT_NAME = ""
    VALUE_NAMES: Tuple[str, ...] = ()  # the keys' names when there are several (else the name)

    def __init__(self, name: Optional[str] = None, group_key: str = USER_ID):
        name = name or self.DEFAULT_NAME
        if not group_key:
            raise ValueError(f"{type(self).__name__} needs a group_key (the feature holding each "
                             "example's group id)")
        value_names = (name,) if len(self.VALUE_NAMES) <= 1 else self.VALUE_NAMES
        value_fn = self._values
        self.value_names, self.group_key = value_names, group_key

        def computations(eval_config=None, model_name="", output_name="", sub_key=None,
                         aggregation_type=None, example_weighted=False, **_):
            return score_columns_computations(
                name, value_names, value_fn, group_key, eval_config, model_name, output_name,
                sub_key, aggregation_type, example_weighted)

        super().__init__(tfma.metrics.merge_per_key_computations(computations), name=name,
                         group_key=group_key)

    def values(self, columns: ScoreColumns) -> Dict[str, float]:
        """{key name: value} on one model output's examples of one slice: what this metric's TFMA
        computation reports for them, without TFMA (components/batch_evaluator.py)."""
        return dict(zip(self.value_names, _values_or_nan(self._values, columns, len(self.value_names))))

    @staticmethod
    def _values(columns: ScoreColumns) -> Tuple[float, ...]:
        raise NotImplementedError


class GroupedAUC(ScoreColumnsMetric):
    """GAUC as a TFMA metric: computed per model, output and slice like TFMA's AUC.

    The group of an example is the value of the raw feature `group_key` (a single id
    per example), which the metric asks TFMA to keep next to the labels and predictions.
    With `MetricsSpec.output_names` it is computed once per output, against the label
    that `ModelSpec.label_keys` assigns to that output.
    """

    DEFAULT_NAME = GAUC_NAME

    @staticmethod
    def _values(columns: ScoreColumns) -> Tuple[float]:
        _, codes = np.unique(columns.groups, return_inverse=True)
        return (_grouped_auc_from_codes(codes.reshape(-1), columns.labels, columns.scores,
                                        columns.weights),)


class ExactAUC(ScoreColumnsMetric):
    """ROC AUC over the slice, exact (sklearn's roc_auc_score; TFMA's AUC bins into 10k
    thresholds); NaN when the slice has one class only."""

    DEFAULT_NAME = AUC_NAME

    @staticmethod
    def _values(columns: ScoreColumns) -> Tuple[float]:
        return (exact_auc(columns.labels, columns.scores, columns.weights),)


class LogLoss(ScoreColumnsMetric):
    """Mean binary cross-entropy (log loss) of the slice; see `log_loss`."""

    DEFAULT_NAME = LOG_LOSS_NAME

    @staticmethod
    def _values(columns: ScoreColumns) -> Tuple[float]:
        return (log_loss(columns.labels, columns.scores, columns.weights),)


class CountAndMeans(ScoreColumnsMetric):
    """example_count (total weight when weighted), mean_label and mean_prediction."""

    DEFAULT_NAME = "count_and_means"
    VALUE_NAMES = (EXAMPLE_COUNT_NAME, MEAN_LABEL_NAME, MEAN_PREDICTION_NAME)

    @staticmethod
    def _values(columns: ScoreColumns) -> Tuple[float, float, float]:
        count = float(len(columns) if columns.weights is None else np.sum(columns.weights))
        return (count, _weighted_mean(columns.labels, columns.weights),
                _weighted_mean(columns.scores, columns.weights))


def _metric_config(cls: type, name: Optional[str], group_key: Optional[str],
                   feature_set: FeatureSet) -> config_pb2.MetricConfig:
    settings = {"group_key": group_key or feature_set.user_id}
    if name:
        settings["name"] = name
    return config_pb2.MetricConfig(class_name=cls.__name__, module=cls.__module__,
                                   config=json.dumps(settings, sort_keys=True))


def gauc_metric_config(name: str = GAUC_NAME, group_key: Optional[str] = None,
                       feature_set: FeatureSet = KUAIRAND) -> config_pb2.MetricConfig:
    """The EvalConfig entry that makes TFMA (and TFX's Evaluator) compute `GroupedAUC`.

    group_key: the group feature; None = `feature_set.user_id` (GAUC per user).
    TFMA imports `module` on the Beam workers, so this package must be importable there.
    """
    return _metric_config(GroupedAUC, name, group_key, feature_set)


def ranking_metric_configs(feature_set: FeatureSet = KUAIRAND) -> Dict[str, config_pb2.MetricConfig]:
    """MetricConfigs of GAUC, exact AUC, log loss, and count and means, by metric name, all
    computed from one pass over each output's examples per slice."""
    return {
        GAUC_NAME: gauc_metric_config(feature_set=feature_set),
        AUC_NAME: _metric_config(ExactAUC, None, None, feature_set),
        LOG_LOSS_NAME: _metric_config(LogLoss, None, None, feature_set),
        "count_and_means": _metric_config(CountAndMeans, None, None, feature_set),
    }
