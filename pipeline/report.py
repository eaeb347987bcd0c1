"""The run report: one HTML page with PNG plots per daily run.

- GAUC per task per user group, candidate beside the last blessed model (when there is one);
- AUC and GAUC per task against the AVC bucket;
- mean personalized-gate output against the AVC bucket (the POSO paper's Fig. 4), computed by
  the candidate's `gates` signature on the evaluation day's examples.
"""

from __future__ import annotations

import glob
import html
import itertools
import os
from typing import Dict, List, Optional

import numpy as np

from feature_specs import specs

_GATES_SIGNATURE = "gates"
_MAX_GATE_EXAMPLES = 4096


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _metric_table(rows: List[Dict[str, object]], prefix: str) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{task: {slice value: {metric: value}}} for slices named 'prefix=value'."""
    table: Dict[str, Dict[str, Dict[str, float]]] = {}
    for row in rows:
        name = str(row["slice"])
        if not name.startswith(prefix + "="):
            continue
        value = name.split("=", 1)[1]
        table.setdefault(str(row["task"]), {})[value] = {k: v for k, v in row.items() if isinstance(v, float)}
    return table


def plot_gauc_by_group(candidate: List[Dict], baseline: Optional[List[Dict]], path: str) -> str:
    plt = _plt()
    tasks = [t.name for t in specs.TASKS]
    groups = list(specs.USER_GROUPS)
    models = [("candidate", _metric_table(candidate, specs.USER_GROUP))]
    if baseline:
        models.append(("last blessed", _metric_table(baseline, specs.USER_GROUP)))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), sharey=True)
    width = 0.8 / len(models)
    for ax, task in zip(np.atleast_1d(axes), tasks):
        for m, (label, table) in enumerate(models):
            values = [table.get(task, {}).get(g, {}).get("gauc", np.nan) for g in groups]
            ax.bar(np.arange(len(groups)) + m * width, values, width, label=label)
        ax.set_xticks(np.arange(len(groups)) + width * (len(models) - 1) / 2, groups)
        ax.set_title(task)
        ax.axhline(0.5, color="grey", lw=0.5)
    np.atleast_1d(axes)[0].set_ylabel("GAUC")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_metrics_by_avc(candidate: List[Dict], path: str) -> str:
    plt = _plt()
    table = _metric_table(candidate, specs.AVC_BUCKET)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for metric, ax in zip(("gauc", "auc"), axes):
        for task, by_bucket in sorted(table.items()):
            buckets = sorted(by_bucket, key=int)
            values = [by_bucket[b].get(metric, np.nan) if by_bucket[b].get("mean_label", 0.5) not in (0.0, 1.0)
                      else np.nan for b in buckets]
            ax.plot([int(b) for b in buckets], values, marker="o", label=task)
        ax.set_xlabel("AVC bucket (PC)")
        ax.set_ylabel(metric.upper())
        ax.axhline(0.5, color="grey", lw=0.5)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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


def plot_gates_by_avc(gate_means: Dict[str, Dict[int, float]], path: str) -> Optional[str]:
    if not gate_means:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for name, by_bucket in sorted(gate_means.items()):
        ax.plot(list(by_bucket), list(by_bucket.values()), marker="o", label=name)
    ax.set_xlabel("AVC bucket (PC)")
    ax.set_ylabel("mean gate output")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(summary: Dict[str, object], home: str) -> str:
    """Writes HOME/runs/DATE/report.html with its PNGs; returns the HTML path."""
    from pipeline import summary as summary_lib

    folder = os.path.join(os.path.abspath(home), "runs", str(summary["date"]))
    os.makedirs(folder, exist_ok=True)
    images = []
    candidate = summary.get("metrics") or []
    baseline = summary.get("baseline_metrics") or None
    if candidate:
        images.append(("GAUC per task and user group", plot_gauc_by_group(candidate, baseline,
                                                                            os.path.join(folder, "gauc_by_group.png"))))
        images.append(("AUC and GAUC against the AVC bucket",
                       plot_metrics_by_avc(candidate, os.path.join(folder, "metrics_by_avc.png"))))
    model_dir, examples_uri = summary.get("candidate_model_dir"), summary.get("eval_examples_uri")
    if model_dir and examples_uri:
        files = sorted(glob.glob(os.path.join(str(examples_uri), "Split-*", "*")))
        gate_plot = plot_gates_by_avc(gate_means_by_avc_bucket(str(model_dir), files),
                                      os.path.join(folder, "gates_by_avc.png"))
        if gate_plot:
            images.append(("Personalized gates against the AVC bucket (POSO paper, Fig. 4)", gate_plot))
    body = [f"<h1>POSO ranking: daily run {html.escape(str(summary['date']))}</h1>",
            f"<pre>{html.escape(summary_lib.format_summary(summary))}</pre>"]
    for title, path in images:
        body.append(f"<h2>{html.escape(title)}</h2><img src=\"{os.path.basename(path)}\">")
    page = os.path.join(folder, "report.html")
    with open(page, "w") as f:
        f.write("<!doctype html><meta charset=utf-8><title>POSO run report</title>"
                "<body style='font-family:sans-serif'>" + "\n".join(body) + "</body>")
    return page
