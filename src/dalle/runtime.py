"""Process-wide settings made before the first large allocation: how freed memory is kept for reuse."""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# glibc refuses mmap thresholds above HEAP_MAX_SIZE / 2: 32 MiB on 64-bit systems.
MMAP_THRESHOLD_MAX = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: never give the top of the heap back
# Set by a user who tunes malloc themselves: then we change nothing.
MALLOC_VARIABLES = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
# The same setting as glibc's environment variables, for a process that does not import dalle (a benchmark's peer).
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX), "MALLOC_TRIM_THRESHOLD_": str(TRIM_THRESHOLD)}


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of returning them to the kernel.

    By default glibc serves large blocks with fresh pages (mmap, or a heap it trims back after each free), so each
    training step faults in every 4 KiB page of its new activations again. On a 2-core AVX2 machine that made a
    tiny-64 dVAE step 1.2× slower (78k faults per step; the prior's steps, with far fewer, did not change:
    bench/RESULTS.md, "CPU memory reuse in training steps").
    Returns whether the setting took effect: not off Linux/glibc, nor when one of ``MALLOC_VARIABLES`` is set.
    """
    if not sys.platform.startswith("linux") or any(name in os.environ for name in MALLOC_VARIABLES):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
