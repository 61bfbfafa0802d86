"""How the pipeline's processes hand memory back to the kernel: they don't, for big buffers.

glibc serves an allocation above its mmap threshold (at most 32 MiB, usually far less) with a
fresh ``mmap`` and returns it with ``munmap`` when freed, and trims the top of the heap once
128 kB are free there. A process that allocates the same large buffers over and over (a CPU
forward pass: activations of tens of MB per call; decoding: full-page buffers) then pays a
page fault for every 4 kB of every buffer, every time, and the kernel zeroes each page. In the
inference process that was a quarter of its CPU time, in the kernel. With a higher mmap
threshold and no trimming, freed buffers stay in the heap and are reused; the process'
resident memory settles at its working set, which the slot pool and the batch size bound.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 256 << 20  # allocations above this still get their own mapping
TRIM_THRESHOLD = 1 << 30    # the heap's free top is given back only beyond this


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where that is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    if not ok:
        log.debug("mallopt refused the heap thresholds; freed buffers go back to the kernel")
    return ok
