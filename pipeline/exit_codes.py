"""Exit codes of `poso run`, `poso backfill` and `poso demo`: what happened, for a scheduler.

Defined here only; the README's operation section lists them.
"""

from __future__ import annotations

PUSHED = 0        # the run finished and the day's model is served (pushed now or by an earlier run)
FAILED = 1        # a step failed (details in the run's log file under HOME/logs); a rerun resumes
BAD_INPUT = 2     # the command line, HOME or the day's data is wrong: fix it before rerunning
NOT_BLESSED = 3   # the run finished but the model was not pushed (evaluation or infra validation)
LOCKED = 4        # another run holds HOME's lock (see --wait-for-lock)
STOPPED = 5       # stopped by SIGTERM, SIGINT or SIGHUP; its steps are marked cancelled, a rerun resumes

MEANING = {
    PUSHED: "pushed",
    FAILED: "failed",
    BAD_INPUT: "bad input",
    NOT_BLESSED: "not blessed",
    LOCKED: "locked",
    STOPPED: "stopped",
}

# Root causes that are the data's fault rather than the run's: the logs, the feature tables or too
# few valid days (components/impression_logs.py, components/span_window.py).
BAD_INPUT_ERRORS = ("LogFormatError", "WindowError")


def of_failure(cause: str) -> int:
    """BAD_INPUT when a failed step's root cause (`ErrorType: message`) is bad data, else FAILED."""
    return BAD_INPUT if cause.split(":", 1)[0].strip() in BAD_INPUT_ERRORS else FAILED
