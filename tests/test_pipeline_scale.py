"""bench pipeline's per-component example counts: the Trainer's own step count reaches the
Trainer's span, and the examples seen follow from it (seconds: a 3-step Keras fit)."""

import logging

import numpy as np
import tensorflow as tf

from benchmarks import pipeline_scale
from models import trainer


def _fit_with_progress(steps: int, batch_size: int) -> None:
    inputs = tf.keras.Input((1,))
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(1)(inputs))
    model.compile(optimizer="sgd", loss="mse")
    x = np.ones((steps * batch_size - 1, 1), np.float32)  # the last batch one short, as a pass ends
    model.fit(x, x, batch_size=batch_size, epochs=1, verbose=0, callbacks=[trainer.StepProgress(None)])


def test_trainer_steps_counted_in_its_span_and_examples_seen():
    timer = pipeline_scale.ComponentTimer()
    timer.phase = "daily"
    root, progress = logging.getLogger(), logging.getLogger(trainer.PROGRESS_LOGGER)
    root.addHandler(timer)
    level, progress_level = root.level, progress.level
    root.setLevel(logging.INFO)
    progress.setLevel(logging.INFO)
    try:
        logging.getLogger("tfx").info("Component Trainer is running.")
        _fit_with_progress(steps=3, batch_size=4)
        logging.getLogger("tfx").info("Component Trainer is finished.")
        logging.getLogger("tfx").info("Component Evaluator is running.")
        logging.getLogger("tfx").info("Component Evaluator is finished.")
    finally:
        root.removeHandler(timer)
        root.setLevel(level)
        progress.setLevel(progress_level)
    spans = {span.name: span for span in timer.spans}
    assert spans["Trainer"].trainer_steps == 3 and spans["Evaluator"].trainer_steps is None

    summary = {"train_rows": 11, "eval_rows": 5, "baseline_metrics": [{"slice": "overall"}]}
    count = lambda name, **kw: pipeline_scale.count_examples(spans.get(name) or pipeline_scale.Span(
        "daily", name, 0.0), summary, **{"epochs": 1, "train_steps": None, "batch_size": 4, **kw})
    assert count("Trainer") == 11  # one pass over the window: ceil(11 / 4) = 3 steps, as counted
    assert count("Trainer", train_steps=7) == 28
    assert count("Evaluator") == 10  # the candidate and the baseline
    assert count("Transform") == 11 and count("AvcExampleGen") == 5 and count("Pusher") is None
    # With an analyzer cache Transform analyzed only the days the cache lacked.
    summary["transform_analyzed_rows"] = 2
    assert count("Transform") == 2


def test_a_step_count_that_disagrees_with_the_window_is_reported(capsys):
    span = pipeline_scale.Span("daily", "Trainer", 0.0, trainer_steps=5)
    assert pipeline_scale.count_examples(span, {"train_rows": 11}, epochs=1, train_steps=None, batch_size=4) == 20
    assert "counted 5 steps, not 3" in capsys.readouterr().out
