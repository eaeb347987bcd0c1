"""A run's scratch folder: its temporary files (and its Beam workers', through TMPDIR) in one
folder of the system temp directory, removed when the run ends, and the processes started in it
ended when the run's process ends, however it ends.

Beam's staging and TensorFlow's autograph leave files in the temp directory, so a daily job
would otherwise fill /tmp. Beam's DirectRunner multi_processing workers (`sh -c python -m
apache_beam.runners.worker.sdk_worker_main`) outlive a run killed outright (SIGKILL, the OOM
killer): nothing in Beam ends them. So each run starts a small watchdog process that waits on a
pipe only the run holds; when the pipe closes without the run saying it ended, the watchdog kills
every process whose environment has TMPDIR=<the scratch folder> (each child the run started
inside it) and removes the folder.

A run also holds an flock on `<scratch>/.in-use` while it lives; the kernel frees it when the
process dies (the descriptor is not inherited), so a later run removes a folder whose lock is free
when even the watchdog could not (both killed at once, a power loss). Neither check relies on
process ids, which are reused and differ between PID namespaces.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Iterator, List, Optional

PREFIX = "poso-run-"
_IN_USE = ".in-use"
_ENDED = b"ended"   # what the run writes to its watchdog when it ends by itself
_PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def processes_started_in(scratch: str) -> List[int]:
    """PIDs of the live processes whose environment holds TMPDIR=`scratch` (Linux /proc)."""
    marker, found = f"TMPDIR={scratch}".encode(), []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue  # ended meanwhile, or not ours to read
    return found


def watch(scratch: str) -> None:
    """The watchdog's body: waits for the run's pipe (stdin) to close; unless the run said it
    ended, kills the processes started in `scratch` and removes it."""
    # A terminal's Ctrl-C or hang-up reaches its whole process group: the run handles those. A
    # SIGTERM (the run's own clean-up stopping its children) ends the watchdog.
    for stop in (signal.SIGINT, signal.SIGHUP):
        signal.signal(stop, signal.SIG_IGN)
    if sys.stdin.buffer.read() == _ENDED:
        return
    for _ in range(5):  # a worker the run was starting as it died may exec a moment later
        for pid in processes_started_in(scratch):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    shutil.rmtree(scratch, ignore_errors=True)


def new_path(parent: Optional[str] = None) -> str:
    """A path for a new scratch folder in `parent` (the system temp directory), not created yet."""
    return os.path.join(parent or tempfile.gettempdir(), PREFIX + secrets.token_hex(8))


@contextlib.contextmanager
def run_scratch_dir(scratch: Optional[str] = None) -> Iterator[str]:
    """Points this process's temporary files (tempfile, and TMPDIR for its child processes) at a
    new scratch folder (`scratch`, from new_path()), held in use until the block ends, then
    removed; first removes the scratch folders of runs that were killed. The processes started
    in the block are ended by a watchdog process if this process dies before the block ends.

    A caller that knows the path before the folder exists (pass it in) can remove the folder
    after a stop signal however far this got: an exception raised while the folder is being set
    up, before the block is entered, leaves nothing else behind."""
    scratch = scratch or new_path()
    remove_abandoned(os.path.dirname(scratch))
    os.mkdir(scratch, 0o700)
    lock_fd, watchdog = None, None
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    try:
        # Locked under a temporary name, then renamed: no other run can see the lock file unlocked.
        partial = os.path.join(scratch, _IN_USE + ".new")
        lock_fd = os.open(partial, os.O_WRONLY | os.O_CREAT, 0o600)
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        os.rename(partial, os.path.join(scratch, _IN_USE))
        watchdog = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]); "
                                   "from pipeline import scratch; scratch.watch(sys.argv[1])", scratch, _PROJECT_DIR],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        tempfile.tempdir = os.environ["TMPDIR"] = scratch
        yield scratch
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(scratch, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)
        if watchdog is not None:
            with contextlib.suppress(OSError):
                watchdog.stdin.write(_ENDED)
                watchdog.stdin.close()
            watchdog.wait()
