"""How `poso run`, `backfill` and `demo` operate: arguments checked before any work, HOME's lock,
a log file per command under HOME/logs, stop signals, one-line errors and exit codes
(pipeline/exit_codes.py).

On failure the terminal gets one line (what, which day, why, where the log is); the log file has
every TFX, Beam and TensorFlow record at INFO and the full traceback.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
from typing import Callable, Iterable, Optional

from pipeline import exit_codes
from pipeline import home_lock, quiet

# After a stop signal the run has this long to clean up (mark its steps cancelled, stop its worker
# processes, remove its scratch folder) through the ordinary exception path before it is done
# from a watchdog thread and the process exits.
STOP_GRACE_SECONDS = 30


class BadInput(ValueError):
    """An argument, HOME or the data cannot work; the message says which and why."""


class Stopped(BaseException):
    """A stop signal arrived (a BaseException, like KeyboardInterrupt, so no `except Exception`
    in a library swallows it)."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


# ------------------------------------------------------------------------------------------------
# Checks before anything runs.
# ------------------------------------------------------------------------------------------------
def check_home(home: str) -> None:
    """HOME must be a folder this process can write in (created when missing). Tried, not
    inferred from permission bits: root passes those, but not a read-only mount."""
    if "://" in home:
        return
    if os.path.exists(home) and not os.path.isdir(home):
        raise BadInput(f"--home {home}: is a file, not a folder")
    try:
        os.makedirs(home, exist_ok=True)
        with tempfile.TemporaryFile(dir=home):
            pass
    except OSError as error:
        raise BadInput(f"--home {home}: not a writable folder ({error.strerror})") from None


def check_data(data_dir: str, first: datetime.date, last: datetime.date) -> None:
    """The data folder has daily logs, and first..last lies within them."""
    from components import impression_logs

    if "://" in data_dir:
        return
    logs = os.path.join(data_dir, impression_logs.LOGS_DIR)
    if not os.path.isdir(data_dir):
        raise BadInput(f"--data {data_dir}: no such folder (the default is HOME/data)")
    dates = impression_logs.available_dates(data_dir)
    if not dates:
        raise BadInput(f"--data {data_dir}: no daily log folders {logs}/YYYY-MM-DD")
    if last > dates[-1]:
        raise BadInput(f"{last.isoformat()} is after the last day of logs in {logs} ({dates[-1].isoformat()})")
    if first < dates[0]:
        raise BadInput(f"{first.isoformat()} is before the first day of logs in {logs} ({dates[0].isoformat()})")


def check_training_windows(cfg, first: datetime.date, last: datetime.date) -> None:
    """Every day of first..last has at least cfg.min_train_days days before it in its window (which
    reaches past skipped days, see pipeline/skip_day.py) that have logs in --data or are ingested already."""
    from components import impression_logs
    from components.avc_example_gen import date_of
    from pipeline import local_runner, skip_day

    if "://" in cfg.data_dir:
        return
    known = set(impression_logs.available_dates(cfg.data_dir)) | {date_of(s) for s in local_runner.validated_ingests(cfg)}
    skipped = tuple(sorted(skip_day.read_skipped_days(cfg)))
    day = first
    while day <= last:
        window = dataclasses.replace(cfg, date=day, skipped_dates=skipped).train_dates
        have = [d for d in window if d in known]
        if len(have) < cfg.min_train_days:
            raise BadInput(f"{day.isoformat()} trains on {window[0].isoformat()}..{window[-1].isoformat()} and needs "
                           f"at least {cfg.min_train_days} of those days; {len(have)} have logs in {cfg.data_dir} "
                           f"or are ingested in {cfg.home}. Pass a later date or a lower --min-train-days")
        day += datetime.timedelta(days=1)


def check_variant(variant: str) -> None:
    """--variant names a model the pipeline trains (MeLU is benchmark-only)."""
    from models import melu, model as model_lib

    if variant == "melu":
        raise BadInput(f"--variant melu: {melu.BENCHMARK_ONLY_REASON}")
    if variant not in model_lib.VARIANTS:
        raise BadInput(f"--variant {variant}: unknown; known: {', '.join(sorted(model_lib.VARIANTS))}")


def check_run_args(args, cfg, first: datetime.date, last: datetime.date) -> None:
    """Every check of `poso run` / `backfill` arguments that needs no TFX run (`cfg`: the first
    day's RunConfig)."""
    if first > last:
        raise BadInput(f"--from {first.isoformat()} is after --to {last.isoformat()}")
    if cfg.min_train_days > cfg.train_days:
        raise BadInput(f"--min-train-days {cfg.min_train_days} is more than --train-days {cfg.train_days}")
    check_variant(args.variant)
    check_home(cfg.home)
    check_data(cfg.data_dir, first, last)


# ------------------------------------------------------------------------------------------------
# Stop signals.
# ------------------------------------------------------------------------------------------------
def _on_stop_signal(number, _frame) -> None:
    from pipeline import local_runner

    name = signal.Signals(number).name
    # The first signal raises Stopped in the main thread; should that not end the run in time
    # (the main thread blocked in native code), the watchdog cleans up and exits.
    for stop in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(stop, signal.SIG_IGN)
    # Beam's threads fail as the run's worker processes are ended, each printing a traceback to
    # stderr, possibly after the command's last line: they go to the log file, as a failure's do.
    threading.excepthook = lambda failed: _log_after_stop(f"thread {getattr(failed.thread, 'name', '?')}", failed)
    sys.unraisablehook = lambda ignored: _log_after_stop(f"{ignored.err_msg or 'ignored'} {ignored.object!r}", ignored)
    threading.Thread(target=_watchdog, args=(name,), daemon=True, name="stop-watchdog").start()
    local_runner.note_stop(name)
    raise Stopped(name)


def _log_after_stop(where: str, hook_args) -> None:
    """threading.excepthook / sys.unraisablehook after a stop signal: to the log file only."""
    logging.info("After the stop, %s: %s", where, hook_args.exc_type.__name__,
                 exc_info=(hook_args.exc_type, hook_args.exc_value, hook_args.exc_traceback))


def _watchdog(signal_name: str) -> None:
    import time

    from pipeline import local_runner

    time.sleep(STOP_GRACE_SECONDS)
    local_runner.clean_up_after_stop()
    # os._exit runs no atexit hooks: flush the stderr filter's pipe first, or the lines the main
    # thread wrote last (its own "stopped by" line among them) die with the copying thread.
    quiet.restore_stderr()
    print(f"poso: stopped by {signal_name} (cleaned up by the watchdog)", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(exit_codes.STOPPED)


def install_stop_handlers() -> None:
    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, _on_stop_signal)


# ------------------------------------------------------------------------------------------------
# One command.
# ------------------------------------------------------------------------------------------------
def log_path(home: str, name: str) -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join(os.path.abspath(home), "logs", f"{name}-{stamp}-{os.getpid()}.log")


def error(command: str, message: str) -> None:
    print(f"poso {command}: {message}", file=sys.stderr, flush=True)


def operate(command: str, home: str, log_name: str, body: Callable[[], int], verbose: bool = False,
            wait_for_lock: float = 0, lock: bool = True) -> int:
    """Runs `body` (which returns an exit code) under HOME's lock with a log file, and turns what
    it raises into one line on stderr and an exit code."""
    from pipeline import local_runner

    log_file = log_path(home, log_name)
    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    local_runner.setup_logging(verbose, log_file=log_file)
    install_stop_handlers()
    where = f"(details: {log_file})"
    try:
        if lock:
            with home_lock.home_lock(home, wait_for_lock, command=" ".join(["poso", *sys.argv[1:]])):
                return body()
        return body()
    except home_lock.HomeLocked as locked:
        error(command, f"locked: {locked}")
        return exit_codes.LOCKED
    except (Stopped, KeyboardInterrupt) as stop:
        name = stop.signal_name if isinstance(stop, Stopped) else "SIGINT"
        logging.warning("Stopped by %s", name)
        local_runner.clean_up_after_stop()
        error(command, f"stopped by {name}; its steps are marked cancelled in ML Metadata, a rerun resumes {where}")
        return exit_codes.STOPPED
    except (BadInput, local_runner.InputError) as bad:
        error(command, f"bad input: {bad}")
        return exit_codes.BAD_INPUT
    except local_runner.PipelineRunError as failure:
        logging.error("%s\n%s", failure, "".join(traceback.format_exception(failure)))
        code = exit_codes.of_failure(failure.cause)
        kind = "bad input" if code == exit_codes.BAD_INPUT else "failed"
        error(command, f"{kind}: {failure} {where}")
        return code
    except Exception as failure:  # pylint: disable=broad-except
        logging.error("%s failed\n%s", command, "".join(traceback.format_exception(failure)))
        error(command, f"failed: {type(failure).__name__}: {failure} {where}")
        return exit_codes.FAILED
    finally:
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(number, signal.SIG_DFL if number != signal.SIGINT else signal.default_int_handler)


def outcome(results: Iterable[dict]) -> int:
    """PUSHED when every day's model is served, else NOT_BLESSED."""
    return exit_codes.PUSHED if all(r.get("pushed") for r in results) else exit_codes.NOT_BLESSED
