"""MAIL's zero-shot tower (Feng et al., CIKM 2021, "Zero Shot on the Cold-Start Problem:
Model-Agnostic Interest Learning for Recommender Systems", arXiv 2108.13592), for `RankingModel`
with `ModelConfig.mail`. The ranking tower is the project's own model.

Inputs, per example (`RankingModel` builds them from the transformed features):
- attributes a_1..a_F: the embeddings of the user id and of `FeatureSet.user_features`, gradient
  stopped; zero-padded to one width d_a for the pooling (`attribute_tokens`); the reconstruction
  target a is their concatenation;
- behaviour v_1..v_L: the behaviour sequence's per-position embeddings (`FeatureSet.behaviour_sequence`,
  concatenated per position, width d_v), gradient stopped, with the mask of real positions.

The tower (`ZeroShotTower`):

    attention pooling   e_i = z^T tanh(W x_i + b),  alpha = softmax(e) over real x_i,  h = sum_i alpha_i x_i
                        h^a = pool_a(a_1..a_F),  h^v = pool_v(v_1..v_L)
    residual encoder    z1 = LReLU(Dense(Drop(h))),  z2 = LReLU(Dense(Drop([z1, h]))),  out = LReLU(Dense([z2, h]))
                        p = E1(h^a),  q = E2(h^v)                     (latent width `latent_dim`)
    decoders            D1, D2: the same pattern with a linear last layer; D1 -> a, D2 -> v (all L positions)
    losses              L_a = |D1(p) - a|^2 + |D2(p) - v|^2,  L_v = |D1(q) - a|^2 + |D2(q) - v|^2
                        alignment: MMD^2(p, q) with k(x, y) = exp(-|x - y|^2 / (2 sigma^2)) (the paper)
                                   or mean_i |p_i - q_i|^2 (the official code, "mse")
                        L_zs = L_a + L_v + alignment                  (all weights 1, as in the paper)
    generation          v_hat = D2(E1(h^a))  -> [L, d_v], every position real

|x - y|^2 is the mean squared error per element; for v only over the user's real positions.
LReLU: tf.nn.leaky_relu (slope 0.2). MMD^2 is the biased (V-statistic) estimate over the batch's
rows. L_zs averages over the rows with behaviour only (`RankingModel`: not new and at least one real
position), the users whose attribute -> behaviour mapping can be learned.

What is interpreted (the paper's model is described for one sequence and its own features):
the attribute widths differ here, so the tokens are zero-padded to the widest before pooling;
the decoder D2 regenerates the whole sequence (as the official code does) but is scored on real
positions only, and the generated sequence is served with all L positions real (a new user has
no length to copy); the ranking tower reads v_hat in place of the sequence for new users
(`cold_start.new_user_mask`: is_new_user, else AVC bucket 0) with gradient stopped, both at
serving and -- `ModelConfig.mail_fill_in_training`, the paper's choice and the default -- in
training, where the generator runs without dropout so that training sees what serving serves.

Served graph: `RankingModel.mail_behaviour_sequence` gathers the new users' rows (tf.where),
runs pool_a, E1 and D2 on those rows only and scatters v_hat back (tf.tensor_scatter_nd_update):
users with behaviour never go through the decoders. In a traced (served) graph the substitution
is one functional `If` node (`control_flow.if_any`) run only when the batch has a new user, so a
request of users with behaviour skips its ~115 ops entirely; in training it runs on every batch,
on the new users' rows. E2, D1 and pool_v run only in training (the losses).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import tensorflow as tf

__all__ = ["ALIGNMENTS", "AttentionPooling", "ResidualCoder", "ZeroShotTower", "attribute_tokens", "mmd",
           "masked_squared_error"]

ALIGNMENTS = ("mmd", "mse")
_NEG_INF = -1e9


def attribute_tokens(embeddings: Sequence[tf.Tensor]) -> tf.Tensor:
    """[B, d_i] per field -> [B, F, max d_i], each field zero-padded on the right."""
    width = max(int(e.shape[-1]) for e in embeddings)
    return tf.stack([tf.pad(e, [[0, 0], [0, width - int(e.shape[-1])]]) for e in embeddings], axis=1)


class AttentionPooling(tf.keras.layers.Layer):
    """h = sum_i alpha_i x_i, alpha = softmax_i(z^T tanh(W x_i + b)) over the real tokens.

    tokens [B, N, d], mask [B, N] bool (None: all real) -> [B, d]; a row without a real token gives 0.
    """

    def __init__(self, units: int, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.projection = tf.keras.layers.Dense(units, activation="tanh", name="projection")
        self.query = tf.keras.layers.Dense(1, use_bias=False, name="query")

    def call(self, tokens: tf.Tensor, mask: tf.Tensor | None = None) -> tf.Tensor:
        scores = tf.squeeze(self.query(self.projection(tokens)), axis=-1)
        if mask is not None:
            scores = tf.where(mask, scores, _NEG_INF)
        alpha = tf.nn.softmax(scores, axis=1)
        if mask is not None:
            alpha *= tf.cast(mask, alpha.dtype)
        return tf.reduce_sum(alpha[:, :, tf.newaxis] * tokens, axis=1)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "units": self.units}


class ResidualCoder(tf.keras.layers.Layer):
    """MAIL's encoder (and, with `linear_output`, decoder):

        z1 = LReLU(Dense_1(Drop(h))),  z2 = LReLU(Dense_2(Drop([z1, h]))),  out = f(Dense_3([z2, h]))

    f = LReLU for an encoder, identity for a decoder.
    """

    def __init__(self, hidden_units: Sequence[int], output_dim: int, dropout: float = 0.5,
                 linear_output: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.hidden_units, self.output_dim = tuple(hidden_units), output_dim
        self.dropout, self.linear_output = dropout, linear_output
        if len(self.hidden_units) != 2:
            raise ValueError(f"ResidualCoder: hidden_units must be two widths, got {hidden_units!r}")
        self.hidden_1 = tf.keras.layers.Dense(self.hidden_units[0], name="hidden_1")
        self.hidden_2 = tf.keras.layers.Dense(self.hidden_units[1], name="hidden_2")
        self.out = tf.keras.layers.Dense(output_dim, name="output")
        self.drop = tf.keras.layers.Dropout(dropout)

    @property
    def dense_layers(self):
        return (self.hidden_1, self.hidden_2, self.out)

    def call(self, h: tf.Tensor, training: bool = False) -> tf.Tensor:
        z1 = tf.nn.leaky_relu(self.hidden_1(self.drop(h, training=training)))
        z2 = tf.nn.leaky_relu(self.hidden_2(self.drop(tf.concat([z1, h], axis=1), training=training)))
        out = self.out(tf.concat([z2, h], axis=1))
        return out if self.linear_output else tf.nn.leaky_relu(out)

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "hidden_units": list(self.hidden_units), "output_dim": self.output_dim,
                "dropout": self.dropout, "linear_output": self.linear_output}


def _squared_distances(x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
    return tf.maximum(tf.reduce_sum(tf.square(x), 1)[:, None] + tf.reduce_sum(tf.square(y), 1)[None, :]
                      - 2.0 * tf.matmul(x, y, transpose_b=True), 0.0)


def mmd(p: tf.Tensor, q: tf.Tensor, weights: tf.Tensor, sigma: float = 1.0) -> tf.Tensor:
    """Biased MMD^2 between the rows of p and of q [B, k] that have weight 1 (weights [B] in {0, 1}):

        MMD^2 = mean_ij k(p_i, p_j) + mean_ij k(q_i, q_j) - 2 mean_ij k(p_i, q_j),
        k(x, y) = exp(-|x - y|^2 / (2 sigma^2)),   means over pairs of weighted rows (0 if none).
    """
    pair = weights[:, None] * weights[None, :]
    count = tf.reduce_sum(pair)

    def mean_kernel(x, y):
        return tf.math.divide_no_nan(tf.reduce_sum(pair * tf.exp(-_squared_distances(x, y) / (2.0 * sigma ** 2))),
                                     count)

    return mean_kernel(p, p) + mean_kernel(q, q) - 2.0 * mean_kernel(p, q)


def masked_squared_error(prediction: tf.Tensor, target: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """Mean of (prediction - target)^2 over the elements whose mask is 1; mask broadcasts to the
    prediction's leading dimensions ([B] rows, or [B, L] positions)."""
    error = tf.reduce_mean(tf.square(prediction - target), axis=-1)  # per row or position
    mask = tf.cast(mask, error.dtype)
    return tf.math.divide_no_nan(tf.reduce_sum(error * mask), tf.reduce_sum(mask))


class ZeroShotTower(tf.keras.layers.Layer):
    """MAIL's zero-shot tower (see the module docstring): two attention poolings, encoders E1
    (attributes) and E2 (behaviour), decoders D1 (-> attributes) and D2 (-> behaviour).

    attribute_dims: the width of each attribute field; behaviour_length, behaviour_dim: L and d_v.
    Its variables are all built at construction (the served graph uses only pool_a, E1 and D2).
    """

    def __init__(self, attribute_dims: Sequence[int], behaviour_length: int, behaviour_dim: int,
                 hidden_units: Sequence[int] = (128, 64), latent_dim: int = 32, attention_units: int = 16,
                 dropout: float = 0.5, alignment: str = "mmd", mmd_sigma: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if alignment not in ALIGNMENTS:
            raise ValueError(f"ZeroShotTower: alignment={alignment!r}, expected one of {ALIGNMENTS}")
        self.attribute_dims, self.behaviour_length, self.behaviour_dim = tuple(attribute_dims), behaviour_length, behaviour_dim
        self.hidden_units, self.latent_dim, self.attention_units = tuple(hidden_units), latent_dim, attention_units
        self.dropout, self.alignment, self.mmd_sigma = dropout, alignment, mmd_sigma
        coder = dict(hidden_units=self.hidden_units, dropout=dropout)
        self.attribute_pooling = AttentionPooling(attention_units, name="mail_attribute_pooling")
        self.behaviour_pooling = AttentionPooling(attention_units, name="mail_behaviour_pooling")
        self.attribute_encoder = ResidualCoder(output_dim=latent_dim, name="mail_attribute_encoder", **coder)   # E1
        self.behaviour_encoder = ResidualCoder(output_dim=latent_dim, name="mail_behaviour_encoder", **coder)   # E2
        self.attribute_decoder = ResidualCoder(output_dim=sum(self.attribute_dims), linear_output=True,
                                               name="mail_attribute_decoder", **coder)                        # D1
        self.behaviour_decoder = ResidualCoder(output_dim=behaviour_length * behaviour_dim, linear_output=True,
                                               name="mail_behaviour_decoder", **coder)                        # D2
        # Every part built now (a served-only forward pass would leave E2, D1, pool_v unbuilt).
        width = max(self.attribute_dims)
        self.attribute_pooling(tf.zeros([1, len(self.attribute_dims), width]))
        self.behaviour_pooling(tf.zeros([1, behaviour_length, behaviour_dim]))
        self.attribute_encoder(tf.zeros([1, width]))
        self.behaviour_encoder(tf.zeros([1, behaviour_dim]))
        for decoder in (self.attribute_decoder, self.behaviour_decoder):
            decoder(tf.zeros([1, latent_dim]))
        self.built = True

    @property
    def served_layers(self):
        """The layers `generate` runs: pool_a, E1, D2."""
        return (self.attribute_pooling, self.attribute_encoder, self.behaviour_decoder)

    def generate(self, tokens: tf.Tensor, training: bool = False) -> tf.Tensor:
        """v_hat = D2(E1(pool_a(tokens))): attribute tokens [B, F, d_a] -> behaviour [B, L, d_v]."""
        latent = self.attribute_encoder(self.attribute_pooling(tokens), training=training)
        return tf.reshape(self.behaviour_decoder(latent, training=training),
                          [-1, self.behaviour_length, self.behaviour_dim])

    def losses_of(self, tokens: tf.Tensor, attributes: tf.Tensor, behaviour: tf.Tensor, behaviour_mask: tf.Tensor,
                  rows: tf.Tensor, training: bool = False) -> Dict[str, tf.Tensor]:
        """{"attribute": L_a, "behaviour": L_v, "alignment", "total"} over the rows with rows = 1.

        tokens [B, F, d_a], attributes a [B, sum d_i], behaviour v [B, L, d_v], behaviour_mask [B, L].
        """
        rows = tf.cast(rows, tf.float32)
        positions = tf.cast(behaviour_mask, tf.float32) * rows[:, None]
        p = self.attribute_encoder(self.attribute_pooling(tokens), training=training)
        q = self.behaviour_encoder(self.behaviour_pooling(behaviour, behaviour_mask), training=training)

        def reconstruction(latent):
            decoded_v = tf.reshape(self.behaviour_decoder(latent, training=training),
                                   [-1, self.behaviour_length, self.behaviour_dim])
            return (masked_squared_error(self.attribute_decoder(latent, training=training), attributes, rows)
                    + masked_squared_error(decoded_v, behaviour, positions))

        if self.alignment == "mmd":
            alignment = mmd(p, q, rows, self.mmd_sigma)
        else:
            alignment = masked_squared_error(p, q, rows)
        losses = dict(attribute=reconstruction(p), behaviour=reconstruction(q), alignment=alignment)
        losses["total"] = losses["attribute"] + losses["behaviour"] + alignment
        return losses

    def get_config(self) -> Dict[str, Any]:
        return {**super().get_config(), "attribute_dims": list(self.attribute_dims),
                "behaviour_length": self.behaviour_length, "behaviour_dim": self.behaviour_dim,
                "hidden_units": list(self.hidden_units), "latent_dim": self.latent_dim,
                "attention_units": self.attention_units, "dropout": self.dropout, "alignment": self.alignment,
                "mmd_sigma": self.mmd_sigma}
