"""One run at a time per HOME: an exclusive flock on HOME/.poso.lock.

The kernel releases a flock when its holder's process ends however it ends (kill -9 included),
so a lock is never stale. The holder writes who it is (pid, host, command, since when) into the
file, for the message a second run prints. The lock is reentrant within a process, so a backfill
holds it across its days and `run_day` called alone takes it too.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Dict, Iterator, Optional

LOCK_FILE = ".poso.lock"
_POLL_SECONDS = 0.5

_held: Dict[str, list] = {}   # real path of the lock file -> [fd, depth]
_held_guard = threading.Lock()


class HomeLocked(RuntimeError):
    """Another process holds HOME's lock; `holder` is what it wrote about itself (may be empty)."""

    def __init__(self, home: str, holder: Dict[str, object], waited: float):
        self.home, self.holder = home, holder
        who = (f"pid {holder.get('pid')} on {holder.get('host')} ({holder.get('command')}), "
               f"running since {holder.get('since')}") if holder else "a process that has not said who it is"
        waited_text = f" after waiting {waited:.0f} s" if waited else ""
        super().__init__(f"{home} is in use by {who}{waited_text}; wait for it to end, "
                         f"or pass --wait-for-lock SECONDS")


def read_holder(home: str) -> Dict[str, object]:
    try:
        with open(os.path.join(home, LOCK_FILE)) as f:
            return json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


@contextlib.contextmanager
def home_lock(home: str, wait_seconds: float = 0, command: Optional[str] = None) -> Iterator[None]:
    """Holds HOME's lock for the block; waits up to `wait_seconds` for it, then raises HomeLocked."""
    if "://" in home:  # remote storage (gs://, s3://) has no flock; its orchestrator serialises runs
        yield
        return
    os.makedirs(home, exist_ok=True)
    path = os.path.realpath(os.path.join(home, LOCK_FILE))
    with _held_guard:
        if path in _held:
            _held[path][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield
        finally:
            with _held_guard:
                _held[path][1] -= 1
        return

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    started = time.monotonic()
    try:
        announced = False
        while not _try_lock(fd):
            waited = time.monotonic() - started
            if waited >= wait_seconds:
                raise HomeLocked(home, read_holder(home), waited)
            if not announced:
                print(f"Waiting up to {wait_seconds:.0f} s for {home}: {HomeLocked(home, read_holder(home), 0)}",
                      file=sys.stderr, flush=True)
                announced = True
            time.sleep(min(_POLL_SECONDS, wait_seconds - waited))
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "command": command or " ".join(sys.argv),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        with _held_guard:
            _held[path] = [fd, 1]
        try:
            yield
        finally:
            with _held_guard:
                del _held[path]
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing the only descriptor releases the flock
