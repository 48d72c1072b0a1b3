"""Keep freed host blocks in the heap on CPU runs, instead of unmapping them.

glibc's malloc serves a block above its mmap threshold with a fresh mmap and unmaps it
when freed. The threshold starts at 128 KiB and only rises as such blocks are freed, and
a CPU training step allocates and frees activations, logits and gradients of hundreds of
KiB to a few MiB every micro-batch: each can come back as fresh zeroed pages and pay a
page fault per 4 KiB. At the small benchmark shape that made the last stage's backward
take 6.3-7.2 ms instead of 4.9 (docs/benchmarks.md, "Where each stage's time goes").
A fixed threshold at glibc's 64-bit maximum keeps those blocks in the heap for reuse.

Setting either threshold turns off glibc's own adjustment of both, so both are set; a
user who set them (``MALLOC_*_`` variables, ``GLIBC_TUNABLES``) keeps theirs.
"""

from __future__ import annotations

import ctypes
import os
import platform

MMAP_THRESHOLD = 32 << 20  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 64 << 20  # free memory kept at the top of the heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def keep_freed_host_memory() -> bool:
    """Fix glibc's mmap and trim thresholds; False where the C library is not glibc or
    the user set them."""
    if platform.libc_ver()[0] != "glibc" or any(v in os.environ for v in USER_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
