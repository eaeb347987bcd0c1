"""PIN (models.pin): backdoor-adjusted gradient aggregation, head/tail tower routing by AVC,
stratified batches and the Trainer path. Export and serving: tests/test_model.py's "pin" case."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

import feature_specs as fs
import raw_examples as rx
from models import model, pin, trainer

from test_model import TINY, trainer_args

SHARE = 0.7  # P(head), far from the batch's share so the adjusted loss differs from the mean


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, transform_dir = rx.shared_transform(str(tmp_path_factory.getbasetemp()))
    tft_output = tft.TFTransformOutput(transform_dir)
    transformed = tft_output.transform_features_layer()(rx.parse_raw(rx.serialize_all(rows)))
    return dict(rows=rows, transform_dir=transform_dir, transformed=transformed)


def _batch(data, n=48):
    return {k: v[:n] for k, v in data["transformed"].items()}


def _split_bucket(features):
    """A head threshold that puts part of the batch in each group."""
    buckets = features[fs.PC_BUCKET].numpy()
    threshold = max(1, int(np.median(buckets)))
    return threshold if threshold <= buckets.max() else buckets.max()


def _pin_model(features, **overrides):
    ranking = model.RankingModel(model.make_config("pin", **TINY, **overrides))
    ranking(features)
    return ranking


def _per_example_loss(ranking, features):
    predictions = ranking(features, training=True)
    return tf.add_n([task.loss_weight * tf.keras.losses.binary_crossentropy(
        tf.cast(features[task.label], tf.float32)[:, tf.newaxis], predictions[task.name][:, tf.newaxis])
        for task in fs.TASKS])


def test_aggregated_gradient_is_the_prior_weighted_sum_of_group_mean_gradients(data):
    features = _batch(data)
    ranking = _pin_model(features, pin_head_min_pc_bucket=_split_bucket(features), pin_head_share=SHARE)
    head = ranking.pin_head_mask(features).numpy()
    assert 0 < head.sum() < len(head)
    variables = ranking.trainable_variables

    with tf.GradientTape() as tape:
        loss = ranking.compute_loss(features, training=True)
    aggregated = tape.gradient(loss, variables)

    # Reference: each group's mean gradient from its own sub-batch, weighted by P(z_k).
    expected = [np.zeros(v.shape, np.float32) for v in variables]
    for in_group, share in ((~head, 1 - SHARE), (head, SHARE)):
        group = {k: tf.boolean_mask(v, in_group) for k, v in features.items()}
        with tf.GradientTape() as tape:
            group_loss = tf.reduce_mean(_per_example_loss(ranking, group))
        for total, gradient in zip(expected, tape.gradient(group_loss, variables)):
            if gradient is not None:
                total += share * tf.convert_to_tensor(gradient).numpy()
    with tf.GradientTape() as tape:
        plain = tape.gradient(tf.reduce_mean(_per_example_loss(ranking, features)), variables)

    differs_from_plain = False
    for variable, got, want, mean in zip(variables, aggregated, expected, plain):
        got = np.zeros(variable.shape, np.float32) if got is None else tf.convert_to_tensor(got).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=variable.name)
        if mean is not None:
            differs_from_plain |= not np.allclose(got, tf.convert_to_tensor(mean).numpy(), rtol=1e-3, atol=1e-6)
    assert differs_from_plain  # with i.i.d. weights it would be the plain mean's gradient


def test_backdoor_weights_renormalise_over_the_groups_present():
    weights = pin.backdoor_weights(tf.constant([True, False, False, False]), 0.5).numpy()
    np.testing.assert_allclose(weights, [2.0, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(pin.backdoor_weights(tf.constant([False, False]), 0.9).numpy(), [1.0, 1.0])


def test_towers_are_chosen_by_avc_and_new_users_go_to_the_tail(data):
    features = dict(_batch(data, 32))
    threshold = 3
    buckets = np.arange(32) % fs.PC.num_buckets
    new = np.zeros(32, np.float32)
    new[-4:] = 1  # new users with any bucket
    buckets[-4:] = fs.PC.num_buckets - 1
    features[fs.PC_BUCKET] = tf.constant(buckets, features[fs.PC_BUCKET].dtype)
    features[fs.IS_NEW_USER] = tf.constant(new, features[fs.IS_NEW_USER].dtype)
    ranking = _pin_model(features, pin_head_min_pc_bucket=threshold, pin_head_share=0.5)

    expected_head = (buckets >= threshold) & (new == 0)
    np.testing.assert_array_equal(ranking.pin_head_mask(features).numpy(), expected_head)
    per_task = ranking.tower_inputs(features)
    served = ranking(features)
    for task, x in zip(fs.TASKS, per_task):
        towers = ranking.towers[task.name]
        head_out, tail_out = (_numpy_tower(x.numpy(), towers.tower_weights(group))[:, 0] for group in (pin.HEAD, pin.TAIL))
        assert not np.allclose(head_out, tail_out)  # two different towers
        np.testing.assert_allclose(served[task.name].numpy(), np.where(expected_head, head_out, tail_out),
                                   rtol=1e-6, err_msg=task.name)


def _numpy_tower(x, weights):
    """A Dense tower in NumPy: ReLU hidden layers, a sigmoid output."""
    for i, (kernel, bias) in enumerate(weights):
        x = x @ np.asarray(kernel) + np.asarray(bias)
        x = np.maximum(x, 0) if i < len(weights) - 1 else 1 / (1 + np.exp(-x))
    return x


def _plugin_towers(units, rows=12, dim=6, seed=0):
    """A built PluginTowers with random weights (biases too), inputs and a mixed is_head."""
    rng = np.random.default_rng(seed)
    towers = pin.PluginTowers(units)
    x = tf.constant(rng.normal(size=(rows, dim)), tf.float32)
    is_head = tf.constant(np.arange(rows) % 3 == 0)
    towers(x, is_head)
    for weight in towers.weights:
        weight.assign(rng.normal(size=weight.shape))
    return towers, x, is_head


@pytest.mark.parametrize("units", [(5,), (5, 3), ()])
def test_plugin_towers_give_each_row_its_groups_tower(units):
    towers, x, is_head = _plugin_towers(units)
    widths = [6, *units, 1]
    for group in (pin.TAIL, pin.HEAD):  # Dense layers' shapes
        assert [(tuple(k.shape), tuple(b.shape)) for k, b in towers.tower_weights(group)] == [
            ((n_in, n_out), (n_out,)) for n_in, n_out in zip(widths, widths[1:])]
    head_out, tail_out = (_numpy_tower(x.numpy(), towers.tower_weights(group)) for group in (pin.HEAD, pin.TAIL))
    assert not np.allclose(head_out, tail_out)
    expected = np.where(is_head.numpy()[:, np.newaxis], head_out, tail_out)
    np.testing.assert_allclose(towers(x, is_head).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert pin.PluginTowers.from_config(towers.get_config()).units == tuple(units)


@pytest.mark.parametrize("units", [(5,), (5, 3), ()])
def test_plugin_towers_gradient_is_two_towers_and_a_select(units):
    """The fused layer's gradient equals that of two separate towers (variables holding its
    blocks) and a per-row select: each group's weights learn from its own rows only."""
    towers, x, is_head = _plugin_towers(units, seed=1)
    upstream = tf.constant(np.random.default_rng(2).normal(size=(x.shape[0], 1)), tf.float32)
    with tf.GradientTape() as tape:
        fused = tf.reduce_sum(towers(x, is_head) * upstream)
    gradients = tape.gradient(fused, towers.weights)

    separate = {group: [[tf.Variable(w) for w in layer] for layer in towers.tower_weights(group)]
                for group in (pin.TAIL, pin.HEAD)}

    def tower(weights):
        h = x
        for i, (kernel, bias) in enumerate(weights):
            h = h @ kernel + bias
            h = tf.nn.relu(h) if i < len(weights) - 1 else tf.sigmoid(h)
        return h

    with tf.GradientTape() as tape:
        selected = tf.reduce_sum(tf.where(is_head[:, tf.newaxis], tower(separate[pin.HEAD]),
                                          tower(separate[pin.TAIL])) * upstream)
    np.testing.assert_allclose(fused.numpy(), selected.numpy(), rtol=1e-5)
    expected = tape.gradient(selected, separate)
    for group in (pin.TAIL, pin.HEAD):
        for got, want in zip(towers.tower_weights(group, gradients), expected[group]):
            for got_part, want_part in zip(got, want):
                np.testing.assert_allclose(got_part.numpy(), want_part.numpy(), rtol=1e-4, atol=1e-6)

    # A head row's loss reaches the head's weights only, a tail row's the tail's only.
    for row, own, other in ((0, pin.HEAD, pin.TAIL), (1, pin.TAIL, pin.HEAD)):
        assert bool(is_head[row]) == (own == pin.HEAD)
        with tf.GradientTape() as tape:
            one_row = towers(x, is_head)[row, 0]
        gradients = tape.gradient(one_row, towers.weights)
        assert all(not np.any(g.numpy()) for layer in towers.tower_weights(other, gradients) for g in layer)
        assert all(np.any(kernel.numpy()) for kernel, _ in towers.tower_weights(own, gradients))


def test_stratified_batches_hold_both_groups_evenly(capfd):
    n = 2000
    buckets = np.where(np.arange(n) % 10 == 0, 8, 1)  # 10% head
    source = tf.data.Dataset.from_tensor_slices({fs.PC_BUCKET: tf.constant(buckets, tf.int64),
                                                 fs.IS_NEW_USER: tf.zeros(n)}).batch(100)
    assert pin.head_share(source, fs.KUAIRAND, 6) == pytest.approx(0.1)
    stratified = pin.stratify(source, 160, fs.KUAIRAND, 6, seed=1)
    first = [batch[fs.PC_BUCKET].numpy() >= 6 for batch in stratified.take(2)]  # before the head (200) runs out
    assert [len(b) for b in first] == [160, 160]
    assert 0.35 < np.mean(first) < 0.65, [np.mean(b) for b in first]
    # Runs of STRATUM_RUN consecutive examples come from one group.
    runs = np.concatenate(first).reshape(-1, pin.STRATUM_RUN)
    assert (runs.all(axis=1) | ~runs.any(axis=1)).all()
    kept = np.sort(np.concatenate([batch[fs.PC_BUCKET].numpy() for batch in stratified]))
    np.testing.assert_array_equal(kept, np.sort(buckets))  # no example lost or repeated
    # TensorFlow logs nothing about the batches' buffers (a second rebatch logged a line a slice).
    assert "RefCount" not in capfd.readouterr().err


def test_stratum_runs_divide_any_batch_size():
    n = 600
    buckets = np.where(np.arange(n) % 2, 8, 1)
    source = tf.data.Dataset.from_tensor_slices({fs.PC_BUCKET: tf.constant(buckets, tf.int64),
                                                 fs.IS_NEW_USER: tf.zeros(n),
                                                 "history": tf.constant(np.stack([buckets] * 3, axis=1))}).batch(50)
    for batch in pin.stratify(source.repeat(), 100, fs.KUAIRAND, 6, seed=3).take(3):  # runs of 10 (100 = 10 x 10)
        runs = (batch[fs.PC_BUCKET].numpy() >= 6).reshape(-1, 10)
        assert runs.shape == (10, 10) and (runs.all(axis=1) | ~runs.any(axis=1)).all()
        # A feature of several values per example stays aligned with its example.
        np.testing.assert_array_equal(batch["history"].numpy(), np.stack([batch[fs.PC_BUCKET].numpy()] * 3, axis=1))


def test_trainer_measures_p_head_and_trains_pin(data, tmp_path):
    fn_args = trainer_args(data, tmp_path, {"variant": "pin", "batch_size": 32,
                                            "overrides": dict(TINY, pin_head_min_pc_bucket=2)}, train_steps=3)
    trainer.run_fn(fn_args)
    with open(os.path.join(fn_args.serving_model_dir, "assets.extra", "model_config.json")) as f:
        saved = model.ModelConfig.from_dict(json.load(f))
    assert saved.pin and 0.0 < saved.pin_head_share < 1.0
    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    served = loaded.signatures["serving_default"](examples=tf.constant(rx.serialize_all(data["rows"][:4])))
    assert set(served) == {task.name for task in fs.TASKS}


def test_pin_without_p_head_fails_clearly(data):
    features = _batch(data, 8)
    ranking = _pin_model(features)
    with pytest.raises(ValueError, match="pin_head_share"):
        ranking.compute_loss(features, training=True)


def test_training_data_of_one_group_is_not_stratified():
    # A window whose users are all new (e.g. the first day of logs): no head example anywhere in
    # repeated data, which stratifying would wait for forever.
    source = tf.data.Dataset.from_tensor_slices({fs.PC_BUCKET: tf.constant([8, 1, 9, 2], tf.int64),
                                                 fs.IS_NEW_USER: tf.ones(4)}).batch(2).repeat()
    batches, config = pin.training_data(source, model.make_config("pin"), 2, fs.KUAIRAND)
    assert config.pin_head_share == 0.0
    assert [b[fs.PC_BUCKET].numpy().tolist() for b in batches.take(3)] == [[8, 1], [9, 2], [8, 1]]
