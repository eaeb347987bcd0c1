"""Headroom on synthetic logs with a known ceiling: how much of the attainable GAUC a model gains.

    bin/poso bench headroom [--presets submergence,none,default] [--seeds 0,1,2] [--models baseline,poso_all]

For each generator preset (components.synthetic_logs.PRESETS) the data take the paper
benchmark's path (benchmarks.paper_data: generate -> AvcExampleGen -> tf.Transform, sizes and
training budget from benchmarks.paper.Budget). The evaluation day's examples are joined to the
generator's truth file (every label's true probability per impression), and per task and user
group (GAUC = models.metrics.grouped_auc, per user):

    ceiling  = GAUC of the ranking by the true probabilities
    headroom = ceiling - GAUC(baseline)                         (per seed)
    closed   = (GAUC(model) - GAUC(baseline)) / headroom        (paired by seed)

The ceiling is what any model could reach on these impressions (up to the labels' sampling
noise, which can put a model a little above it); the headroom is what the plain baseline
leaves. benchmarks/README.md ("Headroom") has each preset's measured figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from feature_specs import specs
from pipeline import argtypes

__all__ = ["truth_for_examples", "ceiling_rows", "ceiling_of", "HeadroomRunner", "summarize", "format_table", "goals",
           "format_long_table", "budget_fields", "run_section", "render_section", "add_arguments", "run", "main"]

DEFAULT_PRESETS = ("submergence", "none", "default")
DEFAULT_MODELS = ("baseline",)
GROUPS = ("new", "regular", "all")
# `poso bench paper` section (f): the issue-17 goals on the presets they are about. On
# `submergence` (the synthetic sections' world, so its models are Table 2's, trained once) every
# Table 2 model; on `none`, the control, the baseline, every POSO variant and the two methods that
# change every user's path (MAIL's generated history, PIN's towers), to show what each costs when
# there is nothing to personalize.
SECTION_PRESETS = ("submergence", "none")
NONE_PRESET_MODELS = ("baseline", "poso_mlp", "poso_mha", "poso_mmoe", "poso_all", "mail", "pin")
# Goals: on `submergence` POSO(all) closes >= 25% of the new-user long_view headroom at p < 0.01
# over >= 8 seeds, regular users' long_view within 0.1 pp of the baseline; on `none` no POSO
# variant is more than 0.1 pp below the baseline on any task and group.
GOAL_CLOSED, GOAL_P, GOAL_SEEDS, GOAL_TOLERANCE_PP = 0.25, 0.01, 8, 0.1
GOAL_TASKS = ("long_view", "like", "click", "follow")


def _example_keys(files: Sequence[str]) -> pd.DataFrame:
    """user_id, video_id and avc of every example in `files`, in file order."""
    import tensorflow as tf

    spec = {name: tf.io.FixedLenFeature([], tf.int64) for name in (specs.USER_ID, specs.VIDEO_ID, specs.AVC)}
    parts: Dict[str, List[np.ndarray]] = {name: [] for name in spec}
    for batch in tf.data.TFRecordDataset(list(files), compression_type="GZIP").batch(4096):
        parsed = tf.io.parse_example(batch, spec)
        for name in spec:
            parts[name].append(parsed[name].numpy())
    return pd.DataFrame({name: np.concatenate(values) for name, values in parts.items()})


def truth_for_examples(example_files: Sequence[str], day_folder: str) -> Dict[str, np.ndarray]:
    """Each TRUTH_LABELS column's probability for every example of `example_files` (one day, in
    file order), from the generator's truth file in `day_folder`.

    An example is its user's k-th impression of the day in AVC order; the pipeline orders a
    user's impressions by (time_ms, file, row), so it is the user's k-th truth row in
    (time_ms, log_row) order. Raises if any joined example's video differs.
    """
    from components import synthetic_logs

    examples = _example_keys(example_files)
    truth = synthetic_logs.read_truth(day_folder)
    truth = truth.sort_values([specs.USER_ID, specs.TIME_MS, synthetic_logs.LOG_ROW], kind="stable")
    truth["rank"] = truth.groupby(specs.USER_ID).cumcount()
    examples["position"] = np.arange(len(examples))
    examples = examples.sort_values([specs.USER_ID, specs.AVC], kind="stable")
    examples["rank"] = examples.groupby(specs.USER_ID).cumcount()
    joined = examples.merge(truth, on=[specs.USER_ID, "rank"], how="left", suffixes=("", "_truth"),
                            validate="one_to_one")
    mismatched = joined[specs.VIDEO_ID + "_truth"].to_numpy() != joined[specs.VIDEO_ID].to_numpy()
    if len(truth) != len(examples) or mismatched.any():
        raise ValueError(f"{day_folder}: the truth file ({len(truth)} rows) does not match the day's "
                         f"{len(examples)} examples ({int(mismatched.sum())} differ in video)")
    joined = joined.sort_values("position")
    return {name: joined[name].to_numpy(np.float64) for name in synthetic_logs.TRUTH_LABELS}


def _group_mask(split, group: str) -> np.ndarray:
    return np.ones(len(split), bool) if group == "all" else split.user_groups == group


def ceiling_rows(split, truth: Mapping[str, np.ndarray]) -> List[Dict[str, Any]]:
    """GAUC of the true probabilities per task and user group."""
    from models import metrics

    rows = []
    for task in specs.TASKS:
        labels = split.features[task.label]
        for group in GROUPS:
            mask = _group_mask(split, group)
            rows.append(dict(task=task.name, group=group, examples=int(mask.sum()),
                             ceiling=metrics.grouped_auc(labels[mask], truth[task.label][mask],
                                                         split.user_ids[mask])))
    return rows


def ceiling_of(data, evaluation) -> List[Dict[str, Any]]:
    """ceiling_rows of a prepared dataset (benchmarks.paper_data.SyntheticData) and its loaded
    evaluation split, from the generator's truth file of the evaluation day."""
    truth = truth_for_examples(data.eval_files, os.path.join(data.logs_dir, "logs", data.eval_date))
    return ceiling_rows(evaluation, truth)


class HeadroomRunner:
    """One preset's data (prepared once, cached under work_dir) and its ceiling; trains models."""

    def __init__(self, preset: str, work_dir: str, budget, log=print):
        from benchmarks import paper_data

        self.preset, self.budget, self.log = preset, budget, log
        settings = paper_data.SyntheticSettings(**{field.name: getattr(budget, field.name)
                                                   for field in dataclasses.fields(paper_data.SyntheticSettings)})
        started = time.time()
        self.data = paper_data.prepare(work_dir, settings, log=log, preset=preset)
        self.train = paper_data.load_split(self.data.train_files, self.data.transform_dir)
        self.eval = paper_data.load_split(self.data.eval_files, self.data.transform_dir)
        self.ceiling = ceiling_of(self.data, self.eval)
        self.description = dict(preset=preset, eval=paper_data.describe(self.eval), eval_date=self.data.eval_date,
                                data_seconds=round(time.time() - started, 1))

    def model_rows(self, model, seed: int) -> List[Dict[str, Any]]:
        """GAUC per task and group of `model` (a models.model.VARIANTS name or a
        benchmarks.paper.ModelSpec) trained with `seed` by benchmarks.paper.train_model."""
        from benchmarks import paper

        started = time.time()
        spec = paper.ModelSpec(model, model) if isinstance(model, str) else model
        predictions = paper.predict(paper.train_model(spec, self.train, seed, self.budget), self.eval.features)
        rows = [dict(model=spec.name, seed=seed, task=r["task"], group=r["group"], gauc=r["gauc"])
                for r in paper.gauc_rows(predictions, self.eval)]
        self.log(f"  {self.preset} {spec.name} seed {seed}: {time.time() - started:.0f} s")
        return rows


def summarize(ceiling: pd.DataFrame, models: pd.DataFrame, baseline: str = "baseline") -> pd.DataFrame:
    """Per preset, task and group: the ceiling, the baseline's headroom (pp, mean and std over
    seeds) and every other model's mean GAUC, its gain over the baseline (pp; mean paired
    difference, 95% CI and paired t-test p, benchmarks.stats) and the headroom it closed (mean of
    the per-seed shares with their 95% t interval). Only seeds the baseline and the model both
    have are paired."""
    from benchmarks import stats

    base = models[models["model"] == baseline].rename(columns={"gauc": "baseline"}).drop(columns="model")
    frame = base.merge(ceiling, on=["preset", "task", "group"])
    frame["headroom_pp"] = 100 * (frame["ceiling"] - frame["baseline"])
    keys = ["preset", "task", "group"]
    out = frame.groupby(keys, sort=False).agg(
        ceiling=("ceiling", "first"), baseline=("baseline", "mean"), headroom_pp=("headroom_pp", "mean"),
        headroom_pp_std=("headroom_pp", "std"), seeds=("seed", "nunique")).reset_index()
    for model in models["model"].unique():
        if model == baseline:
            continue
        paired = models[models["model"] == model].merge(frame, on=keys + ["seed"])
        paired["gain_pp"] = 100 * (paired["gauc"] - paired["baseline"])
        paired["closed"] = paired["gain_pp"] / paired["headroom_pp"]
        rows = []
        for key, group in paired.groupby(keys, sort=False):
            gain = stats.paired_difference(100 * group["gauc"], 100 * group["baseline"])
            closed = stats.paired_difference(group["closed"], np.zeros(len(group)))
            rows.append(dict(zip(keys, key), **{
                f"{model}_gauc": group["gauc"].mean(), f"{model}_seeds": gain["n"],
                f"{model}_gain_pp": gain["mean"], f"{model}_gain_low": gain["low"],
                f"{model}_gain_high": gain["high"], f"{model}_p": gain["p"],
                f"{model}_closed": closed["mean"], f"{model}_closed_std": closed["std"],
                f"{model}_closed_low": closed["low"], f"{model}_closed_high": closed["high"]}))
        out = out.merge(pd.DataFrame(rows), on=keys, how="left")
    return out


def _count(value: Any) -> str:
    """A seed count as a whole number: a model missing on one preset leaves NaN in its column,
    which makes pandas store every count of that column as a float."""
    return "n/a" if pd.isna(value) else str(int(value))


def format_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table (GAUC in %, differences in pp, headroom closed in %; each
    model's gain and share closed with their 95% CI over the paired seeds)."""
    models = [c[:-len("_gain_pp")] for c in summary.columns if c.endswith("_gain_pp")]
    header = ["preset", "task", "group", "ceiling", "baseline", "headroom pp (mean ± std)"]
    for m in models:
        header += [m, f"{m} - baseline pp [95% CI], p", f"{m}: headroom closed [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [row["preset"], row["task"], row["group"], f"{100 * row['ceiling']:.2f}",
                 f"{100 * row['baseline']:.2f}", f"{row['headroom_pp']:+.2f} ± {row['headroom_pp_std']:.2f} "
                                                 f"({_count(row['seeds'])} seeds)"]
        for m in models:
            cells += [f"{100 * row[f'{m}_gauc']:.2f}",
                      f"{row[f'{m}_gain_pp']:+.2f} [{row[f'{m}_gain_low']:+.2f}, {row[f'{m}_gain_high']:+.2f}], "
                      f"p={row[f'{m}_p']:.2g} ({_count(row[f'{m}_seeds'])} seeds)",
                      f"{100 * row[f'{m}_closed']:+.1f}% [{100 * row[f'{m}_closed_low']:+.1f}, "
                      f"{100 * row[f'{m}_closed_high']:+.1f}]"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goals(summary: pd.DataFrame) -> List[Dict[str, Any]]:
    """The issue-17 goals, each with its verdict and the figures it rests on."""
    verdicts = []

    def cell(preset: str, task: str, group: str) -> Optional[Mapping[str, Any]]:
        rows = summary[(summary["preset"] == preset) & (summary["task"] == task) & (summary["group"] == group)]
        return None if rows.empty else rows.iloc[0].to_dict()

    new, regular = cell("submergence", "long_view", "new"), cell("submergence", "long_view", "regular")
    if new is not None and "poso_all_closed" in new:
        met = bool(new["poso_all_closed"] >= GOAL_CLOSED and new["poso_all_p"] < GOAL_P
                   and new["poso_all_gain_pp"] > 0 and new["poso_all_seeds"] >= GOAL_SEEDS
                   and abs(regular["poso_all_gain_pp"]) <= GOAL_TOLERANCE_PP)
        verdicts.append(dict(goal=f"submergence: POSO(all) closes >= {GOAL_CLOSED:.0%} of the new-user long_view "
                                  f"headroom, p < {GOAL_P} over >= {GOAL_SEEDS} seeds, regular users within "
                                  f"{GOAL_TOLERANCE_PP} pp",
                             met=met,
                             figures=f"closed {100 * new['poso_all_closed']:+.1f}% [{100 * new['poso_all_closed_low']:+.1f}, "
                                     f"{100 * new['poso_all_closed_high']:+.1f}], new {new['poso_all_gain_pp']:+.2f} pp "
                                     f"p={new['poso_all_p']:.2g} ({_count(new['poso_all_seeds'])} seeds); regular "
                                     f"{regular['poso_all_gain_pp']:+.2f} pp [{regular['poso_all_gain_low']:+.2f}, "
                                     f"{regular['poso_all_gain_high']:+.2f}]"))
    none = summary[(summary["preset"] == "none") & summary["task"].isin(GOAL_TASKS)]
    for model in [c[:-len("_gain_pp")] for c in summary.columns if c.endswith("_gain_pp")]:
        if not model.startswith("poso") or none.empty or none[f"{model}_gain_pp"].isna().all():
            continue
        worst = none.loc[none[f"{model}_gain_pp"].idxmin()]
        verdicts.append(dict(goal=f"none: {model} no more than {GOAL_TOLERANCE_PP} pp below the baseline on any "
                                  f"task and group", met=bool(worst[f"{model}_gain_pp"] >= -GOAL_TOLERANCE_PP),
                             figures=f"lowest: {worst['task']} {worst['group']} {worst[f'{model}_gain_pp']:+.2f} pp "
                                     f"[{worst[f'{model}_gain_low']:+.2f}, {worst[f'{model}_gain_high']:+.2f}], "
                                     f"p={worst[f'{model}_p']:.2g} ({_count(worst[f'{model}_seeds'])} seeds)"))
    return verdicts


def run_section(runner_for: Callable[[str], Any], table2_models: Sequence[Any],
                seeds_of: Callable[[Any], Sequence[int]]) -> Dict[str, Any]:
    """`poso bench paper` section (f): the ceiling and each model's GAUC per task and group on each
    of SECTION_PRESETS. `runner_for(preset)` is that preset's `benchmarks.paper.SyntheticRunner`
    (which trains each model and seed once, so models Table 2 trained on the same data are reused);
    `table2_models` run on `submergence`, their NONE_PRESET_MODELS on `none`; `seeds_of(spec)` are a
    model's seeds. The payload holds every row."""
    ceilings, models, descriptions = [], [], []
    for preset in SECTION_PRESETS:
        runner = runner_for(preset)
        ceilings += [dict(preset=preset, **row) for row in ceiling_of(runner.data, runner.eval)]
        descriptions.append(dict(preset=preset, eval=runner.description["eval"], eval_date=runner.data.eval_date,
                                 data_seconds=runner.data_seconds))
        specs_here = [m for m in table2_models if preset == "submergence" or m.name in NONE_PRESET_MODELS]
        runner.train_all([(spec, seed) for spec in specs_here for seed in seeds_of(spec)])
        for spec in specs_here:
            for seed in seeds_of(spec):
                models += [dict(preset=preset, model=spec.name, seed=seed, task=r["task"], group=r["group"],
                                gauc=r["gauc"]) for r in runner.results(spec, seed) if r["group"] in GROUPS]
    return dict(budget=budget_fields(runner.budget), data=descriptions, ceiling=ceilings, models=models)


def render_section(payload: Mapping[str, Any]) -> List[str]:
    """RESULTS.md lines of section (f): the goals' verdicts, then one table per preset."""
    summary = summarize(pd.DataFrame(payload["ceiling"]), pd.DataFrame(payload["models"]))
    budget = payload["budget"]
    lines = [f"- Data: generator seed {budget['data_seed']}, {budget['rows_per_day']:,} impressions a day, new-user "
             f"share {budget['new_user_share']}, {budget['warmup_days']} warm-up and {budget['train_days']} training "
             f"days; evaluation day " + ", ".join(f"{d['preset']} {d['eval_date']}" for d in payload["data"]),
             f"- Training: {budget['train_steps']} steps of {budget['batch_size']}, Adam lr {budget['learning_rate']}, "
             "the same for every model",
             "- ceiling: GAUC of the ranking by the generator's true probabilities; headroom = ceiling - baseline; "
             "closed = (model - baseline) / headroom per seed; differences are paired by seed (mean, 95% t "
             "interval, paired t-test p); benchmarks/headroom.py", "", "Goals (issue 17):", ""]
    lines += [f"- **{'met' if g['met'] else 'missed'}**: {g['goal']}: {g['figures']}" for g in goals(summary)]
    for preset in SECTION_PRESETS:
        part = summary[(summary["preset"] == preset) & summary["task"].isin(("long_view", "like", "click"))]
        if not part.empty:
            lines += ["", f"`{preset}` (follow, about 0.2% positive, is in results/f.json):", "", format_long_table(part)]
    return lines + [""]


def format_long_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table with one row per task, group and model (GAUC in %)."""
    models = [c[:-len("_gain_pp")] for c in summary.columns if c.endswith("_gain_pp")]
    header = ["task", "group", "ceiling", "baseline (headroom pp)", "model", "GAUC", "model - baseline pp [95% CI], p",
              "headroom closed [95% CI]"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        for m in models:
            if pd.isna(row.get(f"{m}_gauc")):
                continue
            lines.append("| " + " | ".join([
                row["task"], row["group"], f"{100 * row['ceiling']:.2f}",
                f"{100 * row['baseline']:.2f} ({row['headroom_pp']:+.2f} ± {row['headroom_pp_std']:.2f}, "
                f"{_count(row['seeds'])} seeds)", m, f"{100 * row[f'{m}_gauc']:.2f}",
                f"{row[f'{m}_gain_pp']:+.2f} [{row[f'{m}_gain_low']:+.2f}, {row[f'{m}_gain_high']:+.2f}], "
                f"p={row[f'{m}_p']:.2g} ({_count(row[f'{m}_seeds'])} seeds)",
                f"{100 * row[f'{m}_closed']:+.1f}% [{100 * row[f'{m}_closed_low']:+.1f}, "
                f"{100 * row[f'{m}_closed_high']:+.1f}]"]) + " |")
    return "\n".join(lines)


def _names(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return names


def _presets(text: str) -> List[str]:
    from components import synthetic_logs

    unknown = sorted(set(_names(text)) - set(synthetic_logs.PRESETS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown preset(s) {unknown}; known: {list(synthetic_logs.PRESETS)}")
    return _names(text)


def _models(text: str) -> List[str]:
    from models import model as model_lib

    unknown = sorted(set(_names(text)) - set(model_lib.VARIANTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown model(s) {unknown}; known: {sorted(model_lib.VARIANTS)}")
    return _names(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--presets", type=_presets, default=list(DEFAULT_PRESETS), metavar="A,B,...",
                        help="generator presets (components.synthetic_logs.PRESETS)")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in _names(text)], default=[0, 1, 2],
                        metavar="0,1,...", help="model seeds (initial weights and data order)")
    parser.add_argument("--models", type=_models, default=list(DEFAULT_MODELS), metavar="A,B,...",
                        help="models.model.VARIANTS to train; the first is the baseline the headroom is measured from")
    parser.add_argument("--data-seed", type=int, default=None,
                        help="generator seed (default: benchmarks.paper.Budget's)")
    parser.add_argument("--train-steps", type=argtypes.positive_int, default=None,
                        help="training steps of every model (default: benchmarks.paper.Budget's)")
    parser.add_argument("--work-dir", default=os.path.join("poso_home", "headroom"),
                        help="cache of the prepared data per preset")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows and summary here")


def budget_fields(budget) -> Dict[str, Any]:
    """The budget without its `preset` (the runners name theirs)."""
    fields = dataclasses.asdict(budget)
    fields.pop("preset")
    return fields


def run(args: argparse.Namespace) -> int:
    from benchmarks import paper

    budget = paper.Budget()  # its `preset` is unused: HeadroomRunner takes each preset from --presets
    if args.data_seed is not None:
        budget = dataclasses.replace(budget, data_seed=args.data_seed)
    if args.train_steps is not None:
        budget = dataclasses.replace(budget, train_steps=args.train_steps)
    started = time.time()
    ceilings, models, descriptions = [], [], []
    for preset in args.presets:
        runner = HeadroomRunner(preset, args.work_dir, budget, log=lambda m: print(m, flush=True))
        descriptions.append(runner.description)
        ceilings += [dict(preset=preset, **row) for row in runner.ceiling]
        # Seed by seed, every model: a run stopped early still has paired seeds (and the JSON has them).
        for seed in args.seeds:
            for model in args.models:
                models += [dict(preset=preset, **row) for row in runner.model_rows(model, seed)]
            summary = summarize(pd.DataFrame(ceilings), pd.DataFrame(models), baseline=args.models[0])
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(budget=budget_fields(budget), presets=list(args.presets), data=descriptions,
                                   ceiling=ceilings,
                                   models=models, summary=summary.to_dict("records"),
                                   wall_seconds=round(time.time() - started, 1)), f, indent=1)
        print(format_table(summary[summary["preset"] == preset]), flush=True)
    print(f"\nHeadroom (budget {budget_fields(budget)}; {time.time() - started:.0f} s)\n")
    print(format_table(summary))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="poso bench headroom", description=__doc__.split("\n")[0],
                                     formatter_class=argtypes.HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
