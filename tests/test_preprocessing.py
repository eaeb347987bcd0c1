"""models.preprocessing under a real tf.Transform analysis (Beam DirectRunner) on small data."""

import copy
import math

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_transform as tft

import feature_specs as fs
import raw_examples as rx
from models import preprocessing


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
    rows, transform_dir = rx.shared_transform(str(tmp_path_factory.getbasetemp()))
    return rows, tft.TFTransformOutput(transform_dir)


def _transform(tft_output, rows, include_labels=True):
    raw = rx.parse_raw(rx.serialize_all(rows), include_labels=include_labels)
    return {k: v.numpy() for k, v in tft_output.transform_raw_features(raw).items()}


def _edge_rows(template):
    """Rows at the edges: too long / empty histories, unknown values, missing numerics."""
    long_row, empty_row = copy.deepcopy(template), copy.deepcopy(template)
    for feature in fs.features_of_kind(fs.Kind.SEQUENCE):
        long_row[feature.name] = list(range(100, 100 + feature.max_length + 5))
        empty_row[feature.name] = []
    for feature in fs.features_of_kind(fs.Kind.CATEGORICAL):
        if feature.vocabulary is not None:
            long_row[feature.name] = rx.OOV_STRING if feature.dtype is fs.Dtype.STRING else rx.OOV_INT
    for feature in fs.features_of_kind(fs.Kind.NUMERIC):
        empty_row[feature.name] = float(fs.MISSING_VALUE)
    reversed_row = copy.deepcopy(long_row)
    for feature in fs.features_of_kind(fs.Kind.SEQUENCE):
        reversed_row[feature.name] = long_row[feature.name][: feature.max_length][::-1]
    return [long_row, empty_row, reversed_row]


def test_raw_feature_spec_matches_schema_kinds():
    with_labels = preprocessing.raw_feature_spec(include_labels=True)
    without_labels = preprocessing.raw_feature_spec(include_labels=False)
    labels = {f.name for f in fs.features_of_kind(fs.Kind.LABEL)}
    inputs = {f.name for f in fs.model_input_features()}
    assert set(without_labels) == inputs
    assert set(with_labels) == inputs | labels
    dtypes = {fs.Dtype.INT64: tf.int64, fs.Dtype.FLOAT32: tf.float32, fs.Dtype.STRING: tf.string}
    for name, spec in with_labels.items():
        feature = fs.feature(name)
        assert spec.dtype == dtypes[feature.dtype], name
        if feature.kind is fs.Kind.SEQUENCE:
            assert isinstance(spec, tf.io.VarLenFeature), name
        else:
            assert isinstance(spec, tf.io.FixedLenFeature) and list(spec.shape) == [], name


def test_outputs_have_declared_names_dtypes_and_shapes(analyzed):
    rows, tft_output = analyzed
    out = _transform(tft_output, rows[:20])
    assert set(out) == set(preprocessing.transformed_feature_names())
    assert set(tft_output.transformed_feature_spec()) == set(out)
    for name, value in out.items():
        if name == fs.PC_BUCKET:
            assert value.dtype == np.int64 and value.shape == (20,)
            continue
        feature = fs.feature(name)
        if feature.kind is fs.Kind.SEQUENCE:
            assert value.dtype == np.int64 and value.shape == (20, feature.max_length), name
        elif feature.kind is fs.Kind.CATEGORICAL:
            assert value.dtype == np.int64 and value.shape == (20,), name
        else:
            assert value.dtype == np.float32 and value.shape == (20,), name


def test_slices_are_not_outputs(analyzed):
    rows, tft_output = analyzed
    out = _transform(tft_output, rows[:4])
    assert not set(out) & {f.name for f in fs.features_of_kind(fs.Kind.SLICE)}


def test_vocabulary_features_index_from_one_and_map_unknown_to_zero(analyzed):
    rows, tft_output = analyzed
    rows = rows + _edge_rows(rows[0])
    out = _transform(tft_output, rows)
    saw_oov = False
    for feature in fs.features_of_kind(fs.Kind.CATEGORICAL):
        if feature.vocabulary is None:
            continue
        expected = [feature.vocabulary.index(str(row[feature.name])) + 1
                    if str(row[feature.name]) in feature.vocabulary else 0 for row in rows]
        np.testing.assert_array_equal(out[feature.name], expected, err_msg=feature.name)
        assert out[feature.name].max() < feature.cardinality
        saw_oov |= 0 in expected
    assert saw_oov, "the data should contain out-of-vocabulary values"


def test_hashed_ids_are_in_range_and_consistent(analyzed):
    rows, tft_output = analyzed
    out = _transform(tft_output, rows)
    for feature in fs.features_of_kind(fs.Kind.CATEGORICAL):
        if feature.hash_buckets is None:
            continue
        values = out[feature.name]
        assert values.min() >= 1 and values.max() <= feature.hash_buckets, feature.name
        by_raw = {}
        for row, value in zip(rows, values):
            assert by_raw.setdefault(row[feature.name], value) == value, feature.name
        assert len(set(by_raw.values())) > 1, feature.name


def test_sequences_truncate_to_newest_pad_with_zero_and_keep_order(analyzed):
    rows, tft_output = analyzed
    edge = _edge_rows(rows[0])
    out = _transform(tft_output, rows[:50] + edge)
    for feature in fs.features_of_kind(fs.Kind.SEQUENCE):
        values = out[feature.name]
        lengths = np.array([min(len(row[feature.name]), feature.max_length) for row in rows[:50] + edge])
        real = values != fs.PADDING_INDEX
        # Real ids first, then only padding.
        np.testing.assert_array_equal(real, np.arange(feature.max_length)[None, :] < lengths[:, None],
                                      err_msg=feature.name)
        assert values.max() <= feature.hash_buckets
        long_out, empty_out, reversed_out = values[-3:]
        assert long_out.all() and not empty_out.any()
        # The first (newest) max_length raw ids are kept, in order.
        np.testing.assert_array_equal(reversed_out, long_out[::-1], err_msg=feature.name)


def test_pc_bucket_equals_feature_specs_pc_bucket(analyzed):
    rows, tft_output = analyzed
    probes = [0] + [b + d for b in fs.PC.boundaries for d in (-1, 0, 1)] + [10 ** 6]
    probe_rows = [dict(rows[0], **{fs.PC.source: value}) for value in probes]
    out = _transform(tft_output, rows + probe_rows)
    avc = [row[fs.PC.source] for row in rows + probe_rows]
    np.testing.assert_array_equal(out[fs.PC_BUCKET], [fs.pc_bucket(v) for v in avc])
    assert set(out[fs.PC_BUCKET]) == set(range(fs.PC.num_buckets))


def test_numeric_features_are_z_scored_log_values(analyzed):
    rows, tft_output = analyzed
    out = _transform(tft_output, rows + _edge_rows(rows[0])[1:2])
    for feature in fs.features_of_kind(fs.Kind.NUMERIC):
        values = out[feature.name]
        analyzed_values = values[: len(rows)]
        assert abs(analyzed_values.mean()) < 1e-3 and abs(analyzed_values.std() - 1.0) < 1e-2, feature.name
        logs = np.log1p(np.maximum([row[feature.name] for row in rows], 0.0))
        np.testing.assert_allclose(analyzed_values, (logs - logs.mean()) / logs.std(), rtol=1e-3, atol=1e-3)
        # A missing value (negative marker) is treated as 0.
        np.testing.assert_allclose(values[-1], -logs.mean() / logs.std(), rtol=1e-3, atol=1e-3)


def test_personalization_sources_and_labels(analyzed):
    rows, tft_output = analyzed
    out = _transform(tft_output, rows)
    np.testing.assert_allclose(out[fs.PC.source], [math.log1p(row[fs.PC.source]) for row in rows], rtol=1e-6)
    np.testing.assert_array_equal(out[fs.IS_NEW_USER], [row[fs.IS_NEW_USER] for row in rows])
    for feature in fs.features_of_kind(fs.Kind.LABEL):
        np.testing.assert_array_equal(out[feature.name], [row[feature.name] for row in rows])


def test_serving_requests_without_labels_transform_the_same(analyzed):
    rows, tft_output = analyzed
    with_labels = _transform(tft_output, rows[:30])
    layer = tft_output.transform_features_layer()
    without = layer(rx.parse_raw(rx.serialize_all(rows[:30], drop=[f.name for f in fs.features_of_kind(
        fs.Kind.LABEL, fs.Kind.SLICE)]), include_labels=False))
    assert set(without) == set(preprocessing.transformed_feature_names(include_labels=False))
    for name, value in without.items():
        np.testing.assert_array_equal(value.numpy(), with_labels[name], err_msg=name)
