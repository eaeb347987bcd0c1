"""Converting between serialized tf.Examples and the raw-feature JSON instances of `serving_raw`.

`serving_raw` takes one named tensor per model input feature (feature_specs.model_input_features):
scalars as [batch], lists as [batch, length] padded with feature_specs.SEQUENCE_PADDING_VALUE.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import tensorflow as tf

from feature_specs import specs

RAW_SIGNATURE = "serving_raw"
EXAMPLES_SIGNATURE = "serving_default"
EXAMPLES_INPUT = "examples"


def _values(feature: tf.train.Feature):
    kind = feature.WhichOneof("kind")
    return [] if kind is None else list(getattr(feature, kind).value)


def raw_instance(serialized: bytes) -> Dict[str, object]:
    """One JSON-ready row-format instance from a serialized tf.Example."""
    example = tf.train.Example.FromString(serialized)
    instance: Dict[str, object] = {}
    for feat in specs.model_input_features():
        if feat.name not in example.features.feature:
            raise ValueError(f"example lacks feature {feat.name!r}")
        values = _values(example.features.feature[feat.name])
        if feat.kind is specs.Kind.SEQUENCE:
            padded = [int(v) for v in values][: feat.max_length]
            instance[feat.name] = padded + [specs.SEQUENCE_PADDING_VALUE] * (feat.max_length - len(padded))
        elif feat.dtype is specs.Dtype.STRING:
            instance[feat.name] = values[0].decode()
        elif feat.dtype is specs.Dtype.INT64:
            instance[feat.name] = int(values[0])
        else:
            instance[feat.name] = float(values[0])
    return instance


def raw_instances(serialized_examples: Sequence[bytes]) -> List[Dict[str, object]]:
    return [raw_instance(s) for s in serialized_examples]
