"""ML Metadata on a real MySQL-compatible server (MariaDB), as a production store would be.

The server comes from `bin/with-mysql` (`make test` and `.ci/run` wrap the suite in it): a
throw-away MariaDB on 127.0.0.1 whose address is in POSO_TEST_MYSQL. Each test gets its own
database, dropped at the end. Without a server the pipeline tests are skipped, except under CI,
where they fail.
"""

import datetime
import os
import subprocess
import sys
import urllib.parse
import uuid

import pytest

from components import synthetic_logs
from pipeline import config as config_lib

START = datetime.date(2022, 4, 8)
TRAIN_DAYS = 2          # a short window keeps the two concurrent first runs to a few minutes
FIRST_FULL = START + datetime.timedelta(days=TRAIN_DAYS)
ROWS_PER_DAY = 600
TRAIN_STEPS = 60
RUN_FLAGS = ["--train-steps", str(TRAIN_STEPS), "--train-days", str(TRAIN_DAYS), "--beam-mode", "in_memory"]


# ---------------------------------------------------------------------------------------------
# The URL form of --metadata-mysql.
# ---------------------------------------------------------------------------------------------
def test_mysql_url_gives_the_connection_fields():
    assert config_lib.mysql_connection("mysql://ml%40ops:p%2Fw@db.internal:3307/mlmd") == {
        "host": "db.internal", "port": 3307, "database": "mlmd", "username": "ml@ops", "password": "p/w"}
    assert config_lib.mysql_connection("mysql://root@127.0.0.1/mlmd")["port"] == 3306


@pytest.mark.parametrize("url, problem", [
    ("postgres://u:p@h/db", "must start with mysql://"),
    ("mysql://u:p@h:3306/", "names no database"),
    ("mysql://u:p@h/a/b", "names no database"),
    ("mysql://:p@h/db", "names no user"),
    ("mysql://u:p@h:99999/db", "port is not a number"),
    ("mysql://u:p@h/db?ssl=1", "not supported"),
])
def test_a_bad_mysql_url_is_refused_naming_the_problem_without_the_password(url, problem):
    with pytest.raises(ValueError, match=problem) as error:
        config_lib.mysql_connection(url)
    assert ":p@" not in str(error.value)


def test_the_cli_refuses_a_bad_url_before_any_work(tmp_path):
    home = tmp_path / "home"
    run = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", "--date", FIRST_FULL.isoformat(),
                          "--data", str(tmp_path), "--home", str(home), "--metadata-mysql", "mysql://u:secret@h/"],
                         cwd=config_lib.PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "names no database" in run.stderr and "secret" not in run.stderr
    assert not home.exists()


# ---------------------------------------------------------------------------------------------
# Daily runs with the store in MariaDB.
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mysql_server():
    url = os.environ.get("POSO_TEST_MYSQL")
    if not url:
        message = "no MySQL server: run the suite through bin/with-mysql (make test does) or set POSO_TEST_MYSQL"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    parsed = urllib.parse.urlsplit(url)
    return {"host": parsed.hostname, "port": parsed.port or 3306, "username": urllib.parse.unquote(parsed.username),
            "password": urllib.parse.unquote(parsed.password or "")}


def _connect(server, database=None):
    import pymysql

    return pymysql.connect(host=server["host"], port=server["port"], user=server["username"],
                           password=server["password"], database=database, autocommit=True)


@pytest.fixture(scope="module")
def databases(mysql_server):
    """make(): a fresh database name (created by ML Metadata on first use); all dropped at the end."""
    names = []

    def make():
        names.append(f"poso_test_{uuid.uuid4().hex[:12]}")
        return {**mysql_server, "database": names[-1]}

    yield make
    with _connect(mysql_server) as connection, connection.cursor() as cursor:
        for name in names:
            cursor.execute(f"DROP DATABASE IF EXISTS `{name}`")


def _mysql_url(connection):
    return (f"mysql://{urllib.parse.quote(connection['username'], safe='')}:"
            f"{urllib.parse.quote(connection['password'], safe='')}@{connection['host']}:{connection['port']}/"
            f"{connection['database']}")


def _start_run(root, name, date, connection):
    """`poso run` for `date` in a home of its own with its store in `connection`'s database."""
    data, home = root / f"{name}_data", root / f"{name}_home"
    synthetic_logs.generate(str(data), START, (date - START).days + 1, seed=7, impressions_per_day=ROWS_PER_DAY)
    log = open(root / f"{name}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "run", "--date", date.isoformat(), "--data", str(data),
         "--home", str(home), *RUN_FLAGS, "--metadata-mysql", _mysql_url(connection)],
        cwd=config_lib.PROJECT_DIR, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return process, home, root / f"{name}.log"


def _finish(process, log_path, timeout=900):
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, 9)
            process.wait()
    log = open(log_path).read()
    assert process.returncode == 0, f"the run failed (exit {process.returncode}):\n{log[-4000:]}"
    return log


def _executions(connection):
    """(component name, state) of every execution ML Metadata recorded in `connection`'s database."""
    with _connect(connection, connection["database"]) as db, db.cursor() as cursor:
        cursor.execute("SELECT c.name, e.last_known_state FROM Execution e "
                       "JOIN Association a ON a.execution_id = e.id JOIN Context c ON c.id = a.context_id "
                       "JOIN Type t ON t.id = c.type_id WHERE t.name = 'node' ORDER BY e.id")
        return [(name.split(".", 1)[1], state) for name, state in cursor.fetchall()]


@pytest.fixture(scope="module")
def concurrent_days(tmp_path_factory, databases):
    """Two homes, each with its own database on the one server, running different days at the same time."""
    root = tmp_path_factory.mktemp("mysql")
    first, second = databases(), databases()
    runs = [_start_run(root, "a", FIRST_FULL, first),
            _start_run(root, "b", FIRST_FULL + datetime.timedelta(days=1), second)]
    logs = [_finish(process, log) for process, _, log in runs]
    return [(home, connection, log) for (_, home, _), connection, log in zip(runs, (first, second), logs)]


def test_two_days_run_at_once_each_with_its_store_in_mysql(concurrent_days):
    for home, connection, log in concurrent_days:
        assert "Pushed version" in log, log[-3000:]
        assert not (home / "metadata.sqlite").exists(), "the store must be MySQL, not the default sqlite file"
        executions = _executions(connection)
        pushes = [state for name, state in executions if name == "Pusher"]
        assert pushes == [3], f"one completed (3) Pusher execution expected, got {pushes}"  # Execution.COMPLETE
        trainers = [name for name, _ in executions if name == "Trainer"]
        assert len(trainers) == 1
        versions = [v for v in os.listdir(home / "serving" / config_lib.MODEL_NAME) if v.isdigit()]
        assert len(versions) == 1


def test_a_rerun_on_mysql_is_cached_and_pushes_nothing(concurrent_days, tmp_path):
    home, connection, _ = concurrent_days[0]
    before = _executions(connection)
    data = home.parent / "a_data"
    rerun = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", "--date", FIRST_FULL.isoformat(), "--data", str(data),
         "--home", str(home), *RUN_FLAGS, "--metadata-mysql", _mysql_url(connection)],
        cwd=config_lib.PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    new = {name: state for name, state in _executions(connection)[len(before):]}
    executors = ("ImportSchemaGen", "AvcExampleGen", "Transform", "Trainer", "Evaluator", "Pusher")
    assert {name: new.get(name) for name in executors} == {name: 5 for name in executors}  # Execution.CACHED
    assert len([v for v in os.listdir(home / "serving" / config_lib.MODEL_NAME) if v.isdigit()]) == 1


def test_the_commands_that_read_a_home_read_its_mysql_store(concurrent_days):
    home, connection, _ = concurrent_days[1]
    listed = subprocess.run([sys.executable, "-m", "pipeline.cli", "runs", "--home", str(home), "--json"],
                            cwd=config_lib.PROJECT_DIR, capture_output=True, text=True, timeout=300,
                            env={**os.environ, config_lib.METADATA_MYSQL_ENV: _mysql_url(connection)})
    assert listed.returncode == 0, listed.stderr[-3000:]
    import json

    days = {row["date"]: row for row in json.loads(listed.stdout)}
    evaluated = (FIRST_FULL + datetime.timedelta(days=1)).isoformat()
    # Steps come from ML Metadata only: they are there because the store was read in MySQL.
    assert days[evaluated]["steps"] and days[evaluated]["pushed_version"] is not None, days


def test_the_summary_names_the_mysql_store_without_its_password(concurrent_days):
    import json

    home, connection, _ = concurrent_days[0]
    summary = json.loads((home / "runs" / f"{FIRST_FULL.isoformat()}.json").read_text())
    assert summary["metadata"] == (f"mysql://{connection['username']}@{connection['host']}:{connection['port']}/"
                                   f"{connection['database']}")
