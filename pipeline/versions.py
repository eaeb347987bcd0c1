"""`poso versions`, `poso rollback` and `poso serving-config`: what is pushed, what serves, and
changing it.

What serves is what HOME/serving/models.config tells the servers (they poll it): the latest
pushed version, or the version `poso rollback VERSION` pinned. The pin outlives the daily runs,
which keep pushing but do not serve their models until `poso rollback --release` (or
`poso run --unpin`) lifts it. Which run pushed a version comes from the run summaries
(HOME/runs/DATE.json).
"""

from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
from typing import Dict, List, Optional

from components import serving_config
from pipeline import argtypes
from pipeline import config as config_lib


def _paths(home: str) -> config_lib.RunConfig:
    return config_lib.home_config(home)


def pushed_versions(home: str) -> List[int]:
    """The numbered versions in the serving base directory, oldest first."""
    from serving import config as serving_config_lib

    return sorted(serving_config_lib.list_versions(_paths(home).serving_model_dir))


def serving_versions(home: str) -> List[int]:
    """The versions HOME/serving/models.config has the servers load (none before the first push)."""
    from serving import config as serving_config_lib

    cfg = _paths(home)
    if not os.path.exists(cfg.models_config_path):
        return []
    model = serving_config_lib.find_model(serving_config_lib.load_model_server_config(cfg.models_config_path),
                                          config_lib.MODEL_NAME)
    return sorted(serving_config_lib.aspired_versions(pushed_versions(home), model)) if model else []


def pushing_runs(home: str) -> Dict[int, dict]:
    """{version: the summary of the run that pushed it}, from HOME/runs/*.json."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(os.path.abspath(home), "runs", "*.json"))):
        try:
            with open(path) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            continue
        if summary.get("pushed") and str(summary.get("pushed_version", "")).isdigit():
            runs[int(summary["pushed_version"])] = summary
    return runs


def add_versions_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_home_argument(parser, "the pipeline home")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def printed_as_json_or_empty(rows: List[dict], as_json: bool, empty_message: str) -> bool:
    """Prints `rows` as JSON (with --json) or `empty_message` when there are none; False when the
    caller still has to print its table."""
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(empty_message)
    return as_json or not rows


def _pushed_at(base_directory: str, version: int) -> str:
    """From the version's PUSH.json (components/day_versions.py); a version pushed before those
    is named by its push time in seconds since the epoch (TFX's Pusher)."""
    from components import day_versions

    marker = day_versions.read_marker(os.path.join(base_directory, str(version)))
    if marker.get("pushed_at"):
        at = datetime.datetime.fromisoformat(marker["pushed_at"])
    else:
        at = datetime.datetime.fromtimestamp(version, tz=datetime.timezone.utc)
    return at.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def cmd_versions(args: argparse.Namespace) -> int:
    versions, serving, runs = pushed_versions(args.home), serving_versions(args.home), pushing_runs(args.home)
    pinned = serving_config.read_pin(_paths(args.home).pin_path)
    base_directory = _paths(args.home).serving_model_dir
    rows = [{"version": v, "pushed_at": _pushed_at(base_directory, v),
             "pushed_by_run": run.get("date", "?") if run else None,
             "model": run.get("variant"),  # the variant its run trained (summaries since 2026-12)
             "serving": v in serving, "pinned": v == pinned}
            for v, run in ((v, runs.get(v, {})) for v in versions)]
    if printed_as_json_or_empty(rows, args.json, f"No pushed version under {_paths(args.home).serving_model_dir} yet."):
        return 0
    print(f"{'VERSION':<12} {'PUSHED':<21} {'BLESSED BY RUN':<15} {'MODEL':<10} SERVING")
    for row in rows:
        state = ("yes (pinned by poso rollback)" if row["pinned"] else "yes") if row["serving"] else ""
        print(f"{row['version']:<12} {row['pushed_at']:<21} {row['pushed_by_run'] or '-':<15} "
              f"{row['model'] or '-':<10} {state}")
    if pinned is not None and pinned not in serving:
        print(f"Pinned version {pinned} is missing from the base directory: nothing serves.")
    return 0


def add_rollback_arguments(parser: argparse.ArgumentParser) -> None:
    argtypes.add_home_argument(parser, "the pipeline home")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("version", nargs="?", type=argtypes.positive_int,
                        help="the pushed version to serve (see `poso versions`); pinned until released")
    target.add_argument("--release", action="store_true",
                        help="lift the pin: serve the latest pushed version again")


def cmd_rollback(args: argparse.Namespace) -> int:
    cfg = _paths(args.home)
    if args.release:
        released = serving_config.remove_pin(cfg.pin_path)
        if released is None:
            print("No version was pinned.")
    else:
        available = pushed_versions(args.home)
        if args.version not in available:
            raise SystemExit(f"poso rollback: version {args.version} is not in {cfg.serving_model_dir} "
                             f"(pushed: {', '.join(map(str, available)) or 'none'})")
        serving_config.write_pin(cfg.pin_path, args.version)
    serving_config.write_models_config(cfg.models_config_path, config_lib.MODEL_NAME, cfg.serving_model_dir,
                                       cfg.pin_path)
    serving = serving_versions(args.home)
    print(f"{cfg.models_config_path} now serves version {', '.join(map(str, serving)) or 'none'}"
          + (" (pinned: daily runs keep pushing but do not serve until `poso rollback --release`)"
             if not args.release else " (the latest)")
          + ". Servers polling it switch within their --model_config_file_poll_wait_seconds; "
            "for containers reading deploy/models.config, regenerate it with `poso serving-config`.")
    return 0


def add_serving_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-path", required=True,
                        help="the model's base directory as the server sees it, e.g. /models/poso_ranking "
                             "in the deploy/ containers")
    parser.add_argument("--home", default=os.environ.get(argtypes.HOME_ENVIRONMENT_VARIABLE) or None,
                        help=f"apply this home's pin, if any (default: ${argtypes.HOME_ENVIRONMENT_VARIABLE}; "
                             f"without either: the latest version)")


DEPLOY_HEADER = ("The container-side models.config (HOME/serving is mounted at /models). Generated:\n"
                 "  bin/poso serving-config --base-path /models/poso_ranking > deploy/models.config\n"
                 "(add --home HOME to carry a `poso rollback` pin). Do not edit by hand.")


def cmd_serving_config(args: argparse.Namespace) -> int:
    pinned = serving_config.read_pin(_paths(args.home).pin_path) if args.home else None
    print(serving_config.models_config_text(config_lib.MODEL_NAME, args.base_path, pinned, header=DEPLOY_HEADER),
          end="")
    return 0
