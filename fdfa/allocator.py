"""Keep freed memory in the process for CPU training (glibc's malloc).

PyTorch's CPU tensors come from malloc. glibc serves large blocks with fresh ``mmap``s and gives
freed memory at the top of the heap back to the OS, and it moves both thresholds while the program
runs. A training step frees and allocates the same few megabytes of activations every step, and
depending on where those thresholds happen to sit, each step can fault in every page of them again:
on the CNN step here, 0 to 3,100 minor page faults a step from one process to the next, and up to
1.5 times the step time. Fixing the two thresholds keeps freed blocks for reuse (the process keeps
its peak memory until it exits, as PyTorch's GPU allocator does).
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 2**20  # blocks up to 32 MiB (glibc's maximum) from the heap, not mmap
TRIM_THRESHOLD = 2**31 - 1  # never hand the heap's free top back to the OS


def keep_freed_memory() -> bool:
    """Set glibc's thresholds (see the module doc); False where malloc is not glibc's."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
