"""Keep PyTorch's CPU activations on the heap: glibc malloc tuning.

glibc serves allocations above its mmap threshold (128 KiB, raised dynamically up to
32 MiB) with a fresh `mmap` and returns them with `munmap` when freed, and trims the top of
the heap above 128 KiB back to the OS. A forward pass of a batch allocates and frees
activations of several MiB layer after layer, so each one costs page faults on first
touch: measured here, a 64-image forward of the demo ResNet-20 took ~1.0 ms/image with
the defaults and ~0.65 ms/image with both thresholds raised (`ttaserve bench serve`
numbers in the README are with the tuning). This is the problem that PyTorch's CPU
performance guide addresses by preloading jemalloc or tcmalloc; raising the two glibc
thresholds gets the same reuse without a second allocator. The cost: freed memory stays
in the process (RSS keeps its peak, bounded by the largest batch).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling on 64-bit


def tune_glibc_malloc(mmap_threshold: int = MAX_MMAP_THRESHOLD, trim_threshold: int = 512 * 1024 * 1024) -> bool:  # fmt: skip
    """Raise glibc's mmap and trim thresholds for this process; False where the C
    library is not glibc (musl, macOS, Windows) or refuses the values."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, min(mmap_threshold, MAX_MMAP_THRESHOLD)) == 1
    ok = mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    if not ok:
        log.warning("glibc refused the malloc tuning; forward passes may page-fault more")
    return ok
