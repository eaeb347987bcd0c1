"""`poso schedule`: the daily trigger that runs `poso daily` (pipeline/daily.py: `poso run --date
yesterday` with a log file per day, log retention and alert hooks).

Prints (or installs) a cron line or a systemd service + timer pair. The command always goes
through bin/poso, which finds everything it needs under cron's PATH (/usr/bin:/bin) and
systemd's; overlapping runs are refused by the pipeline's own lock on HOME. Each entry is tagged
with its HOME, so `--install` replaces only the entry of the same HOME and leaves every other
line of the crontab (and every other unit) alone.

`--kind kubeflow` writes the recurring run of the compiled Kubeflow pipeline instead: a JSON file
whose keys are the arguments of kfp 2's `kfp.Client.create_recurring_run` (plus
`experiment_name`), and prints the equivalent `kfp recurring-run create` command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess

from pipeline import argtypes
from pipeline import config as config_lib
from pipeline import daily

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_NAME = "poso-daily"


def daily_command(data: str, home: str, keep_logs: int = 30, on_failure: str = "", on_not_blessed: str = "",
                  run_args: str = "") -> str:
    """The shell command of the trigger: `bin/poso daily` with absolute paths."""
    args = [os.path.join(PROJECT_DIR, "bin", "poso"), "daily", "--home", os.path.abspath(home),
            "--data", os.path.abspath(data), "--keep-logs", str(keep_logs)]
    for flag, value in (("--on-failure", on_failure), ("--on-not-blessed", on_not_blessed), ("--run-args", run_args)):
        if value:
            args += [flag, value]
    return " ".join(shlex.quote(a) for a in args)


def entry_tag(home: str) -> str:
    """The comment that marks this HOME's entry (a crontab line, the units' Description)."""
    return f"poso-schedule home={os.path.abspath(home)}"


def cron_line(hour: int, minute: int, command: str, home: str) -> str:
    # cron turns an unescaped % into a newline; the shell ends the command at the tag's #.
    return f"{minute} {hour} * * * {command.replace('%', chr(92) + '%')} # {entry_tag(home)}"


def updated_crontab(current: str, line: str, home: str) -> str:
    """`current` with this HOME's entry replaced by `line` (added if absent); other lines kept."""
    tag = f"# {entry_tag(home)}"
    kept = [l for l in current.splitlines() if not l.rstrip().endswith(tag)]
    return "\n".join(kept + [line]) + "\n"


def unit_name(home: str) -> str:
    """One service + timer pair per HOME."""
    return f"{UNIT_NAME}-{hashlib.sha1(os.path.abspath(home).encode()).hexdigest()[:8]}"


def systemd_units(hour: int, minute: int, command: str, home: str) -> dict:
    # systemd expands % specifiers and $VARIABLES in ExecStart: escape both for bash -c.
    exec_command = shlex.quote(command).replace("%", "%%").replace("$", "$$")
    service = (f"[Unit]\nDescription=POSO ranking: daily retraining for yesterday's logs ({entry_tag(home)})\n"
               f"Wants=network-online.target\nAfter=network-online.target\n\n[Service]\nType=oneshot\n"
               f"ExecStart=/bin/bash -c {exec_command}\n")
    timer = (f"[Unit]\nDescription=Daily POSO ranking retraining ({entry_tag(home)})\n\n[Timer]\n"
             f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\nPersistent=true\n\n"
             f"[Install]\nWantedBy=timers.target\n")
    name = unit_name(home)
    return {f"{name}.service": service, f"{name}.timer": timer}


def kubeflow_recurring_run(hour: int, minute: int, pipeline_package: str, experiment: str) -> dict:
    """The daily recurring run: one run at a time (each day's run needs the day before's state and
    registry entry), catching up missed days in order, each run evaluating the day before its
    scheduled day (the KFP scheduler fills in [[ScheduledTime...]])."""
    from pipeline import kubeflow_v2_runner

    return {
        "experiment_name": experiment,
        "job_name": f"{config_lib.KUBEFLOW_PIPELINE_NAME}-daily",
        "description": "POSO ranking: daily ingest, retraining, validation and push for the day before",
        "cron_expression": f"0 {minute} {hour} * * *",  # KFP cron: seconds first, in the cluster's UTC
        "max_concurrency": 1,
        "no_catchup": False,
        "enabled": True,
        "pipeline_package_path": os.path.abspath(pipeline_package),
        "params": {"date": kubeflow_v2_runner.RECURRING_DATE_PARAMETER},
    }


def kfp_cli_command(spec: dict) -> str:
    """The `kfp recurring-run create` command (kfp 2 CLI) that creates `spec`."""
    args = ["kfp", "recurring-run", "create", "--experiment-name", spec["experiment_name"],
            "--job-name", spec["job_name"], "--description", spec["description"],
            "--cron-expression", spec["cron_expression"], "--max-concurrency", str(spec["max_concurrency"]),
            "--no-catchup" if spec["no_catchup"] else "--catchup", "--enabled" if spec["enabled"] else "--disabled",
            "--pipeline-package-path", spec["pipeline_package_path"]]
    args += [f"{name}={value}" for name, value in spec["params"].items()]
    return " ".join(shlex.quote(a) for a in args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="daily raw logs for `poso run` (default: HOME/data)")
    parser.add_argument("--home", default=os.environ.get(argtypes.HOME_ENVIRONMENT_VARIABLE) or None,
                        help=f"the pipeline home of the daily run (default: ${argtypes.HOME_ENVIRONMENT_VARIABLE}; "
                             f"required for cron and systemd)")
    parser.add_argument("--at", default="02:30", help="time of day HH:MM (local time of the machine)")
    parser.add_argument("--kind", choices=["cron", "systemd", "kubeflow"], default="cron",
                        help="kubeflow: write the recurring run of the compiled pipeline (--pipeline-package)")
    parser.add_argument("--install", action="store_true",
                        help="install it: this HOME's line in the current user's crontab (other lines kept), "
                             "or this HOME's units in /etc/systemd/system + enable the timer")
    daily.add_hook_arguments(parser)
    parser.add_argument("--pipeline-package", default=config_lib.KUBEFLOW_OUTPUT,
                        help="kubeflow: the spec from `poso compile-kubeflow`")
    parser.add_argument("--experiment", default=config_lib.KUBEFLOW_PIPELINE_NAME, help="kubeflow: the KFP experiment")
    parser.add_argument("--output", default="poso_ranking_recurring_run.json",
                        help="kubeflow: where to write the recurring run")


def run(args: argparse.Namespace) -> int:
    try:
        hour, minute = (int(part) for part in args.at.split(":"))
        if not (0 <= hour < 24 and 0 <= minute < 60):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--at {args.at!r}: expected HH:MM")
    if args.kind == "kubeflow":
        if not os.path.isfile(args.pipeline_package):
            raise SystemExit(f"--pipeline-package {args.pipeline_package}: no such file; compile it first "
                             f"with `poso compile-kubeflow --output {args.pipeline_package}`")
        spec = kubeflow_recurring_run(hour, minute, args.pipeline_package, args.experiment)
        with open(args.output, "w") as f:
            json.dump(spec, f, indent=2)
        print(f"wrote {args.output}; create it with:\n{kfp_cli_command(spec)}")
        return 0
    if not args.home:
        raise SystemExit(f"poso schedule --kind {args.kind}: pass --home (or set ${argtypes.HOME_ENVIRONMENT_VARIABLE})")
    command = daily_command(args.data or os.path.join(args.home, "data"), args.home, args.keep_logs,
                            args.on_failure, args.on_not_blessed, args.run_args)
    if args.kind == "cron":
        line = cron_line(hour, minute, command, args.home)
        if not args.install:
            print(line)
            return 0
        listed = subprocess.run(["crontab", "-l"], capture_output=True, text=True)
        current = listed.stdout if listed.returncode == 0 else ""  # no crontab yet: exit code 1
        subprocess.run(["crontab", "-"], input=updated_crontab(current, line, args.home), text=True, check=True)
        print(f"installed in the crontab: {line}")
        return 0
    units = systemd_units(hour, minute, command, args.home)
    if not args.install:
        for name, text in units.items():
            print(f"# /etc/systemd/system/{name}\n{text}")
        return 0
    for name, text in units.items():
        with open(os.path.join("/etc/systemd/system", name), "w") as f:
            f.write(text)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    timer = next(name for name in units if name.endswith(".timer"))
    subprocess.run(["systemctl", "enable", "--now", timer], check=True)
    print(f"installed and enabled {timer}")
    return 0
