"""`poso schedule` and `poso daily`: the printed trigger works under cron's bare environment, runs
the hooks, keeps a log per day and installs only its own HOME's entry."""

import datetime
import json
import os
import subprocess
import time

import pytest

from pipeline import cli, daily, schedule

YESTERDAY = (datetime.date.today() - datetime.timedelta(days=1)).isoformat()


def _cron_command(line: str) -> str:
    """What cron hands to /bin/sh for `line`: the command after the five time fields, with cron's
    `\\%` unescaped (the shell then drops the trailing tag comment)."""
    return line.split(" ", 5)[5].replace("\\%", "%")


def test_cron_line_runs_under_crons_environment_and_calls_the_failure_hook(capsys, tmp_path):
    home, alerts = tmp_path / "home", tmp_path / "alerts"
    # A run that fails at once (a bad flag of `poso run`), so no pipeline runs here.
    assert cli.main(["schedule", "--home", str(home), "--at", "04:05", "--run-args", "--train-days 0",
                     "--on-failure", f'echo "$POSO_OUTCOME $POSO_DATE $POSO_EXIT_CODE 100%" >> {alerts}']) == 0
    line = capsys.readouterr().out.strip()
    minute, hour, *_rest = line.split(" ", 5)
    assert (minute, hour) == ("5", "4") and line.endswith(f"# poso-schedule home={home}")
    completed = subprocess.run(["env", "-i", "PATH=/usr/bin:/bin", "/bin/sh", "-c", _cron_command(line)],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert alerts.read_text() == f"failed {YESTERDAY} 2 100%\n"
    log = (home / "logs" / f"daily-{YESTERDAY}.log").read_text()
    assert "argument --train-days: expected a positive integer, got '0'" in log
    assert "== exit code 2: failed" in log and "== failed hook exited with 0" in log


def test_systemd_units_wait_for_the_network_and_run_the_same_command(capsys, tmp_path):
    assert cli.main(["schedule", "--kind", "systemd", "--at", "23:59", "--home", str(tmp_path),
                     "--on-not-blessed", "logger -t poso '$POSO_DATE not blessed'"]) == 0
    out = capsys.readouterr().out
    name = schedule.unit_name(str(tmp_path))
    assert f"# /etc/systemd/system/{name}.service" in out and f"# /etc/systemd/system/{name}.timer" in out
    assert "OnCalendar=*-*-* 23:59:00" in out and "Type=oneshot" in out
    assert "Wants=network-online.target\nAfter=network-online.target" in out
    exec_start = next(l for l in out.splitlines() if l.startswith("ExecStart="))
    assert "$$POSO_DATE" in exec_start  # systemd would expand a bare $VARIABLE itself
    command = exec_start[len("ExecStart=/bin/bash -c "):].replace("$$", "$").replace("%%", "%")
    assert subprocess.run(["bash", "-c", f"printf %s {command}"], capture_output=True, text=True).stdout == \
        schedule.daily_command(str(tmp_path / "data"), str(tmp_path), 30, "",
                               "logger -t poso '$POSO_DATE not blessed'")


def test_install_replaces_only_the_entry_of_the_same_home(capsys, tmp_path, monkeypatch):
    # A crontab stand-in on PATH keeping the table in a file (crontab -l exits 1 without one).
    table, fake = tmp_path / "table", tmp_path / "bin" / "crontab"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -l ]; then cat {table} 2>/dev/null || exit 1; else cat > {table}; fi\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    home, other = tmp_path / "home", tmp_path / "other"
    assert cli.main(["schedule", "--home", str(other), "--install"]) == 0
    table.write_text(table.read_text() + "0 * * * * /usr/bin/backup bin/poso run --date yesterday\n")
    for at in ("01:00", "03:15"):
        assert cli.main(["schedule", "--home", str(home), "--at", at, "--install"]) == 0
    lines = table.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith(f"# poso-schedule home={other}")
    assert lines[1] == "0 * * * * /usr/bin/backup bin/poso run --date yesterday"
    assert lines[2].startswith("15 3 * * * ") and lines[2].endswith(f"# poso-schedule home={home}")


def test_outcome_is_read_from_the_summary_this_run_wrote(tmp_path):
    summary = tmp_path / "2022-04-15.json"
    started = time.time()
    assert daily.outcome(str(summary), started, 1) == "failed"
    summary.write_text(json.dumps({"pushed": False}))
    assert daily.outcome(str(summary), started, 3) == "not-blessed"
    os.utime(summary, (started - 0.005,) * 2)  # the file clock lags time.time() by a few ms
    assert daily.outcome(str(summary), started, 3) == "not-blessed"
    summary.write_text(json.dumps({"pushed": True}))
    assert daily.outcome(str(summary), started, 0) == "pushed"
    assert daily.outcome(str(summary), time.time() + 60, 0) == "failed"  # an earlier run's summary


def test_logs_older_than_the_retention_are_deleted(tmp_path):
    old, recent = tmp_path / "daily-2022-01-01.log", tmp_path / "sub" / "run-2022-04-15.log"
    recent.parent.mkdir()
    for path in (old, recent):
        path.write_text("x")
    os.utime(old, (time.time() - 31 * 86400,) * 2)
    (tmp_path / "notes.txt").write_text("kept")
    assert daily.prune_logs(str(tmp_path), 30) == [str(old)]
    assert recent.exists() and (tmp_path / "notes.txt").exists()


def test_bad_time_is_refused():
    with pytest.raises(SystemExit, match="HH:MM"):
        cli.main(["schedule", "--at", "25:00", "--home", "/srv/poso"])


_STOPPED_WHILE_WAITING = """
import os, signal, subprocess, sys, threading
from pipeline import daily
child = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(5)); print('ready', flush=True); time.sleep(60)"],
    stdout=subprocess.PIPE, text=True)
child.stdout.readline()
threading.Timer(0.2, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
print(daily.wait_passing_on_stops(child))
"""


def test_a_stop_sent_to_daily_reaches_the_run_it_waits_for():
    import subprocess
    import sys

    from pipeline import config as config_lib

    done = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_WAITING], cwd=config_lib.PROJECT_DIR,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5"   # the child got the SIGTERM (its handler's exit code), daily did not die
