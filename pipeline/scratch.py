"""A run's scratch folder: its temporary files (and its Beam workers', through TMPDIR) in one
folder of the system temp directory, removed when the run ends, or, when the run was killed
outright (SIGKILL, the OOM killer, a power loss), by the next run on the machine.

Beam's staging and TensorFlow's autograph leave files in the temp directory, so a daily job
would otherwise fill /tmp. A run holds an flock on `<scratch>/.in-use` while it lives; the
kernel frees it when the process dies however it dies (the descriptor is not inherited by the
Beam workers), so a folder whose lock can be taken belongs to no live run. The check does not
rely on process ids, which are reused and differ between PID namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import tempfile
from typing import Iterator, List

PREFIX = "poso-run-"
_IN_USE = ".in-use"


def remove_abandoned(parent: str) -> List[str]:
    """Removes the scratch folders under `parent` whose run is gone; returns their paths. A
    folder without the lock file (being created, or not a run's) is left alone."""
    removed = []
    for path in glob.glob(os.path.join(parent, PREFIX + "*")):
        try:
            fd = os.open(os.path.join(path, _IN_USE), os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live run holds it
        finally:
            os.close(fd)  # the lock, if taken, goes with it: the folder is removed next anyway
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def run_scratch_dir() -> Iterator[str]:
    """Points this process's temporary files (tempfile, and TMPDIR for its child processes) at a
    new scratch folder, held in use until the block ends, then removed; first removes the
    scratch folders of runs that were killed."""
    parent = tempfile.gettempdir()
    remove_abandoned(parent)
    scratch = tempfile.mkdtemp(prefix=PREFIX)
    # Locked under a temporary name, then renamed: no other run can see the lock file unlocked.
    partial = os.path.join(scratch, _IN_USE + ".new")
    lock_fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(lock_fd, fcntl.LOCK_EX)
    os.rename(partial, os.path.join(scratch, _IN_USE))
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = os.environ["TMPDIR"] = scratch
    try:
        yield scratch
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)
        os.close(lock_fd)
