"""Drops TensorFlow's native start-up banners from stderr (shown again with --verbose).

TensorFlow's C++ code logs INFO lines through absl before absl's logging is initialised
("oneDNN custom operations are on", "Could not find cuda drivers", "failed call to cuInit"
on a machine without GPU, preceded by "All log messages
before absl::InitializeLog() is called are written to STDERR"), ignoring TF_CPP_MIN_LOG_LEVEL,
in this process and again in every Beam worker process. They are written straight to file
descriptor 2, so the filter sits there: fd 2 becomes a pipe that a thread copies to the real
stderr without those lines. Worker processes inherit the pipe, so their banners go too. Every
other line, warnings and errors included, passes unchanged.
"""

from __future__ import annotations

import atexit
import os
import re
import threading

# absl's INFO lines ("I0000 00:00:1796241430.763252   4242 port.cc:153] ..."), its error that a
# machine without a GPU has no CUDA driver, TensorFlow's older native INFO format
# ("2026-12-02 19:43:01.123456: I external/...cc:32] ...") and absl's pre-init notice.
NOISE = re.compile(rb"^(I\d{4} [\d:.]+ +\d+ [\w./-]+:\d+\] "
                   rb"|E\d{4} [\d:.]+ +\d+ cuda_[\w.]+:\d+\] failed call to cuInit"
                   rb"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I [\w./-]+:\d+\] "
                   rb"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)")

_installed = False
_restore = None  # set while the filter is installed: puts the real stderr back on fd 2


def is_noise(line: bytes) -> bool:
    return bool(NOISE.match(line))


def filter_native_stderr() -> None:
    """From now on, drop NOISE lines written to fd 2 by this process and its children."""
    global _installed, _restore
    if _installed:
        return
    _installed = True
    real_stderr = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def copy() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while True:
                chunk = pipe.read(65536)
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                kept = b"".join(line + b"\n" for line in lines if not is_noise(line))
                if kept:
                    os.write(real_stderr, kept)
            if pending and not is_noise(pending):
                os.write(real_stderr, pending)

    thread = threading.Thread(target=copy, name="stderr-filter", daemon=True)
    thread.start()

    def restore() -> None:
        # Closing this process's write end ends the copy once child processes have closed theirs.
        import sys

        sys.stderr.flush()
        os.dup2(real_stderr, 2)
        thread.join(timeout=5)

    _restore = restore
    atexit.register(restore_stderr)


def restore_stderr() -> None:
    """Copies what is still in the filter's pipe to the real stderr and puts that back on fd 2;
    then no-op. At exit, and before os._exit (which runs no atexit hooks: the stop watchdog), so
    the command's last lines are not lost with the copying thread."""
    global _restore
    restore, _restore = _restore, None
    if restore is not None:
        restore()
