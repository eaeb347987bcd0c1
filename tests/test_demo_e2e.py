"""End to end: `poso demo` on tiny synthetic data (real TFX, Beam, TensorFlow and servers)."""

import contextlib
import datetime
import glob
import io
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from components.infra_validator import WARMUP_FILE, sample_request_examples
from feature_specs import specs
from pipeline import config as config_lib
from pipeline import demo


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory):
    home = str(tmp_path_factory.mktemp("demo"))
    printed = io.StringIO()
    # 150 steps: enough for the primary tasks to beat the AUC floor reliably (about 30 ms each).
    with contextlib.redirect_stdout(printed):
        assert demo.run_demo(home=home, rows_per_day=800, train_steps=150) == 0
    with open(os.path.join(home, "demo_output.txt"), "w") as f:
        f.write(printed.getvalue())
    return home


def test_progress_says_which_day_which_step_and_the_trainers_steps(demo_home):
    printed = open(os.path.join(demo_home, "demo_output.txt")).read()
    assert f"day 1 of {demo.DAYS - 1} to ingest" in printed and f"day {demo.DAYS - 1} of {demo.DAYS - 1}" in printed
    assert "Component Trainer is running." in printed and "Component Trainer is finished." in printed
    assert "Trainer: step 15 of 150, loss" in printed and "Trainer: step 150 of 150, loss" in printed
    assert re.search(r"\] \d+ steps, \d+ from the cache", printed)
    # The model it trains is named, in the progress and in the run's summary.
    assert f"Daily TFX run of model {config_lib.DEFAULT_VARIANT} " in printed
    assert re.search(rf"^Run \S+ \(model {config_lib.DEFAULT_VARIANT}\): trained on", printed, re.M)


def _pushed_versions(home):
    base = os.path.join(home, "serving", config_lib.MODEL_NAME)
    return sorted(p for p in glob.glob(os.path.join(base, "*")) if os.path.basename(p).isdigit())


def test_demo_pushes_one_numbered_version_with_a_saved_model(demo_home):
    versions = _pushed_versions(demo_home)
    assert len(versions) == 1
    assert os.path.isfile(os.path.join(versions[0], "saved_model.pb"))
    assert os.path.isfile(os.path.join(versions[0], WARMUP_FILE))
    config_text = open(os.path.join(demo_home, "serving", "models.config")).read()
    assert f'name: "{config_lib.MODEL_NAME}"' in config_text and versions[0].rsplit("/", 1)[0] in config_text


def test_pushed_serving_signature_returns_one_probability_per_task_per_row(demo_home):
    loaded = tf.saved_model.load(_pushed_versions(demo_home)[0])
    serve = loaded.signatures["serving_default"]
    examples_dirs = glob.glob(os.path.join(demo_home, "pipeline_root", "AvcExampleGen", "examples", "*"))
    from tfx.types import artifact_utils, standard_artifacts
    artifact = standard_artifacts.Examples()
    artifact.uri = sorted(examples_dirs, key=lambda p: int(os.path.basename(p)))[-1]
    artifact.split_names = artifact_utils.encode_split_names(["day"])
    rows = sample_request_examples(artifact, 7)
    outputs = serve(examples=tf.constant(rows))
    assert sorted(outputs) == sorted(t.name for t in specs.TASKS)
    for task, scores in outputs.items():
        scores = scores.numpy()
        assert scores.shape == (len(rows),), task
        assert np.all((scores > 0) & (scores < 1)), task


def test_demo_writes_the_run_report_with_its_plots(demo_home):
    folder = os.path.join(demo_home, "runs", (demo.START + __import__("datetime").timedelta(days=demo.DAYS - 1)).isoformat())
    page = open(os.path.join(folder, "report.html")).read()
    for title in ("GAUC per user group", "AUC against the AVC bucket", "Gates against the AVC bucket"):
        assert title in page
    assert page.count("<svg") >= len(specs.TASKS) + 3 and "<img" not in page
    assert os.path.getsize(os.path.join(folder, "gates.json")) > 100
    assert "BLESSED" in page and "version " in page


def test_runs_and_versions_show_the_demo_day_pushed_and_serving(demo_home, capsys):
    import json

    from pipeline import cli

    version = int(os.path.basename(_pushed_versions(demo_home)[0]))
    assert cli.main(["runs", "--home", demo_home, "--json"]) == 0
    days = json.loads(capsys.readouterr().out)
    daily = days[0]
    assert daily["date"] == (demo.START + datetime.timedelta(days=demo.DAYS - 1)).isoformat()
    assert (daily["status"], daily["blessed"], daily["pushed_version"]) == ("complete", True, version)
    assert daily["model"] == config_lib.DEFAULT_VARIANT and days[1]["model"] is None
    assert daily["steps"] > 0 and daily["seconds"] > 0 and daily["rows"] > 0
    # The run's own last progress line counts the same steps (components, not resolvers).
    printed = open(os.path.join(demo_home, "demo_output.txt")).read()
    steps, cached = map(int, re.findall(r"\] (\d+) steps, (\d+) from the cache", printed)[-1])
    assert (steps, cached) == (daily["steps"], daily["cached_steps"])
    assert [d["status"] for d in days[1:]] == ["ingested"] * (demo.DAYS - 1)
    assert cli.main(["versions", "--home", demo_home, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["version"], row["pushed_by_run"], row["model"], row["serving"], row["pinned"]) == (
        version, daily["date"], config_lib.DEFAULT_VARIANT, True, False)
