"""Random raw examples consistent with `feature_specs`, and a real tf.Transform run on them.

Test helper: `make_raw_rows` draws deterministic (by seed) rows with valid vocabulary
values, histories of random length 0..max_length and 0/1 labels; `serialize` turns them
into the tf.Examples the Beam step writes; `analyze` runs tf.Transform's Beam analysis
with `models.preprocessing.preprocessing_fn` and writes a `tft.TFTransformOutput` dir.
"""

from __future__ import annotations

import math
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

import feature_specs as fs

Row = Dict[str, object]

# Small id ranges so ids repeat across rows (embeddings can memorize a tiny set).
ID_RANGE = 50
OOV_STRING = "__not_in_vocabulary__"
OOV_INT = 999_999


def _categorical(feature: fs.Feature, rng: np.random.Generator, oov_rate: float):
    if feature.vocabulary is None:
        return int(rng.integers(0, ID_RANGE))
    if rng.random() < oov_rate:
        value = OOV_STRING if feature.dtype is fs.Dtype.STRING else str(OOV_INT)
    else:
        value = feature.vocabulary[int(rng.integers(0, len(feature.vocabulary)))]
    return value if feature.dtype is fs.Dtype.STRING else int(value)


def _random_value(feature: fs.Feature, rng: np.random.Generator, oov_rate: float):
    if feature.kind is fs.Kind.CATEGORICAL:
        return _categorical(feature, rng, oov_rate)
    if feature.kind is fs.Kind.NUMERIC:
        return float(math.exp(rng.uniform(0.0, 10.0)) - 1.0)
    if feature.kind is fs.Kind.SEQUENCE:
        length = int(rng.integers(0, feature.max_length + 1))
        return [int(v) for v in rng.integers(0, ID_RANGE, size=length)]
    if feature.kind is fs.Kind.PERSONALIZATION:
        if feature.name == fs.PC.source:
            # Log-uniform counts so every PC bucket (up to past the last boundary) occurs.
            return int(math.exp(rng.uniform(0.0, math.log(4 * fs.PC.boundaries[-1]))) - 1)
        return int(rng.integers(0, 2))
    if feature.kind is fs.Kind.LABEL:
        return int(rng.random() < 0.4)
    return None  # slices are derived after the other features


def make_raw_rows(n: int, seed: int = 0, oov_rate: float = 0.0) -> List[Row]:
    """`n` raw rows (feature name -> python value or list), deterministic by `seed`."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        row = {f.name: _random_value(f, rng, oov_rate) for f in fs.FEATURES}
        # Only users with few impressions so far can be new.
        row[fs.IS_NEW_USER] = int(row[fs.PC.source] < 24 and row[fs.IS_NEW_USER])
        row[fs.USER_GROUP] = fs.user_group(row[fs.IS_NEW_USER], str(row[fs.USER_ACTIVE_DEGREE]))
        row[fs.AVC_BUCKET] = fs.pc_bucket(row[fs.PC.source])
        missing = [f.name for f in fs.FEATURES if row.get(f.name) is None]
        assert not missing, f"raw_examples cannot generate {missing}"
        rows.append(row)
    return rows


def serialize(row: Row, drop: Iterable[str] = ()) -> bytes:
    """One row as a serialized tf.train.Example (features in `drop` left out)."""
    import tensorflow as tf

    dropped = set(drop)
    features = {}
    for feature in fs.FEATURES:
        if feature.name in dropped:
            continue
        value = row[feature.name]
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        if feature.dtype is fs.Dtype.INT64:
            features[feature.name] = tf.train.Feature(int64_list=tf.train.Int64List(value=values))
        elif feature.dtype is fs.Dtype.FLOAT32:
            features[feature.name] = tf.train.Feature(float_list=tf.train.FloatList(value=values))
        else:
            features[feature.name] = tf.train.Feature(
                bytes_list=tf.train.BytesList(value=[str(v).encode() for v in values]))
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def serialize_all(rows: Sequence[Row], drop: Iterable[str] = ()) -> List[bytes]:
    drop = tuple(drop)
    return [serialize(row, drop) for row in rows]


def write_gzip_tfrecords(path: str, serialized: Iterable[bytes]) -> str:
    """Writes records as a gzip TFRecord file (what ExampleGen writes)."""
    import tensorflow as tf

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with tf.io.TFRecordWriter(path, options="GZIP") as writer:
        for record in serialized:
            writer.write(record)
    return path


def analyze(rows: Sequence[Row], output_dir: str, temp_dir: Optional[str] = None) -> str:
    """Runs tf.Transform analysis with `preprocessing_fn` on `rows`; returns `output_dir`.

    `output_dir` can be opened with `tft.TFTransformOutput` (it holds transform_fn/
    and transformed_metadata/), like the TFX Transform component's transform graph.
    """
    import apache_beam as beam
    import tensorflow_transform.beam as tft_beam
    from tensorflow_transform.tf_metadata import dataset_metadata

    from feature_specs import schema as fs_schema
    from models import preprocessing

    metadata = dataset_metadata.DatasetMetadata(fs_schema.make_schema())
    instances = [_as_instance(row) for row in rows]
    temp_dir = temp_dir or tempfile.mkdtemp(prefix="tft_tmp_")
    with beam.Pipeline(runner="DirectRunner") as pipeline:
        with tft_beam.Context(temp_dir=temp_dir):
            raw = pipeline | "CreateRaw" >> beam.Create(instances, reshuffle=False)
            transform_fn = (raw, metadata) | "Analyze" >> tft_beam.AnalyzeDataset(preprocessing.preprocessing_fn)
            _ = transform_fn | "WriteTransformFn" >> tft_beam.WriteTransformFn(output_dir)
    return output_dir


def _as_instance(row: Row) -> Row:
    """tf.Transform's instance-dict format: numpy arrays for lists, bytes for strings."""
    instance = {}
    for feature in fs.FEATURES:
        value = row[feature.name]
        if feature.kind is fs.Kind.SEQUENCE:
            instance[feature.name] = np.asarray(value, dtype=np.int64)
        elif feature.dtype is fs.Dtype.STRING:
            instance[feature.name] = str(value).encode()
        else:
            instance[feature.name] = value
    return instance


def parse_raw(serialized: Sequence[bytes], include_labels: bool = True):
    """Parses serialized examples with the model's raw feature spec (eager tensors)."""
    import tensorflow as tf

    from models import preprocessing

    return tf.io.parse_example(tf.constant(list(serialized)), preprocessing.raw_feature_spec(include_labels))


def raw_tensors(rows: Sequence[Row]) -> Dict[str, object]:
    """`serving_raw` inputs for `rows`: scalars [N], sequences [N, longest] padded with
    `feature_specs.SEQUENCE_PADDING_VALUE`."""
    import tensorflow as tf

    dtypes = {fs.Dtype.INT64: tf.int64, fs.Dtype.FLOAT32: tf.float32, fs.Dtype.STRING: tf.string}
    tensors = {}
    for feature in fs.model_input_features():
        values = [row[feature.name] for row in rows]
        if feature.kind is fs.Kind.SEQUENCE:
            width = max([len(v) for v in values] + [0])
            padded = [list(v) + [fs.SEQUENCE_PADDING_VALUE] * (width - len(v)) for v in values]
            tensors[feature.name] = tf.constant(padded, tf.int64, shape=[len(rows), width])
        elif feature.dtype is fs.Dtype.STRING:
            tensors[feature.name] = tf.constant([str(v) for v in values], tf.string)
        else:
            tensors[feature.name] = tf.constant(values, dtypes[feature.dtype])
    return tensors


def shared_transform(base_dir: str, n: int = 256, seed: int = 0, oov_rate: float = 0.05):
    """(rows, transform dir) analyzed once per `base_dir` (e.g. a pytest session's basetemp)."""
    rows = make_raw_rows(n, seed=seed, oov_rate=oov_rate)
    output_dir = os.path.join(base_dir, f"transform_n{n}_seed{seed}_oov{oov_rate}")
    if not os.path.isdir(os.path.join(output_dir, "transform_fn")):
        analyze(rows, output_dir, temp_dir=os.path.join(base_dir, "tft_tmp"))
    return rows, output_dir
