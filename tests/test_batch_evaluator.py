"""The batch evaluator (components/batch_evaluator.py) against TFMA's own run on the same day."""

import math
import os

import pytest
import tensorflow as tf
from tfx import v1 as _tfx  # noqa: F401  (TFMA's config protos under tfma.*)
import tensorflow_model_analysis as tfma

import feature_specs as fs
import raw_examples
from components import batch_evaluator
from pipeline import blessing, evaluation

CANDIDATE_SLOPES, BASELINE_SLOPES = [0.1, 0.2, 0.3, 0.4], [0.3, -0.2, 0.05, 0.4]


def _metric_values(output_dir):
    """{(slice key, model, output, metric name, is_diff): value} of a TFMA-format output."""
    values = {}
    for metrics in tfma.load_metrics(output_dir):
        slice_key = tfma.slicer.deserialize_slice_key(metrics.slice_key)
        for kv in metrics.metric_keys_and_values:
            key = kv.key
            assert key.HasField("example_weighted") and not key.example_weighted.value
            values[(slice_key, key.model_name, key.output_name, key.name, key.is_diff)] = kv.value.double_value.value
    return values


class _Scorer(tf.Module):
    """serving_default on serialized examples: per task k, score = sigmoid(slope_k log1p(pc) - 0.1 history)
    rounded to 1e-3, so that equal inputs tie exactly whatever the batch (the vectorized sigmoid can
    differ by an ulp with an example's place in a batch, and TFMA batches differently)."""

    def __init__(self, slopes):
        super().__init__()
        self.slopes = tf.constant(slopes, tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
    def serve(self, examples):
        parsed = tf.io.parse_example(examples, {fs.PC.source: tf.io.FixedLenFeature([], tf.int64),
                                                fs.HIST_VIDEO_IDS: tf.io.VarLenFeature(tf.int64)})
        source = tf.math.log1p(tf.cast(parsed[fs.PC.source], tf.float32))
        history = tf.cast(tf.sparse.reduce_sum(tf.sparse.map_values(tf.ones_like, parsed[fs.HIST_VIDEO_IDS]),
                                               axis=1), tf.float32)
        return {task.name: tf.round(1000 * tf.sigmoid(self.slopes[k] * source - 0.1 * history)) / 1000
                for k, task in enumerate(fs.TASKS)}


def _export(slopes, path):
    scorer = _Scorer(slopes)
    tf.saved_model.save(scorer, path, signatures={"serving_default": scorer.serve})
    return path


@pytest.fixture(scope="module")
def day(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch_eval")
    rows = raw_examples.make_raw_rows(600, seed=5)
    data = raw_examples.write_gzip_tfrecords(str(root / "Split-eval" / "data.gz"), raw_examples.serialize_all(rows))
    return root, [data], {"candidate": _export(CANDIDATE_SLOPES, str(root / "candidate")),
                          "baseline": _export(BASELINE_SLOPES, str(root / "baseline"))}


def _both(root, files, models, name):
    """TFMA's run_model_analysis and the batch evaluator on the same day, EvalConfig and models."""
    eval_config = batch_evaluator.completed_eval_config(_config_json(), has_baseline=len(models) > 1)
    models = models if len(models) > 1 else {"": models["candidate"]}
    tfma_dir, ours_dir = str(root / f"{name}-tfma"), str(root / f"{name}-ours")
    tfma.run_model_analysis(
        eval_shared_model=[tfma.default_eval_shared_model(eval_saved_model_path=path, model_name=model,
                                                          eval_config=eval_config)
                           for model, path in models.items()],
        eval_config=eval_config, data_location=files[0], output_path=tfma_dir)
    scored = batch_evaluator.evaluate(eval_config, models, files, ours_dir, batch_size=128)
    return tfma_dir, ours_dir, scored


def _config_json():
    from tfx.utils import proto_utils

    return proto_utils.proto_to_json(evaluation.make_eval_config())


def _rows(output_dir, model):
    """blessing.metric_rows in a fixed order, NaN as None (so that equal rows compare equal)."""
    rows = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}
            for row in blessing.metric_rows(output_dir, model_name=model)]
    return sorted(rows, key=lambda row: (row["slice"], row["task"]))


# Without a baseline (the model named "", no changes): slow, the daily-pipeline tests' first day
# covers it through the BlessingGate.
@pytest.mark.parametrize("with_baseline", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_metrics_equal_tfma_for_every_task_slice_and_model(day, with_baseline):
    root, files, models = day
    if not with_baseline:
        models = {"candidate": models["candidate"]}
    tfma_dir, ours_dir, scored = _both(root, files, models, f"baseline-{with_baseline}")
    assert scored == 600
    expected, actual = _metric_values(tfma_dir), _metric_values(ours_dir)
    assert sorted(actual) == sorted(expected)
    slices = {key[0] for key in expected}
    assert len(slices) > 8 and () in slices and (("user_group", "new"),) in slices
    outputs = {key[2] for key in expected}
    assert outputs == {t.name for t in fs.TASKS}
    assert {key[4] for key in expected} == ({False, True} if with_baseline else {False})
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(actual[key]), key
        else:
            assert actual[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert any(not math.isnan(v) for k, v in expected.items() if k[3] == "gauc" and k[0] == (("user_group", "new"),))
    # What the BlessingGate, the summary and the dashboard read (tfma.load_eval_result).
    for model in (("candidate", "baseline", None) if with_baseline else (None,)):
        assert _rows(ours_dir, model) == _rows(tfma_dir, model)
    assert tfma.load_validation_result(ours_dir) == tfma.load_validation_result(tfma_dir)


def test_an_unloadable_model_is_named_with_its_path(day, tmp_path):
    root, files, models = day
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
    eval_config = batch_evaluator.completed_eval_config(_config_json(), has_baseline=True)
    with pytest.raises(batch_evaluator.EvaluationError) as raised:
        batch_evaluator.evaluate(eval_config, {"candidate": models["candidate"], "baseline": str(broken)}, files,
                                 str(tmp_path / "out"))
    message = str(raised.value)
    assert message.startswith(f"cannot load the baseline at {broken}: ") and len(message) < 300
    assert not os.path.exists(tmp_path / "out")  # refused before anything is written


def test_an_eval_config_it_cannot_compute_is_refused_by_name():
    eval_config = batch_evaluator.completed_eval_config(_config_json(), has_baseline=False)
    eval_config.metrics_specs[0].metrics.add(class_name="AUC")
    with pytest.raises(batch_evaluator.EvaluationError, match="metric 'AUC' is not computed from score columns"):
        batch_evaluator.plan_of(eval_config)
    eval_config = batch_evaluator.completed_eval_config(_config_json(), has_baseline=False)
    eval_config.slicing_specs.add(feature_values={"user_group": "new"})
    with pytest.raises(batch_evaluator.EvaluationError, match="slicing by feature_values"):
        batch_evaluator.plan_of(eval_config)
