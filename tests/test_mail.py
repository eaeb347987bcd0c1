"""MAIL (models.mail): attention pooling, the residual coders, MMD, the zero-shot losses and the
new-user substitution against NumPy; the two optimizers on disjoint variables. Export, reload
and serving: tests/test_model.py's "mail" case."""

import dataclasses
import numpy as np
import pytest
import tensorflow as tf

import feature_specs as fs
from models import mail, model, model_summary

TINY = dict(embedding_dim=4, mlp_units=(8,), expert_units=(4,), tower_units=(4,), num_heads=1, head_dim=4,
            num_experts=2, mail_hidden_units=(8, 6), mail_latent_dim=5, mail_attention_units=3)
BATCH = 12


def _leaky_relu(x):
    return np.where(x > 0, x, 0.2 * x)


def _np_pooling(layer, tokens, mask):
    w, b = (v.numpy() for v in layer.projection.weights)
    z = layer.query.weights[0].numpy()
    scores = (np.tanh(tokens @ w + b) @ z)[..., 0]
    scores = np.where(mask, scores, -np.inf)
    alpha = np.exp(scores - scores.max(axis=1, keepdims=True, initial=-1e30, where=mask))
    alpha = np.where(mask, alpha, 0.0)
    alpha = np.divide(alpha, alpha.sum(axis=1, keepdims=True), out=np.zeros_like(alpha),
                      where=alpha.sum(axis=1, keepdims=True) > 0)
    return (alpha[..., None] * tokens).sum(axis=1)


def _np_coder(coder, h):
    (k1, b1), (k2, b2), (k3, b3) = ([v.numpy() for v in d.weights] for d in coder.dense_layers)
    z1 = _leaky_relu(h @ k1 + b1)
    z2 = _leaky_relu(np.concatenate([z1, h], 1) @ k2 + b2)
    out = np.concatenate([z2, h], 1) @ k3 + b3
    return out if coder.linear_output else _leaky_relu(out)


def _np_mmd(p, q, rows, sigma):
    p, q = p[rows], q[rows]

    def k(x, y):
        return np.exp(-((x[:, None, :] - y[None, :, :]) ** 2).sum(-1) / (2 * sigma ** 2)).mean()

    return k(p, p) + k(q, q) - 2 * k(p, q)


def test_attention_pooling_matches_numpy_and_skips_padding():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((4, 5, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    layer = mail.AttentionPooling(6)
    pooled = layer(tf.constant(tokens), tf.constant(mask)).numpy()
    np.testing.assert_allclose(pooled, _np_pooling(layer, tokens, mask), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pooled[2], 0.0)            # no real token: zeros
    np.testing.assert_allclose(pooled[3], tokens[3, 0], rtol=1e-6)  # one real token: itself
    changed = tokens.copy()
    changed[1, 1] += 100.0  # a padded position: no effect
    np.testing.assert_allclose(layer(tf.constant(changed), tf.constant(mask)).numpy()[1], pooled[1], rtol=1e-6)


@pytest.mark.parametrize("linear_output", [False, True], ids=["encoder", "decoder"])
def test_residual_coder_matches_numpy_and_drops_out_in_training_only(linear_output):
    h = np.random.default_rng(1).standard_normal((6, 5)).astype(np.float32)
    coder = mail.ResidualCoder((7, 4), 3, dropout=0.5, linear_output=linear_output)
    out = coder(tf.constant(h)).numpy()
    np.testing.assert_allclose(out, _np_coder(coder, h), rtol=1e-5, atol=1e-6)
    tf.random.set_seed(0)
    assert not np.allclose(coder(tf.constant(h), training=True).numpy(), out)


def test_mmd_and_masked_squared_error_match_numpy():
    rng = np.random.default_rng(2)
    p, q = rng.standard_normal((7, 4)), rng.standard_normal((7, 4)) + 0.5
    rows = np.array([1, 1, 0, 1, 1, 0, 1], bool)
    for sigma in (1.0, 2.5):
        value = mail.mmd(tf.constant(p), tf.constant(q), tf.constant(rows, tf.float64), sigma).numpy()
        np.testing.assert_allclose(value, _np_mmd(p, q, rows, sigma), rtol=1e-6)
    assert mail.mmd(tf.constant(p), tf.constant(p), tf.constant(rows, tf.float64)).numpy() == pytest.approx(0, abs=1e-12)
    error = mail.masked_squared_error(tf.constant(p), tf.constant(q), tf.constant(rows)).numpy()
    np.testing.assert_allclose(error, ((p - q) ** 2)[rows].mean(), rtol=1e-6)


@pytest.fixture(scope="module")
def batch():
    features = dict(model_summary.random_transformed_features(BATCH, seed=5))
    new = np.zeros(BATCH, np.float32)
    new[::4] = 1.0  # 3 new users
    history = features[fs.HIST_VIDEO_IDS].numpy()
    history[1] = fs.PADDING_INDEX  # an old user without behaviour: not a zero-shot row
    features[fs.IS_NEW_USER] = tf.constant(new)
    features[fs.HIST_VIDEO_IDS] = tf.constant(history)
    tags = features[fs.HIST_TAGS].numpy()
    tags[1] = fs.PADDING_INDEX
    features[fs.HIST_TAGS] = tf.constant(tags)
    return features


def _built(features, **overrides):
    tf.keras.utils.set_random_seed(0)
    ranking = model.RankingModel(model.make_config("mail", **TINY, **overrides))
    ranking(features)
    return ranking


def _np_inputs(ranking, features):
    fields = [ranking.embeddings[name](features[name]).numpy() for name in model.mail_attribute_names(fs.KUAIRAND)]
    width = max(f.shape[1] for f in fields)
    tokens = np.stack([np.pad(f, [(0, 0), (0, width - f.shape[1])]) for f in fields], axis=1)
    ids = [features[name].numpy() for name in fs.KUAIRAND.behaviour_sequence]
    sequence = np.concatenate([ranking.embeddings[name](x).numpy()
                               for name, x in zip(fs.KUAIRAND.behaviour_sequence, ids)], axis=-1)
    mask = np.any([x != fs.PADDING_INDEX for x in ids], axis=0)
    return tokens, np.concatenate(fields, axis=1), sequence, mask


def _np_generate(tower, tokens):
    latent = _np_coder(tower.attribute_encoder, _np_pooling(tower.attribute_pooling, tokens,
                                                            np.ones(tokens.shape[:2], bool)))
    return _np_coder(tower.behaviour_decoder, latent).reshape(len(tokens), tower.behaviour_length, -1)


def test_new_users_behaviour_is_generated_on_their_rows_only(batch, monkeypatch):
    ranking = _built(batch)
    tower = ranking.zero_shot
    tokens, _, sequence, mask = _np_inputs(ranking, batch)
    new = batch[fs.IS_NEW_USER].numpy() > 0.5
    generated_rows = []
    generate = tower.generate
    monkeypatch.setattr(tower, "generate", lambda t, **kw: generated_rows.append(int(t.shape[0])) or generate(t, **kw))

    served, served_mask = (x.numpy() for x in ranking.mail_behaviour_sequence(batch))
    expected = sequence.copy()
    expected[new] = _np_generate(tower, tokens[new])
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(served_mask, np.where(new[:, None], True, mask))
    assert generated_rows == [int(new.sum())]  # the decoder ran on the new users' rows only

    # In training too by default (the paper); only at serving with mail_fill_in_training=False.
    np.testing.assert_allclose(ranking.mail_behaviour_sequence(batch, training=True)[0].numpy(), expected,
                               rtol=1e-4, atol=1e-6)
    official = _built(batch, mail_fill_in_training=False)
    np.testing.assert_allclose(official.mail_behaviour_sequence(batch, training=True)[0].numpy(),
                               _np_inputs(official, batch)[2], rtol=1e-6)

    # A batch without new users: the generator does not run and the predictions are the plain model's.
    generated_rows.clear()
    old = dict(batch, **{fs.IS_NEW_USER: tf.zeros([BATCH])})
    unchanged, _ = ranking.mail_behaviour_sequence(old)
    np.testing.assert_allclose(unchanged.numpy(), sequence, rtol=1e-6)
    assert generated_rows == []
    # In training it runs on every batch, on the new users' rows: none here.
    ranking.mail_behaviour_sequence(old, training=True)
    assert generated_rows == [0]
    # The predictions of old users do not depend on the new users in the batch.
    with_new, without_new = ranking(batch), ranking(old)
    for task in with_new:
        np.testing.assert_allclose(with_new[task].numpy()[~new], without_new[task].numpy()[~new], rtol=1e-5)
        assert not np.allclose(with_new[task].numpy()[new], without_new[task].numpy()[new])


@pytest.mark.parametrize("alignment", ["mmd", "mse"])
def test_zero_shot_losses_match_numpy_on_users_with_behaviour(batch, alignment):
    ranking = _built(batch, mail_alignment=alignment, mail_mmd_sigma=1.5)
    tower = ranking.zero_shot
    tokens, attributes, sequence, mask = _np_inputs(ranking, batch)
    rows = mask.any(axis=1) & (batch[fs.IS_NEW_USER].numpy() < 0.5)
    assert not rows[1] and not rows[0] and rows.sum() == BATCH - 4
    np.testing.assert_array_equal(ranking.mail_rows(batch).numpy(), rows)

    p = _np_coder(tower.attribute_encoder, _np_pooling(tower.attribute_pooling, tokens, np.ones(tokens.shape[:2], bool)))
    q = _np_coder(tower.behaviour_encoder, _np_pooling(tower.behaviour_pooling, sequence, mask))

    def reconstruction(latent):
        decoded_a = _np_coder(tower.attribute_decoder, latent)
        decoded_v = _np_coder(tower.behaviour_decoder, latent).reshape(sequence.shape)
        positions = mask & rows[:, None]
        return (((decoded_a - attributes) ** 2).mean(axis=1)[rows].mean()
                + ((decoded_v - sequence) ** 2).mean(axis=2)[positions].mean())

    alignment_value = _np_mmd(p, q, rows, 1.5) if alignment == "mmd" else ((p - q) ** 2).mean(axis=1)[rows].mean()
    losses = {name: value.numpy() for name, value in ranking.mail_losses(batch).items()}
    np.testing.assert_allclose(losses["attribute"], reconstruction(p), rtol=1e-4)
    np.testing.assert_allclose(losses["behaviour"], reconstruction(q), rtol=1e-4)
    np.testing.assert_allclose(losses["alignment"], alignment_value, rtol=1e-4, atol=1e-6)  # float32 kernel sums
    np.testing.assert_allclose(losses["total"], reconstruction(p) + reconstruction(q) + alignment_value,
                               rtol=1e-4, atol=1e-6)
    # Rows without behaviour do not count: changing a new user's history changes nothing.
    changed = dict(batch, **{fs.HIST_VIDEO_IDS: tf.tensor_scatter_nd_update(
        batch[fs.HIST_VIDEO_IDS], [[0, 0]], tf.constant([7], tf.int64))})
    np.testing.assert_allclose(ranking.mail_losses(changed)["total"].numpy(), losses["total"], rtol=1e-6)


def test_two_optimizers_train_disjoint_variables(batch):
    ranking = _built(batch, learning_rate=0.01, mail_dropout=0.0)  # the step then computes the gradients below
    zero_shot = ranking.zero_shot.trainable_variables
    zero_shot_refs = {v.ref() for v in zero_shot}
    others = [v for v in ranking.trainable_variables if v.ref() not in zero_shot_refs]
    assert zero_shot and others and len(zero_shot) + len(others) == len(ranking.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        ranking_loss = ranking.compute_loss(batch, training=True)
        zero_shot_loss = ranking.mail_losses(batch)["total"]
    assert all(g is None for g in tape.gradient(ranking_loss, zero_shot))   # stop-gradient on v_hat
    assert all(g is None for g in tape.gradient(zero_shot_loss, others))    # stop-gradient on the embeddings
    zero_shot_gradients = [g.numpy() for g in tape.gradient(zero_shot_loss, zero_shot)]

    # Ranking optimizer at learning rate 0: one step moves the zero-shot variables only, by Adam's
    # first step at half the ranking learning rate, lr/2 * g / (|g| + eps') = about lr/2 * sign(g).
    ranking.compile(optimizer=tf.keras.optimizers.SGD(0.0), run_eagerly=True)
    before_others = [v.numpy().copy() for v in others]
    before = [v.numpy().copy() for v in zero_shot]
    ranking.train_step(batch)
    for variable, value in zip(others, before_others):
        np.testing.assert_array_equal(variable.numpy(), value, err_msg=variable.name)
    moved = 0
    for variable, value, gradient in zip(zero_shot, before, zero_shot_gradients):
        clear = np.abs(gradient) > 1e-4
        np.testing.assert_allclose((variable.numpy() - value)[clear], -0.005 * np.sign(gradient[clear]),
                                   rtol=0.05, err_msg=variable.name)
        moved += clear.sum()
    assert moved > 0
    variables = ranking.zero_shot_optimizer.variables
    optimizer_slots = [v for v in (variables() if callable(variables) else variables) if v.shape.rank]
    assert len(optimizer_slots) == 2 * len(zero_shot)  # Adam's m and v of the zero-shot variables only


def test_config_validation_and_feature_sets():
    config = model.make_config("mail", mail_alignment="mse", mail_fill_in_training=False)
    assert model.ModelConfig.from_dict(config.to_dict()) == config
    for bad in (dict(mail_alignment="kl"), dict(mail_hidden_units=(8,)), dict(mail_dropout=1.0),
                dict(mail_learning_rate_ratio=0.0), dict(user_cold_start="meta_emb")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model.make_config("mail", **bad)
    # MovieLens has no profile: the user id is MAIL's only attribute there.
    movielens = fs.feature_set("movielens")
    assert model.mail_attribute_names(movielens) == (movielens.user_id,)
    assert "mail" in model.variants_for(movielens) and "mail" in model.variants_for(fs.KUAIRAND)
    id_as_slice = dataclasses.replace(movielens.feature(movielens.user_id), kind=fs.Kind.SLICE)
    no_attributes = dataclasses.replace(movielens, features=tuple(
        id_as_slice if f.name == movielens.user_id else f for f in movielens.features))
    with pytest.raises(ValueError, match="MAIL generates behaviour from the user's attributes"):
        model.make_config("mail", feature_set=no_attributes)


@pytest.mark.slow  # graph-mode training: 15-40 s per variant on a shared machine
@pytest.mark.parametrize("variant", ["mail", "pin"])
def test_paper_benchmark_trains_mail_and_pin(variant):
    """benchmarks.paper.train_model (Table 2, headroom) trains both; PIN with P(head) measured and
    stratified batches, as the Trainer."""
    from benchmarks import paper

    class Split:
        features = {k: v.numpy() for k, v in model_summary.random_transformed_features(64, seed=1).items()}

        def __len__(self):
            return 64

    budget = paper.Budget(train_steps=2, batch_size=16)
    spec = paper.ModelSpec(variant, variant, overrides=tuple(TINY.items()))
    trained = paper.train_model(spec, Split(), seed=0, budget=budget)
    assert int(trained.optimizer.iterations.numpy()) == 2
    if variant == "pin":
        expected = np.mean((Split.features[fs.PC_BUCKET] >= trained.config.pin_head_min_pc_bucket)
                           & (Split.features[fs.IS_NEW_USER] < 0.5))
        assert trained.config.pin_head_share == pytest.approx(expected)
    else:
        assert int(trained.zero_shot_optimizer.iterations.numpy()) == 2
    assert all(np.all(np.isfinite(p)) for p in paper.predict(trained, Split.features).values())


@pytest.fixture(scope="module")
def daily_data(tmp_path_factory):
    """Three days of tiny logs and one home for both variants' runs: the second run takes the
    ingest and Transform from the first one's cache, so only training onwards runs again."""
    import datetime

    from components import synthetic_logs

    start, root = datetime.date(2022, 4, 8), tmp_path_factory.mktemp("daily")
    # Train on day 2 (on day 1 every user is new: no behaviour rows for MAIL, no head for PIN).
    synthetic_logs.generate(str(root / "data"), start, 3, seed=42, impressions_per_day=400)
    return start, root


@pytest.mark.slow  # a daily run per variant (TFX, Beam, a model server): about 80 s together
@pytest.mark.parametrize("variant", ["mail", "pin"])
def test_daily_run_trains_validates_and_serves_the_variant(variant, daily_data):
    import datetime
    import json
    import os

    from pipeline import config as config_lib
    from pipeline import local_runner, summary

    start, root = daily_data
    # At 400 rows a day nobody reaches AVC 32, so PIN's head starts at bucket 1 (AVC >= 1, not new).
    overrides = (("pin_head_min_pc_bucket", 1),) if variant == "pin" else ()
    cfg = config_lib.RunConfig(date=start + datetime.timedelta(days=2), data_dir=str(root / "data"),
                               home=str(root / "home"), variant=variant, train_days=1, min_train_days=1,
                               train_steps=20, model_overrides=overrides, beam_direct_running_mode="in_memory",
                               beam_num_workers=1)
    result = local_runner.run_day(cfg)
    assert result["infra_blessed"], result["infra_reason"]  # served by the model server, same signatures
    assert f"(model {variant})" in summary.format_summary(result).splitlines()[0]
    with open(os.path.join(result["candidate_model_dir"], "assets.extra", "model_config.json")) as f:
        config = json.load(f)
    assert config[variant] is True
    if variant == "pin":
        assert 0.0 < config["pin_head_share"] < 1.0  # measured by the Trainer
    loaded = tf.saved_model.load(result["candidate_model_dir"])
    assert set(loaded.signatures) >= {"serving_default", "serving_raw"}
