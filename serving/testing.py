"""Small SavedModels for testing model servers (this one or tensorflow/serving).

`export_contract_model` writes the model the serving contract suite runs against; export
it for a real server with

    python -m serving.testing /models/contract/1

and point the suite at that server (see tests/serving_contract/conftest.py). Its
signatures, with x: float, n: int64, ids: int64 lists padded with -1, tag: string:

    serving_default  (predict)  examples: string [?]   -> score = 2x + n   float [?]
                                                          count = n + 1    int64 [?]
    raw              (predict)  x [?], ids [?,?], tag [?]
                                                       -> total = x + sum(ids >= 0)  float
                                                          id_count = #(ids >= 0)     int64
                                                          tag_bytes = tag            string
    single           (predict)  x: float [?]          -> y = 2x + 1         float [?]
    classify         (classify) inputs: examples      -> classes ["neg", "pos"], scores
                                                          [1 - sigmoid(x), sigmoid(x)]
    regress          (regress)  inputs: examples      -> outputs = 2x + n

`export_scaled_model` writes a TF2 model whose `serving_default` returns y = scale * x and
counts its calls (signature `calls`), which shows which version answered and whether
warm-up requests were replayed.

The ranking model's stand-in (its serving interface, closed-form scores) is project-specific
and lives with the tests (tests/ranking_stub.py): the server knows no model of this project.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

__all__ = [
    "export_contract_model", "export_scaled_model", "write_corrupt_version", "make_example",
    "contract_score", "contract_count", "contract_total", "contract_id_count",
    "contract_single", "contract_positive_probability", "CONTRACT_CLASSES",
]

CONTRACT_CLASSES = ("neg", "pos")


def contract_score(x, n) -> np.ndarray:
    return 2.0 * np.asarray(x, np.float32) + np.asarray(n, np.float32)


def contract_count(n) -> np.ndarray:
    return np.asarray(n, np.int64) + 1


def contract_total(x, ids) -> np.ndarray:
    ids = np.asarray(ids, np.int64)
    return np.asarray(x, np.float32) + np.where(ids >= 0, ids, 0).sum(axis=1).astype(np.float32)


def contract_id_count(ids) -> np.ndarray:
    return (np.asarray(ids, np.int64) >= 0).sum(axis=1).astype(np.int64)


def contract_single(x) -> np.ndarray:
    return 2.0 * np.asarray(x, np.float32) + 1.0


def contract_positive_probability(x) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float32)))


def make_example(x: float, n: int = 0, tag: Optional[str] = None) -> bytes:
    """A serialized tf.Example with the contract model's features."""
    feature = {
        "x": tf.train.Feature(float_list=tf.train.FloatList(value=[x])),
        "n": tf.train.Feature(int64_list=tf.train.Int64List(value=[n])),
    }
    if tag is not None:
        feature["tag"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[tag.encode()]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def export_contract_model(export_dir: str) -> str:
    """Writes the contract model (a TF1-style graph, for classify/regress signatures)."""
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        examples = v1.placeholder(tf.string, [None], name="examples")
        features = tf.io.parse_example(examples, {
            "x": tf.io.FixedLenFeature([], tf.float32),
            "n": tf.io.FixedLenFeature([], tf.int64, default_value=0),
        })
        two = v1.Variable(2.0, name="two")
        score = tf.identity(two * features["x"] + tf.cast(features["n"], tf.float32), "score")
        count = tf.identity(features["n"] + 1, "count")

        raw_x = v1.placeholder(tf.float32, [None], name="raw_x")
        raw_ids = v1.placeholder(tf.int64, [None, None], name="raw_ids")
        raw_tag = v1.placeholder(tf.string, [None], name="raw_tag")
        present = raw_ids >= 0
        total = raw_x + tf.cast(tf.reduce_sum(tf.where(present, raw_ids, tf.zeros_like(raw_ids)),
                                              axis=1), tf.float32)
        id_count = tf.reduce_sum(tf.cast(present, tf.int64), axis=1)

        single_x = v1.placeholder(tf.float32, [None], name="single_x")
        single_y = two * single_x + 1.0

        probability = tf.sigmoid(features["x"])
        scores = tf.stack([1.0 - probability, probability], axis=1)
        classes = tf.tile(tf.constant([list(CONTRACT_CLASSES)]), [tf.shape(examples)[0], 1])

        build = v1.saved_model
        signatures = {
            "serving_default": build.predict_signature_def(
                {"examples": examples}, {"score": score, "count": count}),
            "raw": build.predict_signature_def(
                {"x": raw_x, "ids": raw_ids, "tag": raw_tag},
                {"total": total, "id_count": id_count, "tag_bytes": tf.identity(raw_tag)}),
            "single": build.predict_signature_def({"x": single_x}, {"y": single_y}),
            "classify": build.classification_signature_def(examples, classes, scores),
            "regress": build.regression_signature_def(examples, score),
        }
        with v1.Session(graph=graph) as session:
            session.run(v1.global_variables_initializer())
            builder = build.Builder(export_dir)
            builder.add_meta_graph_and_variables(
                session, [tf.saved_model.SERVING], signature_def_map=signatures,
                strip_default_attrs=True)
            builder.save()
    return export_dir


class _ScaledModel(tf.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = tf.Variable(float(scale), dtype=tf.float32, name="scale")
        self.calls = tf.Variable(0, dtype=tf.int64, name="calls")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.float32, name="x")])
    def predict(self, x):
        self.calls.assign_add(1)
        return {"y": x * self.scale}

    @tf.function(input_signature=[])
    def count_calls(self):
        return {"calls": self.calls.read_value()}


def export_scaled_model(export_dir: str, scale: float) -> str:
    """Writes a TF2 SavedModel: serving_default(x) -> {y: scale * x}; calls() -> {calls}."""
    module = _ScaledModel(scale)
    tf.saved_model.save(module, export_dir, signatures={
        "serving_default": module.predict.get_concrete_function(),
        "calls": module.count_calls.get_concrete_function(),
    })
    return export_dir


def write_corrupt_version(export_dir: str, content: bytes = b"this is not a SavedModel") -> str:
    """A version directory whose saved_model.pb cannot be parsed."""
    os.makedirs(export_dir, exist_ok=True)
    with open(os.path.join(export_dir, "saved_model.pb"), "wb") as graph_file:
        graph_file.write(content)
    return export_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m serving.testing EXPORT_DIR   (e.g. /models/contract/1)",
              file=sys.stderr)
        return 2
    print(export_contract_model(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
