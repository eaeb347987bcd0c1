"""The tf.Transform `preprocessing_fn`, derived entirely from `feature_specs`.

Raw inputs follow `feature_specs.schema`: scalar features arrive dense with shape
[B]; SEQUENCE features arrive as int64 `tf.SparseTensor`s (most recent first,
possibly empty). Transformed outputs, keyed by the feature's own name unless noted:

=================  =========================================================  ==============
raw kind           transformed value                                          dtype, shape
=================  =========================================================  ==============
CATEGORICAL vocab  1 + position in the fixed vocabulary; 0 = out of vocab     int64 [B]
CATEGORICAL hash   1 + hash(id) mod hash_buckets, i.e. in [1, hash_buckets]   int64 [B]
NUMERIC            z-score of log1p(max(x, 0)) over the analyzed data         float32 [B]
SEQUENCE           hashed ids as above, truncated to max_length, 0 = padding  int64 [B, max_length]
PERSONALIZATION    PC source (count): log1p(max(x, 0)); flags: cast           float32 [B]
(PC_BUCKET)        tft.apply_buckets(PC source, fixed PC.boundaries)           int64 [B]
LABEL              passthrough                                                float32 [B]
SLICE              not an output (evaluation only)
=================  =========================================================  ==============

The PC bucket boundaries are fixed constants, never analyzed from data, so that a
personalization code means the same thing in every daily retrain.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional

import tensorflow as tf
import tensorflow_transform as tft
from tensorflow_transform.tf_metadata import schema_utils

import feature_specs as fs
from feature_specs import schema as fs_schema

__all__ = ["preprocessing_fn", "raw_feature_spec", "transformed_feature_names", "analysis_fingerprint"]

_RAW_INPUT_KINDS = (fs.Kind.CATEGORICAL, fs.Kind.NUMERIC, fs.Kind.SEQUENCE, fs.Kind.PERSONALIZATION)


def analysis_fingerprint() -> str:
    """SHA-256 of the code the analysis depends on (this module and feature_specs/): the pipeline
    passes it to Transform, so that a change reruns Transform and no analyzer cache written by
    other code is reused (tf.Transform's cache keys hash op attributes, not every op's kind)."""
    import hashlib
    import os

    digest = hashlib.sha256()
    specs_dir = os.path.dirname(os.path.abspath(fs.__file__))
    paths = [os.path.abspath(__file__)] + sorted(os.path.join(specs_dir, name) for name in os.listdir(specs_dir)
                                                 if name.endswith(".py"))
    for path in paths:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()


def raw_feature_spec(include_labels: bool = True, feature_set: fs.FeatureSet = fs.KUAIRAND
                     ) -> Dict[str, tf.io.FixedLenFeature | tf.io.VarLenFeature]:
    """The tf.io parsing spec of raw examples, derived from `feature_specs.schema`.

    Covers the model's inputs (`feature_specs.model_input_features()`) and, when
    `include_labels`, the task labels. Slice keys are left out: the model never reads
    them, and leaving them out lets serving requests omit them.
    """
    full_spec = schema_utils.schema_as_feature_spec(fs_schema.make_schema(feature_set)).feature_spec
    wanted = [f.name for f in feature_set.model_input_features()]
    if include_labels:
        wanted += [f.name for f in feature_set.features_of_kind(fs.Kind.LABEL)]
    return {name: full_spec[name] for name in wanted}


def transformed_feature_names(include_labels: bool = True, feature_set: fs.FeatureSet = fs.KUAIRAND) -> tuple:
    """Names of the tensors `preprocessing_fn` returns, in a stable order."""
    names = [f.name for f in feature_set.features_of_kind(*_RAW_INPUT_KINDS)] + [fs.PC_BUCKET]
    if include_labels:
        names += [f.name for f in feature_set.features_of_kind(fs.Kind.LABEL)]
    return tuple(names)


def _as_dense_1d(x: tf.Tensor | tf.SparseTensor, feature: fs.Feature) -> tf.Tensor:
    """Scalar features are declared with a fixed shape; accept [B] or [B, 1]."""
    if isinstance(x, tf.SparseTensor):
        raise TypeError(f"feature {feature.name!r} is a scalar ({feature.kind.value}) but arrived as a "
                        "SparseTensor; the raw schema must declare it with a fixed shape")
    if x.shape.rank == 2:
        x = tf.squeeze(x, axis=1)
    return x


def _hash_ids(ids: tf.Tensor, num_buckets: int) -> tf.Tensor:
    """Maps any id to [1, num_buckets]; 0 stays free for padding and unknowns."""
    if ids.dtype != tf.string:
        ids = tf.strings.as_string(ids)
    return tf.strings.to_hash_bucket_fast(ids, num_buckets) + 1


def _lookup_fixed_vocabulary(values: tf.Tensor, vocabulary: tuple) -> tf.Tensor:
    """1 + the value's position in `vocabulary`, or 0 when it is not in it.

    The vocabularies are tiny (at most a few dozen values), so a broadcast compare
    is cheaper and simpler than a lookup table and needs no asset files.
    """
    if values.dtype != tf.string:
        values = tf.strings.as_string(values)
    matches = tf.equal(tf.expand_dims(values, -1), tf.constant(vocabulary, dtype=tf.string))
    position = tf.argmax(tf.cast(matches, tf.int32), axis=-1, output_type=tf.int64) + 1
    return tf.where(tf.reduce_any(matches, axis=-1), position, tf.zeros_like(position))


def _log1p_nonnegative(x: tf.Tensor) -> tf.Tensor:
    # Counts and durations are heavy-tailed; negative values are missing markers.
    return tf.math.log1p(tf.maximum(tf.cast(x, tf.float32), 0.0))


def _padded_sequence(ids: tf.SparseTensor, feature: fs.Feature) -> tf.Tensor:
    """Hashed ids as a dense [B, max_length] int64 tensor, 0 = padding."""
    if not isinstance(ids, tf.SparseTensor):
        raise TypeError(f"sequence feature {feature.name!r} must arrive as a SparseTensor "
                        f"(VarLenFeature), got {type(ids).__name__}")
    hashed = tf.SparseTensor(ids.indices, _hash_ids(ids.values, feature.hash_buckets), ids.dense_shape)
    batch_size = hashed.dense_shape[0]
    # Most recent first, so keeping the first max_length positions keeps the newest.
    size = tf.stack([batch_size, tf.constant(feature.max_length, tf.int64)])
    kept = tf.sparse.slice(hashed, tf.zeros([2], tf.int64), size)
    dense = tf.sparse.to_dense(kept, default_value=tf.constant(fs.PADDING_INDEX, tf.int64))
    missing = feature.max_length - tf.shape(dense, out_type=tf.int64)[1]
    dense = tf.pad(dense, [[0, 0], [0, missing]], constant_values=fs.PADDING_INDEX)
    return tf.ensure_shape(dense, [None, feature.max_length])


def _transform_one(feature: fs.Feature, raw, pc_source: str) -> tf.Tensor:
    if feature.kind is fs.Kind.SEQUENCE:
        return _padded_sequence(raw, feature)
    x = _as_dense_1d(raw, feature)
    if feature.kind is fs.Kind.CATEGORICAL:
        if feature.vocabulary is not None:
            return _lookup_fixed_vocabulary(x, feature.vocabulary)
        return _hash_ids(x, feature.hash_buckets)
    if feature.kind is fs.Kind.NUMERIC:
        return tft.scale_to_z_score(_log1p_nonnegative(x))
    if feature.kind is fs.Kind.PERSONALIZATION:
        # The PC source is a count (log-scaled for gates that read it raw); other
        # personalization sources are 0/1 flags.
        return _log1p_nonnegative(x) if feature.name == pc_source else tf.cast(x, tf.float32)
    if feature.kind is fs.Kind.LABEL:
        return tf.cast(x, tf.float32)
    raise ValueError(f"feature {feature.name!r} of kind {feature.kind.value} is not a Transform output")


def personalization_code_bucket(pc_source: tf.Tensor,
                                boundaries: Optional[tuple] = None) -> tf.Tensor:
    """The PC bucket: the number of fixed boundaries <= value (see `feature_specs.pc_bucket`)."""
    boundaries = fs.PC.boundaries if boundaries is None else boundaries
    return tf.cast(tft.apply_buckets(tf.cast(pc_source, tf.float32),
                                     tf.constant([boundaries], dtype=tf.float32)), tf.int64)


def preprocessing_fn(inputs: Mapping[str, tf.Tensor | tf.SparseTensor],
                     feature_set: fs.FeatureSet = fs.KUAIRAND) -> Dict[str, tf.Tensor]:
    """tf.Transform entry point: raw features (see `raw_feature_spec`) -> model features.

    For another dataset than KuaiRand, bind `feature_set`, e.g.
    `functools.partial(preprocessing_fn, feature_set=MOVIELENS)`.
    """
    outputs = {}
    for feature in feature_set.features_of_kind(*_RAW_INPUT_KINDS, fs.Kind.LABEL):
        if feature.name not in inputs:
            if feature.kind is fs.Kind.LABEL:
                continue  # labels are absent when transforming serving requests
            raise KeyError(f"preprocessing_fn: raw input {feature.name!r} ({feature.kind.value}) is missing; "
                           f"got {sorted(inputs)}")
        outputs[feature.name] = _transform_one(feature, inputs[feature.name], feature_set.pc.source)
    pc_feature = feature_set.feature(feature_set.pc.source)
    outputs[fs.PC_BUCKET] = personalization_code_bucket(_as_dense_1d(inputs[pc_feature.name], pc_feature),
                                                        feature_set.pc.boundaries)
    return outputs
