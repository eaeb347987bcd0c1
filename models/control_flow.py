"""Graph control flow for served graphs: branches a Session skips instead of visiting."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["if_any"]


def if_any(condition: tf.Tensor, true_fn, false_fn):
    """true_fn() if any element of `condition` is true, else false_fn(), kept a functional `If`.

    tf.cond marks its `If` node to be lowered to Switch/Merge when a graph is loaded, which a
    Session (TF Serving's) then executes node by node, the untaken branch's nodes as dead ones:
    MAIL's generator on 0 rows cost every request of users with behaviour +13-20% latency
    (benchmarks/README.md, "Serving latency"). Left functional, the untaken branch is never
    visited; the taken one runs as a function call (a little slower than inline). TensorFlow has
    no public switch for this: the node's `_lower_using_switch_merge` attribute, which tf.cond
    sets (and leaves unset inside XLA), is set to false. tests/test_model.py checks that the
    exported graphs keep their `If`. Eagerly, a plain tf.cond."""
    predicate = tf.reduce_any(condition)
    if tf.executing_eagerly():
        return tf.cond(predicate, true_fn, false_fn)
    from tensorflow.core.framework import attr_value_pb2

    graph = tf.compat.v1.get_default_graph()
    existing = {op.name for op in graph.get_operations()}
    outputs = tf.cond(predicate, true_fn, false_fn)
    conds = [op for op in graph.get_operations() if op.name not in existing and op.type in ("If", "StatelessIf")]
    if len(conds) != 1:
        raise RuntimeError(f"if_any: expected tf.cond to add one If node, found {len(conds)}")
    conds[0]._set_attr("_lower_using_switch_merge", attr_value_pb2.AttrValue(b=False))
    return outputs
