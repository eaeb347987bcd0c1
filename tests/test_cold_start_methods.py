"""Meta-Embedding and MWUF (models.cold_start): their defining computations against NumPy,
eager and after a SavedModel round trip, and the split of the training step's gradients."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

import feature_specs as fs
from models import cold_start, model, model_summary

TINY = dict(embedding_dim=4, mlp_units=(8,), expert_units=(4,), tower_units=(4,), num_heads=1, head_dim=4,
            num_experts=2)
BATCH = 16


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@pytest.fixture(scope="module")
def batch():
    features = model_summary.random_transformed_features(BATCH, seed=3)
    new = np.zeros(BATCH, np.float32)
    new[::3] = 1.0  # a third of the users new, the rest not
    features = dict(features, **{fs.IS_NEW_USER: tf.constant(new)})
    # Users repeat within the batch (both halves), so Meta-Embedding's warm-up step has work.
    features[fs.USER_ID] = tf.constant(np.tile(np.arange(1, 5, dtype=np.int64), BATCH // 4))
    return features


def _built(variant, features, **overrides):
    tf.keras.utils.set_random_seed(0)
    ranking = model.RankingModel(model.make_config(variant, **TINY, **overrides))
    ranking(features)
    return ranking


def _numpy_user_features(ranking, features):
    return np.concatenate([ranking.embeddings[name](features[name]).numpy()
                           for name in fs.KUAIRAND.user_features], axis=1)


def _saved_and_reloaded(ranking, features, tmp_path):
    """The model's served user embedding and predictions, computed by a reloaded SavedModel."""
    module = tf.Module()
    module.ranking = ranking
    signature = {name: tf.TensorSpec(value.shape, value.dtype) for name, value in features.items()}

    @tf.function(input_signature=[signature])
    def serve(inputs):
        return dict(ranking(inputs), user_embedding=ranking.serving_user_embedding(inputs))

    module.serve = serve
    tf.saved_model.save(module, str(tmp_path))
    loaded = tf.saved_model.load(str(tmp_path))
    return {name: value.numpy() for name, value in loaded.serve(features).items()}


def test_meta_embedding_serves_the_generated_embedding_for_new_users(batch, tmp_path):
    ranking = _built("meta_emb", batch)
    kernel, bias = (w.numpy() for w in ranking.cold_start.dense.weights)
    phi = np.tanh(_numpy_user_features(ranking, batch) @ kernel + bias)
    id_embedding = ranking.embeddings[fs.USER_ID](batch[fs.USER_ID]).numpy()
    new = batch[fs.IS_NEW_USER].numpy()[:, None] > 0.5
    expected = np.where(new, phi, id_embedding)
    np.testing.assert_allclose(ranking.serving_user_embedding(batch).numpy(), expected, atol=1e-6)
    assert not np.allclose(phi[new[:, 0]], id_embedding[new[:, 0]])

    eager = {name: value.numpy() for name, value in ranking(batch).items()}
    plain = ranking(batch, training=True)  # training reads e for everyone
    for name, value in plain.items():
        np.testing.assert_allclose(value.numpy()[~new[:, 0]], eager[name][~new[:, 0]], atol=1e-6)
        assert not np.allclose(value.numpy()[new[:, 0]], eager[name][new[:, 0]])
    served = _saved_and_reloaded(ranking, batch, tmp_path)
    np.testing.assert_allclose(served["user_embedding"], expected, atol=1e-6)
    for name, value in eager.items():
        np.testing.assert_allclose(served[name], value, rtol=1e-5, atol=1e-6)


def test_meta_embedding_loss_matches_numpy():
    rng = np.random.default_rng(0)
    size, dim, alpha, lr = 8, 3, 0.1, 0.5
    phi = rng.standard_normal((size, dim))
    target = rng.standard_normal((size, dim))  # float64: the finite differences below need it
    users = np.array([7, 9, 7, 5, 9, 7, 2, 5])  # halves a = rows 0-3, b = rows 4-7; user 2 only in b

    def per_example(embedding):  # l_i = |phi_i - t_i|^2, gradient 2 (phi_i - t_i)
        return tf.reduce_sum(tf.square(embedding - target), axis=1)

    loss, cold, warm = cold_start.meta_embedding_loss(per_example, tf.constant(phi), tf.constant(users), alpha, lr)
    a, b = np.arange(4), np.arange(4, 8)
    losses = np.sum((phi - target) ** 2, axis=1)
    step = {u: np.mean([2 * (phi[i] - target[i]) for i in a if users[i] == u], axis=0) for u in set(users[a])}
    warmed = np.stack([phi[j] - lr * step.get(users[j], np.zeros(dim)) for j in range(size)])
    expected_warm = np.mean(np.sum((warmed[b] - target[b]) ** 2, axis=1))
    np.testing.assert_allclose(cold.numpy(), losses[a].mean(), rtol=1e-5)
    np.testing.assert_allclose(warm.numpy(), expected_warm, rtol=1e-5)
    np.testing.assert_allclose(loss.numpy(), alpha * losses[a].mean() + (1 - alpha) * expected_warm, rtol=1e-5)

    # The gradient reaches phi through the warm-up step too (second order): d phi'_j / d phi_i.
    with tf.GradientTape() as tape:
        variable = tf.constant(phi)
        tape.watch(variable)
        total = cold_start.meta_embedding_loss(per_example, variable, tf.constant(users), alpha, lr)[0]
    analytic = tape.gradient(total, variable).numpy()
    epsilon, numeric = 1e-4, np.zeros_like(phi)
    for i in range(size):
        for k in range(dim):
            shifted = [phi.copy(), phi.copy()]
            shifted[0][i, k] += epsilon
            shifted[1][i, k] -= epsilon
            up, down = (cold_start.meta_embedding_loss(per_example, tf.constant(p),
                                                       tf.constant(users), alpha, lr)[0].numpy() for p in shifted)
            numeric[i, k] = (up - down) / (2 * epsilon)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-3)


def test_mwuf_scales_and_shifts_cold_users_embeddings(batch, tmp_path):
    ranking = _built("mwuf", batch, mwuf_max_pc_bucket=2)
    scale_kernel, scale_bias = (w.numpy() for w in ranking.cold_start.scaling.weights)
    shift_kernel, shift_bias = (w.numpy() for w in ranking.cold_start.shifting.weights)
    id_embedding = ranking.embeddings[fs.USER_ID](batch[fs.USER_ID]).numpy()
    history = batch[fs.HIST_VIDEO_IDS].numpy()
    embedded = ranking.embeddings[fs.HIST_VIDEO_IDS](history).numpy()
    mask = (history != fs.PADDING_INDEX)[:, :, None]
    history_mean = (embedded * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)
    warmed = (2 * _sigmoid(_numpy_user_features(ranking, batch) @ scale_kernel + scale_bias) * id_embedding
              + history_mean @ shift_kernel + shift_bias)
    applies = (batch[fs.IS_NEW_USER].numpy() > 0.5) | (batch[fs.PC_BUCKET].numpy() <= 2)
    assert applies.any() and not applies.all()
    expected = np.where(applies[:, None], warmed, id_embedding)
    np.testing.assert_allclose(ranking.serving_user_embedding(batch).numpy(), expected, atol=1e-5)
    eager = {name: value.numpy() for name, value in ranking(batch).items()}
    served = _saved_and_reloaded(ranking, batch, tmp_path)
    np.testing.assert_allclose(served["user_embedding"], expected, atol=1e-5)
    for name, value in eager.items():
        np.testing.assert_allclose(served[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["meta_emb", "mwuf"])
def test_train_step_trains_the_method_on_its_meta_loss_and_the_rest_on_the_usual_loss(batch, variant):
    ranking = _built(variant, batch)
    learning_rate = 0.1
    ranking.compile(optimizer=tf.keras.optimizers.SGD(learning_rate), run_eagerly=True)
    method_variables = ranking.cold_start.trainable_variables
    user_table = ranking.embeddings[fs.USER_ID].embeddings
    with tf.GradientTape(persistent=True) as tape:
        usual = ranking.compute_loss(batch, training=True)
        meta = ranking.cold_start_loss(batch)
    expected_method = [v.numpy() - learning_rate * g.numpy()
                       for v, g in zip(method_variables, tape.gradient(meta, method_variables))]
    expected_table = user_table.numpy() - learning_rate * tf.convert_to_tensor(tape.gradient(usual, user_table)).numpy()
    assert all(g is None for g in tape.gradient(usual, method_variables))  # the usual loss never reads them
    ranking.train_step(batch)
    for variable, expected in zip(method_variables, expected_method):
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(user_table.numpy(), expected_table, rtol=1e-5, atol=1e-7)


def test_config_round_trip_and_validation():
    config = model.make_config("meta_emb", meta_emb_alpha=0.3, meta_emb_warmup_lr=0.05)
    assert model.ModelConfig.from_dict(config.to_dict()) == config
    ranking = model.RankingModel(model.make_config("mwuf", mwuf_max_pc_bucket=-1))
    assert model.RankingModel.from_config(ranking.get_config()).config == ranking.config
    for bad in (dict(user_cold_start="melu"), dict(meta_emb_alpha=1.5), dict(mwuf_max_pc_bucket=-2)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.make_config("baseline", **bad)
    movielens = fs.feature_set("movielens")
    assert {"meta_emb", "mwuf"} <= set(model.variants_for(movielens))  # user id + history as user features
    without_id = dataclasses.replace(movielens, user_features=(), features=tuple(
        dataclasses.replace(f, kind=fs.Kind.SLICE) if f.name == movielens.user_id else f for f in movielens.features))
    with pytest.raises(ValueError, match="user id 'user_id' is slice"):
        model.make_config("meta_emb", feature_set=without_id)


def _movielens_batch(size=12, seed=5):
    """Transformed MovieLens features by hand: some users at their first rating (empty history)."""
    movielens = fs.feature_set("movielens")
    rng = np.random.default_rng(seed)
    features = {}
    for feature in movielens.features_of_kind(fs.Kind.CATEGORICAL):
        features[feature.name] = rng.integers(1, feature.cardinality, size, dtype=np.int64)
    lengths = np.r_[0, 0, rng.integers(1, 30, size - 2)]
    for feature in movielens.features_of_kind(fs.Kind.SEQUENCE):
        ids = rng.integers(1, feature.cardinality, (size, feature.max_length), dtype=np.int64)
        ids[np.arange(feature.max_length)[None, :] >= np.minimum(lengths, feature.max_length)[:, None]] = 0
        features[feature.name] = ids
    features[movielens.pc.source] = np.log1p(lengths).astype(np.float32)
    features[fs.PC_BUCKET] = np.array([movielens.pc_bucket(int(n)) for n in lengths], np.int64)
    for task in movielens.tasks:
        features[task.label] = rng.integers(0, 2, size).astype(np.float32)
    return {name: tf.constant(value) for name, value in features.items()}


@pytest.mark.parametrize("max_pc_bucket", [-1, 11])
def test_meta_embedding_on_movielens_generates_from_the_pooled_history(max_pc_bucket):
    movielens = fs.feature_set("movielens")
    batch = _movielens_batch()
    tf.keras.utils.set_random_seed(0)
    ranking = model.RankingModel(model.make_config("meta_emb", movielens, **TINY,
                                                   meta_emb_max_pc_bucket=max_pc_bucket), movielens)
    ranking(batch)
    pooled = []
    for name in movielens.user_features:  # the history sequences, mean over the real positions
        ids = batch[name].numpy()
        embedded = ranking.embeddings[name](ids).numpy()
        mask = (ids != 0)[:, :, None]
        pooled.append((embedded * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1))
    kernel, bias = (w.numpy() for w in ranking.cold_start.dense.weights)
    phi = np.tanh(np.concatenate(pooled, axis=1) @ kernel + bias)
    id_embedding = ranking.embeddings[movielens.user_id](batch[movielens.user_id]).numpy()
    replaced = batch[fs.PC_BUCKET].numpy() <= max(max_pc_bucket, 0)  # bucket 0: no earlier rating = new
    expected = np.where(replaced[:, None], phi, id_embedding)
    np.testing.assert_allclose(ranking.serving_user_embedding(batch).numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(phi[0], np.tanh(bias), atol=1e-6)  # first rating: nothing known but the bias
    assert ranking.cold_start_loss(batch).shape == ()
