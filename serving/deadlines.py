"""Per-thread deadlines for request work that cannot be interrupted from outside.

A Python thread cannot be killed, so the REST front end answers 504 when a request runs past
its timeout but the thread working on it runs on. Code that may run long (JSON decoding,
the step before a model call) calls `check_deadline()` at intervals; under
`with deadline(seconds):` it raises DEADLINE_EXCEEDED once the time is up, and the thread is
free for the next request.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

import grpc

from serving.errors import ServingError

__all__ = ["deadline", "check_deadline"]

_deadline = threading.local()


class deadline:  # noqa: N801 (used as a context manager)
    """`with deadline(seconds):` makes `check_deadline` in this thread raise
    DEADLINE_EXCEEDED once `seconds` have passed (None or <= 0: never)."""

    def __init__(self, seconds: Optional[float]):
        self._at = None if seconds is None or seconds <= 0 else time.monotonic() + seconds

    def __enter__(self):
        self._previous = getattr(_deadline, "at", None)
        _deadline.at = self._at
        return self

    def __exit__(self, *exc_info):
        _deadline.at = self._previous


def check_deadline(what: str = "request") -> None:
    """DEADLINE_EXCEEDED if the current thread's deadline (see `deadline`) has passed."""
    at = getattr(_deadline, "at", None)
    if at is not None and time.monotonic() > at:
        raise ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                           f"Deadline exceeded while processing the {what}")
