"""Adam, with TensorFlow's fused kernel doing each variable's update.

tf_keras' Adam writes the update as separate TensorFlow ops. For an embedding table's sparse
gradient it decays m and v over the whole table, scatters the batch's rows in, then updates every
row of the table: about nine passes over each table, each with its own temporary, every step.
With the tables of `feature_specs` (about 3.5M embedding weights) that was over a quarter of the
ranking model's training step on these CPUs (`bin/poso bench train`).

`FusedAdam` computes the same update,

    m <- m + (1 - beta_1) (g - m)
    v <- v + (1 - beta_2) (g^2 - v)
    w <- w - lr sqrt(1 - beta_2^t) / (1 - beta_1^t) * m / (sqrt(v) + epsilon)

with `ResourceApplyAdam`, one multi-threaded pass per variable (what TF 1's AdamOptimizer ran). A
sparse gradient is made dense first (duplicate rows summed, as tf_keras' scatter_add sums them), so
the rows a batch does not touch decay exactly as tf_keras decays them: this is Adam, not LazyAdam.
Anything the kernel does not do (amsgrad, adaptive epsilon) falls back to tf_keras' own step.
Weight decay, clipping and EMA happen outside `update_step`, in the base class, unchanged.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = ["FusedAdam"]


@tf.keras.utils.register_keras_serializable(package="poso")
class FusedAdam(tf.keras.optimizers.Adam):
    """tf_keras' Adam (same arguments, same math) with one fused kernel per variable update."""

    def update_step(self, gradient, variable):
        if self.amsgrad or getattr(self, "adaptive_epsilon", False):
            return super().update_step(gradient, variable)
        if isinstance(gradient, tf.IndexedSlices):
            gradient = tf.convert_to_tensor(gradient)
        index = self._index_dict[self._var_key(variable)]
        dtype = variable.dtype
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        return tf.raw_ops.ResourceApplyAdam(
            var=variable.handle, m=self._momentums[index].handle, v=self._velocities[index].handle,
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(self.learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=gradient, use_locking=False)
