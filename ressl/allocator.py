"""Keep freed CPU memory in the process: glibc's default malloc costs a CPU training step dearly.

A training step allocates and frees the same few-megabyte tensors every step (augmented views,
activations, gradients). With glibc's defaults, blocks of 128 KiB and more are mapped fresh from
the kernel and unmapped when freed, and the heap's free top is returned to the kernel, so each
step pays page faults to zero the same memory again. On the 2-core benchmark machine that made
the colour jitter 2-3x slower than its arithmetic (see ``python -m benchmarks``). Raising the
mmap and trim thresholds keeps those blocks for reuse, which is what PyTorch's CPU tuning guide
gets by swapping in jemalloc or tcmalloc, without a new dependency.

The settings are process-wide and only ever raise how much freed memory is kept; elsewhere
(macOS, Windows, musl) :func:`keep_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for it on 64-bit: larger blocks are still mapped
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free heap top kept before any is returned to the kernel
DISABLE_ENV = "RESSL_DEFAULT_MALLOC"  # set to 1 to leave glibc's defaults alone

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return _done
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return _done
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
