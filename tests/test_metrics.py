"""Tests for models.metrics: grouped_auc against sklearn, and GroupedAUC run through TFMA."""

import math
import pickle

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
from tensorflow_model_analysis.proto import config_pb2
from tensorflow_model_analysis.slicer.slicer_lib import deserialize_slice_key
from sklearn.metrics import roc_auc_score

from feature_specs import AVC, TASKS, USER_GROUP, USER_GROUPS, USER_ID, VIDEO_DURATION
from models.metrics import (CountAndMeans, ExactAUC, GroupedAUC, LogLoss, gauc_metric_config,
                            grouped_auc, ranking_metric_configs)


def sklearn_gauc(labels, predictions, groups, weights=None):
    """The definition, spelled out with sklearn: per-group AUC, impression-weighted mean."""
    labels, predictions, groups = map(np.asarray, (labels, predictions, groups))
    weights = np.ones(labels.size) if weights is None else np.asarray(weights, dtype=np.float64)
    total, norm = 0.0, 0.0
    for group in np.unique(groups):
        member = groups == group
        if len(np.unique(labels[member])) < 2:
            continue
        auc = roc_auc_score(labels[member], predictions[member], sample_weight=weights[member])
        total += weights[member].sum() * auc
        norm += weights[member].sum()
    return total / norm if norm else float("nan")


def random_dataset(seed, size=3000, num_groups=80):
    rng = np.random.default_rng(seed)
    groups = rng.zipf(1.5, size) % num_groups  # skewed group sizes, many tiny groups
    affinity = rng.normal(size=num_groups)[groups]
    labels = (rng.random(size) < 1 / (1 + np.exp(-affinity))).astype(np.int64)
    # Quantized scores, so that ties inside a group are common.
    predictions = np.round(1 / (1 + np.exp(-(affinity + labels + rng.normal(size=size)))), 2)
    weights = rng.uniform(0.1, 3.0, size)
    return labels, predictions, groups, weights


# ---------------------------------------------------------------------------
# grouped_auc
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_auc_matches_sklearn_per_group(seed):
    labels, predictions, groups, weights = random_dataset(seed)
    single_class = [g for g in np.unique(groups) if len(np.unique(labels[groups == g])) == 1]
    assert single_class, "the dataset should exercise the exclusion of one-class groups"

    assert grouped_auc(labels, predictions, groups) == pytest.approx(
        sklearn_gauc(labels, predictions, groups), rel=1e-12)
    assert grouped_auc(labels, predictions, groups, weights) == pytest.approx(
        sklearn_gauc(labels, predictions, groups, weights), rel=1e-12)


def test_grouped_auc_hand_checked():
    labels = [1, 0, 0, 0, 1, 1, 1]
    predictions = [0.9, 0.5, 0.95, 0.2, 0.8, 0.1, 0.3]
    groups = ["a", "a", "a", "b", "b", "c", "c"]  # "c" has positives only: excluded
    # AUC_a = 1/2 (0.9 beats 0.5, loses to 0.95), AUC_b = 1.
    assert grouped_auc(labels, predictions, groups) == pytest.approx((3 * 0.5 + 2 * 1.0) / 5)
    # Doubling group a's weights doubles its impressions but not its AUC.
    weights = [2, 2, 2, 1, 1, 1, 1]
    assert grouped_auc(labels, predictions, groups, weights) == pytest.approx((6 * 0.5 + 2 * 1.0) / 8)


def test_grouped_auc_counts_ties_as_half():
    labels = np.array([[1], [0], [1], [0], [0]])  # [n, 1] columns are accepted
    predictions = np.array([[0.5], [0.5], [0.5], [0.5], [0.1]])
    groups = [7, 7, 8, 8, 8]
    # AUC_7 = 1/2 (a tie); AUC_8 = (1/2 + 1) / 2.
    assert grouped_auc(labels, predictions, groups) == pytest.approx((2 * 0.5 + 3 * 0.75) / 5)


def test_grouped_auc_is_nan_without_a_two_class_group():
    assert math.isnan(grouped_auc([1, 0], [0.3, 0.4], [1, 2]))
    assert math.isnan(grouped_auc([], [], []))
    # Zero-weight negatives leave the group with one class.
    assert math.isnan(grouped_auc([1, 0], [0.3, 0.4], [1, 1], weights=[1.0, 0.0]))


@pytest.mark.parametrize("kwargs, message", [
    (dict(labels=[1, 0], predictions=[0.1], groups=[1, 1]), "same length"),
    (dict(labels=[1, 0], predictions=[0.1, 0.2], groups=[1, 1], weights=[1.0]), "same length"),
    (dict(labels=[1, 2], predictions=[0.1, 0.2], groups=[1, 1]), "0 or 1"),
    (dict(labels=[1, 0], predictions=[0.1, np.nan], groups=[1, 1]), "finite"),
    (dict(labels=[1, 0], predictions=[0.1, 0.2], groups=[1, 1], weights=[1.0, -1.0]), "non-negative"),
    (dict(labels=[[1, 0]], predictions=[[0.1, 0.2]], groups=[[1, 1]]), "1-D"),
])
def test_grouped_auc_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grouped_auc(**kwargs)


# ---------------------------------------------------------------------------
# GroupedAUC combiner, without Beam
# ---------------------------------------------------------------------------
def _computations(metric, **kwargs):
    """The metric's column computation and its derived computation."""
    columns, derived = metric.computations(**kwargs)
    assert isinstance(columns, tfma.metrics.MetricComputation)
    assert isinstance(derived, tfma.metrics.DerivedMetricComputation)
    return columns, derived


def _result(metric, accumulator, **kwargs):
    """What TFMA reports for one slice whose accumulator is `accumulator`."""
    columns, derived = _computations(metric, **kwargs)
    return derived.result(columns.combiner.extract_output(accumulator))


def _element(task, label, prediction, group, weight=1.0):
    return tfma.metrics.StandardMetricInputs(
        labels={task: np.array([label])},
        predictions={task: np.array([prediction], dtype=np.float32)},
        example_weights={task: np.array([weight])},
        features={USER_ID: np.array([group])},
    )


def test_combiner_merges_and_pickles_partial_accumulators():
    labels, predictions, groups, weights = random_dataset(seed=3, size=500)
    task = TASKS[0].name
    metric = GroupedAUC()
    combiner = _computations(metric, output_names=[task], example_weighted=True)[0].combiner
    accumulators = [combiner.create_accumulator() for _ in range(3)]
    for i in range(labels.size):
        combiner.add_input(accumulators[i % 3], _element(task, labels[i], predictions[i], groups[i], weights[i]))
    # Accumulators cross process boundaries pickled; an empty one must survive too.
    accumulators = [pickle.loads(pickle.dumps(a)) for a in accumulators + [combiner.create_accumulator()]]
    result = _result(metric, combiner.merge_accumulators(accumulators), output_names=[task],
                     example_weighted=True)

    (key,) = result
    assert (key.name, key.output_name, key.example_weighted) == ("gauc", task, True)
    expected = grouped_auc(labels, predictions.astype(np.float32), groups, weights)
    assert result == {key: pytest.approx(expected, rel=1e-12)}


@pytest.mark.parametrize("weighted", [False, True])
def test_metrics_from_the_shared_columns_equal_their_references(weighted):
    """AUC and log loss from one pass equal sklearn's and Keras' functions on the same rows."""
    labels, predictions, groups, weights = random_dataset(seed=4, size=800)
    predictions = predictions.astype(np.float32)
    predictions[:5] = [0.0, 1.0, 0.0, 1.0, 0.5]  # the log loss clips 0 and 1 as Keras does
    task = TASKS[0].name
    kwargs = dict(output_names=[task], example_weighted=weighted)
    combiner = _computations(GroupedAUC(), **kwargs)[0].combiner
    accumulator = combiner.create_accumulator()
    for i in range(labels.size):
        combiner.add_input(accumulator, _element(task, labels[i], predictions[i], groups[i], weights[i]))
    w = weights if weighted else None
    results = {}
    for metric in (GroupedAUC(), ExactAUC(), LogLoss(), CountAndMeans()):
        # Every metric's column computation is the same one: TFMA runs it once for all.
        assert _computations(metric, **kwargs)[0] == _computations(GroupedAUC(), **kwargs)[0]
        results.update({key.name: value for key, value in _result(metric, accumulator, **kwargs).items()})

    # In float64, as the metric computes (Keras would clip 1 - 1e-7 in float32 otherwise).
    keras_losses = tf.keras.losses.binary_crossentropy(
        labels.reshape(-1, 1).astype(np.float64), predictions.reshape(-1, 1).astype(np.float64)).numpy()
    assert results == {
        "gauc": pytest.approx(sklearn_gauc(labels, predictions, groups, w), rel=1e-12),
        "auc": pytest.approx(roc_auc_score(labels, predictions, sample_weight=w), rel=1e-12),
        "log_loss": pytest.approx(np.average(keras_losses, weights=w), rel=1e-12),
        "example_count": pytest.approx(w.sum() if weighted else labels.size, rel=1e-12),
        "mean_label": pytest.approx(np.average(labels, weights=w), rel=1e-12),
        "mean_prediction": pytest.approx(np.average(predictions.astype(np.float64), weights=w), rel=1e-12),
    }


def test_auc_of_a_one_class_slice_is_nan_not_zero():
    task = TASKS[0].name
    combiner = _computations(ExactAUC(), output_names=[task])[0].combiner
    accumulator = combiner.create_accumulator()
    for prediction in (0.2, 0.7):
        combiner.add_input(accumulator, _element(task, 1, prediction, 3))
    (value,) = _result(ExactAUC(), accumulator, output_names=[task]).values()
    assert math.isnan(value)


def test_combiner_accepts_groups_that_are_not_integers():
    """User ids may be strings (another feature set's group key): same GAUC as by integer ids."""
    labels, predictions, groups, _ = random_dataset(seed=5, size=300)
    task = TASKS[0].name
    combiner = _computations(GroupedAUC(), output_names=[task])[0].combiner
    by_int, by_name = combiner.create_accumulator(), combiner.create_accumulator()
    for i in range(labels.size):
        for accumulator, group in ((by_int, np.array([groups[i]])), (by_name, np.array([f"user-{groups[i]}".encode()]))):
            combiner.add_input(accumulator, tfma.metrics.StandardMetricInputs(
                labels={task: np.array([labels[i]])}, predictions={task: np.array([predictions[i]])},
                example_weights={task: np.array([1.0])}, features={USER_ID: group}))
    by_name = pickle.loads(pickle.dumps(by_name))
    (expected,) = _result(GroupedAUC(), by_int, output_names=[task]).values()
    (actual,) = _result(GroupedAUC(), by_name, output_names=[task]).values()
    assert actual == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(grouped_auc(labels, predictions, groups), rel=1e-12)


def test_combiner_names_a_missing_group_feature():
    combiner = _computations(GroupedAUC(group_key=VIDEO_DURATION))[0].combiner
    element = tfma.metrics.StandardMetricInputs(
        labels=np.array([1]), predictions=np.array([0.2]), example_weights=np.array([1.0]),
        features={USER_ID: np.array([3])})
    with pytest.raises(ValueError, match=VIDEO_DURATION):
        combiner.add_input(combiner.create_accumulator(), element)


def test_metric_config_round_trips_through_tfma():
    config = gauc_metric_config(name="user_gauc")
    metric = tfma.metrics.metric_specs.metric_instance(config)
    assert isinstance(metric, GroupedAUC)
    assert metric.get_config() == {"name": "user_gauc", "group_key": USER_ID}


# ---------------------------------------------------------------------------
# GroupedAUC inside a real TFMA run
# ---------------------------------------------------------------------------
EVAL_TASKS = TASKS[:2]


def _write_examples(path, size=400, num_users=25, seed=7):
    rng = np.random.default_rng(seed)
    rows = {
        USER_ID: rng.integers(1000, 1000 + num_users, size),
        VIDEO_DURATION: rng.normal(size=size).astype(np.float32),
        USER_GROUP: rng.choice(USER_GROUPS, size),
        AVC: rng.integers(0, 4, size),  # doubles as the example weight (zeros included)
    }
    for i, task in enumerate(EVAL_TASKS):
        logit = (i + 1) * rows[VIDEO_DURATION] + rng.normal(size=size)
        rows[task.label] = (rng.random(size) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    serialized = []
    with tf.io.TFRecordWriter(path) as writer:
        for i in range(size):
            feature = {}
            for name, column in rows.items():
                value = column[i]
                if isinstance(value, str):
                    feature[name] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode()]))
                elif isinstance(value, np.floating):
                    feature[name] = tf.train.Feature(float_list=tf.train.FloatList(value=[value]))
                else:
                    feature[name] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
            record = tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()
            writer.write(record)
            serialized.append(record)
    return rows, serialized


class _TwoTaskScorer(tf.Module):
    """A fixed two-output scorer serving {task: probability} from serialized tf.Examples."""

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples):
        features = tf.io.parse_example(examples, {
            USER_ID: tf.io.FixedLenFeature([], tf.int64),
            VIDEO_DURATION: tf.io.FixedLenFeature([], tf.float32),
        })
        user_bias = tf.cast(features[USER_ID] % 5, tf.float32) / 4.0
        outputs = {}
        for i, task in enumerate(EVAL_TASKS):
            probability = tf.sigmoid((i + 1) * features[VIDEO_DURATION] - user_bias)
            # Rounded so that equal scores (ties) occur within users.
            outputs[task.name] = tf.round(probability * 10.0) / 10.0
        return outputs


@pytest.fixture(scope="module")
def tfma_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gauc_tfma")
    model_dir, data_path, output_dir = str(root / "model"), str(root / "data.tfrecord"), str(root / "eval")
    scorer = _TwoTaskScorer()
    tf.saved_model.save(scorer, model_dir, signatures={"serving_default": scorer.serve})
    rows, serialized = _write_examples(data_path)
    served = tf.saved_model.load(model_dir).signatures["serving_default"](examples=tf.constant(serialized))
    predictions = {task.name: served[task.name].numpy() for task in EVAL_TASKS}

    eval_config = config_pb2.EvalConfig(
        model_specs=[config_pb2.ModelSpec(
            signature_name="serving_default",
            label_keys={task.name: task.label for task in EVAL_TASKS},
            example_weight_keys={task.name: AVC for task in EVAL_TASKS},
        )],
        slicing_specs=[config_pb2.SlicingSpec(), config_pb2.SlicingSpec(feature_keys=[USER_GROUP])],
        metrics_specs=[config_pb2.MetricsSpec(
            output_names=[task.name for task in EVAL_TASKS],
            example_weights=config_pb2.ExampleWeightOptions(weighted=True, unweighted=True),
            # TFMA's own AUC beside ours, as a check of ours inside TFMA.
            metrics=[*ranking_metric_configs().values(),
                     config_pb2.MetricConfig(class_name="AUC", config='{"name": "tfma_auc"}')],
        )],
    )
    tfma.run_model_analysis(
        eval_shared_model=tfma.default_eval_shared_model(eval_saved_model_path=model_dir, eval_config=eval_config),
        eval_config=eval_config,
        data_location=data_path,
        output_path=output_dir,
    )
    written = {}
    for metrics_for_slice in tfma.load_metrics(output_dir):
        slice_name = deserialize_slice_key(metrics_for_slice.slice_key)
        for key_and_value in metrics_for_slice.metric_keys_and_values:
            key = key_and_value.key
            written[(slice_name, key.name, key.output_name, key.example_weighted.value)] = (
                key_and_value.value.double_value.value)
    return rows, predictions, written


def _slice_members(rows):
    """{TFMA slice key: row mask} of the slicing specs of `tfma_run`."""
    slices = {(): np.ones(len(rows[USER_ID]), dtype=bool)}
    for group in USER_GROUPS:
        slices[((USER_GROUP, group),)] = rows[USER_GROUP] == group
    return slices


@pytest.mark.parametrize("example_weighted", [False, True])
def test_tfma_gauc_equals_grouped_auc_per_output_and_slice(tfma_run, example_weighted):
    rows, predictions, written = tfma_run
    for slice_name, member in _slice_members(rows).items():
        for task in EVAL_TASKS:
            weights = rows[AVC][member] if example_weighted else None
            expected = grouped_auc(rows[task.label][member], predictions[task.name][member],
                                   rows[USER_ID][member], weights)
            assert not math.isnan(expected)
            actual = written[(slice_name, "gauc", task.name, example_weighted)]
            assert actual == pytest.approx(expected, rel=1e-9), (slice_name, task.name)


@pytest.mark.parametrize("example_weighted", [False, True])
def test_tfma_auc_and_log_loss_equal_their_references_per_output_and_slice(tfma_run, example_weighted):
    rows, predictions, written = tfma_run
    for slice_name, member in _slice_members(rows).items():
        for task in EVAL_TASKS:
            labels, scores = rows[task.label][member], predictions[task.name][member]
            weights = rows[AVC][member].astype(np.float64) if example_weighted else None
            losses = tf.keras.losses.binary_crossentropy(
                labels.reshape(-1, 1).astype(np.float64), scores.reshape(-1, 1).astype(np.float64)).numpy()
            got = {name: written[(slice_name, name, task.name, example_weighted)]
                   for name in ("auc", "log_loss", "example_count", "mean_label")}
            assert got == {
                "auc": pytest.approx(roc_auc_score(labels, scores, sample_weight=weights), rel=1e-9),
                "log_loss": pytest.approx(np.average(losses, weights=weights), rel=1e-9),
                "example_count": pytest.approx(member.sum() if weights is None else weights.sum()),
                "mean_label": pytest.approx(np.average(labels, weights=weights), rel=1e-9),
            }, (slice_name, task.name)


def test_tfma_reports_auc_alongside_gauc(tfma_run):
    rows, predictions, written = tfma_run
    for task in EVAL_TASKS:
        overall_auc = written[((), "auc", task.name, False)]
        # TFMA's own AUC bins scores into 10k thresholds: close to the exact one, not equal.
        assert written[((), "tfma_auc", task.name, False)] == pytest.approx(overall_auc, abs=1e-3)
        # GAUC differs from AUC.
        assert written[((), "gauc", task.name, False)] != pytest.approx(overall_auc, abs=1e-6)
