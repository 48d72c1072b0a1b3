"""CPU runs keep freed host blocks in the heap: glibc's own accounting (mallinfo2) shows a
16 MiB block served from the heap after ``keep_freed_host_memory``, and from a fresh mmap
without it. Each case runs in a fresh interpreter, as the thresholds are process-wide."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")

PROBE = """
import ctypes, sys, torch
from megatron_paci.utils.host_memory import keep_freed_host_memory
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena ordblks smblks hblks hblkhd usmblks "
                                               "fsmblks uordblks fordblks keepcost").split()]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
kept = keep_freed_host_memory() if sys.argv[1] == "keep" else None
before = libc.mallinfo2().hblkhd
x = torch.empty(16 << 20, dtype=torch.uint8)
print(kept, libc.mallinfo2().hblkhd - before)
"""


def probe(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], check=True, capture_output=True,
                         text=True, env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1])


def test_a_16_mib_block_comes_from_the_heap_once_kept():
    kept, mapped = probe("keep")
    assert kept == "True" and mapped < 1 << 20
    _, mapped = probe("default")
    assert mapped >= 16 << 20  # glibc's default: a block this size is its own mmap


def test_the_users_own_settings_win():
    kept, mapped = probe("keep", MALLOC_MMAP_THRESHOLD_="131072")
    assert kept == "False" and mapped >= 16 << 20
