"""The TFX schema (tensorflow_metadata Schema proto) derived from `specs`.

The pipeline imports this schema (ImportSchemaGen) instead of inferring one, so
ExampleValidator reports drift against what the product declares: a dropped column,
a changed type or an out-of-vocabulary value is an anomaly naming the feature.
"""

from __future__ import annotations

from tensorflow_metadata.proto.v0 import schema_pb2

from feature_specs import specs

_TYPES = {
    specs.Dtype.INT64: schema_pb2.INT,
    specs.Dtype.FLOAT32: schema_pb2.FLOAT,
    specs.Dtype.STRING: schema_pb2.BYTES,
}
# The model reads these; serving requests carry them (labels and slices are absent there).
SERVING_ENVIRONMENT = "SERVING"
TRAINING_ENVIRONMENT = "TRAINING"


def make_schema(feature_set: specs.FeatureSet = specs.KUAIRAND) -> schema_pb2.Schema:
    """The schema of `feature_set`'s raw tf.Examples (KuaiRand's by default)."""
    schema = schema_pb2.Schema()
    schema.default_environment.extend([TRAINING_ENVIRONMENT, SERVING_ENVIRONMENT])
    for feat in feature_set.features:
        proto = schema.feature.add(name=feat.name, type=_TYPES[feat.dtype])
        if feat.kind is specs.Kind.SEQUENCE:
            # Variable length (a new user has no history): at least 0, at most max_length.
            proto.value_count.min = 0
            proto.value_count.max = feat.max_length
            proto.presence.min_fraction = 1.0
        else:
            proto.shape.SetInParent()  # a scalar: exactly one value per example
            proto.presence.min_fraction = 1.0
            proto.presence.min_count = 1
        if feat.dtype is specs.Dtype.STRING and feat.vocabulary is not None:
            proto.domain = feat.name
            schema.string_domain.add(name=feat.name, value=list(feat.vocabulary))
            # Real logs carry a few rare or unknown values; they map to the OOV index.
            proto.distribution_constraints.min_domain_mass = 0.99
        if feat.kind in (specs.Kind.LABEL, specs.Kind.SLICE):
            proto.not_in_environment.append(SERVING_ENVIRONMENT)
    return schema


def write_schema(path: str, feature_set: specs.FeatureSet = specs.KUAIRAND) -> str:
    """Writes the schema as text proto to `path` (a file) and returns the path."""
    import os
    from google.protobuf import text_format

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text_format.MessageToString(make_schema(feature_set)))
    return path
