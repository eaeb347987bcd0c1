"""Tests for models.layers: POSO modules against their equations and plain counterparts."""

import numpy as np
import pytest
import tensorflow as tf

from models import layers

BATCH, INPUT_DIM, PC_DIM, LENGTH, ITEM_DIM = 5, 6, 3, 7, 4
NUM_HEADS, HEAD_DIM = 2, 3

# Row 0 has padding at the end, row 1 is full, row 2 fully padded, rows 3-4 mixed.
MASK = np.array(
    [
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0],
        [0, 1, 0, 1, 1, 0, 1],
        [1, 0, 0, 0, 0, 0, 0],
    ],
    dtype=bool,
)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


@pytest.fixture
def inputs(rng):
    return {
        "x": rng.normal(size=(BATCH, INPUT_DIM)).astype(np.float32),
        "pc": rng.normal(size=(BATCH, PC_DIM)).astype(np.float32),
        "sequence": rng.normal(size=(BATCH, LENGTH, ITEM_DIM)).astype(np.float32),
        "mask": MASK,
    }


# ---------------------------------------------------------------------------
# NumPy references.
# ---------------------------------------------------------------------------


def relu(v):
    return np.maximum(v, 0.0)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def softmax(v, axis=-1):
    e = np.exp(v - v.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def dense_np(dense, v, activation=None):
    out = v @ dense.kernel.numpy()
    if dense.use_bias:
        out = out + dense.bias.numpy()
    return activation(out) if activation else out


def gate_np(gates, pc, index=0):
    """Gate `index` of a PersonalizedGates, g(pc) = C * sigmoid(W2 relu(W1 pc + b1) + b2)."""
    w1, b1, w2, b2 = (np.asarray(w) for w in gates.gate_weights(index))
    return gates.scale * sigmoid(relu(pc @ w1 + b1) @ w2 + b2)


def attention_np(q, k, v, mask, num_heads, head_dim):
    """One query per row; per-head masked softmax; heads concatenated."""
    batch, length, _ = k.shape
    q = q.reshape(batch, num_heads, head_dim)
    k = k.reshape(batch, length, num_heads, head_dim)
    v = v.reshape(batch, length, num_heads, head_dim)
    out = np.zeros((batch, num_heads, head_dim))
    for b in range(batch):
        real = np.flatnonzero(mask[b])
        if real.size == 0:
            continue  # Fully padded row: zeros.
        for h in range(num_heads):
            logits = k[b, real, h] @ q[b, h] / np.sqrt(head_dim)
            out[b, h] = softmax(logits) @ v[b, real, h]
    return out.reshape(batch, num_heads * head_dim)


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def call_layer(layer, inputs, **overrides):
    """Calls any layer of the module with the arguments it takes."""
    args = {**inputs, **overrides}
    if isinstance(layer, layers.PersonalizedGates):
        return layer(args["pc"])
    if isinstance(layer, (layers.MultiHeadAttention, layers.PosoMultiHeadAttention)):
        return layer(args["x"], args["sequence"], mask=args["mask"], pc=args["pc"])
    return layer(args["x"], pc=args["pc"])


def to_numpy(outputs):
    return [np.asarray(o) for o in tf.nest.flatten(outputs)]


def assert_outputs_equal(actual, expected, atol=0.0, rtol=0.0):
    actual, expected = to_numpy(actual), to_numpy(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=rtol, atol=atol)


def fix_gates_at_one(gates):
    """Makes every gate output exactly 1: W2 = 0, b2 = logit(1 / C).

    The one variable holds W1, b1, W2, b2 flattened in that order (see PersonalizedGates),
    so W2 and b2 are its last hidden_units * width + width entries.
    """
    (parameters,) = gates.get_weights()
    width = sum(gates.gate_units)
    parameters[-(gates.hidden_units * width + width) : -width] = 0.0
    parameters[-width:] = np.log(1.0 / (gates.scale - 1.0))
    gates.set_weights([parameters])


def randomize_weights(layer, rng):
    """Replaces every weight (e.g. zero-initialized biases) with random values."""
    layer.set_weights([rng.normal(size=w.shape).astype(np.float32) for w in layer.get_weights()])


# Small, non-default configurations of every layer.
LAYER_FACTORIES = {
    "gate": lambda: layers.PersonalizedGate(4, hidden_units=5, scale=3.0),
    "gates": lambda: layers.PersonalizedGates([4, 2, 3], hidden_units=5, stop_gradient=True),
    "one_hot_gates": lambda: layers.PersonalizedGates([4, 2], hidden_units=5, one_hot_code=True),
    "mlp": lambda: layers.MLP([8, 4], activation="tanh"),
    "poso_mlp": lambda: layers.PosoMLP([8, 4], gate_hidden_units=5, gate_scale=3.0),
    "moe": lambda: layers.FeatureGatedMoE([8, 4], num_experts=3),
    "attention": lambda: layers.MultiHeadAttention(NUM_HEADS, HEAD_DIM),
    "poso_attention": lambda: layers.PosoMultiHeadAttention(
        NUM_HEADS, HEAD_DIM, num_value_projections=3, gate_hidden_units=5
    ),
    "mmoe": lambda: layers.MMoE(2, num_experts=3, expert_units=(8, 4)),
    "poso_mmoe": lambda: layers.PosoMMoE(
        2, num_experts=3, expert_units=(8, 4), gate_stop_gradient=True
    ),
}


# ---------------------------------------------------------------------------
# The personalized gate.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2.0, 3.5])
def test_gate_matches_equation_and_stays_in_range(inputs, rng, scale):
    gate = layers.PersonalizedGate(6, hidden_units=5, scale=scale)
    gate(inputs["pc"])
    randomize_weights(gate, rng)

    outputs = gate(inputs["pc"]).numpy()

    np.testing.assert_allclose(outputs, gate_np(gate, inputs["pc"]), rtol=1e-5, atol=1e-6)
    assert outputs.shape == (BATCH, 6)
    assert np.all(outputs > 0.0) and np.all(outputs < scale)


def test_gate_stays_within_bounds_for_huge_inputs(inputs, rng):
    gate = layers.PersonalizedGate(6, hidden_units=5)
    gate(inputs["pc"])
    randomize_weights(gate, rng)

    outputs = gate(inputs["pc"] * 1e6).numpy()

    assert np.all(np.isfinite(outputs))
    assert np.all(outputs >= 0.0) and np.all(outputs <= 2.0)
    # Saturated on both sides, so the bounds really are exercised.
    assert outputs.min() == 0.0 and outputs.max() == 2.0


def test_untrained_gate_is_close_to_one(inputs):
    outputs = layers.PersonalizedGate(6)(inputs["pc"] * 0.01).numpy()
    np.testing.assert_allclose(outputs, 1.0, atol=0.05)


def test_gates_equal_gates_built_one_by_one(inputs, rng):
    gates = layers.PersonalizedGates([4, 2, 3], hidden_units=5, scale=2.5)
    gates(inputs["pc"])
    randomize_weights(gates, rng)

    outputs = gates(inputs["pc"])

    assert [o.shape for o in outputs] == [(BATCH, 4), (BATCH, 2), (BATCH, 3)]
    for index, units in enumerate(gates.gate_units):
        # A lone gate given gate `index`'s weights (its own blocks, nothing shared) agrees.
        single = layers.PersonalizedGate(units, hidden_units=5, scale=2.5)
        single(inputs["pc"])
        single.set_weights([np.concatenate([np.ravel(w) for w in gates.gate_weights(index)])])
        np.testing.assert_allclose(outputs[index], single(inputs["pc"]), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            outputs[index], gate_np(gates, inputs["pc"], index), rtol=1e-5, atol=1e-6
        )
    assert gates.gate_parameter_counts() == [
        PC_DIM * 5 + 5 + 5 * units + units for units in (4, 2, 3)
    ]
    assert sum(gates.gate_parameter_counts()) == gates.count_params()


def test_one_hot_code_gates_equal_the_equation_and_its_gradients(rng):
    codes = np.array([2, 0, 2, 1, 2])  # code 2 repeats: its rows share one table row
    pc = tf.one_hot(codes, PC_DIM)
    direct = layers.PersonalizedGates([4, 2, 3], hidden_units=5, scale=2.5)
    per_code = layers.PersonalizedGates([4, 2, 3], hidden_units=5, scale=2.5, one_hot_code=True)
    direct(pc), per_code(pc)
    randomize_weights(direct, rng)
    per_code.set_weights(direct.get_weights())

    results = []
    for gates in (direct, per_code):
        with tf.GradientTape() as tape:
            outputs = gates(pc)
            # Weighted so that every gate and every row moves the loss differently.
            loss = tf.add_n([tf.reduce_sum(o * (1.0 + tf.range(o.shape[1], dtype=tf.float32)))
                             for o in outputs])
        results.append((outputs, tape.gradient(loss, gates.parameters)))

    (direct_outputs, direct_gradient), (table_outputs, table_gradient) = results
    for index, output in enumerate(table_outputs):
        np.testing.assert_allclose(output, gate_np(direct, pc.numpy(), index), rtol=1e-5, atol=1e-6)
    assert_outputs_equal(table_outputs, direct_outputs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(table_gradient, direct_gradient, rtol=1e-4, atol=1e-5)
    assert np.abs(direct_gradient.numpy()).sum() > 0.0


def test_each_gate_starts_glorot_uniform_for_its_own_shape(inputs):
    gates = layers.PersonalizedGates([256, 4], hidden_units=8)
    gates(inputs["pc"])
    (w1_wide, b1_wide, w2_wide, b2_wide), (w1_narrow, _, w2_narrow, _) = (
        [np.asarray(w) for w in gates.gate_weights(i)] for i in range(2)
    )

    assert np.abs(w2_wide).max() <= np.sqrt(6.0 / (8 + 256))
    assert np.abs(w2_narrow).max() <= np.sqrt(6.0 / (8 + 4))
    assert np.abs(w2_narrow).max() > np.sqrt(6.0 / (8 + 256))  # not one wide kernel's scale
    assert not np.allclose(w1_wide, w1_narrow)  # every block drawn, not one block repeated
    np.testing.assert_array_equal(b1_wide, 0.0)
    np.testing.assert_array_equal(b2_wide, 0.0)


# ---------------------------------------------------------------------------
# POSO layers against their equations.
# ---------------------------------------------------------------------------


def test_poso_mlp_matches_eq_11(inputs, rng):
    layer = layers.PosoMLP([8, 5, 4], gate_hidden_units=6)
    layer(inputs["x"], pc=inputs["pc"])
    randomize_weights(layer, rng)

    hidden = inputs["x"]
    for index, dense in enumerate(layer.dense_layers):
        hidden = gate_np(layer.gate_network, inputs["pc"], index) * dense_np(dense, hidden, relu)

    np.testing.assert_allclose(
        layer(inputs["x"], pc=inputs["pc"]).numpy(), hidden, rtol=1e-5, atol=1e-5
    )
    gates = layer.gates(inputs["pc"])
    assert sorted(gates) == ["layer_0", "layer_1", "layer_2"]
    for index, name in enumerate(sorted(gates)):
        np.testing.assert_allclose(
            gates[name], gate_np(layer.gate_network, inputs["pc"], index), rtol=1e-5
        )


def test_poso_attention_matches_eq_14(inputs, rng):
    layer = layers.PosoMultiHeadAttention(NUM_HEADS, HEAD_DIM, num_value_projections=3)
    call_layer(layer, inputs)
    randomize_weights(layer, rng)
    pc, seq = inputs["pc"], inputs["sequence"]

    queries = dense_np(layer.query_projection, inputs["x"])
    key_gate = gate_np(layer.gate_network, pc, 0)
    keys = key_gate[:, None, :] * dense_np(layer.key_projection, seq)
    value_gates = gate_np(layer.gate_network, pc, 1)
    values = sum(
        value_gates[:, i, None, None] * (seq @ layer.value_kernel(i).numpy()) for i in range(3)
    )
    expected = attention_np(queries, keys, values, MASK, NUM_HEADS, HEAD_DIM)

    outputs = call_layer(layer, inputs).numpy()

    assert outputs.shape == (BATCH, NUM_HEADS * HEAD_DIM)
    np.testing.assert_allclose(outputs, expected, rtol=1e-4, atol=1e-5)
    gates = layer.gates(pc)
    np.testing.assert_allclose(gates["keys"], key_gate, rtol=1e-5)
    np.testing.assert_allclose(gates["values"], value_gates, rtol=1e-5)
    assert gates["values"].shape == (BATCH, 3)


def test_poso_mmoe_matches_eq_17(inputs, rng):
    layer = layers.PosoMMoE(num_tasks=2, num_experts=3, expert_units=(8, 4))
    layer(inputs["x"], pc=inputs["pc"])
    randomize_weights(layer, rng)
    x, pc = inputs["x"], inputs["pc"]

    expert_gates = gate_np(layer.gate_network, pc)  # [B, E]
    experts = np.stack(
        [
            dense_np(expert.dense_layers[1], dense_np(expert.dense_layers[0], x, relu), relu)
            for expert in layer.experts
        ],
        axis=1,
    )
    expected = [
        np.einsum("be,be,bed->bd", softmax(dense_np(task_gate, x)), expert_gates, experts)
        for task_gate in layer.task_gates
    ]

    outputs = layer(x, pc=pc)

    assert len(outputs) == 2
    for output, want in zip(outputs, expected):
        np.testing.assert_allclose(output.numpy(), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.gates(pc)["experts"], expert_gates, rtol=1e-5)


def test_feature_gated_moe_matches_equation(inputs, rng):
    layer = layers.FeatureGatedMoE([8, 4], num_experts=3)
    layer(inputs["x"])
    randomize_weights(layer, rng)
    x = inputs["x"]
    mixture = layer.mixture

    experts = np.stack(
        [
            dense_np(expert.dense_layers[1], dense_np(expert.dense_layers[0], x, relu), relu)
            for expert in mixture.experts
        ],
        axis=1,
    )
    weights = softmax(dense_np(mixture.task_gates[0], x))
    expected = np.einsum("be,bed->bd", weights, experts)

    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert layer.gates(inputs["pc"]) == {}


# ---------------------------------------------------------------------------
# With every gate fixed at 1, POSO layers equal their plain counterparts.
# ---------------------------------------------------------------------------


def _mlp_pair(inputs):
    poso, plain = layers.PosoMLP([8, 4]), layers.MLP([8, 4])
    for layer in (poso, plain):
        call_layer(layer, inputs)
    for poso_dense, plain_dense in zip(poso.dense_layers, plain.dense_layers):
        plain_dense.set_weights(poso_dense.get_weights())
    return poso, plain, poso.gate_network


def _attention_pair(inputs):
    poso = layers.PosoMultiHeadAttention(NUM_HEADS, HEAD_DIM, num_value_projections=3)
    plain = layers.MultiHeadAttention(NUM_HEADS, HEAD_DIM)
    for layer in (poso, plain):
        call_layer(layer, inputs)
    plain.query_projection.set_weights(poso.query_projection.get_weights())
    plain.key_projection.set_weights(poso.key_projection.get_weights())
    # sum_i W_v^i = W_v exactly: the first kernel is W_v, the others zero.
    kernels = poso.value_kernels.numpy()
    item_dim = kernels.shape[0] // 3
    kernels[item_dim:] = 0.0
    poso.value_kernels.assign(kernels)
    plain.value_projection.set_weights([kernels[:item_dim]])
    return poso, plain, poso.gate_network


def _mmoe_pair(inputs):
    poso = layers.PosoMMoE(2, num_experts=3, expert_units=(8, 4))
    plain = layers.MMoE(2, num_experts=3, expert_units=(8, 4))
    for layer in (poso, plain):
        call_layer(layer, inputs)
    for poso_part, plain_part in zip(
        poso.experts + poso.task_gates, plain.experts + plain.task_gates
    ):
        plain_part.set_weights(poso_part.get_weights())
    return poso, plain, poso.gate_network


@pytest.mark.parametrize("make_pair", [_mlp_pair, _attention_pair, _mmoe_pair])
def test_poso_equals_plain_when_gates_are_one(inputs, rng, make_pair):
    poso, plain, gates = make_pair(inputs)
    randomize_weights(gates, rng)
    # Sanity check: random gates make a difference.
    assert not np.allclose(
        to_numpy(call_layer(poso, inputs))[0], to_numpy(call_layer(plain, inputs))[0]
    )

    fix_gates_at_one(gates)

    for values in poso.gates(inputs["pc"]).values():
        np.testing.assert_array_equal(values.numpy(), 1.0)
    # Equal up to float32 rounding: POSO(MHA) projects with all its value kernels stacked, which
    # orders the sums differently from the plain layer's single projection.
    assert_outputs_equal(call_layer(poso, inputs), call_layer(plain, inputs), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# Untrained, POSO layers start at their plain counterparts' output scale.
# ---------------------------------------------------------------------------

# The model's default sizes (models.model.ModelConfig): what the scale must hold for.
SCALE_PAIRS = {
    "mlp": (lambda: layers.PosoMLP([256, 128], gate_hidden_units=8), lambda: layers.MLP([256, 128])),
    "attention": (lambda: layers.PosoMultiHeadAttention(2, 16, num_value_projections=4,
                                                        gate_hidden_units=8),
                  lambda: layers.MultiHeadAttention(2, 16)),
    "mmoe": (lambda: layers.PosoMMoE(4, num_experts=4, expert_units=(64,), gate_hidden_units=8),
             lambda: layers.MMoE(4, num_experts=4, expert_units=(64,))),
}


def _shared_parts(layer):
    """The sub-layers a POSO layer has in common with its plain counterpart."""
    if isinstance(layer, (layers.MultiHeadAttention, layers.PosoMultiHeadAttention)):
        return [layer.query_projection, layer.key_projection]
    if isinstance(layer, layers.MMoE):
        return layer.experts + layer.task_gates
    return layer.dense_layers


def _scale_inputs(seed, pc_kind):
    rng = np.random.default_rng(seed)
    batch = 1024
    pc = (np.eye(12, dtype=np.float32)[rng.integers(0, 12, batch)] if pc_kind == "one_hot"
          else rng.normal(size=(batch, 12)).astype(np.float32))
    return {
        "x": rng.normal(size=(batch, 64)).astype(np.float32),
        "pc": pc,
        "sequence": rng.normal(size=(batch, 10, 24)).astype(np.float32),
        "mask": np.ones((batch, 10), dtype=bool),
    }


def _output_std(layer, inputs):
    return float(np.concatenate(to_numpy(call_layer(layer, inputs)), axis=1).std())


@pytest.mark.parametrize("pc_kind", ["one_hot", "normal"])
@pytest.mark.parametrize("name", sorted(SCALE_PAIRS))
def test_untrained_poso_layer_starts_at_the_plain_output_scale(name, pc_kind):
    """Output std of a freshly initialized POSO layer over its plain counterpart's, with the
    parts they share given the same weights (what differs is only what POSO adds)."""
    ratios = []
    for seed in range(6):
        tf.keras.utils.set_random_seed(seed)
        inputs = _scale_inputs(seed, pc_kind)
        poso, plain = (make() for make in SCALE_PAIRS[name])
        call_layer(poso, inputs), call_layer(plain, inputs)  # builds them
        for poso_part, plain_part in zip(_shared_parts(poso), _shared_parts(plain)):
            poso_part.set_weights(plain_part.get_weights())
        ratios.append(_output_std(poso, inputs) / _output_std(plain, inputs))
    # Gates of mean 1 raise the mean square by 1 + Var(g) per gated layer: under 1% for the
    # wide gates, more for POSO(MMoE)'s 4-output gate (its Glorot W2 is wider-spread: std of g
    # about 0.13 on a one-hot PC, 0.4 on a unit-normal one). Single draws spread by 5-20%
    # (POSO(MHA)'s value kernels are drawn afresh), hence the mean over seeds. POSO(MHA)'s N = 4
    # value projections at the usual initial scale would give about 2.
    assert 0.9 < np.mean(ratios) < 1.1, ratios


@pytest.mark.parametrize("pc_kind", ["one_hot", "normal"])
def test_untrained_gates_average_one(pc_kind):
    """Over fresh draws each gate averages 1 (C = 2, logits symmetric about 0)."""
    values = [[], [], []]
    for seed in range(6):
        tf.keras.utils.set_random_seed(seed)
        gates = layers.PersonalizedGates([256, 4, 128], hidden_units=8)
        for gate, output in zip(values, gates(_scale_inputs(seed, pc_kind)["pc"])):
            gate.append(output.numpy())
    for gate in values:
        assert abs(np.mean(gate) - 1.0) < 0.05, np.mean(gate)
        assert np.std(gate) < 0.5, np.std(gate)


def test_poso_attention_value_kernels_start_at_one_over_sqrt_n_scale(inputs):
    """Each of the N stacked value kernels is Glorot-uniform for its shape, / sqrt(N)."""
    layer = layers.PosoMultiHeadAttention(NUM_HEADS, HEAD_DIM, num_value_projections=4)
    call_layer(layer, inputs)
    limit = np.sqrt(6.0 / (ITEM_DIM + NUM_HEADS * HEAD_DIM)) / 2.0  # Glorot limit / sqrt(4)
    for index in range(4):
        kernel = layer.value_kernel(index).numpy()
        assert np.abs(kernel).max() <= limit
        assert np.abs(kernel).max() > 0.5 * limit  # drawn over the whole range, not smaller
    assert not np.allclose(layer.value_kernel(0), layer.value_kernel(1))


@pytest.mark.parametrize("name", ["poso_mlp", "poso_attention", "poso_mmoe"])
def test_precomputed_gates_replace_the_layers_own(inputs, rng, name):
    layer = LAYER_FACTORIES[name]()
    external = layers.PersonalizedGates(
        layer.gate_units, hidden_units=layer.gate_network.hidden_units, scale=layer.gate_scale
    )
    external(inputs["pc"])  # builds it
    randomize_weights(external, rng)
    values = external(inputs["pc"])
    args = [inputs["x"], inputs["sequence"]] if "attention" in name else [inputs["x"]]
    mask = {"mask": inputs["mask"]} if "attention" in name else {}

    with_gates = layer(*args, gates=values, **mask)

    assert not layer.gate_network.built and not layer.gate_network.weights  # never called
    layer(*args, pc=inputs["pc"], **mask)
    layer.gate_network.set_weights(external.get_weights())
    assert_outputs_equal(with_gates, layer(*args, pc=inputs["pc"], **mask), atol=1e-6, rtol=1e-5)

    with pytest.raises(ValueError, match=r"`gates` must be \d+ tensors of widths"):
        layer(*args, gates=values[:-1] + [values[-1][:, :1]], **mask)


def test_plain_layers_have_no_gates(inputs):
    for layer in (layers.MLP([4]), layers.MultiHeadAttention(), layers.MMoE(2)):
        assert layer.gates(inputs["pc"]) == {}


# ---------------------------------------------------------------------------
# Masking.
# ---------------------------------------------------------------------------

ATTENTION_NAMES = ["attention", "poso_attention"]


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_padded_positions_do_not_change_attention(inputs, rng, name):
    layer = LAYER_FACTORIES[name]()
    before = call_layer(layer, inputs).numpy()

    changed = inputs["sequence"].copy()
    changed[~MASK] = rng.normal(size=changed[~MASK].shape) * 100.0
    after = call_layer(layer, inputs, sequence=changed).numpy()
    changed[~MASK] = np.inf  # Even non-finite padding must not leak.
    after_inf = call_layer(layer, inputs, sequence=changed).numpy()

    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after_inf, before)
    # Whereas changing a real position does change the output.
    changed = inputs["sequence"].copy()
    changed[1, 0] += 1.0
    assert not np.allclose(call_layer(layer, inputs, sequence=changed).numpy()[1], before[1])


@pytest.mark.parametrize("name", ATTENTION_NAMES)
def test_fully_padded_rows_give_zeros_and_finite_gradients(inputs, name):
    layer = LAYER_FACTORIES[name]()
    sequence = tf.constant(inputs["sequence"])
    with tf.GradientTape() as tape:
        tape.watch(sequence)
        outputs = call_layer(layer, inputs, sequence=sequence)
    gradient = tape.gradient(outputs, sequence).numpy()

    fully_padded = ~MASK.any(axis=1)
    assert fully_padded.any()
    np.testing.assert_array_equal(outputs.numpy()[fully_padded], 0.0)
    assert np.all(np.isfinite(outputs.numpy()))
    assert np.all(np.isfinite(gradient))
    assert np.all(np.abs(outputs.numpy()[~fully_padded]).sum(axis=1) > 0.0)


def test_attention_without_mask_uses_every_position(inputs):
    layer = layers.MultiHeadAttention(NUM_HEADS, HEAD_DIM)
    everything = np.ones_like(MASK)
    np.testing.assert_allclose(
        call_layer(layer, inputs, mask=None).numpy(),
        call_layer(layer, inputs, mask=everything).numpy(),
        rtol=1e-6,
    )


# ---------------------------------------------------------------------------
# Stop-gradient on the personalization code.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stop_gradient", [True, False])
@pytest.mark.parametrize(
    "build",
    [
        lambda sg: layers.PersonalizedGate(4, stop_gradient=sg),
        lambda sg: layers.PosoMLP([8, 4], gate_stop_gradient=sg),
        lambda sg: layers.PosoMultiHeadAttention(NUM_HEADS, HEAD_DIM, gate_stop_gradient=sg),
        lambda sg: layers.PosoMMoE(2, expert_units=(4,), gate_stop_gradient=sg),
    ],
    ids=["gate", "poso_mlp", "poso_attention", "poso_mmoe"],
)
def test_stop_gradient_blocks_gradient_to_pc(inputs, build, stop_gradient):
    layer = build(stop_gradient)
    pc = tf.constant(inputs["pc"])
    with tf.GradientTape() as tape:
        tape.watch(pc)
        outputs = tf.nest.flatten(call_layer(layer, inputs, pc=pc))
        loss = tf.add_n([tf.reduce_sum(output) for output in outputs])
    gradient = tape.gradient(loss, pc, unconnected_gradients=tf.UnconnectedGradients.ZERO)

    if stop_gradient:
        np.testing.assert_array_equal(gradient.numpy(), 0.0)
    else:
        assert np.abs(gradient.numpy()).sum() > 0.0


# ---------------------------------------------------------------------------
# Serialization, tf.function and SavedModel.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_config_round_trip(inputs, rng, name):
    layer = LAYER_FACTORIES[name]()
    call_layer(layer, inputs)
    randomize_weights(layer, rng)
    config = layer.get_config()

    clone = type(layer).from_config(config)
    deserialized = tf.keras.layers.deserialize(tf.keras.layers.serialize(layer))

    for copy in (clone, deserialized):
        assert type(copy) is type(layer)
        assert copy.get_config() == config
        call_layer(copy, inputs)
        copy.set_weights(layer.get_weights())
        assert_outputs_equal(call_layer(copy, inputs), call_layer(layer, inputs))


@pytest.mark.parametrize("name", sorted(LAYER_FACTORIES))
def test_runs_in_tf_function(inputs, name):
    layer = LAYER_FACTORIES[name]()
    eager = call_layer(layer, inputs)
    tensors = {key: tf.constant(value) for key, value in inputs.items()}

    graph = tf.function(lambda args: call_layer(layer, args))(tensors)

    assert_outputs_equal(graph, eager, atol=1e-6, rtol=1e-5)


def make_keras_inputs():
    return {
        "x": tf.keras.Input((INPUT_DIM,), name="x"),
        "pc": tf.keras.Input((PC_DIM,), name="pc"),
        "sequence": tf.keras.Input((LENGTH, ITEM_DIM), name="sequence"),
        "mask": tf.keras.Input((LENGTH,), dtype=tf.bool, name="mask"),
    }


def test_saved_model_round_trip(inputs, tmp_path):
    keras_inputs = make_keras_inputs()
    # Every layer in one model keeps the test fast (one save, one load).
    outputs = {
        name: call_layer(factory(), keras_inputs) for name, factory in LAYER_FACTORIES.items()
    }
    model = tf.keras.Model(keras_inputs, outputs)
    expected = model(inputs)

    tf.saved_model.save(model, str(tmp_path / "model"))
    loaded = tf.saved_model.load(str(tmp_path / "model"))

    restored = loaded({key: tf.constant(value) for key, value in inputs.items()})
    assert sorted(restored) == sorted(LAYER_FACTORIES)
    for name in LAYER_FACTORIES:
        assert_outputs_equal(restored[name], expected[name], atol=1e-6, rtol=1e-5)


def test_keras_saved_model_restores_the_layer_classes(inputs, tmp_path):
    keras_inputs = make_keras_inputs()
    attention, mmoe = LAYER_FACTORIES["poso_attention"](), LAYER_FACTORIES["poso_mmoe"]()
    model = tf.keras.Model(
        keras_inputs,
        [call_layer(attention, keras_inputs), *call_layer(mmoe, keras_inputs)],
    )

    model.save(str(tmp_path / "model"))
    # No custom_objects: the layers are registered as Keras serializables.
    loaded = tf.keras.models.load_model(str(tmp_path / "model"))

    restored_types = {type(layer) for layer in loaded.layers}
    assert {layers.PosoMultiHeadAttention, layers.PosoMMoE} <= restored_types
    assert_outputs_equal(loaded(inputs), model(inputs), atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------
# Factories and bad input.
# ---------------------------------------------------------------------------


# Each factory with every option, including those its plain kinds ignore.
FACTORIES = {
    "make_mlp": lambda kind: layers.make_mlp(kind, [4], gate_scale=3.0, num_experts=2),
    "make_attention": lambda kind: layers.make_attention(kind, 2, 3, gate_scale=3.0),
    "make_mmoe": lambda kind: layers.make_mmoe(kind, 2, gate_scale=3.0),
}


@pytest.mark.parametrize(
    "factory, kind, expected_type",
    [
        ("make_mlp", "plain", layers.MLP),
        ("make_mlp", "poso", layers.PosoMLP),
        ("make_mlp", "moe", layers.FeatureGatedMoE),
        ("make_attention", "plain", layers.MultiHeadAttention),
        ("make_attention", "poso", layers.PosoMultiHeadAttention),
        ("make_mmoe", "plain", layers.MMoE),
        ("make_mmoe", "poso", layers.PosoMMoE),
    ],
)
def test_factories_build_the_requested_kind(inputs, factory, kind, expected_type):
    layer = FACTORIES[factory](kind)
    assert type(layer) is expected_type
    if hasattr(layer, "gate_scale"):
        assert layer.gate_scale == 3.0
    call_layer(layer, inputs)  # Plain and POSO are called the same way.


@pytest.mark.parametrize(
    "factory, valid",
    [
        (lambda: layers.make_mlp("posso", [4]), "plain, poso, moe"),
        (lambda: layers.make_attention("moe"), "plain, poso"),
        (lambda: layers.make_mmoe("moe", 2), "plain, poso"),
    ],
)
def test_factories_reject_unknown_kinds(factory, valid):
    with pytest.raises(ValueError, match=f"valid kinds are {valid}"):
        factory()


def test_poso_layers_require_pc(inputs):
    for name in ("poso_mlp", "poso_attention", "poso_mmoe"):
        with pytest.raises(ValueError, match="needs the personalization code"):
            call_layer(LAYER_FACTORIES[name](), inputs, pc=None)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: layers.MLP([]), "`units` must be a non-empty sequence"),
        (lambda: layers.MLP([4, 0]), "`units` must be a positive integer"),
        (lambda: layers.PosoMLP([4], gate_scale=-1.0), "`gate_scale` must be a positive"),
        (lambda: layers.PersonalizedGate(4, hidden_units=2.5), "`hidden_units`"),
        (lambda: layers.MultiHeadAttention(num_heads=0), "`num_heads`"),
        (lambda: layers.PosoMultiHeadAttention(num_value_projections=0), "num_value_projections"),
        (lambda: layers.MMoE(num_tasks=0), "`num_tasks`"),
        (lambda: layers.FeatureGatedMoE([4], num_experts=0), "`num_experts`"),
    ],
)
def test_bad_arguments_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_input_ranks_are_rejected(inputs):
    attention = layers.PosoMultiHeadAttention(NUM_HEADS, HEAD_DIM, name="history")
    with pytest.raises(ValueError, match=r"'history': `sequence` must have shape"):
        call_layer(attention, inputs, sequence=inputs["x"])
    with pytest.raises(ValueError, match=r"`mask` must have shape"):
        call_layer(attention, inputs, mask=MASK[:, :, None])
    with pytest.raises(ValueError, match=r"`pc` must have shape"):
        call_layer(layers.PosoMLP([4]), inputs, pc=inputs["pc"][:, 0])
    for layer in (layers.MMoE(2), layers.FeatureGatedMoE([4], name="tower")):
        with pytest.raises(ValueError, match=rf"'{layer.name}': `x` must have shape"):
            call_layer(layer, inputs, x=inputs["sequence"])
