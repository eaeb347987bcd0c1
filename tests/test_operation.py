"""How the daily commands operate, without a pipeline run: HOME's lock, argument checks and exit
codes, and the exactly-once push of a version folder (killed for real at its injection points)."""

import datetime
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from components import day_versions, fault_injection, synthetic_logs
from pipeline import cli, exit_codes, home_lock
from pipeline import config as config_lib

DAY = datetime.date(2022, 4, 15)
_ENV = {**os.environ, "PYTHONPATH": config_lib.PROJECT_DIR}

_HOLD_LOCK = """
import sys, time
from pipeline import home_lock
with home_lock.home_lock(sys.argv[1], command="holder-under-test"):
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_lock(home, seconds):
    child = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(home), str(seconds)], cwd=config_lib.PROJECT_DIR,
                             env=_ENV, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_a_second_holder_is_refused_naming_the_first_then_gets_the_lock_once_it_ends(tmp_path):
    holder = _hold_lock(tmp_path, 3)
    try:
        with pytest.raises(home_lock.HomeLocked) as locked:
            with home_lock.home_lock(str(tmp_path)):
                pass
        message = str(locked.value)
        assert f"pid {holder.pid}" in message and "holder-under-test" in message and "since" in message
        started = time.monotonic()
        with home_lock.home_lock(str(tmp_path), wait_seconds=60):  # waits for the holder's 3 s
            waited = time.monotonic() - started
            assert home_lock.read_holder(str(tmp_path))["pid"] == os.getpid()
        assert 0.5 < waited < 30
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_free_at_once(tmp_path):
    holder = _hold_lock(tmp_path, 600)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with home_lock.home_lock(str(tmp_path)):
        with home_lock.home_lock(str(tmp_path)):  # reentrant in one process
            pass


def _data(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    synthetic_logs.generate(str(data), DAY, 3, seed=1, impressions_per_day=50)
    return str(data)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return _data(tmp_path_factory)


def _cli(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    return code, capsys.readouterr().err.strip().splitlines()


def test_the_cli_refuses_a_locked_home_at_once_with_the_locked_exit_code(tmp_path, data, capsys):
    holder = _hold_lock(tmp_path, 120)
    try:
        code, err = _cli(["run", "--date", (DAY + datetime.timedelta(days=1)).isoformat(), "--data", data,
                          "--home", str(tmp_path), "--train-days", "1"], capsys)
    finally:
        holder.kill()
        holder.wait()
    assert code == exit_codes.LOCKED
    assert err[-1].startswith("poso run: locked: ") and f"pid {holder.pid}" in err[-1], err


def _bad_cases(tmp_path, data):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    day2 = (DAY + datetime.timedelta(days=1)).isoformat()
    common = ["--data", data, "--home", str(tmp_path / "home"), "--train-days", "1"]
    return {
        "from after to": (["backfill", "--from", day2, "--to", DAY.isoformat(), *common], "is after --to"),
        "train days 0": (["run", "--date", day2, *common, "--train-days", "0"], "--train-days: expected a positive"),
        "negative steps": (["run", "--date", day2, *common, "--train-steps", "-5"], "--train-steps: expected a positive"),
        "home is a file": (["run", "--date", day2, *common, "--home", str(a_file)], "is a file, not a folder"),
        "home not creatable": (["run", "--date", day2, *common, "--home", str(a_file / "home")], "not a writable folder"),
        "missing data": (["run", "--date", day2, *common, "--data", str(tmp_path / "nowhere")], "no such folder"),
        "date beyond the data": (["run", "--date", "2022-05-30", *common], "is after the last day of logs"),
        "window before the data": (["run", "--date", DAY.isoformat(), *common], "needs at least 1 of those days"),
        "unknown variant": (["run", "--date", day2, *common, "--variant", "posox"], "--variant posox: unknown"),
        "benchmark-only variant": (["run", "--date", day2, *common, "--variant", "melu"], "cannot do"),
        "demo, unknown variant": (["demo", "--home", str(tmp_path / "home"), "--variant", "posox"],
                                  "--variant posox: unknown"),
        "demo, benchmark-only variant": (["demo", "--home", str(tmp_path / "home"), "--variant", "melu"], "cannot do"),
    }


@pytest.mark.parametrize("case", ["from after to", "train days 0", "negative steps", "home is a file",
                                  "home not creatable", "missing data", "date beyond the data",
                                  "window before the data", "unknown variant", "benchmark-only variant",
                                  "demo, unknown variant", "demo, benchmark-only variant"])
def test_bad_arguments_are_refused_before_any_work_with_one_line(tmp_path, data, capsys, case):
    argv, words = _bad_cases(tmp_path, data)[case]
    code, err = _cli(argv, capsys)
    assert code == exit_codes.BAD_INPUT
    assert words in err[-1], err
    assert not (tmp_path / "home" / "metadata.sqlite").exists()
    assert len([line for line in err if line.startswith("poso")]) == 1, err


# ------------------------------------------------------------------------------------------------
# The exactly-once push.
# ------------------------------------------------------------------------------------------------
def _model(folder, weights: bytes):
    os.makedirs(os.path.join(folder, "variables"), exist_ok=True)
    with open(os.path.join(folder, "saved_model.pb"), "wb") as f:
        f.write(b"graph")
    with open(os.path.join(folder, "variables", "variables.index"), "wb") as f:
        f.write(weights)
    with open(os.path.join(folder, "variables", "variables.data-00000-of-00001"), "wb") as f:
        f.write(weights * 1000)
    return str(folder)


def _folders(base):
    return sorted(os.listdir(base))


_PUSH = """
import datetime, sys
from components import day_versions
day_versions.push(sys.argv[1], sys.argv[2], datetime.date.fromisoformat(sys.argv[3]))
"""


def _push_killed_at(point, model, base):
    done = subprocess.run([sys.executable, "-c", _PUSH, model, base, DAY.isoformat()], cwd=config_lib.PROJECT_DIR,
                          env={**_ENV, fault_injection.VARIABLE: point}, timeout=300)
    assert done.returncode == -signal.SIGKILL


def test_a_day_is_pushed_once_as_its_own_version_and_a_rerun_adopts_it(tmp_path):
    base = str(tmp_path / "serving")
    model = _model(tmp_path / "model", b"A")
    first = day_versions.push(model, base, DAY)
    assert first == {"version": 2022041500, "destination": os.path.join(base, "2022041500"), "push": "copied"}
    again = day_versions.push(model, base, DAY)
    assert again["push"] == "adopted" and again["version"] == 2022041500
    assert _folders(base) == ["2022041500"]
    marker = day_versions.read_marker(first["destination"])
    assert marker["date"] == DAY.isoformat() and marker["model_fingerprint"] == day_versions.model_fingerprint(model)
    next_day = day_versions.push(model, base, DAY + datetime.timedelta(days=1))
    assert next_day["version"] == 2022041600 and _folders(base) == ["2022041500", "2022041600"]


@pytest.mark.parametrize("point", ["Pusher:copied", "Pusher:renamed"])
def test_a_push_killed_inside_leaves_one_complete_version_after_the_rerun(tmp_path, point):
    base = str(tmp_path / "serving")
    model = _model(tmp_path / "model", b"A")
    _push_killed_at(point, model, base)
    if point == "Pusher:copied":  # killed with saved_model.pb copied: only the hidden folder exists
        assert _folders(base) == [".push-2022041500"]
    else:
        assert _folders(base) == ["2022041500"]
    result = day_versions.push(model, base, DAY)
    assert result["push"] == ("copied" if point == "Pusher:copied" else "adopted")
    assert _folders(base) == ["2022041500"]
    assert os.path.getsize(os.path.join(base, "2022041500", "variables", "variables.data-00000-of-00001")) == 1000


def test_another_model_for_a_pushed_day_replaces_it_under_the_next_revision(tmp_path):
    base = str(tmp_path / "serving")
    day_versions.push(_model(tmp_path / "a", b"A"), base, DAY)
    replaced = day_versions.push(_model(tmp_path / "b", b"B"), base, DAY)
    assert replaced == {"version": 2022041501, "destination": os.path.join(base, "2022041501"), "push": "copied"}
    assert _folders(base) == ["2022041501"]
    with open(os.path.join(base, "2022041501", "variables", "variables.index"), "rb") as f:
        assert f.read() == b"B"


def test_a_replacement_never_removes_the_version_a_rollback_pinned(tmp_path):
    base = str(tmp_path / "serving")
    pinned = day_versions.push(_model(tmp_path / "a", b"A"), base, DAY)["version"]
    replaced = day_versions.push(_model(tmp_path / "b", b"B"), base, DAY, pinned=pinned)
    assert _folders(base) == [str(pinned), str(replaced["version"])]


def test_gc_does_not_delete_while_a_run_holds_the_home(tmp_path, capsys):
    version = tmp_path / "serving" / "poso_ranking" / "2022041500"
    version.mkdir(parents=True)
    holder = _hold_lock(tmp_path, 600)
    try:
        assert cli.main(["gc", "--home", str(tmp_path), "--keep", "0", "--delete"]) == exit_codes.LOCKED
    finally:
        holder.kill()
        holder.wait()
    assert "in use by" in capsys.readouterr().err
    assert version.is_dir()
