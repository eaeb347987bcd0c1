"""The blessing decision, in a step after the Evaluator: the Evaluator computes the metrics
(components/batch_evaluator.py, in TFMA's output format), this decides.

TFMA's thresholds cannot say what the daily gate needs: a margin that depends on how many
impressions a slice holds, and no verdict at all on a slice too small to tell anything. So the
EvalConfig has no thresholds (the Evaluator computes every metric for the candidate and the last
blessed model, and its evaluation output is kept as is) and `BlessingGate` reads that output
with `tfma.load_eval_result` and writes the ModelBlessing the Pusher and the next day's baseline
resolver read.

Checks, on each primary task (see `decide`):
- floor: the candidate's overall AUC above AUC_FLOOR (better than chance on the whole day);
- against the last blessed model, on the same day's examples: the overall AUC, and the new
  users' GAUC, may fall by at most a margin that accounts for the slice's size:

      allowed drop = max(fixed floor, Z * SE),  SE = sqrt(SE_candidate^2 + SE_baseline^2)

  where each SE is Hanley and McNeil's (1982) standard error of an AUC A over n_pos positive
  and n_neg negative impressions (n_pos = example_count * mean_label):

      SE^2 = (A(1-A) + (n_pos-1)(Q1-A^2) + (n_neg-1)(Q2-A^2)) / (n_pos n_neg),
      Q1 = A/(2-A),  Q2 = 2A^2/(1+A).

  Adding the two variances treats the two models' AUCs as independent; on the same examples
  they are positively correlated, so the margin is on the wide side (a refusal is a real drop).
  For GAUC the same formula on the slice's counts is an approximation (GAUC averages per-user
  AUCs; its spread is somewhat larger).
- a slice with fewer than MIN_SLICE_SIZE impressions, or without both labels, does not gate
  (its values are still reported).
The first run, with no blessed model yet, is judged by the floor alone.
"""

from __future__ import annotations

import json
import math
import os
from typing import Dict, List, Optional, Sequence

from tfx import types
from tfx.dsl.components.base import base_component, base_executor, executor_spec
from tfx.types import artifact_utils, standard_artifacts
from tfx.types.component_spec import ChannelParameter, ComponentSpec, ExecutionParameter

DECISION_FILE = "decision.json"
_METRICS = ("gauc", "auc", "log_loss", "example_count", "mean_label")


def metric_rows(eval_uri: str, model_name: Optional[str] = None) -> List[Dict[str, object]]:
    """[{"slice": "overall" | "key=value, ...", "task": output name, metric: value}] of a TFMA result."""
    import tensorflow_model_analysis as tfma

    result = tfma.load_eval_result(eval_uri, model_name=model_name)
    rows = []
    for slice_key, by_output in result.slicing_metrics:
        name = "overall" if not slice_key else ", ".join(f"{k}={v}" for k, v in slice_key)
        for output, sub_keys in by_output.items():
            row = {"slice": name, "task": output}
            for metric_name, value in sub_keys.get("", {}).items():
                if metric_name.lower() in _METRICS:
                    row[metric_name.lower()] = value.get("doubleValue", value)
            rows.append(row)
    return rows


def hanley_mcneil_se(auc: float, positives: float, negatives: float) -> float:
    """Standard error of an AUC over `positives` and `negatives` (Hanley and McNeil, 1982)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc)
                + (negatives - 1) * (q2 - auc * auc)) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def _classes(row: Dict[str, object]):
    count = float(row.get("example_count") or 0)
    positives = round(count * float(row.get("mean_label") or 0))
    return count, positives, count - positives


def decide(candidate: Sequence[Dict[str, object]], baseline: Optional[Sequence[Dict[str, object]]],
           tasks: Sequence[str], thresholds: Dict[str, float], new_user_slice: str) -> List[Dict[str, object]]:
    """One record per check: metric, task, slice, size (impressions), rule, candidate, baseline,
    change, allowed, passed (None: not gating), and the message. `thresholds`: auc_floor, max_auc_drop,
    max_new_user_gauc_drop, z, min_slice_size."""
    def row_of(rows, task, slice_name):
        return next((r for r in rows or () if r["task"] == task and r["slice"] == slice_name), None)

    checks = []
    for task in tasks:
        overall = row_of(candidate, task, "overall")
        if overall is None or overall.get("auc") is None:
            checks.append({"metric": "auc", "task": task, "slice": "overall", "passed": False,
                           "message": f"auc ({task}) on overall: not computed"})
            continue
        auc = float(overall["auc"])
        passed = auc > thresholds["auc_floor"]
        checks.append({"metric": "auc", "task": task, "slice": "overall", "candidate": auc, "passed": passed,
                       "size": int(_classes(overall)[0]), "rule": f"candidate > {thresholds['auc_floor']}",
                       "message": f"auc ({task}) on overall: {auc:.4f} "
                                  f"{'>' if passed else '<='} floor {thresholds['auc_floor']:.4f}"})
        if not baseline:
            continue
        for metric, slice_name, fixed in (("auc", "overall", thresholds["max_auc_drop"]),
                                          ("gauc", new_user_slice, thresholds["max_new_user_gauc_drop"])):
            mine, theirs = row_of(candidate, task, slice_name), row_of(baseline, task, slice_name)
            if not mine or not theirs or mine.get(metric) is None or theirs.get(metric) is None:
                continue
            count, positives, negatives = _classes(mine)
            value, base = float(mine[metric]), float(theirs[metric])
            where = f"{metric} ({task}) on {slice_name}: candidate {value:.4f}, baseline {base:.4f}, change {value - base:+.4f}"
            record = {"metric": metric, "task": task, "slice": slice_name, "candidate": value, "baseline": base,
                      "change": value - base, "size": int(count),
                      "rule": f"change >= -max({fixed}, {thresholds['z']:g} x SE)"}
            if count < thresholds["min_slice_size"] or not positives or not negatives:
                record.update(passed=None, rule=f"not gating under {int(thresholds['min_slice_size'])} impressions",
                              message=f"{where}; not gating: {int(count)} impressions "
                                                   f"(< {int(thresholds['min_slice_size'])} or one label only)")
            else:
                se = math.hypot(hanley_mcneil_se(value, positives, negatives),
                                hanley_mcneil_se(base, positives, negatives))
                allowed = max(fixed, thresholds["z"] * se)
                passed = value - base >= -allowed
                record.update(passed=passed, allowed=allowed, se=se, message=(
                    f"{where} {'>=' if passed else '<'} -{allowed:.4f} allowed "
                    f"(max({fixed:.4f}, {thresholds['z']:g} x SE {se:.4f}) on {int(count)} impressions)"))
            checks.append(record)
    return checks


class BlessingGateSpec(ComponentSpec):
    PARAMETERS = {"thresholds": ExecutionParameter(type=str)}  # JSON: see decide()
    INPUTS = {
        "examples": ChannelParameter(type=standard_artifacts.Examples),  # the day evaluated (lineage)
        "evaluation": ChannelParameter(type=standard_artifacts.ModelEvaluation),
        "model": ChannelParameter(type=standard_artifacts.Model),
        "baseline_model": ChannelParameter(type=standard_artifacts.Model, optional=True),
    }
    OUTPUTS = {"blessing": ChannelParameter(type=standard_artifacts.ModelBlessing)}


class BlessingGateExecutor(base_executor.BaseExecutor):
    def Do(self, input_dict: Dict[str, List[types.Artifact]], output_dict: Dict[str, List[types.Artifact]],
           exec_properties: Dict[str, object]) -> None:
        from feature_specs import specs

        settings = json.loads(str(exec_properties["thresholds"]))
        evaluation = artifact_utils.get_single_instance(input_dict["evaluation"])
        model = artifact_utils.get_single_instance(input_dict["model"])
        baselines = input_dict.get("baseline_model") or []
        blessing = artifact_utils.get_single_instance(output_dict["blessing"])
        baseline_rows = None
        if baselines:
            try:
                baseline_rows = metric_rows(evaluation.uri, model_name="baseline")
            except Exception:  # pylint: disable=broad-except  (no baseline metrics: floors only)
                baseline_rows = None
        checks = decide(metric_rows(evaluation.uri), baseline_rows, settings["tasks"], settings,
                        f"{specs.USER_GROUP}=new")
        blessed = all(c["passed"] is not False for c in checks)
        os.makedirs(blessing.uri, exist_ok=True)
        with open(os.path.join(blessing.uri, DECISION_FILE), "w") as f:
            json.dump({"blessed": blessed, "checks": checks, "thresholds": settings}, f, indent=2)
        # What TFX's Evaluator writes: the Pusher and LatestBlessedModelStrategy read these.
        open(os.path.join(blessing.uri, "BLESSED" if blessed else "NOT_BLESSED"), "w").close()
        blessing.set_int_custom_property("blessed", int(blessed))
        blessing.set_string_custom_property("current_model", model.uri)
        blessing.set_int_custom_property("current_model_id", model.id)
        if baselines:
            blessing.set_string_custom_property("baseline_model", baselines[0].uri)
            blessing.set_int_custom_property("baseline_model_id", baselines[0].id)


def read_decision(blessing_uri: str) -> Optional[Dict[str, object]]:
    path = os.path.join(blessing_uri, DECISION_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


class BlessingGate(base_component.BaseComponent):
    """Blesses the candidate or not from the Evaluator's metrics; see the module docstring."""

    SPEC_CLASS = BlessingGateSpec
    EXECUTOR_SPEC = executor_spec.ExecutorClassSpec(BlessingGateExecutor)

    def __init__(self, examples: types.BaseChannel, evaluation: types.BaseChannel, model: types.BaseChannel,
                 baseline_model: Optional[types.BaseChannel], thresholds: Dict[str, object]):
        super().__init__(spec=BlessingGateSpec(
            examples=examples, evaluation=evaluation, model=model, baseline_model=baseline_model,
            thresholds=json.dumps(thresholds, sort_keys=True),
            blessing=types.Channel(type=standard_artifacts.ModelBlessing)))
