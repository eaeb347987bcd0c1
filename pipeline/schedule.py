"""`poso schedule`: the daily trigger that runs `poso run --date yesterday`.

Prints (or installs) a cron line or a systemd service + timer pair. The command always goes
through bin/poso, so the trigger needs nothing but this checkout.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess

from pipeline import config as config_lib

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIT_NAME = "poso-daily"


def daily_command(data: str, home: str, extra: str = "") -> str:
    poso = os.path.join(PROJECT_DIR, "bin", "poso")
    log = os.path.join(os.path.abspath(home), "logs", "daily.log")
    args = (f"{shlex.quote(poso)} run --date yesterday --data {shlex.quote(os.path.abspath(data))} "
            f"--home {shlex.quote(os.path.abspath(home))}" + (f" {extra}" if extra else ""))
    return f"mkdir -p {shlex.quote(os.path.dirname(log))} && {args} >> {shlex.quote(log)} 2>&1"


def cron_line(hour: int, minute: int, command: str) -> str:
    return f"{minute} {hour} * * * {command}"


def systemd_units(hour: int, minute: int, command: str) -> dict:
    service = (f"[Unit]\nDescription=POSO ranking: daily retraining for yesterday's logs\n"
               f"After=network-online.target\n\n[Service]\nType=oneshot\n"
               f"ExecStart=/bin/bash -c {shlex.quote(command)}\n")
    timer = (f"[Unit]\nDescription=Daily POSO ranking retraining\n\n[Timer]\n"
             f"OnCalendar=*-*-* {hour:02d}:{minute:02d}:00\nPersistent=true\n\n"
             f"[Install]\nWantedBy=timers.target\n")
    return {f"{UNIT_NAME}.service": service, f"{UNIT_NAME}.timer": timer}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=config_lib.DEFAULT_DATA)
    parser.add_argument("--home", default=config_lib.DEFAULT_HOME)
    parser.add_argument("--at", default="02:30", help="time of day HH:MM (local time of the machine)")
    parser.add_argument("--kind", choices=["cron", "systemd"], default="cron")
    parser.add_argument("--install", action="store_true",
                        help="install it (crontab of the current user, or /etc/systemd/system + enable the timer)")
    parser.add_argument("--run-args", default="", help="extra arguments for `poso run`, e.g. '--variant poso_all'")


def run(args: argparse.Namespace) -> int:
    try:
        hour, minute = (int(part) for part in args.at.split(":"))
        if not (0 <= hour < 24 and 0 <= minute < 60):
            raise ValueError
    except ValueError:
        raise SystemExit(f"--at {args.at!r}: expected HH:MM")
    command = daily_command(args.data, args.home, args.run_args)
    if args.kind == "cron":
        line = cron_line(hour, minute, command)
        if not args.install:
            print(line)
            return 0
        current = subprocess.run(["crontab", "-l"], capture_output=True, text=True).stdout
        kept = [l for l in current.splitlines() if "bin/poso run --date yesterday" not in l]
        subprocess.run(["crontab", "-"], input="\n".join(kept + [line]) + "\n", text=True, check=True)
        print(f"installed in the crontab: {line}")
        return 0
    units = systemd_units(hour, minute, command)
    if not args.install:
        for name, text in units.items():
            print(f"# /etc/systemd/system/{name}\n{text}")
        return 0
    for name, text in units.items():
        with open(os.path.join("/etc/systemd/system", name), "w") as f:
            f.write(text)
    subprocess.run(["systemctl", "daemon-reload"], check=True)
    subprocess.run(["systemctl", "enable", "--now", f"{UNIT_NAME}.timer"], check=True)
    print(f"installed and enabled {UNIT_NAME}.timer")
    return 0
