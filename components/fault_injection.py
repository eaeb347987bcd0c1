"""Test-only fault injection: POSO_FAULT_INJECT=<point>[,<point>...] kills the process (SIGKILL, as
a machine losing power or the OOM killer would) when the run reaches a named point.

Points: `<Component>:running` and `<Component>:finished` at every component boundary (see
pipeline/local_runner.py), `Pusher:copied` (the model, saved_model.pb included, copied into the
temporary folder) and `Pusher:renamed` (the version folder in place, the push not yet recorded in
ML Metadata). Only tests/test_faults.py sets the variable; unset, every check is one dict lookup.
"""

from __future__ import annotations

import os
import signal

VARIABLE = "POSO_FAULT_INJECT"


def points() -> set:
    return {p.strip() for p in os.environ.get(VARIABLE, "").split(",") if p.strip()}


def reached(point: str) -> None:
    """Kills this process if `point` is one of the injected faults."""
    if VARIABLE in os.environ and point in points():
        os.kill(os.getpid(), signal.SIGKILL)
