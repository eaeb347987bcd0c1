"""Keeps glibc's malloc from returning TensorFlow's large buffers to the kernel after each call.

glibc serves an allocation above a threshold with its own mmap and unmaps it when freed, and
gives the top of a heap back to the kernel once more than another threshold of it is free;
both thresholds adapt as the process runs. A model call allocates and frees tensors of up to a
few MB every time, so call after call the kernel maps fresh pages and zeroes them: measured
here (`bin/poso bench serving`), nearly a third of the CPU time of 1,000-row batches went to
the kernel, and fixing the thresholds made them 1.6 times as fast.
tensorflow_model_server avoids this by linking tcmalloc; this server keeps glibc and fixes both
thresholds with mallopt(3) (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD), which also turns off their
adjustment. The price is memory: up to `trim_threshold_bytes` of freed memory per malloc arena
stays with the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["retain_freed_memory", "release_free_memory", "MMAP_THRESHOLD_BYTES",
           "TRIM_THRESHOLD_BYTES"]

logger = logging.getLogger(__name__)

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's largest accepted value on 64-bit hosts
TRIM_THRESHOLD_BYTES = 256 << 20
_M_TRIM_THRESHOLD = -1  # <malloc.h>
_M_MMAP_THRESHOLD = -3


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def release_free_memory() -> bool:
    """Gives the free memory of every malloc arena back to the kernel now (glibc's
    malloc_trim(3)): after a request that decoded a body of many MB, whose Python objects
    and arrays are freed but would otherwise stay with the process up to the trim threshold
    per arena. Returns whether anything was released (False without glibc)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1


def retain_freed_memory(mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES,
                        trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES) -> bool:
    """Fixes glibc malloc's mmap and trim thresholds for this process. Returns whether both
    were set; on a C library without mallopt (musl, macOS) it logs why not and does nothing."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as error:
        logger.info("malloc thresholds left as they are: no glibc mallopt (%s)", error)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 for a value it refuses.
    applied = (mallopt(_M_MMAP_THRESHOLD, mmap_threshold_bytes) == 1
               and mallopt(_M_TRIM_THRESHOLD, trim_threshold_bytes) == 1)
    if not applied:
        logger.warning("glibc refused malloc thresholds mmap=%d trim=%d bytes",
                       mmap_threshold_bytes, trim_threshold_bytes)
    return applied
