"""Why POSO(all) closes none of the `submergence` preset's new-user headroom: diagnosis arms.

    bin/poso-env python -m benchmarks.headroom_diagnosis [--data-seed 2] [--seeds 0,1,2,3] [--json PATH]

On a generator seed other than the final table's (choices are made here, never on the
evaluation world of benchmarks/README.md's table), every arm is trained per model seed on the
preset's 7 training days and scored on the evaluation day against the truth (benchmarks.headroom):

    baseline, poso_all              the published arms (benchmarks.paper.Budget: 300 steps of 512)
    specialist                      the baseline trained on new users' impressions only (same steps):
                                    what a model that cannot be submerged learns from the new-user data
    baseline@4x, poso_all@4x        1,200 steps (about 3 passes over the window): the training budget
    poso_all/is_new_user            POSO's gates read the generator's own switch (the 0/1 new-user
                                    flag) instead of the AVC bucket: the PC encoding

The specialist answers whether the new-user data alone holds what the shared models miss; the
longer budget whether the models are under-trained at the benchmark's default; the PC arm whether
the AVC bucket is too coarse a code for the generator's 24-hour new-user window.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import pandas as pd


__all__ = ["run", "main"]

BUDGET_FACTOR = 4


def run(args: argparse.Namespace) -> int:
    from benchmarks import headroom, paper

    budget = dataclasses.replace(paper.Budget(), data_seed=args.data_seed)
    longer = dataclasses.replace(budget, train_steps=BUDGET_FACTOR * budget.train_steps)
    started = time.time()
    runner = headroom.HeadroomRunner(args.preset, args.work_dir, budget, log=lambda m: print(m, flush=True))
    ceiling = [dict(preset=args.preset, **row) for row in runner.ceiling]
    new_only = runner.train.subset(runner.train.user_groups == "new")
    print(f"training rows {len(runner.train)}, of new users {len(new_only)}", flush=True)

    def rows_of(name: str, predictions, seed: int) -> List[Dict[str, Any]]:
        return [dict(preset=args.preset, model=name, seed=seed, task=r["task"], group=r["group"], gauc=r["gauc"])
                for r in paper.gauc_rows(predictions, runner.eval)]

    models: List[Dict[str, Any]] = []
    arms = [("baseline", paper.ModelSpec("baseline", "baseline"), runner.train, budget),
            ("poso_all", paper.ModelSpec("poso_all", "poso_all"), runner.train, budget),
            ("specialist", paper.ModelSpec("specialist", "baseline"), new_only, budget),
            ("poso_all/is_new_user", paper.ModelSpec("poso_all/is_new_user", "poso_all",
                                                     (("pc_source", "is_new_user"),)), runner.train, budget),
            (f"baseline@{BUDGET_FACTOR}x", paper.ModelSpec("baseline", "baseline"), runner.train, longer),
            (f"poso_all@{BUDGET_FACTOR}x", paper.ModelSpec("poso_all", "poso_all"), runner.train, longer)]
    arms = [arm for arm in arms if args.arms is None or arm[0] in args.arms]
    for seed in args.seeds:
        for name, spec, train, arm_budget in arms:
            arm_started = time.time()
            predictions = paper.predict(paper.train_model(spec, train, seed, arm_budget), runner.eval.features)
            models += rows_of(name, predictions, seed)
            print(f"  {name} seed {seed}: {time.time() - arm_started:.0f} s", flush=True)
        frame = pd.DataFrame(models)
        summaries = {base: headroom.summarize(pd.DataFrame(ceiling), frame, baseline=base)
                     for base in ("baseline", f"baseline@{BUDGET_FACTOR}x") if base in set(frame["model"])}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(dict(budget=headroom.budget_fields(budget), data=runner.description, ceiling=ceiling,
                               models=models, wall_seconds=round(time.time() - started, 1),
                               summaries={k: v.to_dict("records") for k, v in summaries.items()}), f, indent=1)
    for base, summary in summaries.items():
        print(f"\nAgainst {base} ({time.time() - started:.0f} s):\n")
        print(headroom.format_table(summary[summary["task"].isin(args.tasks)]))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    from benchmarks import headroom

    parser = argparse.ArgumentParser(prog="python -m benchmarks.headroom_diagnosis",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="submergence")
    parser.add_argument("--data-seed", type=int, default=2,
                        help="generator seed (2: not the final table's world, data seed 1)")
    parser.add_argument("--seeds", type=lambda t: [int(s) for s in headroom._names(t)], default=[0, 1, 2, 3])
    parser.add_argument("--arms", type=headroom._names, default=None, help="a subset of the arms, by name")
    parser.add_argument("--tasks", type=headroom._names, default=["long_view", "like", "click"])
    parser.add_argument("--work-dir", default="poso_home/headroom")
    parser.add_argument("--json", default=None)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
