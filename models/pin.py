"""PIN (Lv et al. 2022, "Personalizing Intervened Network for Long-tailed Sequential User
Behavior Modeling", arXiv 2208.09130): our INTERPRETATION of the method, since only the
paper's abstract could be read and no code is published.

The abstract: user activeness is long-tailed and confounds joint training; PIN learns shared
knowledge into a backbone by "gradient aggregation" deconfounded by backdoor adjustment
(activeness the confounder), then adds separate plugin prediction networks for head and tail
users. Our reading, as `RankingModel` with `ModelConfig.pin`:

- Activity groups z_k: two, tail and head. A user is in the head when the PC (AVC) bucket is
  at least `ModelConfig.pin_head_min_pc_bucket`, and not new (`cold_start.new_user_mask`);
  everyone else, new users included, is in the tail.
- Backdoor-adjusted gradient aggregation: the training loss is

      L = sum_k P(z_k) * mean_{i in group k of the batch} l_i

  so the gradient of every backbone variable is sum_k P(z_k) * (mean gradient of group k).
  P(z_k) is the group's share in the training data: `ModelConfig.pin_head_share` (the tail's
  is 1 - it); the Trainer measures it on the training data before training when it is None.
  A group absent from a batch drops out and the present group's weight becomes 1.
- Stratified batches (`stratify`): the Trainer draws each run of 16 examples from the head or
  the tail stream with probability 1/2 (until one runs out), so every batch holds about as many
  tail as head examples (a batch of 512 is 32 runs: the head's share varies by about 0.09). With i.i.d. batches and P(z_k) the batch's shares, L would be the plain mean
  loss, i.e. ordinary training. In expectation L still has the population gradient; what
  changes is that each group's mean gradient is estimated from half the batch, the tail's
  far more precisely than in an i.i.d. batch.
- Plugin towers: every task has a head tower and a tail tower of the same shape (`tower_units`
  hidden ReLU layers, a sigmoid output) on the shared backbone's output; an example goes
  through its group's tower, in training and at serving, so each tower trains on its own users
  only (weighted by P(z_k)). Interpretation: one joint stage, not a backbone stage then a
  tower stage with the backbone frozen or slower.
- The two towers of a task are one `PluginTowers` layer (`RankingModel.towers[task]`): each
  layer's head and tail weights are one variable, so both towers cost one MatMul per layer and
  the served graph has about the baseline's op count for its towers; the output is exactly the
  row's group's tower's, and its gradient reaches that group's weights only.
  A warm start (models.trainer.warm_start, by variable name) from a PIN export before the
  fused layout (per-group `{task}_hidden_i` and `tail_{task}_hidden_i` Dense layers) restores
  everything but the towers, which keep their initial values; the log names them.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

import feature_specs as fs
from models import cold_start

_log = logging.getLogger(__name__)

__all__ = ["head_mask", "backdoor_weights", "PluginTowers", "stratify", "head_share", "training_data"]

TAIL, HEAD = 0, 1  # the activity groups' indices in PluginTowers' stacked weights


def head_mask(features: Mapping[str, tf.Tensor], feature_set: fs.FeatureSet, head_min_pc_bucket: int) -> tf.Tensor:
    """[B] bool: the example's user is a head user (PC bucket >= head_min_pc_bucket, not new)."""
    bucket = features[fs.PC_BUCKET]
    return (bucket >= tf.cast(head_min_pc_bucket, bucket.dtype)) & ~cold_start.new_user_mask(features, feature_set)


def backdoor_weights(is_head: tf.Tensor, head_share: float) -> tf.Tensor:
    """[B] example weights w with mean_i w_i l_i = sum_k P(z_k) mean_{i in k} l_i.

        w_i = B * P(z_k(i)) / n_k(i)         (P renormalised over the groups present)
    """
    is_head = tf.cast(is_head, tf.float32)
    batch = tf.cast(tf.size(is_head), tf.float32)
    counts = tf.stack([batch - tf.reduce_sum(is_head), tf.reduce_sum(is_head)])     # [tail, head]
    shares = tf.constant([1.0 - head_share, head_share]) * tf.cast(counts > 0, tf.float32)
    shares /= tf.reduce_sum(shares)
    per_group = batch * tf.math.divide_no_nan(shares, counts)
    return tf.gather(per_group, tf.cast(is_head, tf.int32))


@tf.keras.utils.register_keras_serializable(package="poso")
class PluginTowers(tf.keras.layers.Layer):
    """A task's tail and head plugin towers, run as one computation; row i gets its group's.

    Group k's tower (k = TAIL 0, HEAD 1; `units` = u_1..u_L hidden widths):

        h^0 = x,   h^l = relu(h^{l-1} W_k^l + b_k^l)   (l = 1..L),   p = sigmoid(h^L W_k^{L+1} + b_k^{L+1})

    Fused, with g_i the row's group, e_i = onehot(g_i) [B, 2] and M^l_i [B, 2 u_l] the row's
    e_i with each entry repeated u_l times (1 on its group's units, 0 on the other's):

        layer 1:   H^1 = act(x [W_0^1 | W_1^1] + [b_0^1 | b_1^1])        both groups' units, one MatMul
                   Z^1 = H^1 * M^1                                        the other group's zeroed
        layer l>1: h^l = act([Z^{l-1}, e] [W_0^l; W_1^l; b_0^l; b_1^l])   [B, u_l]: the row's group's
                   Z^l = [h^l, h^l] * M^l

    (act = relu, sigmoid at the output; with no hidden layer p = sigmoid(sum(H^1 * e, axis=1)).)
    Zeros times the other group's weights add exactly nothing, so p_i is group g_i's tower's
    output, and a row's loss has zero gradient on the other group's weights: their inputs are
    that row's zeros (M, e), as with two towers and a per-row select. Each layer's weights are
    one variable, the tail's block then the head's (layer 1: `layer_0_kernel` [d, 2 u_1] and
    `layer_0_bias` [2 u_1]; layer l > 1: `layer_{l-1}_weights` [2 u_{l-1} + 2, u_l], the bias
    rows last); `tower_weights(k)` gives group k's (W_k^l, b_k^l). Initialised as two Dense
    towers are: each W_k^l Glorot-uniform over its own [fan_in, fan_out], biases zero.
    """

    def __init__(self, units: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.units = tuple(int(u) for u in units)
        self._widths = self.units + (1,)  # every layer's width, the output's last

    def build(self, input_shape):
        fan_in = int(input_shape[-1])
        self.first_kernel = self.add_weight(
            name="layer_0_kernel", shape=[fan_in, 2 * self._widths[0]],
            initializer=_glorot_blocks(fan_in, self._widths[0]))
        self.first_bias = self.add_weight(name="layer_0_bias", shape=[2 * self._widths[0]], initializer="zeros")
        # Layer l > 1: the two groups' kernels stacked, then the two biases as rows.
        self.stacked = [
            self.add_weight(name=f"layer_{index}_weights", shape=[2 * n_in + 2, n_out],
                            initializer=_glorot_blocks(n_in, n_out, stacked=True))
            for index, (n_in, n_out) in enumerate(zip(self._widths, self._widths[1:]), start=1)]
        super().build(input_shape)

    def call(self, inputs: tf.Tensor, is_head: tf.Tensor) -> tf.Tensor:
        """x [B, d], is_head [B] bool -> p [B, 1]."""
        groups = tf.one_hot(tf.cast(is_head, tf.int32), 2, dtype=inputs.dtype)  # e [B, 2]
        last = len(self._widths) - 1
        hidden = tf.nn.bias_add(tf.matmul(inputs, self.first_kernel), self.first_bias)
        if last == 0:
            return tf.sigmoid(tf.reduce_sum(hidden * groups, axis=1, keepdims=True))
        hidden = tf.nn.relu(hidden) * _unit_mask(groups, self._widths[0])
        for index, weights in enumerate(self.stacked, start=1):
            logits = tf.matmul(tf.concat([hidden, groups], axis=1), weights)
            if index == last:
                return tf.sigmoid(logits)
            hidden = tf.concat([tf.nn.relu(logits)] * 2, axis=1) * _unit_mask(groups, self._widths[index])

    def tower_weights(self, group: int, values: Optional[Sequence[Any]] = None) -> List[Tuple[Any, Any]]:
        """Group `group`'s [(W^l, b^l)] for l = 1..L+1, sliced from `values` (tensors shaped like
        the layer's `weights`, e.g. their gradients; default: the weights)."""
        first_kernel, first_bias, *stacked = self.weights if values is None else values
        n = self._widths[0]
        layers = [(first_kernel[:, group * n:(group + 1) * n], first_bias[group * n:(group + 1) * n])]
        for weights, n_in in zip(stacked, self._widths):
            layers.append((weights[group * n_in:(group + 1) * n_in], weights[2 * n_in + group]))
        return layers

    def matmul_macs(self) -> int:
        """Multiply-adds per example of the MatMuls that run (both groups' blocks, the bias rows)."""
        return sum(int(np.prod(w.shape)) for w in [self.first_kernel, *self.stacked])

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config["units"] = list(self.units)
        return config


def _unit_mask(groups: tf.Tensor, units: int) -> tf.Tensor:
    """M [B, 2 units]: e's tail column repeated `units` times, then its head column."""
    return tf.gather(groups, [TAIL] * units + [HEAD] * units, axis=1)


def _glorot_blocks(fan_in: int, fan_out: int, stacked: bool = False):
    """Initializer of a fused layer's variable: uniform +-sqrt(6 / (fan_in + fan_out)) -- each
    group's block Glorot-uniform over its own fans, as a Dense layer's kernel -- and, when
    `stacked`, the two bias rows (last) zero."""
    limit = (6.0 / (fan_in + fan_out)) ** 0.5

    def initialize(shape, dtype=None, **kwargs):
        del kwargs
        kernels = tf.keras.initializers.RandomUniform(-limit, limit)(
            [shape[0] - 2, shape[1]] if stacked else shape, dtype or tf.float32)
        return tf.concat([kernels, tf.zeros([2, shape[1]], kernels.dtype)], axis=0) if stacked else kernels

    return initialize


# Examples are drawn from the two streams in runs of this many, not one by one: tf.data's
# per-element work (unbatch, filter, sample_from_datasets over single examples) took longer than
# the training step (PIN trained in 2.6x the baseline's time in benchmarks.paper).
STRATUM_RUN = 16


def stratify(batches: tf.data.Dataset, batch_size: int, feature_set: fs.FeatureSet, head_min_pc_bucket: int,
             seed: int = 0, run: int = STRATUM_RUN) -> tf.data.Dataset:
    """Re-batches batches of transformed features so that each run of `run` consecutive examples
    comes from the head or the tail stream with probability 1/2 (until one stream ends; the other
    then fills the batches). Batches are split by group and re-cut into runs (`rebatch`), never
    unbatched, and `batch_size / run` runs make a batch; `run` shrinks to the largest divisor of
    `batch_size` not above it (slower when that is small). On a finite stream each group's last,
    shorter run is kept, so a batch may hold fewer examples.

    The runs are stacked (`ragged_batch`) and flattened rather than re-cut by a second `rebatch`,
    which logs "Tensor RefCount not reliable if buf_ points to a SubBuffer" for every slice of
    the first (about 200 lines a training step) at the same speed."""
    divisor = max(r for r in range(1, min(run, batch_size) + 1) if batch_size % r == 0)
    if divisor < run and batch_size >= run:
        _log.warning("PIN: batch size %d is not a multiple of %d: strata alternate in runs of %d examples "
                     "(slower input)", batch_size, run, divisor)
    run = divisor

    def group(head: bool) -> tf.data.Dataset:
        def rows(batch):
            mask = head_mask(batch, feature_set, head_min_pc_bucket)
            return {name: tf.boolean_mask(value, mask if head else ~mask) for name, value in batch.items()}
        return batches.map(rows, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).rebatch(run)

    def flatten(runs):  # [runs, (run), ...] -> [examples, ...]
        return {name: value.flat_values if isinstance(value, tf.RaggedTensor)
                else tf.reshape(value, tf.concat([[-1], tf.shape(value)[2:]], 0)) for name, value in runs.items()}

    mixed = tf.data.Dataset.sample_from_datasets([group(False), group(True)], weights=[0.5, 0.5], seed=seed)
    return (mixed.ragged_batch(batch_size // run)
            .map(flatten, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE))


def head_share(batches: tf.data.Dataset, feature_set: fs.FeatureSet, head_min_pc_bucket: int,
               max_batches: int = 100) -> float:
    """P(head): the head's share of the examples in the first `max_batches` batches."""
    head = total = 0
    for batch in batches.take(max_batches):
        mask = head_mask(batch, feature_set, head_min_pc_bucket)
        head += int(tf.reduce_sum(tf.cast(mask, tf.int64)))
        total += int(tf.size(mask))
    if total == 0:
        raise ValueError("pin.head_share: the training data has no examples")
    return head / total


def training_data(batches: tf.data.Dataset, config: Any, batch_size: int, feature_set: fs.FeatureSet,
                  seed: int = 0) -> Tuple[tf.data.Dataset, Any]:
    """PIN's training input for a `ModelConfig` with `pin`: (stratified batches, the config with
    P(head) measured on `batches` -- its first 100 batches -- unless configured). What the Trainer
    and the benchmarks train on.

    When those batches hold only one group (e.g. a window whose users are all new), the batches
    are returned as they are: there is nothing to stratify, and stratifying repeated data would
    wait forever for an example of the absent group.
    """
    measured = head_share(batches, feature_set, config.pin_head_min_pc_bucket)
    if config.pin_head_share is None:
        _log.info("PIN: P(head) = %.4f measured on the training data", measured)
        config = config.replace(pin_head_share=measured)
    if measured in (0.0, 1.0):
        _log.warning("PIN: the training data hold only %s users: batches not stratified",
                     "head" if measured else "tail")
        return batches, config
    return stratify(batches, batch_size, feature_set, config.pin_head_min_pc_bucket, seed), config
