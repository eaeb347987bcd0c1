"""A SavedModel with the ranking model's serving interface (`serving_default` on serialized raw
tf.Examples, `serving_raw` on one tensor per feature_specs.model_input_features(), parsed exactly
as models.export parses them) whose per-task scores are a closed form of two features
(`ranking_stub_scores`): clients and command-line tools are tested against it without training.
"""

import numpy as np
import tensorflow as tf


def ranking_stub_scores(personalization_source, history_lengths) -> dict:
    """{task name: float32 [batch]} that export_ranking_stub_model's signatures return:

        score_k = sigmoid(0.1 (k + 1) log(1 + pc_source) - 0.1 history_length)

    for the k-th task of feature_specs.TASKS, where pc_source is the personalization-code
    source feature (feature_specs.PC.source) and history_length the number of ids in
    feature_specs.HIST_VIDEO_IDS.
    """
    from feature_specs import TASKS

    source = np.log1p(np.asarray(personalization_source, np.float32))
    lengths = np.asarray(history_lengths, np.float32)
    return {task.name: (1.0 / (1.0 + np.exp(-(0.1 * (k + 1) * source - 0.1 * lengths))))
            .astype(np.float32) for k, task in enumerate(TASKS)}


def export_ranking_stub_model(export_dir: str) -> str:
    """Writes a SavedModel with the ranking model's serving_default and serving_raw
    signatures whose outputs are ranking_stub_scores (see the module docstring)."""
    import feature_specs as fs
    from models import export, preprocessing

    parse_spec = preprocessing.raw_feature_spec(include_labels=False)

    class RankingStub(tf.Module):
        def __init__(self):
            super().__init__()
            self.task_slopes = tf.Variable([0.1 * (k + 1) for k in range(len(fs.TASKS))],
                                           dtype=tf.float32, name="task_slopes")

        def scores(self, parsed):
            source = tf.math.log1p(tf.cast(parsed[fs.PC.source], tf.float32))
            history = parsed[fs.HIST_VIDEO_IDS]
            lengths = tf.reduce_sum(tf.sparse.to_dense(
                tf.sparse.map_values(tf.ones_like, history)), axis=1)
            lengths = tf.cast(lengths, tf.float32)
            return {task.name: tf.sigmoid(self.task_slopes[k] * source - 0.1 * lengths)
                    for k, task in enumerate(fs.TASKS)}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="examples")])
        def serve_examples(self, examples):
            return self.scores(tf.io.parse_example(examples, parse_spec))

        @tf.function
        def serve_raw(self, **features):
            return self.scores(export.raw_inputs_as_parsed(features))

    stub = RankingStub()
    tf.saved_model.save(stub, export_dir, signatures={
        export.SERVING_DEFAULT: stub.serve_examples.get_concrete_function(),
        export.SERVING_RAW: stub.serve_raw.get_concrete_function(**export.raw_input_signature()),
    })
    return export_dir
