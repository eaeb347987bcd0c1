"""RankingModel variants, their SavedModel export (3 signatures) and the TFX trainer module."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft
from tfx.components.trainer.fn_args_utils import FnArgs

import feature_specs as fs
import raw_examples as rx
from models import export, model, trainer
from serving import servable

# Tiny dimensions so every variant trains and exports in seconds on 2 CPU cores.
TINY = dict(embedding_dim=4, mlp_units=(16,), expert_units=(8,), tower_units=(4,), num_heads=2, head_dim=4,
            gate_hidden_units=4, pc_embedding_dim=3, num_experts=2, num_value_projections=2,
            learning_rate=0.01)
# Each variant once and each PC source once (PC sources only matter with POSO modules).
CASES = [
    ("baseline", "avc_bucket_onehot"),
    ("moe", "avc_bucket_onehot"),
    ("pin", "avc_bucket_onehot"),
    ("poso_mlp", "avc_bucket_embedding"),
    ("poso_mha", "avc_raw"),
    ("poso_mmoe", "is_new_user"),
    ("poso_all", "user_id"),
    ("poso_all", "item_age"),
    ("poso_all", "avc_bucket_onehot"),
    ("poso_mlp", "all_features"),
    ("meta_emb", "avc_bucket_onehot"),
    ("mwuf", "avc_bucket_onehot"),
    ("mail", "avc_bucket_onehot"),
]
LABELS_AND_SLICES = [f.name for f in fs.features_of_kind(fs.Kind.LABEL, fs.Kind.SLICE)]
TASK_NAMES = {task.name for task in fs.TASKS}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows, transform_dir = rx.shared_transform(str(tmp_path_factory.getbasetemp()))
    tft_output = tft.TFTransformOutput(transform_dir)
    transformed = tft_output.transform_features_layer()(rx.parse_raw(rx.serialize_all(rows)))
    return dict(rows=rows, transform_dir=transform_dir, tft_output=tft_output, transformed=transformed)


_EXPORTS = {}


def _train_and_export(case, data, export_root):
    """Trains `case` for a few steps and exports it; cached per module run."""
    if case not in _EXPORTS:
        variant, pc_source = case
        # PIN's P(head) is measured by the Trainer; here it is given.
        pin_share = dict(pin_head_share=0.25) if model.VARIANTS[variant].pin else {}
        ranking = model.RankingModel(model.make_config(variant, pc_source=pc_source, **TINY, **pin_share))
        # Eager steps: tracing a train function costs more than 3 tiny steps (graph-mode
        # training is covered by the overfit and trainer tests).
        ranking.compile(optimizer=tf.keras.optimizers.Adam(ranking.config.learning_rate), run_eagerly=True)
        dataset = tf.data.Dataset.from_tensor_slices(dict(data["transformed"])).batch(64)
        history = ranking.fit(dataset, epochs=1, steps_per_epoch=3, verbose=0)
        export_dir = export.export_serving_model(ranking, data["tft_output"],
                                                 os.path.join(export_root, "_".join(case)))
        _EXPORTS[case] = (ranking, tf.saved_model.load(export_dir), history.history["loss"])
    return _EXPORTS[case]


@pytest.fixture(scope="module")
def export_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("exports"))


def _numpy(outputs):
    return {name: value.numpy() for name, value in outputs.items()}


def test_cases_cover_every_variant_and_pc_source():
    assert {variant for variant, _ in CASES} == set(model.VARIANTS)
    assert {source for variant, source in CASES if model.VARIANTS[variant].uses_poso} == set(model.PC_SOURCES)


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_variant_trains_and_serves_the_same_after_export(case, data, export_root):
    ranking, loaded, losses = _train_and_export(case, data, export_root)
    assert np.all(np.isfinite(losses))
    rows = data["rows"][:40]
    features = {k: v[:40] for k, v in data["transformed"].items()}
    eager = _numpy(ranking(features))
    assert set(eager) == TASK_NAMES
    for probabilities in eager.values():
        assert probabilities.shape == (40,) and probabilities.dtype == np.float32
        assert np.all((probabilities > 0) & (probabilities < 1))

    examples = tf.constant(rx.serialize_all(rows, drop=LABELS_AND_SLICES))
    from_examples = _numpy(loaded.signatures[export.SERVING_DEFAULT](examples=examples))
    from_raw = _numpy(loaded.signatures[export.SERVING_RAW](**rx.raw_tensors(rows)))
    # And as the model server runs it: a Session over the serve MetaGraphDef.
    export_dir = os.path.join(export_root, "_".join(case))
    session = servable.SessionSignatures(export_dir, servable.read_serve_meta_graph(export_dir))
    by_session = session.run(export.SERVING_DEFAULT, {export.EXAMPLES_INPUT: examples.numpy()})
    raw_by_session = session.run(export.SERVING_RAW, _numpy(rx.raw_tensors(rows)))
    for served in (from_examples, from_raw, by_session, raw_by_session):
        assert set(served) == TASK_NAMES
        for name in TASK_NAMES:
            assert served[name].shape == (40,) and served[name].dtype == np.float32
            np.testing.assert_allclose(served[name], eager[name], rtol=1e-5, atol=1e-6, err_msg=name)

    gates = _numpy(loaded.signatures[export.GATES](examples=examples))
    eager_gates = _numpy(ranking.gate_outputs(features))
    assert set(gates) == {export.PC_OUTPUT} | set(eager_gates)
    np.testing.assert_allclose(gates[export.PC_OUTPUT], ranking.personalization_code(features).numpy(), atol=1e-6)
    assert bool(eager_gates) == ranking.config.uses_poso
    for name, value in eager_gates.items():
        np.testing.assert_allclose(gates[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
        assert value.shape[0] == 40 and np.all((value > 0) & (value < ranking.config.gate_scale)), name


def test_pc_sources_give_their_documented_codes(data):
    features = {k: v[:8] for k, v in data["transformed"].items()}
    widths = {}
    for source in model.PC_SOURCES:
        ranking = model.RankingModel(model.make_config("poso_all", pc_source=source, **TINY))
        ranking(features)
        widths[source] = ranking.personalization_code(features).shape[1]
    onehot = model.RankingModel(model.make_config("poso_all", **TINY)).personalization_code(features).numpy()
    np.testing.assert_array_equal(onehot.argmax(axis=1), features[fs.PC_BUCKET].numpy())
    non_sequential = model.RankingModel(model.make_config("baseline", **TINY))._non_sequential(features)
    assert widths == {"avc_bucket_onehot": fs.PC.num_buckets, "avc_bucket_embedding": TINY["pc_embedding_dim"],
                      "avc_raw": 1, "is_new_user": 1, "user_id": TINY["embedding_dim"], "item_age": 1,
                      "all_features": non_sequential.shape[1]}


def test_one_gate_network_computes_every_modules_gates(data):
    features = {k: v[:8] for k, v in data["transformed"].items()}
    plain, poso = (model.RankingModel(model.make_config(v, **TINY)) for v in ("baseline", "poso_all"))
    for ranking in (plain, poso):
        ranking(features)
    # The modules' own gate networks are never called: the model's one network (a single
    # variable) is POSO(all)'s only extra variable, which keeps its training step cheap.
    for module in (poso.mlp, poso.attention, poso.mmoe):
        assert not module.gate_network.built, module.name
    assert len(poso.trainable_variables) == len(plain.trainable_variables) + 1
    assert poso.gates_by_module() == {"attention": [0, 1], "mlp": [2], "mmoe": [3]}
    pc = poso.personalization_code(features)
    outputs, network = poso.gate_outputs(features), poso.gate_network(pc)
    for name, index in (("attention_keys", 0), ("attention_values", 1), ("mlp_layer_0", 2),
                        ("mmoe_experts", 3)):
        np.testing.assert_array_equal(outputs[name], network[index], err_msg=name)
    assert plain.gate_network is None and plain.gate_outputs(features) == {}


@pytest.mark.parametrize("pc_source", ["user_id", "all_features"])
def test_embedding_pcs_do_not_train_the_embeddings_through_gates(data, pc_source):
    features = {k: v[:16] for k, v in data["transformed"].items()}
    ranking = model.RankingModel(model.make_config("poso_all", pc_source=pc_source, **TINY))
    ranking(features)
    tables = [table.embeddings for table in ranking.embeddings.values()]
    with tf.GradientTape() as tape:
        gate_sum = tf.add_n([tf.reduce_sum(g) for g in ranking.gate_outputs(features).values()])
    gradients = tape.gradient(gate_sum, tables + [ranking.gate_network.parameters])
    assert all(gradient is None for gradient in gradients[:-1])
    assert gradients[-1] is not None  # the gates themselves do learn
    if pc_source == "all_features":  # the code is x itself: every non-sequential input
        np.testing.assert_array_equal(ranking.personalization_code(features), ranking._non_sequential(features))


def test_tiny_overfit_run_decreases_the_loss(data):
    batch = {k: v[:32] for k, v in data["transformed"].items()}
    ranking = model.RankingModel(model.make_config("poso_all", **TINY))
    ranking.compile(optimizer=tf.keras.optimizers.Adam(0.02))
    before = float(ranking.compute_loss(batch))
    history = ranking.fit(tf.data.Dataset.from_tensors(batch).repeat(), epochs=1, steps_per_epoch=20, verbose=0)
    after = float(ranking.compute_loss(batch))
    assert np.isfinite(history.history["loss"]).all()
    assert after < 0.6 * before, (before, after)


def test_config_validation_and_round_trip():
    config = model.make_config("poso_all", pc_source="is_new_user", mlp_units=[8, 4])
    assert config.mlp_units == (8, 4)
    assert model.ModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="pc_source"):
        model.make_config("baseline", pc_source="shoe_size")
    with pytest.raises(ValueError, match="mlp"):
        model.ModelConfig(mlp="transformer")
    with pytest.raises(ValueError, match="unknown model variant"):
        model.make_config("poso_everything")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        model.make_config("baseline", hidden_units=3)


def test_model_names_a_missing_feature(data):
    features = {k: v[:4] for k, v in data["transformed"].items() if k != fs.USER_ID}
    with pytest.raises(KeyError, match=fs.USER_ID):
        model.RankingModel(model.make_config("baseline", **TINY))(features)


def test_dense_to_sparse_sequence_matches_example_parsing():
    padding = fs.SEQUENCE_PADDING_VALUE
    padded = tf.constant([[5, 0, padding, padding], [padding, padding, padding, padding], [7, padding, 8, 9]],
                         tf.int64)
    sparse = export.dense_to_sparse_sequence(padded)
    np.testing.assert_array_equal(tf.sparse.to_dense(sparse, default_value=-9).numpy(),
                                  [[5, 0, -9], [-9, -9, -9], [7, 8, 9]])


def _reference_export(data, export_root):
    return _train_and_export(("poso_all", "avc_bucket_onehot"), data, export_root)[1]


def test_serving_raw_rejects_bad_payloads(data, export_root):
    serve_raw = _reference_export(data, export_root).signatures[export.SERVING_RAW]
    good = rx.raw_tensors(data["rows"][:3])
    missing = dict(good)
    del missing[fs.VIDEO_ID]
    with pytest.raises(TypeError, match=fs.VIDEO_ID):
        serve_raw(**missing)
    wrong_dtype = dict(good, **{fs.VIDEO_ID: tf.cast(good[fs.VIDEO_ID], tf.float32)})
    with pytest.raises((tf.errors.InvalidArgumentError, TypeError, ValueError), match="int64"):
        serve_raw(**wrong_dtype)
    short = dict(good, **{fs.AUTHOR_ID: good[fs.AUTHOR_ID][:2]})
    with pytest.raises(tf.errors.InvalidArgumentError, match=fs.AUTHOR_ID):
        serve_raw(**short)


def test_serving_default_rejects_bad_payloads(data, export_root):
    serve = _reference_export(data, export_root).signatures[export.SERVING_DEFAULT]
    missing_feature = rx.serialize_all(data["rows"][:2], drop=LABELS_AND_SLICES + [fs.USER_ACTIVE_DEGREE])
    with pytest.raises(tf.errors.InvalidArgumentError, match=fs.USER_ACTIVE_DEGREE):
        serve(examples=tf.constant(missing_feature))
    with pytest.raises(tf.errors.InvalidArgumentError, match="parse"):
        serve(examples=tf.constant([b"definitely not a tf.Example"]))
    # Labels may be present in a request; they are ignored.
    with_labels = _numpy(serve(examples=tf.constant(rx.serialize_all(data["rows"][:5]))))
    without = _numpy(serve(examples=tf.constant(rx.serialize_all(data["rows"][:5], drop=LABELS_AND_SLICES))))
    for name in TASK_NAMES:
        np.testing.assert_array_equal(with_labels[name], without[name])


# MAIL's served part (models.mail.ZeroShotTower.served_layers) and the parts only its losses run.
MAIL_SERVED_SCOPES = ("mail_attribute_pooling", "mail_attribute_encoder", "mail_behaviour_decoder")
MAIL_TRAINING_ONLY_SCOPES = ("mail_behaviour_pooling", "mail_behaviour_encoder", "mail_attribute_decoder")


def _traced_rows(session, signature, examples):
    """serving_default run in `session` with a full trace: (outputs, {scope: {rows}}) where rows are
    the leading dimensions of the rank-2 tensors E1's and D2's ops produced."""
    run_metadata = tf.compat.v1.RunMetadata()
    outputs = session.run({name: info.name for name, info in signature.outputs.items()},
                          {signature.inputs[export.EXAMPLES_INPUT].name: examples},
                          options=tf.compat.v1.RunOptions(trace_level=tf.compat.v1.RunOptions.FULL_TRACE),
                          run_metadata=run_metadata)
    rows = {scope: set() for scope in MAIL_SERVED_SCOPES[1:]}
    for device in run_metadata.step_stats.dev_stats:
        for node in device.node_stats:
            scope = next((scope for scope in rows if f"/{scope}/" in node.node_name), None)
            # Not the variable reads: their outputs are [in, out] kernels (in the If's branch, the
            # inlined nodes' names go on after "/ReadVariableOp").
            if scope and "/ReadVariableOp" not in node.node_name:
                rows[scope].update(int(output.tensor_description.shape.dim[0].size) for output in node.output
                                   if len(output.tensor_description.shape.dim) == 2)
    return outputs, rows


def test_mail_serving_graph_generates_for_new_users_rows_only(data, export_root, monkeypatch):
    """The exported MAIL model, run as the model server runs it (a Session over the serve
    MetaGraphDef): E2, D1 and pool_v are not in the served graph; E1 and D2 run on the new users'
    rows only, and not at all for a request without new users (its `If` is kept functional); their
    predictions are the model's without MAIL."""
    case = ("mail", "avc_bucket_onehot")
    ranking = _train_and_export(case, data, export_root)[0]
    export_dir = os.path.join(export_root, "_".join(case))
    meta_graph = servable.read_serve_meta_graph(export_dir)
    signature = meta_graph.signature_def[export.SERVING_DEFAULT]
    # The variables the signature's call reads (its resource inputs) and the ops of every function.
    (call,) = {info.name.split(":")[0] for info in signature.outputs.values()}
    (call_node,) = [node for node in meta_graph.graph_def.node if node.name == call]
    read = {name for name in call_node.input if name.startswith("mail_")}
    saved = {node.name for node in meta_graph.graph_def.node if node.op == "VarHandleOp"}
    function_ops = [node.name for function in meta_graph.graph_def.library.function for node in function.node_def]
    for scope in MAIL_TRAINING_ONLY_SCOPES:  # saved (for warm starts), never read, never computed
        assert any(name.startswith(scope + "/") for name in saved), scope
        assert not any(name.startswith(scope + "/") for name in read), scope
        assert not any(f"{scope}/" in name for name in function_ops), scope
    for scope in MAIL_SERVED_SCOPES:
        assert any(name.startswith(scope + "/") for name in read), scope
    # The substitution is an If node (one per traced function), left functional: not lowered to
    # Switch/Merge when a Session loads the graph.
    ifs = [node for function in meta_graph.graph_def.library.function for node in function.node_def
           if node.op in ("If", "StatelessIf")]
    assert ifs and all(node.attr["_lower_using_switch_merge"].b is False for node in ifs)

    rows = data["rows"]
    new = [row for row in rows if row[fs.IS_NEW_USER] == 1][:3]
    old = [row for row in rows if row[fs.IS_NEW_USER] == 0][:8]
    assert len(new) == 3 and len(old) == 8
    graph = tf.Graph()
    with tf.compat.v1.Session(graph=graph) as session:
        with graph.as_default():
            tf.compat.v1.saved_model.load(session, [tf.saved_model.SERVING], export_dir)
        served_old, old_rows = _traced_rows(session, signature, rx.serialize_all(old, drop=LABELS_AND_SLICES))
        served_mixed, mixed_rows = _traced_rows(session, signature, rx.serialize_all(new + old[:5],
                                                                                       drop=LABELS_AND_SLICES))
    assert old_rows == {"mail_attribute_encoder": set(), "mail_behaviour_decoder": set()}  # never ran
    assert mixed_rows == {"mail_attribute_encoder": {3}, "mail_behaviour_decoder": {3}}

    # The same weights with the zero-shot tower bypassed: the history for every row.
    transformed = tft.TFTransformOutput(data["transform_dir"]).transform_features_layer()
    features = transformed(rx.parse_raw(rx.serialize_all(new + old), include_labels=False))
    monkeypatch.setattr(ranking, "mail_behaviour_sequence",
                        lambda features, training=False: ranking._behaviour_sequence(features))
    bypassed = _numpy(ranking(features))
    for name in TASK_NAMES:
        np.testing.assert_allclose(served_old[name], bypassed[name][3:], rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(served_mixed[name][3:], bypassed[name][3:8], rtol=1e-5, atol=1e-6, err_msg=name)
    # New users' predictions do read v_hat (a task's tiny tower may be dead for them: any task).
    assert not all(np.allclose(served_mixed[name][:3], bypassed[name][:3], rtol=1e-5, atol=1e-6)
                   for name in TASK_NAMES)


def _write_spans(root, rows, spans=2):
    """ExampleGen-like layout: <root>/span-<i>/Split-<split>/data.gz, one dir per daily span."""
    patterns = {"train": [], "eval": []}
    for span in range(spans):
        for split, part in (("train", rows[span::spans][:-8]), ("eval", rows[span::spans][-8:])):
            directory = os.path.join(root, f"span-{span}", f"Split-{split}")
            rx.write_gzip_tfrecords(os.path.join(directory, "data_tfrecord-00000-of-00001.gz"), rx.serialize_all(part))
            patterns[split].append(os.path.join(directory, "*"))
    return patterns


def trainer_args(data, tmp_path, custom_config, train_steps):
    """FnArgs for `trainer.run_fn` on spans of data["rows"] written under tmp_path."""
    patterns = _write_spans(str(tmp_path / "examples"), data["rows"])
    return FnArgs(
        train_files=patterns["train"], eval_files=patterns["eval"], transform_output=data["transform_dir"],
        serving_model_dir=str(tmp_path / "serving"), model_run_dir=str(tmp_path / "logs"),
        train_steps=train_steps, eval_steps=1, custom_config=custom_config)


def test_run_fn_trains_on_raw_spans_exports_and_logs(data, tmp_path):
    fn_args = trainer_args(data, tmp_path, {"variant": "poso_mlp", "batch_size": 32, "epochs": 2,
                                            "overrides": dict(TINY, pc_source="is_new_user")}, train_steps=4)
    trainer.run_fn(fn_args)

    loaded = tf.saved_model.load(fn_args.serving_model_dir)
    assert set(loaded.signatures) == set(export.SIGNATURES)
    served = loaded.signatures[export.SERVING_DEFAULT](examples=tf.constant(rx.serialize_all(data["rows"][:4])))
    assert set(served) == TASK_NAMES
    with open(os.path.join(fn_args.serving_model_dir, "assets.extra", "model_config.json")) as f:
        saved_config = model.ModelConfig.from_dict(json.load(f))
    assert (saved_config.mlp, saved_config.pc_source) == ("poso", "is_new_user")
    for split in ("train", "validation"):
        events = [event for path in tf.io.gfile.glob(os.path.join(fn_args.model_run_dir, split, "events.*"))
                  for event in tf.compat.v1.train.summary_iterator(path)]
        losses = {event.step: float(tf.make_ndarray(value.tensor)) for event in events
                  for value in event.summary.value if value.tag == "epoch_loss"}
        assert sorted(losses) == [0, 1] and np.isfinite(list(losses.values())).all(), split


def test_warm_start_restores_matching_variables_only(data, export_root, tmp_path):
    case = ("poso_all", "avc_bucket_onehot")
    base, _, _ = _train_and_export(case, data, export_root)
    base_dir = os.path.join(export_root, "_".join(case))
    features = {k: v[:10] for k, v in data["transformed"].items()}

    same = model.RankingModel(base.config)
    same(features)
    assert len({variable.name for variable in same.variables}) == len(same.variables)
    assert trainer.warm_start(same, base_dir) == len(same.variables)
    for name, value in _numpy(same(features)).items():
        np.testing.assert_allclose(value, base(features)[name].numpy(), rtol=1e-6, err_msg=name)

    wider = model.RankingModel(base.config.replace(mlp_units=(32,)))
    wider(features)
    restored = trainer.warm_start(wider, base_dir)
    assert 0 < restored < len(wider.variables)
    assert trainer.warm_start(wider, str(tmp_path / "no_such_model")) == 0


def test_pin_warm_starts_from_pin_and_its_towers_not_from_other_towers(data, export_root, caplog):
    """PIN's fused towers restore from a PIN export; from an export with per-task Dense towers
    (the baseline's, named as PIN's head towers were before the fusion) everything but the
    towers is restored, and the log names the towers' variables left at their initial values."""
    features = {k: v[:10] for k, v in data["transformed"].items()}
    pin_case, baseline_case = ("pin", "avc_bucket_onehot"), ("baseline", "avc_bucket_onehot")
    base = _train_and_export(pin_case, data, export_root)[0]
    _train_and_export(baseline_case, data, export_root)
    same = model.RankingModel(base.config)
    same(features)
    assert trainer.warm_start(same, os.path.join(export_root, "_".join(pin_case))) == len(same.variables)
    for name, value in _numpy(same(features)).items():
        np.testing.assert_allclose(value, base(features)[name].numpy(), rtol=1e-6, err_msg=name)

    fresh = model.RankingModel(base.config)
    fresh(features)
    towers = {v.name for tower in fresh.towers.values() for v in tower.variables}
    with caplog.at_level("WARNING", logger=trainer.__name__):
        restored = trainer.warm_start(fresh, os.path.join(export_root, "_".join(baseline_case)))
    assert restored == len(fresh.variables) - len(towers)
    (warning,) = [r.getMessage() for r in caplog.records if "keep their initial values" in r.getMessage()]
    assert all(name in warning for name in towers)


def test_custom_config_validation():
    with pytest.raises(ValueError, match="learning_rate"):
        trainer.parse_custom_config({"learning_rate": 0.1})  # belongs in overrides
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        trainer.parse_custom_config({"overrides": {"learning_rat": 0.1}})
    options = trainer.parse_custom_config({"variant": "poso_mha", "batch_size": 16, "overrides": {"head_dim": 2}})
    assert options["batch_size"] == 16 and options["config"] == model.make_config("poso_mha", head_dim=2)
