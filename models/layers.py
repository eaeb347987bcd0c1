"""POSO personalized modules and their plain counterparts (Keras 2 layers).

POSO (Dai et al. 2021, "POSO: Personalized Cold Start Modules for Large-scale
Recommender Systems") multiplies the outputs of ordinary modules by
*personalized gates*: small networks that read a personalization code `pc`
(for example user-activity features) and output values in (0, C):

    g(pc) = C * sigmoid(W2 relu(W1 pc + b1) + b2)                        (gate)

With C = 2 an untrained gate outputs about 1, so a POSO module starts out close
to its plain counterpart (at its output scale; tests/test_layers.py measures it)
and learns per-user-group deviations from it. POSO(MHA) needs one more step for
that: its N value projections start at 1/sqrt(N) of the usual scale, since their
sum would otherwise start sqrt(N) times too large (see `PosoMultiHeadAttention`).

Layers here:

* `PersonalizedGate`: the gate above; `PersonalizedGates`: several independent
  gates reading the same code, computed together (cheaper to train).
* `MLP` / `PosoMLP` (Eq. 11):      x_{l+1} = g_l(pc) * act(W_l x_l + b_l).
* `MultiHeadAttention` / `PosoMultiHeadAttention` (Eq. 14): target attention of
  the non-sequential features over a behaviour sequence, with gated keys and a
  gated mixture of value projections.
* `MMoE` / `PosoMMoE` (Eq. 17):    y_t = sum_i softmax(W_t x)_i * g_i(pc) * E_i(x).
* `FeatureGatedMoE`: a mixture of MLP experts gated on all features, a
  drop-in for `MLP` (not the paper's Table 6 "All features" row, which is POSO
  with all features as the code: `models.model`'s pc_source "all_features").

Every layer takes `pc` as a keyword argument, so plain and POSO variants are
interchangeable (plain layers ignore `pc`), and every layer has
`gates(pc) -> Dict[str, tf.Tensor]` (empty for plain layers) for inspecting the
personalized gates, e.g. against user activity (the paper's Fig. 4). A POSO
layer can instead be handed its gates precomputed (`gates=`, widths
`gate_units`), so that a model computes the gates of all its POSO layers with
one `PersonalizedGates`, as `models.model.RankingModel` does.
`make_mlp`, `make_attention` and `make_mmoe` build a layer from a kind name.
"""

import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

__all__ = [
    "PersonalizedGates",
    "PersonalizedGate",
    "MLP",
    "PosoMLP",
    "FeatureGatedMoE",
    "MultiHeadAttention",
    "PosoMultiHeadAttention",
    "MMoE",
    "PosoMMoE",
    "make_mlp",
    "make_attention",
    "make_mmoe",
    "MLP_KINDS",
    "ATTENTION_KINDS",
    "MMOE_KINDS",
]

_SERIALIZATION_PACKAGE = "poso"


# --------------------------------------------------------------------------
# Argument and input checks shared by all layers.
# --------------------------------------------------------------------------


def _describe(layer: tf.keras.layers.Layer) -> str:
    return f"{type(layer).__name__} '{layer.name}'"


def _positive_int(value: Any, argument: str, layer: tf.keras.layers.Layer) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"{_describe(layer)}: `{argument}` must be a positive integer, got {value!r}."
        )
    return int(value)


def _positive_float(value: Any, argument: str, layer: tf.keras.layers.Layer) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(
            f"{_describe(layer)}: `{argument}` must be a positive finite number, "
            f"got {value!r}."
        )
    return float(value)


def _positive_int_tuple(
    values: Any, argument: str, layer: tf.keras.layers.Layer
) -> Tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(
            f"{_describe(layer)}: `{argument}` must be a non-empty sequence of "
            f"positive integers, got {values!r}."
        )
    return tuple(_positive_int(value, argument, layer) for value in values)


def _tensor_of_rank(
    value: Any, rank: int, argument: str, shape_doc: str, layer: tf.keras.layers.Layer
) -> tf.Tensor:
    """Converts `value` to a tensor and checks its (static) rank."""
    tensor = tf.convert_to_tensor(value)
    if tensor.shape.rank is not None and tensor.shape.rank != rank:
        raise ValueError(
            f"{_describe(layer)}: `{argument}` must have shape {shape_doc}, "
            f"got shape {tensor.shape}."
        )
    return tensor


def _required_pc(pc: Any, layer: tf.keras.layers.Layer) -> tf.Tensor:
    if pc is None:
        raise ValueError(
            f"{_describe(layer)} needs the personalization code: call it with "
            "`pc=<tensor of shape [batch, pc_dim]>`."
        )
    return _tensor_of_rank(pc, 2, "pc", "[batch, pc_dim]", layer)


def _serialize_activation(activation: Any) -> Any:
    return tf.keras.activations.serialize(activation)


# --------------------------------------------------------------------------
# The personalized gate.
# --------------------------------------------------------------------------


def _glorot_uniform_blocks(
    block_shapes: Sequence[Tuple[int, int]], axis: int, scale: float = 1.0
):
    """Initializer of kernels [fan_in, fan_out] concatenated along `axis`, each
    Glorot-uniform for its own shape, times `scale`.

    Several kernels kept in one variable must start out as they would one by one
    (Keras' Dense default), not as one big kernel whose fans are the sums of theirs.
    """

    def initializer(shape, dtype=None, **kwargs):
        del shape, kwargs  # The blocks define the shape.
        # A new initializer per block: an unseeded one returns the same values on every call.
        blocks = [
            scale * tf.keras.initializers.GlorotUniform()(block_shape, dtype=dtype)
            for block_shape in block_shapes
        ]
        return tf.concat(blocks, axis=axis)

    return initializer


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class PersonalizedGates(tf.keras.layers.Layer):
    """n independent personalized gates that read the same code, computed together:

        g_j(pc) = C * sigmoid(W2_j relu(W1_j pc + b1_j) + b2_j),   j = 1..n

    Gate j has its own hidden layer (`hidden_units` wide) and output layer
    (`units[j]` wide); no weight is shared between gates. They are computed as
    one network: the hidden layers side by side, W1 = [W1_1 .. W1_n], and the
    output layer block-diagonal, diag(W2_1 .. W2_n), each block multiplied on its
    own. All parameters live in one variable, `parameters`: W1 [pc_dim, n*h],
    b1 [n*h], W2 = [W2_1 .. W2_n] [h, sum(units)] and b2 [sum(units)], flattened
    row-major in that order (`gate_weights(j)` reads gate j's). Why: tf_keras'
    Adam spends some 37 graph ops per variable per step, more than these small
    layers' own arithmetic, so n gates as n layers of 4 variables each made up
    most of POSO's training-step overhead.

    Outputs lie in (0, C) (in [0, C] once the sigmoid saturates in floating
    point). With the default C = 2 an untrained gate outputs about 1 (mean 1: the
    logits start symmetric about 0), so a module it scales starts at its ungated
    counterpart's output scale (for POSO(MHA) see `PosoMultiHeadAttention`).

    A one-hot code (a bucket, as the default bucketized AVC is) takes only
    pc_dim values, so with `one_hot_code` each gate is computed once per batch
    and code, a table T_j = g_j(I) [pc_dim, units_j] with row k = g_j(e_k), and
    each example gathers its code's row, T_j[argmax pc]: for one-hot pc exactly
    g_j(pc), with no multiply-add per example (`gate_macs`).

    Args:
      units: Output width of each gate (the width of what it scales).
      hidden_units: Width of each gate's hidden ReLU layer.
      scale: C, the upper bound of the gates.
      stop_gradient: Do not back-propagate into `pc`. Use this when `pc`
        contains ID embeddings that the gates should read but not train.
      one_hot_code: Every row of `pc` is one-hot: compute the gates per code
        (see above). For any other `pc` the result is not g(pc).

    Call arguments:
      pc: Personalization code, [batch, pc_dim].

    Returns:
      A list of n tensors, gate j's of shape [batch, units[j]].
    """

    def __init__(
        self,
        units: Sequence[int],
        hidden_units: int = 32,
        scale: float = 2.0,
        stop_gradient: bool = False,
        one_hot_code: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.gate_units = _positive_int_tuple(units, "units", self)
        self.hidden_units = _positive_int(hidden_units, "hidden_units", self)
        self.scale = _positive_float(scale, "scale", self)
        self.stop_gradient = bool(stop_gradient)
        self.one_hot_code = bool(one_hot_code)

    @property
    def num_gates(self) -> int:
        return len(self.gate_units)

    def build(self, input_shape):
        pc_dim = tf.TensorShape(input_shape)[-1]
        if pc_dim is None:
            raise ValueError(
                f"{_describe(self)}: the last dimension of `pc` must be known, "
                f"got shape {input_shape}."
            )
        hidden, width = self.hidden_units, sum(self.gate_units)
        self._part_shapes = (  # W1, b1, W2 (W2_1 .. W2_n side by side), b2
            (pc_dim, self.num_gates * hidden),
            (self.num_gates * hidden,),
            (hidden, width),
            (width,),
        )
        hidden_kernel_init = _glorot_uniform_blocks([(pc_dim, hidden)] * self.num_gates, axis=1)
        logit_kernel_init = _glorot_uniform_blocks(
            [(hidden, units) for units in self.gate_units], axis=1
        )

        def initializer(shape, dtype=None, **kwargs):
            del shape, kwargs
            parts = [
                hidden_kernel_init(None, dtype),
                tf.zeros(self._part_shapes[1], dtype),
                logit_kernel_init(None, dtype),
                tf.zeros(self._part_shapes[3], dtype),
            ]
            return tf.concat([tf.reshape(part, [-1]) for part in parts], axis=0)

        # One variable for all of W1, b1, W2, b2 (see the class docstring).
        self.parameters = self.add_weight(
            "parameters",
            shape=(sum(int(np.prod(shape)) for shape in self._part_shapes),),
            initializer=initializer,
        )
        super().build(input_shape)

    def _parts(self) -> List[tf.Tensor]:
        """[W1, b1, W2, b2] (the gates' blocks side by side) from the one variable."""
        sizes = [int(np.prod(shape)) for shape in self._part_shapes]
        parts = tf.split(self.parameters, sizes)
        return [tf.reshape(part, shape) for part, shape in zip(parts, self._part_shapes)]

    def _output_columns(self) -> List[Tuple[int, int]]:
        ends = np.cumsum(self.gate_units).tolist()
        return list(zip([0] + ends[:-1], ends))

    def call(self, pc: tf.Tensor) -> List[tf.Tensor]:
        pc = _tensor_of_rank(pc, 2, "pc", "[batch, pc_dim]", self)
        pc = tf.cast(pc, self.compute_dtype)
        if self.stop_gradient:
            pc = tf.stop_gradient(pc)
        if self.one_hot_code:
            # Row k of gate j's table is g_j(e_k); a one-hot pc selects its row. The code is an
            # input, never trained through, so the lookup needs no gradient with respect to it.
            tables = self._evaluate(tf.eye(self._pc_dim(), dtype=pc.dtype))
            codes = tf.argmax(pc, axis=1)
            return [tf.gather(table, codes) for table in tables]
        return self._evaluate(pc)

    def _evaluate(self, pc: tf.Tensor) -> List[tf.Tensor]:
        """The equation, evaluated on every row of `pc`."""
        hidden_kernel, hidden_bias, logit_kernel, logit_bias = self._parts()
        hidden = tf.nn.relu(tf.matmul(pc, hidden_kernel) + hidden_bias)
        if self.num_gates == 1:
            return [self.scale * tf.sigmoid(tf.matmul(hidden, logit_kernel) + logit_bias)]
        # [h_1 .. h_n] diag(W2_1 .. W2_n) one block at a time: a dense product with the
        # block-diagonal matrix would multiply n times as many weights, mostly zeros.
        logits = tf.concat(
            [
                tf.matmul(gate_hidden, kernel)
                for gate_hidden, kernel in zip(
                    tf.split(hidden, self.num_gates, axis=1),
                    tf.split(logit_kernel, self.gate_units, axis=1),
                )
            ],
            axis=1,
        )
        gates = self.scale * tf.sigmoid(logits + logit_bias)
        return tf.split(gates, self.gate_units, axis=1)

    def gate_weights(self, index: int) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """(W1_j, b1_j, W2_j, b2_j) of gate j = `index`, as in the equation."""
        if not 0 <= index < self.num_gates:
            raise IndexError(f"{_describe(self)} has {self.num_gates} gate(s), no gate {index}")
        hidden = slice(index * self.hidden_units, (index + 1) * self.hidden_units)
        output = slice(*self._output_columns()[index])
        hidden_kernel, hidden_bias, logit_kernel, logit_bias = self._parts()
        return (
            hidden_kernel[:, hidden],
            hidden_bias[hidden],
            logit_kernel[:, output],
            logit_bias[output],
        )

    def _pc_dim(self) -> int:
        if not self.built:
            raise ValueError(f"{_describe(self)} is not built; call it on a `pc` first")
        return self._part_shapes[0][0]

    def gate_parameter_counts(self) -> List[int]:
        """Parameters of each gate: pc_dim * h + h + h * units_j + units_j."""
        pc_dim, hidden = self._pc_dim(), self.hidden_units
        return [pc_dim * hidden + hidden + hidden * units + units for units in self.gate_units]

    def gate_macs(self) -> List[int]:
        """Multiply-adds per example of each gate as it runs: the equation, pc_dim * h + h * units_j;
        with `one_hot_code` 0, a row lookup (its tables cost `gate_table_macs` per batch)."""
        if self.one_hot_code:
            return [0] * self.num_gates
        return self.equation_macs()

    def equation_macs(self) -> List[int]:
        """Multiply-adds of each gate's equation on one code: pc_dim * h + h * units_j."""
        pc_dim, hidden = self._pc_dim(), self.hidden_units
        return [pc_dim * hidden + hidden * units for units in self.gate_units]

    def gate_table_macs(self) -> List[int]:
        """Multiply-adds per batch of each gate's table with `one_hot_code` (the equation on
        each of the pc_dim codes), else 0."""
        if not self.one_hot_code:
            return [0] * self.num_gates
        return [self._pc_dim() * macs for macs in self.equation_macs()]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            units=list(self.gate_units),
            hidden_units=self.hidden_units,
            scale=self.scale,
            stop_gradient=self.stop_gradient,
            one_hot_code=self.one_hot_code,
        )
        return config


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class PersonalizedGate(PersonalizedGates):
    """Personalized gate: g(pc) = C * sigmoid(W2 relu(W1 pc + b1) + b2).

    `PersonalizedGates` with one gate, returning its tensor rather than a list.

    Args:
      units: Width of the gate output (the width of what it scales).
      hidden_units: Width of the hidden ReLU layer (W1).
      scale: C, the upper bound of the gate.
      stop_gradient: Do not back-propagate into `pc`.
      one_hot_code: `pc` is one-hot: compute the gate once per code.

    Call arguments:
      pc: Personalization code, [batch, pc_dim].

    Returns:
      [batch, units] gate values in (0, C).
    """

    def __init__(
        self,
        units: int,
        hidden_units: int = 32,
        scale: float = 2.0,
        stop_gradient: bool = False,
        one_hot_code: bool = False,
        **kwargs,
    ):
        super().__init__(
            [units],
            hidden_units=hidden_units,
            scale=scale,
            stop_gradient=stop_gradient,
            one_hot_code=one_hot_code,
            **kwargs,
        )

    @property
    def units(self) -> int:
        return self.gate_units[0]

    def call(self, pc: tf.Tensor) -> tf.Tensor:
        return super().call(pc)[0]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config["units"] = self.units
        return config


class _PersonalizedGatesMixin:
    """What the POSO layers share: their gates are one `PersonalizedGates`, `gate_network`.

    A POSO layer computes its gates from `pc`, or is handed them precomputed
    (`gates=`, one tensor per entry of `gate_units`): a model with several POSO
    layers can compute all of their gates with one `PersonalizedGates`, which
    is the same function at a fraction of the training-step cost. The layer's
    own `gate_network` is then never called, so it never creates variables.
    """

    # Names of the layer's gates, in `gate_units` order (the keys of `gates(pc)`).
    gate_names: Tuple[str, ...] = ()

    def _set_gate_options(self, hidden_units: int, scale: float, stop_gradient: bool):
        self.gate_hidden_units = _positive_int(hidden_units, "gate_hidden_units", self)
        self.gate_scale = _positive_float(scale, "gate_scale", self)
        self.gate_stop_gradient = bool(stop_gradient)

    def _make_gate_network(self, units: Sequence[int]) -> None:
        self.gate_network = PersonalizedGates(
            units,
            hidden_units=self.gate_hidden_units,
            scale=self.gate_scale,
            stop_gradient=self.gate_stop_gradient,
            name="gates",
        )

    @property
    def gate_units(self) -> Tuple[int, ...]:
        """Output width of each of the layer's gates."""
        return self.gate_network.gate_units

    def _gate_values(self, pc: Any, gates: Optional[Sequence[tf.Tensor]]) -> List[tf.Tensor]:
        if gates is None:
            return self.gate_network(_required_pc(pc, self))
        gates = list(gates)
        widths = [gate.shape[-1] for gate in gates]
        if len(gates) != len(self.gate_units) or any(
            width is not None and width != units for width, units in zip(widths, self.gate_units)
        ):
            raise ValueError(
                f"{_describe(self)}: `gates` must be {len(self.gate_units)} tensors of widths "
                f"{list(self.gate_units)} ({', '.join(self.gate_names)}), got widths {widths}."
            )
        return gates

    def _named_gates(self, pc: Any, gates: Any) -> Dict[str, tf.Tensor]:
        return dict(zip(self.gate_names, self._gate_values(pc, gates)))

    def gates(self, pc: Any) -> Dict[str, tf.Tensor]:
        """The layer's own gate outputs by name (see `gate_names`), each [batch, units]."""
        return self._named_gates(pc, None)

    def _gate_config(self) -> Dict[str, Any]:
        return {
            "gate_hidden_units": self.gate_hidden_units,
            "gate_scale": self.gate_scale,
            "gate_stop_gradient": self.gate_stop_gradient,
        }


class _UngatedMixin:
    """The plain layers' side of the POSO layers' interface: no gates."""

    gate_names: Tuple[str, ...] = ()
    gate_units: Tuple[int, ...] = ()

    def _named_gates(self, pc: Any, gates: Any) -> Dict[str, tf.Tensor]:
        del pc, gates  # `pc` and `gates` are accepted and ignored.
        return {}

    def gates(self, pc: Any) -> Dict[str, tf.Tensor]:
        """Personalized gate outputs by name: none, this layer has no gates."""
        return self._named_gates(pc, None)


# --------------------------------------------------------------------------
# MLP and POSO(MLP).
# --------------------------------------------------------------------------


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class MLP(_UngatedMixin, tf.keras.layers.Layer):
    """Fully connected stack: x_{l+1} = act(W_l x_l + b_l), l = 0..len(units)-1.

    Every layer, the last included, is activated; the model adds its own
    output head.

    Args:
      units: Width of each layer.
      activation: Activation of every layer (name or callable).

    Call arguments:
      x: [batch, input_dim].
      pc, gates: Ignored; accepted so that `MLP` and `PosoMLP` are
        interchangeable.

    Returns:
      [batch, units[-1]].
    """

    def __init__(self, units: Sequence[int], activation: Any = "relu", **kwargs):
        super().__init__(**kwargs)
        self.units = _positive_int_tuple(units, "units", self)
        self.activation = tf.keras.activations.get(activation)
        self.dense_layers = [
            tf.keras.layers.Dense(width, activation=self.activation, name=f"dense_{i}")
            for i, width in enumerate(self.units)
        ]

    def call(
        self,
        x: tf.Tensor,
        pc: Optional[tf.Tensor] = None,
        gates: Optional[Sequence[tf.Tensor]] = None,
    ) -> tf.Tensor:
        x = _tensor_of_rank(x, 2, "x", "[batch, input_dim]", self)
        layer_gates = list(self._named_gates(pc, gates).values())  # none for the plain MLP
        for index, dense in enumerate(self.dense_layers):
            x = dense(x)
            if layer_gates:
                x = layer_gates[index] * x
        return x

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            units=list(self.units), activation=_serialize_activation(self.activation)
        )
        return config


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class PosoMLP(_PersonalizedGatesMixin, MLP):
    """POSO(MLP), Eq. 11: x_{l+1} = g_l(pc) * act(W_l x_l + b_l).

    Each layer's activated output is multiplied element-wise by its own
    personalized gate g_l of the same width; all gates read the same raw
    personalization code (one `PersonalizedGates` holds them).

    Args:
      units: Width of each layer.
      activation: Activation of every layer.
      gate_hidden_units: Hidden width of each gate.
      gate_scale: C, the gates' upper bound.
      gate_stop_gradient: Do not back-propagate from the gates into `pc`.

    Call arguments:
      x: [batch, input_dim].
      pc: Personalization code, [batch, pc_dim] (required unless `gates`).
      gates: Optional precomputed gate values, one [batch, units[l]] per layer
        (see `_PersonalizedGatesMixin`).

    Returns:
      [batch, units[-1]].
    """

    def __init__(
        self,
        units: Sequence[int],
        activation: Any = "relu",
        gate_hidden_units: int = 32,
        gate_scale: float = 2.0,
        gate_stop_gradient: bool = False,
        **kwargs,
    ):
        super().__init__(units, activation=activation, **kwargs)
        self._set_gate_options(gate_hidden_units, gate_scale, gate_stop_gradient)
        self._make_gate_network(self.units)
        self.gate_names = tuple(f"layer_{i}" for i in range(len(self.units)))

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(self._gate_config())
        return config


# --------------------------------------------------------------------------
# Mixtures of experts: MMoE, POSO(MMoE) and the feature-gated MoE.
# --------------------------------------------------------------------------


def _mix_experts(gate_weights: tf.Tensor, expert_outputs: tf.Tensor) -> tf.Tensor:
    """sum_i w_i E_i: [batch, experts] x [batch, experts, width] -> [batch, width]."""
    return tf.einsum("be,bed->bd", gate_weights, expert_outputs)


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class MMoE(_UngatedMixin, tf.keras.layers.Layer):
    """Multi-gate mixture of experts: y_t = sum_i softmax(W_t x)_i E_i(x).

    The experts E_i are `MLP`s shared by all tasks; each task t mixes them with
    its own softmax gate over the input features (W_t has no bias).

    Args:
      num_tasks: Number of tasks (outputs).
      num_experts: Number of experts.
      expert_units: Layer widths of each expert MLP.
      activation: Activation of the expert layers.

    Call arguments:
      x: [batch, input_dim].
      pc, gates: Ignored; accepted so that `MMoE` and `PosoMMoE` are
        interchangeable.

    Returns:
      A list of `num_tasks` tensors, each [batch, expert_units[-1]].
    """

    def __init__(
        self,
        num_tasks: int,
        num_experts: int = 4,
        expert_units: Sequence[int] = (64,),
        activation: Any = "relu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_tasks = _positive_int(num_tasks, "num_tasks", self)
        self.num_experts = _positive_int(num_experts, "num_experts", self)
        self.expert_units = _positive_int_tuple(expert_units, "expert_units", self)
        self.activation = tf.keras.activations.get(activation)
        self.experts = [
            MLP(self.expert_units, activation=self.activation, name=f"expert_{i}")
            for i in range(self.num_experts)
        ]
        self.task_gates = [
            tf.keras.layers.Dense(self.num_experts, use_bias=False, name=f"task_gate_{t}")
            for t in range(self.num_tasks)
        ]

    def call(
        self,
        x: tf.Tensor,
        pc: Optional[tf.Tensor] = None,
        gates: Optional[Sequence[tf.Tensor]] = None,
    ) -> List[tf.Tensor]:
        x = _tensor_of_rank(x, 2, "x", "[batch, input_dim]", self)
        expert_outputs = tf.stack([expert(x) for expert in self.experts], axis=1)
        expert_gates = self._named_gates(pc, gates).get("experts")  # [batch, experts] or None
        outputs = []
        for task_gate in self.task_gates:
            weights = tf.nn.softmax(task_gate(x), axis=-1)
            if expert_gates is not None:
                # sum_i w_i (g_i E_i) = sum_i (w_i g_i) E_i: scaling the task's mixing
                # weights gives Eq. 17 without scaling every expert output element.
                weights = weights * expert_gates
            outputs.append(_mix_experts(weights, expert_outputs))
        return outputs

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            num_tasks=self.num_tasks,
            num_experts=self.num_experts,
            expert_units=list(self.expert_units),
            activation=_serialize_activation(self.activation),
        )
        return config


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class PosoMMoE(_PersonalizedGatesMixin, MMoE):
    """POSO(MMoE), Eq. 17: y_t = sum_i softmax(W_t x)_i * g_i(pc) * E_i(x).

    Every expert's output is scaled by its own scalar personalized gate g_i(pc)
    (one personalized gate with `num_experts` outputs) before the per-task
    softmax gates mix the experts. Computed as sum_i (w_ti g_i) E_i: the same
    sum, with the gates scaling each task's mixing weights w_t rather than every
    element of every expert output.

    Args:
      num_tasks, num_experts, expert_units, activation: As for `MMoE`.
      gate_hidden_units: Hidden width of the personalized gate.
      gate_scale: C, the gate's upper bound.
      gate_stop_gradient: Do not back-propagate from the gate into `pc`.

    Call arguments:
      x: [batch, input_dim].
      pc: Personalization code, [batch, pc_dim] (required unless `gates`).
      gates: Optional precomputed gate values, [[batch, num_experts]] (see
        `_PersonalizedGatesMixin`).

    Returns:
      A list of `num_tasks` tensors, each [batch, expert_units[-1]].
    """

    gate_names = ("experts",)

    def __init__(
        self,
        num_tasks: int,
        num_experts: int = 4,
        expert_units: Sequence[int] = (64,),
        activation: Any = "relu",
        gate_hidden_units: int = 32,
        gate_scale: float = 2.0,
        gate_stop_gradient: bool = False,
        **kwargs,
    ):
        super().__init__(
            num_tasks,
            num_experts=num_experts,
            expert_units=expert_units,
            activation=activation,
            **kwargs,
        )
        self._set_gate_options(gate_hidden_units, gate_scale, gate_stop_gradient)
        self._make_gate_network([self.num_experts])  # g_1(pc) .. g_N(pc), one per expert

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(self._gate_config())
        return config


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class FeatureGatedMoE(_UngatedMixin, tf.keras.layers.Layer):
    """Mixture of MLP experts gated on all features: y = sum_i softmax(W_g x)_i E_i(x).

    Like POSO it mixes several sub-networks, but with a softmax over full MLP
    experts gated on the whole input instead of personalized gates on a code
    (so it is not the paper's Table 6 "All features" row, which keeps POSO's
    gates and feeds them all features). A drop-in replacement for `MLP`; it is
    a single-task `MMoE` whose experts have the MLP's widths.

    Args:
      units: Layer widths of each expert MLP.
      num_experts: Number of experts.
      activation: Activation of the expert layers.

    Call arguments:
      x: [batch, input_dim].
      pc, gates: Ignored; accepted so that it is interchangeable with
        `MLP`/`PosoMLP`.

    Returns:
      [batch, units[-1]].
    """

    def __init__(
        self,
        units: Sequence[int],
        num_experts: int = 4,
        activation: Any = "relu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.units = _positive_int_tuple(units, "units", self)
        self.num_experts = _positive_int(num_experts, "num_experts", self)
        self.activation = tf.keras.activations.get(activation)
        self.mixture = MMoE(
            num_tasks=1,
            num_experts=self.num_experts,
            expert_units=self.units,
            activation=self.activation,
            name="mixture",
        )

    def call(
        self,
        x: tf.Tensor,
        pc: Optional[tf.Tensor] = None,
        gates: Optional[Sequence[tf.Tensor]] = None,
    ) -> tf.Tensor:
        del pc, gates  # Gated on the features, not on the personalization code.
        x = _tensor_of_rank(x, 2, "x", "[batch, input_dim]", self)
        return self.mixture(x)[0]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(
            units=list(self.units),
            num_experts=self.num_experts,
            activation=_serialize_activation(self.activation),
        )
        return config


# --------------------------------------------------------------------------
# Multi-head target attention and POSO(MHA).
# --------------------------------------------------------------------------


def _pooled_sequence_per_head(
    queries: tf.Tensor,
    keys: tf.Tensor,
    sequence: tf.Tensor,
    mask: Optional[tf.Tensor],
    num_heads: int,
    head_dim: int,
) -> tf.Tensor:
    """Each head's attention-weighted sum of the raw sequence items.

    queries [B, H*d], keys [B, L, H*d], sequence [B, L, item_dim], mask [B, L]
    (True = real item) -> [B, H, item_dim]: P_h = sum_l a_hl S_l with
    a_h = softmax_l(q_h k_lh / sqrt(d)) over the real positions. Masked
    positions get zero weight; a row with no real position gets zeros.
    """
    batch_size, length = tf.shape(keys)[0], tf.shape(keys)[1]
    queries = tf.reshape(queries, [batch_size, num_heads, head_dim])
    keys = tf.reshape(keys, [batch_size, length, num_heads, head_dim])
    logits = tf.einsum("bhd,blhd->bhl", queries, keys) / tf.cast(
        math.sqrt(head_dim), queries.dtype
    )
    if mask is None:
        weights = tf.nn.softmax(logits, axis=-1)
    else:
        real = tf.cast(mask, tf.bool)
        # A finite fill (not -inf) keeps the softmax of fully padded rows
        # NaN-free (it is uniform there); zeroing the padded items then makes
        # those rows zero, and keeps padding that holds inf/NaN from leaking
        # through a zero weight (0 * inf = NaN).
        logits = tf.where(
            real[:, tf.newaxis, :], logits, tf.constant(logits.dtype.min, logits.dtype)
        )
        weights = tf.nn.softmax(logits, axis=-1)
        sequence = tf.where(real[:, :, tf.newaxis], sequence, tf.zeros_like(sequence))
    return tf.einsum("bhl,bli->bhi", weights, sequence)


class _SequenceAttention(tf.keras.layers.Layer):
    """Shared structure of the attention layers: Q = x W_q, K = S W_k, V from S.

    Values are linear in the sequence (V = S W_v, no bias or activation), so
    each head's output sum_l a_hl (S_l W_v)_h equals (sum_l a_hl S_l) W_v[:, h]:
    the sequence is pooled per head first and projected once per head, which
    costs item_dim * width per example instead of L * item_dim * width.
    Subclasses define the queries' personalization and the projection of the
    pooled items (`_personalize_queries`, `_project_values`), and get their
    gates by name (`_named_gates`) from a gates mixin.
    """

    def __init__(self, num_heads: int = 2, head_dim: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = _positive_int(num_heads, "num_heads", self)
        self.head_dim = _positive_int(head_dim, "head_dim", self)
        self.query_projection = tf.keras.layers.Dense(
            self.width, use_bias=False, name="query"
        )
        self.key_projection = tf.keras.layers.Dense(self.width, use_bias=False, name="key")

    @property
    def width(self) -> int:
        """Width of Q, K, V and of the output: num_heads * head_dim."""
        return self.num_heads * self.head_dim

    def call(
        self,
        query: tf.Tensor,
        sequence: tf.Tensor,
        mask: Optional[tf.Tensor] = None,
        pc: Optional[tf.Tensor] = None,
        gates: Optional[Sequence[tf.Tensor]] = None,
    ) -> tf.Tensor:
        query = _tensor_of_rank(query, 2, "query", "[batch, query_dim]", self)
        sequence = _tensor_of_rank(
            sequence, 3, "sequence", "[batch, length, item_dim]", self
        )
        if mask is not None:
            mask = _tensor_of_rank(mask, 2, "mask", "[batch, length] (bool)", self)
        named_gates = self._named_gates(pc, gates)
        pooled = _pooled_sequence_per_head(
            self._personalize_queries(self.query_projection(query), named_gates),
            self.key_projection(sequence),
            sequence,
            mask,
            self.num_heads,
            self.head_dim,
        )  # [batch, num_heads, item_dim]
        outputs = self._project_values(pooled, named_gates)  # [batch, num_heads, head_dim]
        return tf.reshape(outputs, [-1, self.width])

    def _per_head(self, kernel: tf.Tensor) -> tf.Tensor:
        """A value kernel [item_dim, width] as [item_dim, num_heads, head_dim]."""
        return tf.reshape(kernel, [-1, self.num_heads, self.head_dim])

    @staticmethod
    def _built_kernel(projection: tf.keras.layers.Dense, item_dim: int) -> tf.Variable:
        """The kernel of a value projection that is used as a matrix, not called."""
        if not projection.built:
            # Built here, not by __call__, so open its scope by hand: without it every
            # kernel would be named "<attention>/kernel" and checkpoints could not tell
            # them apart.
            with tf.name_scope(projection.name):
                projection.build(tf.TensorShape([None, item_dim]))
        return projection.kernel

    def _personalize_queries(self, queries: tf.Tensor, gates: Dict[str, tf.Tensor]) -> tf.Tensor:
        del gates  # Plain attention: shared queries.
        return queries

    def _project_values(self, pooled: tf.Tensor, gates: Dict[str, tf.Tensor]) -> tf.Tensor:
        """Each head's pooled items [batch, num_heads, item_dim] -> its values [batch, num_heads, head_dim]."""
        raise NotImplementedError(f"{type(self).__name__} must define its value projection")

    def compute_mask(self, inputs, mask=None):
        # `mask` masks the sequence, which the output no longer has: the output
        # is one pooled vector per row. Without this Keras would reject `mask`.
        return None

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(num_heads=self.num_heads, head_dim=self.head_dim)
        return config


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class MultiHeadAttention(_UngatedMixin, _SequenceAttention):
    """Multi-head target attention over a behaviour sequence.

    Q = x W_q, K = S W_k, V = S W_v (no biases); Q, K, V are split into
    `num_heads` heads of `head_dim`, each head computes
    softmax(Q_h K_h^T / sqrt(head_dim)) V_h over the real (unmasked) sequence
    positions, and the heads' outputs are concatenated.

    Args:
      num_heads: Number of heads.
      head_dim: Width of each head.

    Call arguments:
      query: Non-sequential features x, [batch, query_dim].
      sequence: Behaviour sequence S, [batch, length, item_dim].
      mask: Optional [batch, length] bool, True for real items. Padded positions
        do not affect the output; fully padded rows give zeros.
      pc, gates: Ignored; accepted so that it is interchangeable with
        `PosoMultiHeadAttention`.

    Returns:
      [batch, num_heads * head_dim].
    """

    def __init__(self, num_heads: int = 2, head_dim: int = 16, **kwargs):
        super().__init__(num_heads=num_heads, head_dim=head_dim, **kwargs)
        self.value_projection = tf.keras.layers.Dense(
            self.width, use_bias=False, name="value"
        )

    def _project_values(self, pooled: tf.Tensor, gates: Dict[str, tf.Tensor]) -> tf.Tensor:
        del gates
        kernel = self._built_kernel(self.value_projection, pooled.shape[-1])
        return tf.einsum("bhi,ihd->bhd", pooled, self._per_head(kernel))


@tf.keras.utils.register_keras_serializable(package=_SERIALIZATION_PACKAGE)
class PosoMultiHeadAttention(_PersonalizedGatesMixin, _SequenceAttention):
    """POSO(MHA), Eq. 14: multi-head target attention with personalized K and V.

        Q = x W_q
        K = G_k(pc) * (S W_k)                       (G_k broadcast over positions)
        V = sum_{i=1..N} g_i(pc) (S W_v^i)

    G_k is a personalized gate as wide as the keys; g_1..g_N are the N outputs
    of a second personalized gate (a scalar per value projection); one
    `PersonalizedGates` holds both. Attention itself is as in
    `MultiHeadAttention`.

    Start scale. Untrained gates are about 1 (C = 2, sigmoid(~0) = 1/2), so V
    starts as the sum of N projections. With every W_v^i drawn independently
    with zero mean, variances add: Var(sum_i S W_v^i) = N Var(S W_v^1), i.e.
    sqrt(N) times the output scale of plain attention (2x at N = 4). The paper
    (Eq. 14) is silent on this. Here each W_v^i starts Glorot-uniform for its
    own shape times 1/sqrt(N), so the sum of N of them has exactly the variance
    of one plain W_v: the untrained layer matches `MultiHeadAttention`'s output
    scale. Chosen over rescaling the mixture in the forward pass because Eq. 14
    then holds as written (no constant beside C), and because a mixture
    normalised by N, C/N sum_i g_i V_i, would start at 1/sqrt(N) of the plain
    scale instead (the mean of N independent projections): the mismatch would
    only change sign. This is the fan-in rule applied to the stacked kernel
    [W_v^1; ..; W_v^N], which reads the N gated copies of the pooled items as
    one input N times as wide.

    Args:
      num_heads: Number of heads.
      head_dim: Width of each head.
      num_value_projections: N, the number of value projections W_v^i.
      gate_hidden_units: Hidden width of each gate.
      gate_scale: C, the gates' upper bound.
      gate_stop_gradient: Do not back-propagate from the gates into `pc`.

    Call arguments:
      query: Non-sequential features x, [batch, query_dim].
      sequence: Behaviour sequence S, [batch, length, item_dim].
      mask: Optional [batch, length] bool, True for real items.
      pc: Personalization code, [batch, pc_dim] (required unless `gates`).
      gates: Optional precomputed gate values [G_k, g] of shapes
        [batch, num_heads * head_dim] and [batch, N] (see
        `_PersonalizedGatesMixin`).

    Returns:
      [batch, num_heads * head_dim].
    """

    gate_names = ("keys", "values")

    def __init__(
        self,
        num_heads: int = 2,
        head_dim: int = 16,
        num_value_projections: int = 4,
        gate_hidden_units: int = 32,
        gate_scale: float = 2.0,
        gate_stop_gradient: bool = False,
        **kwargs,
    ):
        super().__init__(num_heads=num_heads, head_dim=head_dim, **kwargs)
        self.num_value_projections = _positive_int(
            num_value_projections, "num_value_projections", self
        )
        self._set_gate_options(gate_hidden_units, gate_scale, gate_stop_gradient)
        self.value_kernels = None  # [W_v^1; ..; W_v^N], [N * item_dim, width]; built on first call
        self._make_gate_network([self.width, self.num_value_projections])  # G_k, g_1..g_N

    def _personalize_queries(self, queries: tf.Tensor, gates: Dict[str, tf.Tensor]) -> tf.Tensor:
        # q . (G_k * k_l) = (G_k * q) . k_l: gating the one query per row gives the
        # same scores as gating the L keys of Eq. 14, at 1/L of the multiplies.
        return gates["keys"] * queries

    def _project_values(self, pooled: tf.Tensor, gates: Dict[str, tf.Tensor]) -> tf.Tensor:
        # sum_i g_i (P W_v^i) = [g_1 P, .., g_N P] [W_v^1; ..; W_v^N]: scale each head's
        # pooled items by the N gates and project them with the stacked kernels, one
        # product per head as in plain attention.
        item_dim = pooled.shape[-1]
        # (expand_dims, not [:, tf.newaxis]: its gradient is a reshape, not a strided slice's)
        value_gates = tf.reshape(gates["values"], [-1, 1, self.num_value_projections, 1])
        gated = value_gates * tf.expand_dims(pooled, 2)  # [batch, heads, N, item_dim]
        gated = tf.reshape(gated, [-1, self.num_heads, self.num_value_projections * item_dim])
        kernels = self._per_head(self.value_kernel_matrix(item_dim))  # [N * item_dim, heads, head_dim]
        return tf.einsum("bhk,khd->bhd", gated, kernels)

    def value_kernel_matrix(self, item_dim: int) -> tf.Variable:
        """[W_v^1; ..; W_v^N] stacked, [N * item_dim, width]: one variable, so one
        optimizer update rather than N."""
        if self.value_kernels is None:
            self.value_kernels = self.add_weight(
                "value_kernels",
                shape=(self.num_value_projections * item_dim, self.width),
                # Each W_v^i Glorot-uniform / sqrt(N): see the class docstring.
                initializer=_glorot_uniform_blocks(
                    [(item_dim, self.width)] * self.num_value_projections,
                    axis=0,
                    scale=1.0 / math.sqrt(self.num_value_projections),
                ),
            )
        return self.value_kernels

    def value_kernel(self, index: int) -> tf.Tensor:
        """W_v^i, i = `index`: [item_dim, width] (once the layer has been called)."""
        if self.value_kernels is None:
            raise ValueError(f"{_describe(self)} has no value kernels before its first call")
        item_dim = self.value_kernels.shape[0] // self.num_value_projections
        return self.value_kernels[index * item_dim : (index + 1) * item_dim]

    def get_config(self) -> Dict[str, Any]:
        config = super().get_config()
        config.update(num_value_projections=self.num_value_projections)
        config.update(self._gate_config())
        return config


# --------------------------------------------------------------------------
# Building a layer by kind.
# --------------------------------------------------------------------------

MLP_KINDS = ("plain", "poso", "moe")
ATTENTION_KINDS = ("plain", "poso")
MMOE_KINDS = ("plain", "poso")


def _check_kind(kind: str, valid_kinds: Sequence[str], factory: str) -> None:
    if kind not in valid_kinds:
        raise ValueError(
            f"{factory}: unknown kind {kind!r}; valid kinds are {', '.join(valid_kinds)}."
        )


def make_mlp(
    kind: str,
    units: Sequence[int],
    activation: Any = "relu",
    *,
    gate_hidden_units: int = 32,
    gate_scale: float = 2.0,
    gate_stop_gradient: bool = False,
    num_experts: int = 4,
    **layer_kwargs,
) -> tf.keras.layers.Layer:
    """Builds an MLP-like layer: "plain" `MLP`, "poso" `PosoMLP`, "moe" `FeatureGatedMoE`.

    Options that the chosen kind does not use (gate options for "plain"/"moe",
    `num_experts` for "plain"/"poso") are ignored, so callers can pass one set
    of options whatever the kind. `layer_kwargs` (e.g. `name`) go to the layer.
    """
    _check_kind(kind, MLP_KINDS, "make_mlp")
    if kind == "plain":
        return MLP(units, activation=activation, **layer_kwargs)
    if kind == "poso":
        return PosoMLP(
            units,
            activation=activation,
            gate_hidden_units=gate_hidden_units,
            gate_scale=gate_scale,
            gate_stop_gradient=gate_stop_gradient,
            **layer_kwargs,
        )
    return FeatureGatedMoE(
        units, num_experts=num_experts, activation=activation, **layer_kwargs
    )


def make_attention(
    kind: str,
    num_heads: int = 2,
    head_dim: int = 16,
    *,
    num_value_projections: int = 4,
    gate_hidden_units: int = 32,
    gate_scale: float = 2.0,
    gate_stop_gradient: bool = False,
    **layer_kwargs,
) -> tf.keras.layers.Layer:
    """Builds "plain" `MultiHeadAttention` or "poso" `PosoMultiHeadAttention`.

    POSO-only options are ignored for "plain".
    """
    _check_kind(kind, ATTENTION_KINDS, "make_attention")
    if kind == "plain":
        return MultiHeadAttention(num_heads=num_heads, head_dim=head_dim, **layer_kwargs)
    return PosoMultiHeadAttention(
        num_heads=num_heads,
        head_dim=head_dim,
        num_value_projections=num_value_projections,
        gate_hidden_units=gate_hidden_units,
        gate_scale=gate_scale,
        gate_stop_gradient=gate_stop_gradient,
        **layer_kwargs,
    )


def make_mmoe(
    kind: str,
    num_tasks: int,
    num_experts: int = 4,
    expert_units: Sequence[int] = (64,),
    activation: Any = "relu",
    *,
    gate_hidden_units: int = 32,
    gate_scale: float = 2.0,
    gate_stop_gradient: bool = False,
    **layer_kwargs,
) -> tf.keras.layers.Layer:
    """Builds "plain" `MMoE` or "poso" `PosoMMoE`; gate options are ignored for "plain"."""
    _check_kind(kind, MMOE_KINDS, "make_mmoe")
    common = dict(
        num_experts=num_experts, expert_units=expert_units, activation=activation
    )
    if kind == "plain":
        return MMoE(num_tasks, **common, **layer_kwargs)
    return PosoMMoE(
        num_tasks,
        **common,
        gate_hidden_units=gate_hidden_units,
        gate_scale=gate_scale,
        gate_stop_gradient=gate_stop_gradient,
        **layer_kwargs,
    )
