"""models.model_summary (parameters and FLOPs, plain vs POSO) and the train-throughput benchmark smoke run."""

import argparse
import json
import re

import numpy as np
import pytest
import tensorflow as tf

import feature_specs as fs
from benchmarks import train_throughput
from models import layers, model, model_summary
from pipeline import cli

# Small dimensions for the tests that do not need the default model.
TINY = dict(embedding_dim=4, mlp_units=(16,), expert_units=(8,), tower_units=(4,), num_heads=2, head_dim=4,
            gate_hidden_units=4, pc_embedding_dim=3, num_experts=2, num_value_projections=2)
LENGTH = fs.feature(model.BEHAVIOUR_SEQUENCE[0]).max_length


@pytest.fixture(scope="module")
def summary():
    return model_summary.summarize()


@pytest.fixture(scope="module")
def built():
    """The default plain and POSO(all) models, built here independently of the summary."""
    features = model_summary.random_transformed_features(3, seed=7, include_labels=False)
    models = {"plain": model.RankingModel(model.make_config("baseline")),
              "poso": model.RankingModel(model.make_config("poso_all"))}
    for ranking in models.values():
        ranking(features)
    return models


def _gate_params(pc_dim, hidden, units):
    return pc_dim * hidden + hidden + hidden * units + units


def _gate_macs(pc_dim, hidden, units):
    # Both gate kernels, plus one multiply per gated output element.
    return pc_dim * hidden + hidden * units + units


def test_parameter_counts_are_the_built_layers_counts(summary, built):
    rows = summary["rows"]
    for role, ranking in built.items():
        # A POSO module's gates are computed by the model's one gate network: its row adds them.
        gate_params = (ranking.gate_network.gate_parameter_counts() if ranking.gate_network else [])
        by_module = ranking.gates_by_module()
        for row, module in (("MLP", "mlp"), ("MHA", "attention"), ("MMoE", "mmoe")):
            own_gates = sum(gate_params[i] for i in by_module.get(module, []))
            assert rows[row][f"{role}_params"] == getattr(ranking, module).count_params() + own_gates
            assert (own_gates > 0) == (role == "poso")
        assert rows["Towers"][f"{role}_params"] == sum(t.count_params() for t in ranking.towers.values())
        assert rows["Embedding tables"][f"{role}_params"] == sum(e.count_params() for e in ranking.embeddings.values())
        trainable = sum(int(np.prod(w.shape)) for w in ranking.trainable_weights)
        assert rows["Whole model"][f"{role}_params"] == trainable == ranking.count_params()
        assert trainable == sum(rows[row][f"{role}_params"] for row in ("MLP", "MHA", "MMoE", "Towers", "User cold start",
                                                                         "Embedding tables"))


def test_poso_adds_exactly_the_gate_parameters(summary):
    config = model.ModelConfig()
    pc_dim, hidden = fs.PC.num_buckets, config.gate_hidden_units  # default PC: one-hot of the AVC bucket
    width = config.num_heads * config.head_dim
    item_dim = sum(fs.feature(name).embedding_dim for name in model.BEHAVIOUR_SEQUENCE)
    added = {row: v["poso_params"] - v["plain_params"] for row, v in summary["rows"].items()}
    assert added["MLP"] == sum(_gate_params(pc_dim, hidden, units) for units in config.mlp_units)
    assert added["MMoE"] == _gate_params(pc_dim, hidden, config.num_experts)
    # POSO(MHA) also has N value projections where MHA has one.
    value_projections = config.num_value_projections
    assert added["MHA"] == (_gate_params(pc_dim, hidden, width) + _gate_params(pc_dim, hidden, value_projections)
                            + (value_projections - 1) * item_dim * width)
    assert added["Towers"] == added["Embedding tables"] == 0
    assert added["Dense network"] == added["Whole model"] == added["MLP"] + added["MHA"] + added["MMoE"]
    assert summary["pc_dim"] == pc_dim


def test_flops_are_positive_and_poso_adds_its_gates(summary, built):
    rows = summary["rows"]
    for row, v in rows.items():
        if row == "User cold start":  # neither baseline nor POSO has one
            assert v["plain_flops"] == v["poso_flops"] == 0
            continue
        assert v["plain_flops"] > 0 and v["poso_flops"] >= v["plain_flops"], row
    for row in model_summary.MODULE_ROWS:
        assert rows[row]["poso_flops"] > rows[row]["plain_flops"], row
    config = model.ModelConfig()
    # The default PC is one-hot: each gate is a row lookup (0 MACs per example); what remains is
    # one multiply per gated element. The tables cost the equation once per code and batch.
    assert summary["one_hot_gates"]
    assert rows["MLP"]["poso_flops"] - rows["MLP"]["plain_flops"] == sum(config.mlp_units)
    gates = built["poso"].gate_network
    assert summary["gate_table_macs_per_batch"] == fs.PC.num_buckets * sum(
        _gate_macs(fs.PC.num_buckets, config.gate_hidden_units, units) - units for units in gates.gate_units)
    # Plain attention: Q once; K at every position; scores per position; each head pools the
    # raw items (heads * L * item_dim) and projects the pooled item once (item_dim * width).
    attention = built["plain"].attention
    query_dim, item_dim = attention.query_projection.kernel.shape[0], attention.key_projection.kernel.shape[0]
    width = config.num_heads * config.head_dim
    assert rows["MHA"]["plain_flops"] == (query_dim * width + LENGTH * item_dim * width + LENGTH * width
                                          + config.num_heads * LENGTH * item_dim + item_dim * width)
    assert rows["Whole model"]["plain_flops"] == sum(rows[row]["plain_flops"] for row in
                                                     ("Dense network", "Embedding tables"))


def test_table_has_every_row_and_ends_with_the_overhead(summary):
    table = model_summary.format_table(summary)
    for row in model_summary.ROWS:
        assert re.search(rf"^{re.escape(row)}\s+[\d,]+\s", table, re.MULTILINE), row
    last = table.splitlines()[-1]
    overhead = summary["overhead"]
    assert last.startswith(f"POSO(all) vs plain: {overhead['dense_params_pct']:+.1f}% parameters, "
                           f"{overhead['flops_pct']:+.1f}% FLOPs")
    assert f"{overhead['params_pct']:+.1f}% parameters" in last


def _summary_parser():
    parser = argparse.ArgumentParser()
    cli.add_model_summary_arguments(parser)
    return parser


def test_the_help_shows_the_default_pair():
    shown = " ".join(_summary_parser().format_help().split())
    assert f"(default: {','.join(model_summary.DEFAULT_VARIANT_PAIR)})" in shown


def test_other_pairs_and_overrides(capsys):
    overrides = dict(TINY, pc_source="avc_bucket_embedding")
    assert cli.cmd_model_summary(_summary_parser().parse_args(
        ["--variant-pair", "baseline,poso_mlp", "--config", json.dumps(overrides), "--json"])) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["variants"] == {"plain": "baseline", "poso": "poso_mlp"}
    assert result["configs"]["poso"]["mlp_units"] == [16] and result["pc_dim"] == TINY["pc_embedding_dim"]
    rows = result["rows"]
    for row in ("MHA", "MMoE", "Towers", "Embedding tables"):
        assert rows[row]["poso_params"] == rows[row]["plain_params"], row
        assert rows[row]["poso_flops"] == rows[row]["plain_flops"], row
    assert rows["MLP"]["poso_params"] - rows["MLP"]["plain_params"] == _gate_params(3, 4, 16)
    # A dense (embedded) code runs the gate's equation on every example.
    assert not result["one_hot_gates"] and result["gate_table_macs_per_batch"] == 0
    assert rows["MLP"]["poso_flops"] - rows["MLP"]["plain_flops"] == _gate_macs(3, 4, 16)
    # Both variants carry the PC embedding table (it is an input of every variant).
    assert rows["Embedding tables"]["plain_params"] >= fs.PC.num_buckets * TINY["pc_embedding_dim"]


def test_pin_counts_its_fused_towers():
    """PIN's head and tail towers are one layer per task: twice the baseline's tower kernels and
    biases, FLOPs both groups' kernels plus the two bias rows of the output MatMul."""
    summary = model_summary.summarize(TINY, variant_pair=("baseline", "pin"))
    towers, tasks, width, units = summary["rows"]["Towers"], len(fs.TASKS), TINY["expert_units"][-1], 4
    assert towers["plain_params"] == tasks * (width * units + units + units + 1)
    assert towers["poso_params"] == 2 * towers["plain_params"]
    assert towers["plain_flops"] == tasks * (width * units + units)
    assert towers["poso_flops"] == tasks * (2 * width * units + 2 * units + 2)
    # Neither model has POSO gates, and the table says so rather than describe gates.
    table = model_summary.format_table(summary)
    assert "Gates: none (neither variant has POSO gates)." in table.splitlines()
    assert "MAIL:" not in table


def test_mail_table_says_what_its_flops_and_parameters_cover():
    table = model_summary.format_table(model_summary.summarize(TINY, variant_pair=("baseline", "mail")))
    assert table.splitlines()[-1].startswith("MAIL: the FLOPs are a new user's row's")
    assert "Gates: none" in table


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="'nope'"):
        model_summary.summarize(variant_pair=("baseline", "nope"))
    with pytest.raises(ValueError, match="mlp_unit"):
        model_summary.summarize({"mlp_unit": [8]})
    with pytest.raises(TypeError, match="no FLOP counting rule for Dense"):
        model_summary.module_flops(tf.keras.layers.Dense(3), LENGTH)
    with pytest.raises(SystemExit):
        _summary_parser().parse_args(["--config", "[1, 2]"])
    with pytest.raises(SystemExit):
        _summary_parser().parse_args(["--variant-pair", "baseline,nope"])


def test_random_transformed_features_are_valid():
    features = {k: v.numpy() for k, v in model_summary.random_transformed_features(64, seed=3).items()}
    for feature in fs.features_of_kind(fs.Kind.CATEGORICAL, fs.Kind.SEQUENCE):
        values = features[feature.name]
        assert values.dtype == np.int64 and values.min() >= 0 and values.max() < feature.cardinality, feature.name
    for feature in fs.features_of_kind(fs.Kind.SEQUENCE):
        ids = features[feature.name]
        assert ids.shape == (64, feature.max_length)
        real = ids != fs.PADDING_INDEX
        # Padding only after the real ids.
        assert np.all(real[:, 1:] <= real[:, :-1]), feature.name
    counts = np.rint(np.expm1(features[fs.PC.source])).astype(int)
    assert [fs.pc_bucket(c) for c in counts] == features[fs.PC_BUCKET].tolist()
    assert len(set(features[fs.PC_BUCKET].tolist())) > 3
    for feature in fs.features_of_kind(fs.Kind.LABEL):
        assert set(np.unique(features[feature.name])) <= {0.0, 1.0}


@pytest.mark.parametrize("optimizer", train_throughput.OPTIMIZERS)
def test_train_throughput_smoke(tmp_path, capsys, optimizer):
    parser = argparse.ArgumentParser()
    train_throughput.add_arguments(parser)
    out = tmp_path / "throughput.json"
    args = parser.parse_args(["--variants", "baseline,poso_all", "--steps", "3", "--batch-size", "32",
                              "--repeats", "2", "--warmup", "1", "--config", json.dumps(TINY), "--json", str(out),
                              "--optimizer", optimizer])
    assert train_throughput.run(args) == 0
    results = json.loads(out.read_text())
    assert results["settings"]["optimizer"] == optimizer
    assert set(results["variants"]) == {"baseline", "poso_all"}
    for name, r in results["variants"].items():
        assert r["examples_per_second_median"] > 0 and len(r["step_ms_rounds"]) == 2, name
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"], name
    assert results["variants"]["poso_all"]["dense_params"] > results["variants"]["baseline"]["dense_params"]
    assert results["poso_all_vs_baseline"]["step_time_ratio"] > 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-2].startswith("POSO(all) vs baseline step time: ")
    assert printed[-1].startswith("POSO(all) vs baseline parameters: ")
