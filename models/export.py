"""Exports a trained `RankingModel` with its tf.Transform graph as a SavedModel.

Signatures (outputs are always {task name: probability float32 [None]} unless noted):

* `serving_default(examples: string [None])`: serialized raw tf.Examples (labels and
  slice keys may be absent). What TF Serving's predict API and TFMA call.
* `serving_raw(<one input per feature_specs.model_input_features()>)`: scalars [None]
  of the feature's dtype; SEQUENCE features int64 [None, None], each row's ids first
  and padded with `feature_specs.SEQUENCE_PADDING_VALUE`.
* `gates(examples: string [None])`: {"personalization_code": [None, pc_dim]} and every
  personalized gate's output {"<module>_<gate>": [None, units]} (the paper's Fig. 4).

The transform graph is applied inside every signature, so clients send raw features.
"""

from __future__ import annotations

from typing import Dict, Mapping

import tensorflow as tf
import tensorflow_transform as tft

import feature_specs as fs
from models import preprocessing

__all__ = ["SIGNATURES", "SERVING_DEFAULT", "SERVING_RAW", "GATES", "EXAMPLES_INPUT", "PC_OUTPUT",
           "ServingModule", "export_serving_model", "raw_input_signature", "raw_inputs_as_parsed",
           "dense_to_sparse_sequence"]

SERVING_DEFAULT, SERVING_RAW, GATES = "serving_default", "serving_raw", "gates"
SIGNATURES = (SERVING_DEFAULT, SERVING_RAW, GATES)
EXAMPLES_INPUT = "examples"
PC_OUTPUT = "personalization_code"

_EXAMPLES_SPEC = tf.TensorSpec([None], tf.string, name=EXAMPLES_INPUT)
_TF_DTYPES = {fs.Dtype.INT64: tf.int64, fs.Dtype.FLOAT32: tf.float32, fs.Dtype.STRING: tf.string}


def raw_input_signature(feature_set: fs.FeatureSet = fs.KUAIRAND) -> Dict[str, tf.TensorSpec]:
    """`serving_raw`'s inputs: one TensorSpec per model input feature, by feature name."""
    specs = {}
    for feature in feature_set.model_input_features():
        if feature.kind is fs.Kind.SEQUENCE:
            specs[feature.name] = tf.TensorSpec([None, None], tf.int64, name=feature.name)
        else:
            specs[feature.name] = tf.TensorSpec([None], _TF_DTYPES[feature.dtype], name=feature.name)
    return specs


def dense_to_sparse_sequence(padded: tf.Tensor,
                             padding_value: int = fs.SEQUENCE_PADDING_VALUE) -> tf.SparseTensor:
    """[B, L] padded ids -> the SparseTensor parsing a tf.Example gives for the same lists.

    Real ids keep their order and are packed to the left, so a padding value in the
    middle of a row is simply skipped.
    """
    is_real = tf.not_equal(padded, padding_value)
    column = tf.cumsum(tf.cast(is_real, tf.int64), axis=1, exclusive=True)
    positions = tf.where(is_real)
    indices = tf.stack([positions[:, 0], tf.gather_nd(column, positions)], axis=1)
    lengths = tf.reduce_sum(tf.cast(is_real, tf.int64), axis=1)
    longest = tf.reduce_max(tf.concat([lengths, [0]], axis=0))  # 0 for an empty batch
    dense_shape = tf.stack([tf.shape(padded, out_type=tf.int64)[0], longest])
    return tf.SparseTensor(indices, tf.gather_nd(padded, positions), dense_shape)


class ServingModule(tf.Module):
    """A `RankingModel` plus its transform graph, with the serving signatures as methods.

    The raw inputs are those of the model's `feature_set`.
    """

    def __init__(self, model: tf.keras.Model, tft_output: tft.TFTransformOutput):
        super().__init__(name="ranking_serving")
        # Held in a closure, not an attribute, so the SavedModel does not serialize the
        # Keras objects (that re-traces every layer and slows loading several-fold); the
        # signatures only need the variables, tracked below.
        self._get_model = lambda: model
        # Attached so the transform graph's assets and tables are tracked and exported.
        self.transform_features_layer = tft_output.transform_features_layer()
        # The model's variables in creation order, with their names (for warm starts).
        self.model_variables = list(model.variables)
        self._feature_set = getattr(model, "feature_set", fs.KUAIRAND)
        self._raw_spec = preprocessing.raw_feature_spec(include_labels=False, feature_set=self._feature_set)

    def _parse(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
        return tf.io.parse_example(examples, self._raw_spec)

    def _transform(self, raw: Mapping[str, tf.Tensor]) -> Dict[str, tf.Tensor]:
        return self.transform_features_layer(dict(raw))

    @tf.function(input_signature=[_EXAMPLES_SPEC], autograph=False)
    def serve_examples(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
        return self._get_model()(self._transform(self._parse(examples)), training=False)

    @tf.function(input_signature=[_EXAMPLES_SPEC], autograph=False)
    def serve_gates(self, examples: tf.Tensor) -> Dict[str, tf.Tensor]:
        transformed = self._transform(self._parse(examples))
        outputs = {PC_OUTPUT: self._get_model().personalization_code(transformed)}
        outputs.update(self._get_model().gate_outputs(transformed))
        return outputs

    @tf.function(autograph=False)
    def serve_raw(self, **features: tf.Tensor) -> Dict[str, tf.Tensor]:
        return self._get_model()(self._transform(raw_inputs_as_parsed(features, self._feature_set)),
                                 training=False)

    def signatures(self) -> Dict[str, tf.types.experimental.ConcreteFunction]:
        return {
            SERVING_DEFAULT: self.serve_examples.get_concrete_function(),
            SERVING_RAW: self.serve_raw.get_concrete_function(**raw_input_signature(self._feature_set)),
            GATES: self.serve_gates.get_concrete_function(),
        }


def raw_inputs_as_parsed(features: Mapping[str, tf.Tensor], feature_set: fs.FeatureSet = fs.KUAIRAND
                         ) -> Dict[str, tf.Tensor | tf.SparseTensor]:
    """serving_raw's tensors -> what parsing the same tf.Examples gives; checks batch sizes."""
    inputs = feature_set.model_input_features()
    first = inputs[0].name
    batch_size = tf.shape(features[first])[0]
    parsed = {}
    for feature in inputs:
        value = features[feature.name]
        check = tf.debugging.assert_equal(
            tf.shape(value)[0], batch_size,
            message=f"serving_raw: input {feature.name!r} has a different batch size than {first!r}")
        with tf.control_dependencies([check]):
            value = tf.identity(value)
        parsed[feature.name] = dense_to_sparse_sequence(value) if feature.kind is fs.Kind.SEQUENCE else value
    return parsed


def export_serving_model(model: tf.keras.Model, tft_output: tft.TFTransformOutput | str,
                         export_dir: str) -> str:
    """Saves `model` with its transform graph and the SIGNATURES to `export_dir`; returns it.

    The signatures take the raw features of `model.feature_set` (KuaiRand's by default).
    """
    if not model.variables:
        raise ValueError("export_serving_model: the model has no variables yet; train it or call it "
                         "on a batch of transformed features first")
    if isinstance(tft_output, str):
        tft_output = tft.TFTransformOutput(tft_output)
    module = ServingModule(model, tft_output)
    tf.saved_model.save(module, export_dir, signatures=module.signatures())
    return export_dir
