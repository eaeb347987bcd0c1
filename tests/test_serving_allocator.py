"""serving/allocator.py: with the thresholds fixed, a large freed block stays with the process
(no munmap, no fresh zeroed pages on the next call); without, glibc maps and unmaps it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: glibc's thresholds adapt to what a process has freed before.
PROBE = """
import ctypes, sys
from serving import allocator

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "retain":
    assert allocator.retain_freed_memory()
block = libc.malloc(16 << 20)
mapped_on_its_own = libc.mallinfo2().hblkhd >= 16 << 20
libc.free(block)
kept_after_free = libc.mallinfo2().fordblks >= 16 << 20
print(mapped_on_its_own, kept_after_free)
"""


def _probe(mode: str) -> str:
    # Without a GLIBC_TUNABLES of the caller's, which could fix the thresholds from the start.
    env = {name: value for name, value in os.environ.items() if name != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_buffers_stay_with_the_process_once_thresholds_are_fixed():
    assert _probe("default") == "True False"  # glibc: mmap'd on its own, unmapped on free
    assert _probe("retain") == "False True"   # fixed: from the heap, kept there for reuse


def test_the_server_fixes_them_unless_told_not_to():
    from serving import server

    parse = server.build_arg_parser().parse_args
    assert parse([]).retain_freed_memory is True
    assert parse(["--retain_freed_memory", "false"]).retain_freed_memory is False
