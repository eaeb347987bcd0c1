"""The run report: HOME/runs/DATE/report.html, the dashboard's page of the day (pipeline/dashboard).

Besides what the dashboard reads from the home, it holds the mean personalized-gate output against
the AVC bucket (the POSO paper's Fig. 4), computed here by the candidate's `gates` signature on the
evaluation day's examples and kept in gates.json for the dashboard.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
from typing import Dict, List

import numpy as np

from feature_specs import specs

GATES_FILE = "gates.json"
_GATES_SIGNATURE = "gates"
_MAX_GATE_EXAMPLES = 4096


def gate_means_by_avc_bucket(model_dir: str, example_files: List[str]) -> Dict[str, Dict[int, float]]:
    """Mean output of every personalized gate per AVC bucket, from the `gates` signature."""
    import tensorflow as tf

    loaded = tf.saved_model.load(model_dir)
    if _GATES_SIGNATURE not in loaded.signatures:
        return {}
    gates = loaded.signatures[_GATES_SIGNATURE]
    every_record = itertools.chain.from_iterable(
        tf.data.TFRecordDataset(path, compression_type="GZIP" if path.endswith(".gz") else "")
        for path in example_files)
    records = [record.numpy() for record in itertools.islice(every_record, _MAX_GATE_EXAMPLES)]
    buckets = [tf.train.Example.FromString(record).features.feature[specs.AVC_BUCKET].int64_list.value[0]
               for record in records]
    if not records:
        return {}
    buckets = np.asarray(buckets)
    means: Dict[str, Dict[int, float]] = {}
    for start in range(0, len(records), 1024):
        outputs = gates(examples=tf.constant(records[start:start + 1024]))
        for name, values in outputs.items():
            if name == "personalization_code":
                continue
            per_example = values.numpy().reshape(len(values), -1).mean(axis=1)
            for bucket in np.unique(buckets[start:start + 1024]):
                entry = means.setdefault(name, {}).setdefault(int(bucket), [])
                entry.extend(per_example[buckets[start:start + 1024] == bucket].tolist())
    return {name: {b: float(np.mean(v)) for b, v in sorted(by.items())} for name, by in means.items()}


def write_report(summary: Dict[str, object], home: str) -> str:
    """Writes HOME/runs/DATE/report.html, the dashboard's page of the day without links (one
    self-contained file, plots inline), and gates.json beside it; returns the HTML path."""
    from pipeline.dashboard import data, pages

    date = str(summary["date"])
    folder = os.path.join(os.path.abspath(home), "runs", date)
    os.makedirs(folder, exist_ok=True)
    gate_means: Dict[str, Dict[str, float]] = {}
    model_dir, examples_uri = summary.get("candidate_model_dir"), summary.get("eval_examples_uri")
    if model_dir and examples_uri:
        files = sorted(glob.glob(os.path.join(str(examples_uri), "Split-*", "*")))
        gate_means = {name: {str(bucket): mean for bucket, mean in by_bucket.items()}
                      for name, by_bucket in gate_means_by_avc_bucket(str(model_dir), files).items()}
        with open(os.path.join(folder, GATES_FILE), "w") as f:
            json.dump(gate_means, f, indent=2)
    reader = data.HomeReader(home)
    page = os.path.join(folder, "report.html")
    with open(page, "w") as f:
        f.write(pages.day_page(date, summary, reader.day(date), gate_means, links=False))
    return page
