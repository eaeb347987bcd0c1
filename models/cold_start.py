"""User cold-start methods that produce or warm the user-id embedding: Meta-Embedding and MWUF.

Both slot into `RankingModel` the same way (`ModelConfig.user_cold_start`):

- at serving and evaluation (`training=False`) the model reads `serving_user_embedding`
  instead of the user-id embedding e (for the users the method applies to);
- in training the main model keeps its usual loss on the plain e, and the method's own
  variables (only those) are trained on the method's `meta_loss`: `RankingModel.train_step`
  applies the gradient of the usual loss to every other variable and the gradient of the meta
  loss to the method's variables, in one optimizer step.

Inputs: z = concat(embeddings of `FeatureSet.user_features`) (the user's profile, not the id;
a history sequence mean-pooled, as MovieLens' user features are), gradient stopped (the meta
losses must not train the main model's embeddings).

A user is new (`new_user_mask`) per the feature set's new-user definition: `is_new_user` = 1
where the feature set has it (KuaiRand: within 24 h of the first impression), else AVC bucket 0
(no impression before).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import tensorflow as tf

import feature_specs as fs

__all__ = ["USER_COLD_START_METHODS", "MetaEmbeddingGenerator", "meta_embedding_loss", "MetaWarmUp",
           "new_user_mask"]

USER_COLD_START_METHODS: Tuple[str, ...] = ("none", "meta_emb", "mwuf")


def new_user_mask(features: Dict[str, tf.Tensor], feature_set: fs.FeatureSet) -> tf.Tensor:
    """[B] bool: the example's user is new (see the module docstring)."""
    if feature_set.has(fs.IS_NEW_USER):
        return tf.cast(features[fs.IS_NEW_USER], tf.float32) > 0.5
    return tf.equal(features[fs.PC_BUCKET], 0)


class MetaEmbeddingGenerator(tf.keras.layers.Layer):
    """Meta-Embedding's generator (Pan et al., SIGIR 2019, arXiv 1904.11547), for users.

        phi = tanh(W z + b)                                     [B, d]

    phi replaces a new user's id embedding e at serving. The paper's generator is a small
    network on the features' embeddings; one tanh layer is our reading (an id embedding's
    values are small, initialised in +-0.05, so tanh bounds phi without limiting it).
    Trained on `meta_embedding_loss`.
    """

    def __init__(self, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.dense = tf.keras.layers.Dense(embedding_dim, activation="tanh", name="generator")

    def call(self, user_features: tf.Tensor) -> tf.Tensor:
        return self.dense(user_features)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "embedding_dim": self.embedding_dim}


def meta_embedding_loss(per_example_loss: Callable[[tf.Tensor], tf.Tensor], phi: tf.Tensor, user_ids: tf.Tensor,
                        alpha: float, warmup_lr: float) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Meta-Embedding's two-part loss on one batch; returns (loss, cold loss, warm loss).

    per_example_loss(embeddings [B, d]) -> [B]: the model's loss of each example when its
    user-id embedding is the given row (all other parameters fixed). The batch's first half is
    the paper's batch a, the second half batch b:

        l_a   = mean_{i in a} l_i(phi_i)                                  cold-start loss
        g_u   = mean_{i in a, user(i) = u} d l_i / d phi_i                one warm-up step on
        phi'_j = phi_j - warmup_lr * g_{user(j)}                          the user's a-examples
        l_b   = mean_{j in b} l_j(phi'_j)                                 loss after warm-up
        loss  = alpha * l_a + (1 - alpha) * l_b

    The gradient of `loss` reaches phi through phi' too (second order, as in the paper).
    Interpretation: the paper draws a and b as two batches of one (old) id; here a and b are
    the halves of a shuffled training batch and the warm-up is per user, so a b-example whose
    user has no a-example is scored with phi' = phi (g = 0).
    """
    size = tf.shape(phi)[0]
    in_a = tf.range(size) < size // 2
    a_weight = tf.cast(in_a, phi.dtype)
    b_weight = 1.0 - a_weight
    with tf.GradientTape() as warmup_tape:
        warmup_tape.watch(phi)
        losses = per_example_loss(phi)
        cold = tf.reduce_sum(losses * a_weight) / tf.maximum(tf.reduce_sum(a_weight), 1.0)
        summed_a = tf.reduce_sum(losses * a_weight)
    per_row = warmup_tape.gradient(summed_a, phi)  # d l_i / d phi_i, zero outside a
    _, user_index = tf.unique(tf.reshape(user_ids, [-1]))
    per_user = tf.math.unsorted_segment_sum(per_row, user_index, size)
    counts = tf.math.unsorted_segment_sum(a_weight, user_index, size)
    warmed = phi - warmup_lr * tf.gather(per_user / tf.maximum(counts, 1.0)[:, tf.newaxis], user_index)
    warm = tf.reduce_sum(per_example_loss(warmed) * b_weight) / tf.maximum(tf.reduce_sum(b_weight), 1.0)
    return alpha * cold + (1.0 - alpha) * warm, cold, warm


class MetaWarmUp(tf.keras.layers.Layer):
    """MWUF's meta scaling and shifting networks (Zhu et al., SIGIR 2021, arXiv 2105.04790), for users.

        scale = 2 sigmoid(W_s z + b_s)                          [B, d]   from the user's features
        shift = W_h m + b_h                                     [B, d]   m = mean of the history's
        e'    = scale * e + shift                                        item-id embeddings

    e is the user-id embedding. The paper's scaling network reads the entity's features and its
    shifting network the mean embedding of the entities it interacted with; the output forms
    (2 sigmoid: about 1 at the start, like POSO's gates; a linear shift) are our reading.
    Trained on the model's loss with e' for every example (the other parameters fixed);
    applied at serving by `RankingModel` per `ModelConfig.mwuf_max_pc_bucket`.
    """

    def __init__(self, embedding_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.embedding_dim = embedding_dim
        self.scaling = tf.keras.layers.Dense(embedding_dim, activation="sigmoid", name="meta_scaling")
        self.shifting = tf.keras.layers.Dense(embedding_dim, name="meta_shifting")

    def call(self, embedding: tf.Tensor, user_features: tf.Tensor, history_mean: tf.Tensor) -> tf.Tensor:
        return 2.0 * self.scaling(user_features) * embedding + self.shifting(history_mean)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "embedding_dim": self.embedding_dim}
