"""Parameters and FLOPs of the ranking model's modules, plain vs POSO (the POSO paper's Table 1).

    bin/poso model-summary [--variant-pair baseline,poso_all] [--config JSON] [--json]

Two `RankingModel`s are built, the "plain" and the "POSO" variant of the pair (by default
`baseline` and `poso_all`), with every other hyper-parameter equal: the default
`ModelConfig`, or `config` overrides. For each module (MLP, MHA, MMoE, the task towers),
for the dense network (their sum), for the embedding tables and for the whole model the
table gives both variants' parameters and FLOPs and the relative increase.

Parameters are read from the built Keras layers (`count_params()`); the whole model's count
is `model.trainable_weights` and must equal the sum of the parts, so the table cannot miss
a sub-module. The embedding tables (every feature's table and, with
`pc_source="avc_bucket_embedding"`, the PC embedding) dwarf the dense network, so the
overhead is given both for the dense network (what POSO adds to) and for the whole model.

FLOPs are multiply-adds (MACs) per example of the forward pass, counted analytically from
the built layers' weight shapes and the behaviour-sequence length L:

* a Dense kernel [n_in, n_out] costs n_in * n_out per position it is applied at: once per
  example, or L times for the attention's key projection;
* attention: L * width for the scores Q K^T; values are linear in the items, so each head
  pools the raw items first (num_heads * L * item_dim) and the pooled items are projected
  once (item_dim * width) instead of projecting all L items;
* a personalized gate costs what runs: its two kernels (pc_dim * h + h * units) on a dense
  code; on a one-hot code (the default AVC bucket) a row lookup in a table of the gate's values
  per code, 0 per example, plus the tables once per batch (pc_dim times the equation: reported
  beside the table, `gate_table_macs_per_batch`, not in the per-example counts); applying it costs one
  multiply per gated element (units for a POSO(MLP) layer, width for POSO(MHA)'s query,
  which equals gating every key, num_experts * expert width for POSO(MMoE)); POSO(MHA)
  scales each head's pooled items by its N value gates (N * num_heads * item_dim) and
  projects them with all N value kernels (N * item_dim * width where plain attention has
  item_dim * width);
* an MMoE costs its experts, its task gates' kernels and T * num_experts * expert width
  for mixing the experts; the feature-gated MoE is a one-task MMoE;
* embedding lookups cost 0; the masked mean of a pooled (candidate)
  sequence costs max_length * embedding_dim.

Not counted: bias adds, activations, sigmoid/softmax, the 1/sqrt(d) scaling, masking,
concatenation and reshapes (a few per output element, the same order for both variants),
and the backward pass (about twice the forward MACs for either variant). TensorFlow's
graph profiler (`tf.compat.v1.profiler` on a frozen concrete function) was not used: on
TF 2.21 it counts MatMul but has no FLOP statistics for Einsum, which computes the
attention scores, the value mixture and the expert mixtures here, so it undercounts
exactly the parts POSO changes.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

import feature_specs as fs
from models import cold_start, layers, pin
from models import model as model_lib

__all__ = [
    "DEFAULT_VARIANT_PAIR", "MODULE_ROWS", "ROWS", "summarize", "format_table", "parameter_counts",
    "module_flops", "random_transformed_features", "build_model", "check_variant_pair",
]

DEFAULT_VARIANT_PAIR: Tuple[str, str] = ("baseline", "poso_all")
# Table rows: the modules POSO can replace, then the rest of the model.
MODULE_ROWS: Tuple[str, ...] = ("MLP", "MHA", "MMoE")
# "User cold start": Meta-Embedding's generator or MWUF's meta networks (models.cold_start), or
# MAIL's zero-shot tower (models.mail).
ROWS: Tuple[str, ...] = MODULE_ROWS + ("Towers", "User cold start", "Dense network", "Embedding tables",
                                       "Whole model")
_DENSE_PARTS: Tuple[str, ...] = MODULE_ROWS + ("Towers", "User cold start")
_MODULE_ATTRIBUTES = {"MLP": "mlp", "MHA": "attention", "MMoE": "mmoe"}
_KIND_FIELDS = ("mlp", "attention", "mmoe", "user_cold_start", "pin", "mail")  # from the variant
_LABELS = {"baseline": "plain", "moe": "MoE", "poso_mlp": "POSO(MLP)", "poso_mha": "POSO(MHA)",
           "poso_mmoe": "POSO(MMoE)", "poso_all": "POSO(all)", "meta_emb": "Meta-Embedding", "mwuf": "MWUF",
           "pin": "PIN", "mail": "MAIL"}


# --------------------------------------------------------------------------------------------
# Inputs: random but valid transformed features.
# --------------------------------------------------------------------------------------------


def random_transformed_features(batch_size: int, seed: int = 0,
                                include_labels: bool = True) -> Dict[str, tf.Tensor]:
    """A random batch shaped like `models.preprocessing.preprocessing_fn`'s outputs.

    Derived from `feature_specs` only: categorical ids in [0, cardinality) (0 = out of
    vocabulary, hashed ids from 1), z-scores for numerics, sequences of random length
    padded with `PADDING_INDEX`, a log-uniform AVC with its log1p value and its PC bucket,
    0/1 flags and labels. Enough to build the model and time training steps; the values
    carry no signal.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f"random_transformed_features: batch_size must be a positive int, got {batch_size!r}")
    rng = np.random.default_rng(seed)
    features: Dict[str, np.ndarray] = {}
    for feature in fs.features_of_kind(fs.Kind.CATEGORICAL):
        low = 0 if feature.vocabulary is not None else 1
        features[feature.name] = rng.integers(low, feature.cardinality, size=batch_size, dtype=np.int64)
    for feature in fs.features_of_kind(fs.Kind.NUMERIC):
        features[feature.name] = rng.standard_normal(batch_size).astype(np.float32)
    for feature in fs.features_of_kind(fs.Kind.SEQUENCE):
        ids = rng.integers(1, feature.cardinality, size=(batch_size, feature.max_length), dtype=np.int64)
        lengths = rng.integers(0, feature.max_length + 1, size=batch_size)
        ids[np.arange(feature.max_length)[np.newaxis, :] >= lengths[:, np.newaxis]] = fs.PADDING_INDEX
        features[feature.name] = ids
    for feature in fs.features_of_kind(fs.Kind.PERSONALIZATION):
        if feature.name == fs.PC.source:
            counts = np.floor(np.exp(rng.uniform(0.0, math.log(2 * fs.PC.boundaries[-1]), batch_size))) - 1
            features[feature.name] = np.log1p(counts).astype(np.float32)
            features[fs.PC_BUCKET] = np.array([fs.pc_bucket(int(c)) for c in counts], dtype=np.int64)
        else:
            features[feature.name] = rng.integers(0, 2, size=batch_size).astype(np.float32)
    if include_labels:
        for feature in fs.features_of_kind(fs.Kind.LABEL):
            features[feature.name] = rng.integers(0, 2, size=batch_size).astype(np.float32)
    return {name: tf.constant(value) for name, value in features.items()}


def build_model(config: model_lib.ModelConfig) -> model_lib.RankingModel:
    """A `RankingModel` of `config` with its variables created (called on 2 random rows)."""
    ranking = model_lib.RankingModel(config)
    ranking(random_transformed_features(2, include_labels=False))
    return ranking


# --------------------------------------------------------------------------------------------
# Parameters.
# --------------------------------------------------------------------------------------------


def _embedding_layers(ranking: model_lib.RankingModel) -> List[tf.keras.layers.Layer]:
    tables = list(ranking.embeddings.values())
    if ranking.pc_embedding is not None:
        tables.append(ranking.pc_embedding)
    return tables


def _model_gates(ranking: model_lib.RankingModel, attribute: str, per_gate: Sequence[int]) -> int:
    """Sum of `per_gate` over the gates that the model's gate network computes for a module."""
    return sum(per_gate[i] for i in ranking.gates_by_module().get(attribute, ()))


def parameter_counts(ranking: model_lib.RankingModel) -> Dict[str, int]:
    """Parameters of a built `RankingModel` by row of `ROWS` (all rows but the sums are parts).

    Raises if the parts do not add up to the model's trainable weights (a sub-module this
    summary does not know about).
    """
    if not ranking.built:
        raise ValueError("parameter_counts: the model is not built; call it on a batch first (see build_model)")
    gate_parameters = (ranking.gate_network.gate_parameter_counts()
                       if ranking.gate_network is not None else [])
    counts = {row: getattr(ranking, attribute).count_params()
              + _model_gates(ranking, attribute, gate_parameters)
              for row, attribute in _MODULE_ATTRIBUTES.items()}
    counts["Towers"] = sum(tower.count_params() for tower in ranking.towers.values())
    counts["User cold start"] = sum(method.count_params() for method in (ranking.cold_start, ranking.zero_shot)
                                    if method is not None)
    counts["Dense network"] = sum(counts[row] for row in _DENSE_PARTS)
    counts["Embedding tables"] = sum(table.count_params() for table in _embedding_layers(ranking))
    counts["Whole model"] = int(sum(np.prod(weight.shape) for weight in ranking.trainable_weights))
    if counts["Whole model"] != counts["Dense network"] + counts["Embedding tables"]:
        raise RuntimeError(
            f"parameter_counts: the model has {counts['Whole model']} trainable parameters but its known "
            f"parts ({', '.join(_DENSE_PARTS)}, embedding tables) have "
            f"{counts['Dense network'] + counts['Embedding tables']}; a sub-module of RankingModel is "
            "missing from models.model_summary")
    return counts


# --------------------------------------------------------------------------------------------
# FLOPs (multiply-adds per example; the counting rule is in the module docstring).
# --------------------------------------------------------------------------------------------


def _dense_macs(dense: tf.keras.layers.Layer, positions: int = 1) -> int:
    if not isinstance(dense, tf.keras.layers.Dense):
        raise TypeError(f"expected a Dense layer, got {type(dense).__name__} '{dense.name}'")
    if not dense.built:
        raise ValueError(f"Dense layer '{dense.name}' is not built; build the model before counting FLOPs")
    return positions * int(np.prod(dense.kernel.shape))


def _own_gate_macs(module: Any) -> int:
    """The module's own gate network, if it computed its gates (in a RankingModel the model's
    gate network does, and `flop_counts` counts it)."""
    return sum(module.gate_network.gate_macs()) if module.gate_network.built else 0


def _mlp_macs(mlp: layers.MLP, length: int) -> int:
    del length
    return sum(_dense_macs(dense) for dense in mlp.dense_layers)


def _poso_mlp_macs(mlp: layers.PosoMLP, length: int) -> int:
    # Each layer's gate, plus one multiply per gated output element.
    return _mlp_macs(mlp, length) + _own_gate_macs(mlp) + sum(mlp.gate_units)


def _mmoe_macs(mmoe: layers.MMoE, length: int) -> int:
    expert_width = mmoe.expert_units[-1]
    experts = sum(module_flops(expert, length) for expert in mmoe.experts)
    task_gates = sum(_dense_macs(gate) for gate in mmoe.task_gates)
    return experts + task_gates + mmoe.num_tasks * mmoe.num_experts * expert_width


def _poso_mmoe_macs(mmoe: layers.PosoMMoE, length: int) -> int:
    # The expert gates scale each task's mixing weights (equal to scaling the expert outputs).
    gated_weights = mmoe.num_tasks * mmoe.num_experts
    return _mmoe_macs(mmoe, length) + _own_gate_macs(mmoe) + gated_weights


def _feature_gated_moe_macs(moe: layers.FeatureGatedMoE, length: int) -> int:
    return module_flops(moe.mixture, length)


def _attention_core_macs(attention, length: int) -> int:
    # Query projection (once), key projection and scores (per position), each head's weighted
    # sum of the raw items (per position), and the pooled items' value projection (once).
    item_dim = attention.key_projection.kernel.shape[0]
    return (_dense_macs(attention.query_projection) + _dense_macs(attention.key_projection, length)
            + length * attention.width + attention.num_heads * length * item_dim
            + item_dim * attention.width)


def _attention_macs(attention: layers.MultiHeadAttention, length: int) -> int:
    return _attention_core_macs(attention, length)


def _poso_attention_macs(attention: layers.PosoMultiHeadAttention, length: int) -> int:
    # Each head's pooled items are scaled by the N value gates (N * num_heads * item_dim) and
    # projected by the N stacked value kernels (N * item_dim * width where plain attention has
    # item_dim * width); the query is gated (width multiplies; equal to gating every key).
    item_dim = attention.value_kernel(0).shape[0]
    extra_value_kernels = (attention.num_value_projections - 1) * item_dim * attention.width
    value_mixture = attention.num_value_projections * attention.num_heads * item_dim
    gated_query = attention.width
    return (_attention_core_macs(attention, length) + extra_value_kernels + value_mixture + gated_query
            + _own_gate_macs(attention))


# Exact types: a new subclass must get its own rule rather than silently inherit one.
_FLOP_RULES: Dict[type, Callable[[Any, int], int]] = {
    layers.MLP: _mlp_macs,
    layers.PosoMLP: _poso_mlp_macs,
    layers.FeatureGatedMoE: _feature_gated_moe_macs,
    layers.MMoE: _mmoe_macs,
    layers.PosoMMoE: _poso_mmoe_macs,
    layers.MultiHeadAttention: _attention_macs,
    layers.PosoMultiHeadAttention: _poso_attention_macs,
}


def _tower_macs(tower: Union[tf.keras.Sequential, pin.PluginTowers]) -> int:
    """A task tower's Dense kernels; PIN's head and tail towers (one `pin.PluginTowers`) run on
    every example: both groups' kernels and, from the second layer, the bias rows its MatMuls hold."""
    if isinstance(tower, pin.PluginTowers):
        return tower.matmul_macs()
    return sum(_dense_macs(layer) for layer in tower.layers)


def module_flops(module: tf.keras.layers.Layer, sequence_length: int) -> int:
    """Multiply-adds per example of a built module from `models.layers` (see the module docstring)."""
    rule = _FLOP_RULES.get(type(module))
    if rule is None:
        raise TypeError(f"module_flops: no FLOP counting rule for {type(module).__name__} '{module.name}'; "
                        f"known: {sorted(cls.__name__ for cls in _FLOP_RULES)}")
    return rule(module, sequence_length)


def _behaviour_length() -> int:
    return fs.feature(model_lib.BEHAVIOUR_SEQUENCE[0]).max_length


def _cold_start_macs(ranking: model_lib.RankingModel, length: int) -> int:
    """The served substitution, computed for every example (the choice per user is a select):
    Meta-Embedding's generator; MWUF's two networks, the history's mean and e' = scale * e + shift;
    MAIL: `_mail_macs`."""
    if ranking.zero_shot is not None:
        return _mail_macs(ranking.zero_shot)
    method = ranking.cold_start
    if method is None:
        return 0
    if isinstance(method, cold_start.MetaEmbeddingGenerator):
        return _dense_macs(method.dense)
    history_dim = ranking.embeddings[model_lib.BEHAVIOUR_SEQUENCE[0]].output_dim
    return (_dense_macs(method.scaling) + _dense_macs(method.shifting) + length * history_dim
            + 2 * method.embedding_dim)


def _mail_macs(tower: Any) -> int:
    """MAIL's served generation v_hat = D2(E1(pool_a(a))), charged per example although the graph
    runs it on new users' rows only (0 for users with behaviour): the attention pooling's projection
    and query per attribute token, E1 and D2. The zero-shot losses (E2, D1, pool_v) run in training only."""
    pooling = tower.attribute_pooling
    tokens = len(tower.attribute_dims)
    return (_dense_macs(pooling.projection, tokens) + _dense_macs(pooling.query, tokens)
            + sum(_dense_macs(dense) for coder in (tower.attribute_encoder, tower.behaviour_decoder)
                  for dense in coder.dense_layers))


def flop_counts(ranking: model_lib.RankingModel) -> Dict[str, int]:
    """Multiply-adds per example of a built `RankingModel` by row of `ROWS`."""
    length = _behaviour_length()
    gate_macs = ranking.gate_network.gate_macs() if ranking.gate_network is not None else []
    counts = {row: module_flops(getattr(ranking, attribute), length)
              + _model_gates(ranking, attribute, gate_macs)
              for row, attribute in _MODULE_ATTRIBUTES.items()}
    counts["Towers"] = sum(_tower_macs(tower) for tower in ranking.towers.values())
    counts["User cold start"] = _cold_start_macs(ranking, length)
    counts["Dense network"] = sum(counts[row] for row in _DENSE_PARTS)
    # Lookups are free; the masked mean of each pooled (non-behaviour) sequence is not.
    pooled = [f for f in fs.features_of_kind(fs.Kind.SEQUENCE) if f.name not in model_lib.BEHAVIOUR_SEQUENCE]
    counts["Embedding tables"] = sum(f.max_length * ranking.embeddings[f.name].output_dim for f in pooled)
    counts["Whole model"] = counts["Dense network"] + counts["Embedding tables"]
    return counts


# --------------------------------------------------------------------------------------------
# Summary and table.
# --------------------------------------------------------------------------------------------


def _shared_overrides(config: Union[None, model_lib.ModelConfig, Mapping[str, Any]]) -> Dict[str, Any]:
    """The hyper-parameters both variants share; module kinds come from the variant pair."""
    if config is None:
        return {}
    if isinstance(config, model_lib.ModelConfig):
        values = config.to_dict()
    elif isinstance(config, Mapping):
        values = dict(config)
        model_lib.ModelConfig.from_dict(values)  # unknown fields or bad values fail here, clearly
    else:
        raise TypeError(f"summarize: config must be a ModelConfig, a mapping of ModelConfig overrides or None, "
                        f"got {type(config).__name__}")
    return {key: value for key, value in values.items() if key not in _KIND_FIELDS}


def check_variant_pair(variant_pair: Sequence[str]) -> Tuple[str, str]:
    if isinstance(variant_pair, str) or len(variant_pair) != 2:
        raise ValueError(f"variant pair must be two variant names (plain, POSO), got {variant_pair!r}")
    for name in variant_pair:
        if name not in model_lib.VARIANTS:
            raise ValueError(f"unknown model variant {name!r} in the variant pair; known: {sorted(model_lib.VARIANTS)}")
    return tuple(variant_pair)


def _increase_pct(before: int, after: int) -> Optional[float]:
    return None if before == 0 else 100.0 * (after - before) / before


def summarize(config: Union[None, model_lib.ModelConfig, Mapping[str, Any]] = None,
              variant_pair: Sequence[str] = DEFAULT_VARIANT_PAIR) -> Dict[str, Any]:
    """Parameters and FLOPs per row of `ROWS` for the two variants of `variant_pair`.

    config: the shared hyper-parameters, a `ModelConfig` or a mapping of its fields
      (None = defaults). Its module kinds (mlp/attention/mmoe) are ignored: they come from
      the variants of the pair.

    Returns a JSON-friendly dict: "variants" {"plain": name, "poso": name}, "configs" (both
    full configs), "sequence_length", "pc_dim", "one_hot_gates" (the POSO variant's gates are
    table lookups), "gate_table_macs_per_batch" (what computing those tables costs), "gated"
    (either variant has POSO gates), "rows" {row: {"plain_params", "poso_params",
    "params_increase_pct", "plain_flops", "poso_flops", "flops_increase_pct"}} in `ROWS`
    order, and "overhead" {"dense_params_pct", "params_pct", "flops_pct"} of POSO over plain
    (dense network params, whole-model params, whole-model FLOPs).
    """
    plain_name, poso_name = check_variant_pair(variant_pair)
    shared = _shared_overrides(config)
    measured = {}
    for role, name in (("plain", plain_name), ("poso", poso_name)):
        ranking = build_model(model_lib.make_config(name, **shared))
        pc_dim = int(ranking.personalization_code(random_transformed_features(1, include_labels=False)).shape[1])
        table_macs = ranking.gate_network.gate_table_macs() if ranking.gate_network is not None else []
        measured[role] = dict(config=ranking.config.to_dict(), params=parameter_counts(ranking),
                              flops=flop_counts(ranking), pc_dim=pc_dim,
                              one_hot_gates=bool(ranking.gate_network and ranking.gate_network.one_hot_code),
                              gate_table_macs=sum(table_macs), gated=ranking.gate_network is not None)
    rows = {}
    for row in ROWS:
        plain_params, poso_params = measured["plain"]["params"][row], measured["poso"]["params"][row]
        plain_flops, poso_flops = measured["plain"]["flops"][row], measured["poso"]["flops"][row]
        rows[row] = dict(plain_params=plain_params, poso_params=poso_params,
                         params_increase_pct=_increase_pct(plain_params, poso_params),
                         plain_flops=plain_flops, poso_flops=poso_flops,
                         flops_increase_pct=_increase_pct(plain_flops, poso_flops))
    return dict(
        variants=dict(plain=plain_name, poso=poso_name),
        configs={role: measured[role]["config"] for role in ("plain", "poso")},
        sequence_length=_behaviour_length(),
        pc_dim=measured["poso"]["pc_dim"],
        one_hot_gates=measured["poso"]["one_hot_gates"],
        gate_table_macs_per_batch=measured["poso"]["gate_table_macs"],
        gated=measured["plain"]["gated"] or measured["poso"]["gated"],
        rows=rows,
        overhead=dict(dense_params_pct=rows["Dense network"]["params_increase_pct"],
                      params_pct=rows["Whole model"]["params_increase_pct"],
                      flops_pct=rows["Whole model"]["flops_increase_pct"]),
    )


# What MAIL's FLOPs per example are (model-summary's table and `bench train` say it).
MAIL_FLOPS_NOTE = "a new user's row's, with the generator (pool_a, E1, D2); a row with behaviour skips it"


def _label(variant: str) -> str:
    return _LABELS.get(variant, variant)


def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:+.1f}%"


def format_table(summary: Mapping[str, Any]) -> str:
    """The summary as a text table (the paper's Table 1 layout), ending with the overhead line."""
    plain, poso = _label(summary["variants"]["plain"]), _label(summary["variants"]["poso"])
    config = summary["configs"]["poso"]
    header = ["module", f"{plain} params", f"{poso} params", "+%", f"{plain} FLOPs", f"{poso} FLOPs", "+%"]
    lines = [[row, f"{v['plain_params']:,}", f"{v['poso_params']:,}", _pct(v["params_increase_pct"]),
              f"{v['plain_flops']:,}", f"{v['poso_flops']:,}", _pct(v["flops_increase_pct"])]
             for row, v in summary["rows"].items()]
    widths = [max(len(line[i]) for line in [header] + lines) for i in range(len(header))]

    def render(cells):
        return "  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(cells))

    rule = "-" * len(render(header))
    overhead = summary["overhead"]
    text = [
        f"Parameters and FLOPs per module: {plain} = {summary['variants']['plain']}, "
        f"{poso} = {summary['variants']['poso']}",
        f"FLOPs = forward multiply-adds per example (behaviour sequence length {summary['sequence_length']}); "
        "embedding lookups count 0.",
        (f"Gates: pc_source={config['pc_source']} (pc_dim {summary['pc_dim']}), "
         f"gate_hidden_units={config['gate_hidden_units']}"
         + (f"; one-hot code: each gate is a row lookup (0 MACs per example) in tables computed once per "
            f"batch ({summary['gate_table_macs_per_batch']:,} MACs per batch)." if summary["one_hot_gates"] else ".")
         if summary["gated"] else "Gates: none (neither variant has POSO gates)."),
        "",
        render(header),
        rule,
    ]
    for line in lines:
        if line[0] == "Dense network":
            text.append(rule)
        text.append(render(line))
    text += [
        "",
        f"{poso} vs {plain}: {_pct(overhead['dense_params_pct'])} parameters, {_pct(overhead['flops_pct'])} FLOPs "
        f"(dense network; whole model with embedding tables: {_pct(overhead['params_pct'])} parameters)",
    ]
    if any(summary["configs"][role].get("mail") for role in ("plain", "poso")):
        text.append(f"MAIL: the FLOPs are {MAIL_FLOPS_NOTE}. The parameters include pool_v, E2 and D1, "
                    "which only training runs.")
    return "\n".join(text)
