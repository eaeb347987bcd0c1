"""FusedAdam against tf_keras' Adam, the reference: the same weights after the same steps."""

import numpy as np
import pytest
import tensorflow as tf

from models import model as model_lib
from models import model_summary
from models.optimizers import FusedAdam

TINY = dict(embedding_dim=4, mlp_units=(16,), expert_units=(8,), tower_units=(4,), num_heads=2, head_dim=4,
            gate_hidden_units=4, pc_embedding_dim=3, num_experts=2, num_value_projections=2)


def _apply(optimizer, gradients, initial):
    variable = tf.Variable(initial)
    for gradient in gradients:
        optimizer.apply_gradients([(gradient, variable)])
    return variable.numpy()


def test_sparse_gradient_with_repeated_rows_matches_keras_adam():
    # A table whose rows the batches touch unevenly, twice in one batch, or not at all: rows left
    # out must still decay (Adam, not LazyAdam), and repeated rows must be summed.
    rng = np.random.default_rng(0)
    initial = rng.normal(size=(6, 3)).astype(np.float32)
    gradients = [tf.IndexedSlices(tf.constant(rng.normal(size=(3, 3)), tf.float32), tf.constant(rows),
                                  tf.constant([6, 3]))
                 for rows in ([0, 2, 2], [5, 1, 0], [2, 2, 2], [4, 0, 1])]
    expected = _apply(tf.keras.optimizers.Adam(0.05), gradients, initial)
    fused = _apply(FusedAdam(0.05), gradients, initial)
    np.testing.assert_allclose(fused, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fused[3], initial[3])  # never had a gradient
    # Row 5's only gradient is in the second batch; it keeps moving on its momentum after it.
    after_its_batch = _apply(FusedAdam(0.05), gradients[:2], initial)
    assert np.abs(fused[5] - after_its_batch[5]).min() > 1e-3


def test_amsgrad_falls_back_to_keras_step():
    rng = np.random.default_rng(1)
    initial = rng.normal(size=(4,)).astype(np.float32)
    gradients = [tf.constant(rng.normal(size=(4,)), tf.float32) for _ in range(3)]
    np.testing.assert_allclose(_apply(FusedAdam(0.1, amsgrad=True), gradients, initial),
                               _apply(tf.keras.optimizers.Adam(0.1, amsgrad=True), gradients, initial), rtol=1e-6)


@pytest.mark.parametrize("variant", ["poso_all", "mail"])
def test_ranking_model_trains_to_the_same_weights(variant):
    # Graph-mode steps (the Trainer's), embedding tables (sparse gradients) and dense layers. MAIL
    # brings its own zero-shot optimizer (a FusedAdam in both runs): the ranking one is compared.
    features = model_summary.random_transformed_features(64 * 4, seed=3)
    dataset = tf.data.Dataset.from_tensor_slices(features).batch(64)
    weights, losses = {}, {}
    for name, optimizer in (("keras", tf.keras.optimizers.Adam), ("fused", FusedAdam)):
        tf.keras.utils.set_random_seed(0)
        config = model_lib.make_config(variant, learning_rate=0.01, **TINY)
        ranking = model_lib.RankingModel(config)
        ranking.compile(optimizer=optimizer(config.learning_rate))
        losses[name] = ranking.fit(dataset, epochs=2, verbose=0).history["loss"]
        weights[name] = [w.numpy() for w in ranking.weights]
    assert losses["keras"][-1] < losses["keras"][0]
    np.testing.assert_allclose(losses["fused"], losses["keras"], rtol=1e-4)
    assert len(weights["fused"]) == len(weights["keras"]) > 10
    for fused, keras in zip(weights["fused"], weights["keras"]):
        np.testing.assert_allclose(fused, keras, rtol=1e-3, atol=1e-5)
