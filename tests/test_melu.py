"""MeLU (models.melu, benchmarks.melu): the per-user adapted decision layers after k local steps
against a NumPy reference, the meta-gradient through them, and the benchmark-only refusal."""

import numpy as np
import pytest
import tensorflow as tf

from models import melu, model


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _numpy_adapt(weights, inputs, labels, loss_weights, steps, learning_rate):
    """One user's towers after `steps` gradient steps on the mean loss over its examples, by hand:
    hidden ReLU layers, a logit output, BCE per task (dL/dz = sigmoid(z) - y)."""
    weights = [[(k.copy(), b.copy()) for k, b in layers] for layers in weights]
    n = inputs[0].shape[0]
    for _ in range(steps):
        stepped = []
        for layers, x, y, w in zip(weights, inputs, labels, loss_weights):
            activations, pre = [x], []
            for position, (kernel, bias) in enumerate(layers):
                z = activations[-1] @ kernel + bias
                pre.append(z)
                activations.append(np.maximum(z, 0) if position < len(layers) - 1 else z)
            delta = w * (_sigmoid(activations[-1][:, 0]) - y)[:, None] / n  # d mean loss / d logit
            grads = []
            for position in reversed(range(len(layers))):
                grads.append((activations[position].T @ delta, delta.sum(axis=0)))
                if position:
                    delta = (delta @ layers[position][0].T) * (pre[position - 1] > 0)
            stepped.append([(k - learning_rate * gk, b - learning_rate * gb)
                            for (k, b), (gk, gb) in zip(layers, reversed(grads))])
        weights = stepped
    return weights


@pytest.fixture
def problem():
    rng = np.random.default_rng(7)
    dims, tasks, users, examples = (6, 5, 1), 2, 3, 20
    weights = [[(rng.normal(0, 0.5, (dims[i], dims[i + 1])).astype(np.float32),
                 rng.normal(0, 0.1, dims[i + 1]).astype(np.float32)) for i in range(len(dims) - 1)]
               for _ in range(tasks)]
    inputs = [rng.normal(0, 1, (examples, dims[0])).astype(np.float32) for _ in range(tasks)]
    labels = [rng.integers(0, 2, examples).astype(np.float32) for _ in range(tasks)]
    user_index = rng.permutation(np.arange(examples) % users).astype(np.int32)
    return weights, inputs, labels, user_index, users


@pytest.mark.parametrize("steps", [1, 3])
def test_adapted_weights_after_k_steps_match_numpy_per_user(problem, steps):
    weights, inputs, labels, user_index, users = problem
    loss_weights, learning_rate = (1.0, 0.5), 0.3
    adapted = melu.adapt([[(tf.constant(k), tf.constant(b)) for k, b in layers] for layers in weights],
                         [tf.constant(x) for x in inputs], [tf.constant(y) for y in labels],
                         tf.constant(user_index), users, steps, learning_rate, loss_weights)
    for user in range(users):
        mine = user_index == user
        expected = _numpy_adapt(weights, [x[mine] for x in inputs], [y[mine] for y in labels], loss_weights,
                                steps, learning_rate)
        for task in range(len(weights)):
            for (kernel, bias), (want_kernel, want_bias) in zip(adapted[task], expected[task]):
                np.testing.assert_allclose(kernel.numpy()[user], want_kernel, rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(bias.numpy()[user], want_bias, rtol=1e-4, atol=1e-5)
    # The adaptation moved every user away from theta, each differently.
    first_kernel = adapted[0][0][0].numpy()
    assert not np.allclose(first_kernel[0], weights[0][0][0]) and not np.allclose(first_kernel[0], first_kernel[1])


def _numpy_logits(layers, x):
    for position, (kernel, bias) in enumerate(layers):
        x = x @ kernel + bias
        x = np.maximum(x, 0) if position < len(layers) - 1 else x
    return x[:, 0]


def test_scoring_with_per_user_weights_reads_each_examples_user(problem):
    weights, inputs, _, user_index, users = problem
    shared = [[(tf.constant(k), tf.constant(b)) for k, b in layers] for layers in weights]
    # Unadapted per-user copies score as the shared towers (to float32 rounding: the per-user
    # product sums in another order).
    per_user = melu.shared_for_users(shared, users)
    for got, want in zip(melu.tower_logits(per_user, inputs, tf.constant(user_index)), melu.tower_logits(shared, inputs)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    # Users with different weights (user u's scaled by 1 + u): row i is scored with its user's.
    scaled = [[(k * (1.0 + tf.range(users, dtype=tf.float32))[:, None, None],
                b * (1.0 + tf.range(users, dtype=tf.float32))[:, None]) for k, b in layers] for layers in per_user]
    got = melu.tower_logits(scaled, inputs, tf.constant(user_index))
    for task, layers in enumerate(weights):
        want = np.empty(len(user_index), np.float32)
        for user in range(users):
            mine = user_index == user
            want[mine] = _numpy_logits([(k * (1 + user), b * (1 + user)) for k, b in layers], inputs[task][mine])
        np.testing.assert_allclose(got[task].numpy(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("first_order", [False, True])
def test_meta_gradient_reaches_theta_through_the_local_update(problem, first_order):
    weights, inputs, labels, user_index, users = problem
    theta = [[(tf.Variable(k), tf.Variable(b)) for k, b in layers] for layers in weights]
    flat = [v for layers in theta for pair in layers for v in pair]

    def query_loss(variables_as_tensors):
        it = iter(variables_as_tensors)
        current = [[(next(it), next(it)) for _ in layers] for layers in theta]
        adapted = melu.adapt(current, inputs, labels, tf.constant(user_index), users, 2, 0.3, (1.0, 1.0),
                             first_order=first_order)
        return tf.reduce_mean(melu.per_example_loss(melu.tower_logits(adapted, inputs, tf.constant(user_index)),
                                                    labels, (1.0, 1.0)))

    with tf.GradientTape() as tape:
        loss = query_loss(flat)
    gradient = tape.gradient(loss, flat)[0].numpy()
    # Central differences on one kernel entry: the gradient of the full (second-order) meta loss.
    epsilon, values = 1e-2, [v.numpy() for v in flat]
    numeric = []
    for sign in (1, -1):
        shifted = [v.copy() for v in values]
        shifted[0][0, 0] += sign * epsilon
        numeric.append(query_loss([tf.constant(v) for v in shifted]))
    numeric = float(numeric[0] - numeric[1]) / (2 * epsilon)
    if first_order:
        assert gradient[0, 0] != 0 and abs(gradient[0, 0] - numeric) > 1e-6  # an approximation, and not zero
    else:
        np.testing.assert_allclose(gradient[0, 0], numeric, rtol=2e-2, atol=1e-4)


def test_melu_is_refused_as_a_pipeline_variant_with_the_reason():
    with pytest.raises(ValueError, match="benchmark-only.*TF Serving"):
        model.make_config("melu")
    assert "melu" not in model.VARIANTS


def test_episodes_take_each_users_earliest_examples_as_support():
    from benchmarks import melu as melu_bench

    users = np.array([5, 7, 5, 7, 5, 5, 9, 7, 5])
    order = np.array([3, 0, 1, 2, 0, 2, 0, 1, 4])  # e.g. AVC: earlier interactions have smaller values
    episodes = melu_bench.Episodes(users, order, melu_bench.MeLUSettings(support_size=2, query_size=3))
    # User 9 has one example (no query): left out. User 5's earliest: AVC 0, 1; user 7's: AVC 0, 1.
    assert sorted(map(tuple, episodes.support.tolist())) == [(1, 7), (4, 2)]
    index, local = next(episodes.batches(2, seed=0))
    supports, queries = index[:4].reshape(2, 2), index[4:].reshape(2, 3)
    for support, query in zip(supports, queries):
        assert set(users[query]) == {users[support[0]]} and order[query].min() > order[support].max()
    assert local.tolist() == [0, 0, 1, 1, 0, 0, 0, 1, 1, 1]


@pytest.mark.slow  # about 10 s on a quiet machine (a second-order training step to trace): out of `make test`
def test_melu_trains_and_scores_later_examples_with_adapted_towers():
    from benchmarks import melu as melu_bench
    import feature_specs as fs
    from models import model_summary

    size = 48
    features = {name: value.numpy() for name, value in model_summary.random_transformed_features(size, seed=1).items()}
    users = np.repeat(np.arange(4), size // 4)
    order = np.tile(np.arange(size // 4), 4).astype(np.float32)
    settings = melu_bench.MeLUSettings(support_size=3, query_size=3, local_steps=2, local_learning_rate=0.5)
    config = model.make_config("baseline", embedding_dim=4, mlp_units=(8,), expert_units=(4,), tower_units=(4,),
                               num_heads=1, head_dim=4, num_experts=2)
    ranking = melu_bench.train(config, fs.KUAIRAND, features, users, order, steps=3, batch_size=24, seed=0,
                               settings=settings)
    got = melu_bench.predict(ranking, fs.KUAIRAND, features, users, order, settings, users_per_chunk=3)
    plain = {name: value.numpy() for name, value in ranking({k: tf.constant(v) for k, v in features.items()}).items()}
    support = order < settings.support_size
    for task in fs.KUAIRAND.tasks:  # the support set unadapted, the rest adapted on it
        np.testing.assert_allclose(got[task.name][support], plain[task.name][support], rtol=1e-5)
        assert np.abs(got[task.name][~support] - plain[task.name][~support]).min() > 0
    # User 0's later examples: the towers adapted on its support set alone.
    from models import melu as melu_math
    rows = np.flatnonzero(users == 0)
    batch = {k: tf.constant(v[rows]) for k, v in features.items()}
    per_task = ranking.tower_inputs(batch)
    towers = melu_math.tower_weights([ranking.towers[t.name] for t in fs.KUAIRAND.tasks])
    s = settings.support_size
    adapted = melu_math.adapt(towers, [h[:s] for h in per_task], [batch[t.label][:s] for t in fs.KUAIRAND.tasks],
                              tf.zeros([s], tf.int32), 1, settings.local_steps, settings.local_learning_rate,
                              [t.loss_weight for t in fs.KUAIRAND.tasks])
    logits = melu_math.tower_logits(adapted, [h[s:] for h in per_task], tf.zeros([rows.size - s], tf.int32))
    for task, logit in zip(fs.KUAIRAND.tasks, logits):
        np.testing.assert_allclose(got[task.name][rows[s:]], tf.sigmoid(logit).numpy(), rtol=1e-4, atol=1e-6)
    assert melu_bench.after_support(users, order, s).tolist() == (~support).tolist()
