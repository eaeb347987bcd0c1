"""MeLU's local update (Lee et al., KDD 2019, arXiv 1908.00413): decision layers adapted per user.

BENCHMARK-ONLY. A MeLU model scores a user with decision layers adapted to that user's own
support set; serving it would mean a gradient step per user inside TF Serving, which serves a
fixed graph. So MeLU is no `models.model.VARIANTS` entry (the daily pipeline's `--variant` list
is what can be served) and its training and evaluation loop is `benchmarks.melu`.

Here MeLU is the baseline `RankingModel` whose task towers are the decision layers: the
embeddings, attention, MLP and MMoE are global (MeLU's global embeddings; our reading: the paper
adapts every fully-connected layer of a small model, and adapting the 256-128 MLP per user is
out of reach on 2 CPU cores), each task's tower is adapted per user. With theta the towers'
weights, h_t(x) the MMoE output of task t and z_t = tower_t(h_t; theta) the logit:

    l(x, y; theta)      = sum_t w_t * BCE(y_t, sigmoid(z_t))              one example
    L_u^S(theta)        = mean over user u's support examples of l        (the earliest ones)
    theta_u^0           = theta
    theta_u^{s+1}       = theta_u^s - alpha * grad L_u^S(theta_u^s),  s = 0 .. k-1    (local update)
    L^Q                 = mean over query examples i of l(x_i, y_i; theta_{u(i)}^k)  (meta loss)

The meta (global) update applies the gradient of L^Q to theta and to every global variable,
through the local update (second order, as MAML). At evaluation a user's earliest examples are
the support set and the later ones are scored with theta_u^k.

Per-user weights are stacked: a kernel [in, out] becomes [U, in, out], and example i reads its
user's slice. The sum over users of L_u^S has, with respect to user u's slice, exactly the
gradient of L_u^S: one gradient call adapts every user of a batch.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import tensorflow as tf

__all__ = ["TowerWeights", "tower_weights", "shared_for_users", "tower_logits", "per_example_loss",
           "per_user_mean", "adapt", "BENCHMARK_ONLY_REASON"]

BENCHMARK_ONLY_REASON = ("MeLU (variant 'melu') is benchmark-only: it adapts its decision layers to each user "
                         "by gradient steps at scoring time, which TF Serving cannot do; compare it with "
                         "`poso bench paper` (benchmarks.melu), not in the daily pipeline")

# Per task, the layers in order, each (kernel, bias): kernel [in, out] (shared) or [U, in, out]
# (per user), bias [out] or [U, out]. Hidden layers use ReLU, the last one is the logit.
TowerWeights = List[List[Tuple[tf.Tensor, tf.Tensor]]]


def tower_weights(towers: Sequence[tf.keras.Sequential]) -> TowerWeights:
    """theta: the (kernel, bias) variables of each task tower (Dense ReLU layers, then Dense sigmoid)."""
    return [[(layer.kernel, layer.bias) for layer in tower.layers] for tower in towers]


def shared_for_users(weights: TowerWeights, num_users: int) -> TowerWeights:
    """theta_u^0 = theta for every user: each weight repeated into a leading [U] axis."""
    return [[(tf.repeat(kernel[tf.newaxis], num_users, axis=0), tf.repeat(bias[tf.newaxis], num_users, axis=0))
             for kernel, bias in layers] for layers in weights]


def tower_logits(weights: TowerWeights, per_task_inputs: Sequence[tf.Tensor],
                 user_index: tf.Tensor = None) -> List[tf.Tensor]:
    """Each task's logit [B]; with `user_index` [B] the weights are per user and example i reads
    user_index[i]'s, else they are shared."""
    logits = []
    for layers, hidden in zip(weights, per_task_inputs):
        for position, (kernel, bias) in enumerate(layers):
            if user_index is None:
                hidden = tf.matmul(hidden, kernel) + bias
            else:
                hidden = (tf.einsum("bi,bio->bo", hidden, tf.gather(kernel, user_index))
                          + tf.gather(bias, user_index))
            if position < len(layers) - 1:
                hidden = tf.nn.relu(hidden)
        logits.append(tf.squeeze(hidden, axis=-1))
    return logits


def per_example_loss(logits: Sequence[tf.Tensor], labels: Sequence[tf.Tensor],
                     loss_weights: Sequence[float]) -> tf.Tensor:
    """l [B]: sum over tasks of weight * binary cross-entropy (from logits)."""
    return tf.add_n([weight * tf.nn.sigmoid_cross_entropy_with_logits(labels=tf.cast(y, logit.dtype), logits=logit)
                     for logit, y, weight in zip(logits, labels, loss_weights)])


def per_user_mean(values: tf.Tensor, user_index: tf.Tensor, num_users: int) -> tf.Tensor:
    """[U]: the mean of `values` [B] over each user's examples (0 for a user without any)."""
    total = tf.math.unsorted_segment_sum(values, user_index, num_users)
    count = tf.math.unsorted_segment_sum(tf.ones_like(values), user_index, num_users)
    return total / tf.maximum(count, 1.0)


def adapt(weights: TowerWeights, per_task_inputs: Sequence[tf.Tensor], labels: Sequence[tf.Tensor],
          user_index: tf.Tensor, num_users: int, steps: int, learning_rate: float,
          loss_weights: Sequence[float], first_order: bool = False) -> TowerWeights:
    """theta_u^k for every user u in [0, num_users): `steps` local updates on each user's support
    examples (`per_task_inputs`, `labels` per task, `user_index` [B] in [0, num_users)).

    The result is differentiable with respect to `weights` and the inputs (second order) unless
    `first_order`, which stops the gradient through the local gradients (first-order MAML).
    """
    adapted = shared_for_users(weights, num_users)
    for _ in range(steps):
        flat = [tensor for layers in adapted for pair in layers for tensor in pair]
        with tf.GradientTape() as tape:
            tape.watch(flat)
            losses = per_example_loss(tower_logits(adapted, per_task_inputs, user_index), labels, loss_weights)
            support_loss = tf.reduce_sum(per_user_mean(losses, user_index, num_users))
        # tf.gather's gradient arrives as IndexedSlices: every user's slice is touched, so densify.
        gradients = [tf.convert_to_tensor(g) for g in tape.gradient(support_loss, flat)]
        if first_order:
            gradients = [tf.stop_gradient(g) for g in gradients]
        stepped = iter([tensor - learning_rate * gradient for tensor, gradient in zip(flat, gradients)])
        adapted = [[(next(stepped), next(stepped)) for _ in layers] for layers in adapted]
    return adapted
