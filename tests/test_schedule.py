"""`poso schedule`: the printed trigger runs the real CLI for yesterday with the given paths."""

import shlex
import subprocess

from pipeline import cli, schedule


def test_cron_line_runs_bin_poso_for_yesterday(capsys, tmp_path):
    assert cli.main(["schedule", "--data", str(tmp_path / "logs"), "--home", str(tmp_path / "home"), "--at", "04:05"]) == 0
    line = capsys.readouterr().out.strip()
    minute, hour, *_rest = line.split(" ", 5)
    assert (minute, hour) == ("5", "4")
    command = line.split(" ", 5)[5]
    assert f"{schedule.PROJECT_DIR}/bin/poso run --date yesterday" in command
    assert f"--data {tmp_path / 'logs'}" in command and f"--home {tmp_path / 'home'}" in command
    # The command is valid shell.
    assert subprocess.run(["bash", "-n", "-c", command]).returncode == 0


def test_systemd_timer_fires_daily_at_the_given_time(capsys):
    assert cli.main(["schedule", "--kind", "systemd", "--at", "23:59", "--home", "/srv/poso"]) == 0
    out = capsys.readouterr().out
    assert "OnCalendar=*-*-* 23:59:00" in out and "Type=oneshot" in out and "run --date yesterday" in out


def test_bad_time_is_refused():
    import pytest
    with pytest.raises(SystemExit, match="HH:MM"):
        cli.main(["schedule", "--at", "25:00", "--home", "/srv/poso"])
