"""The pipeline processes' heap settings: a big buffer freed and allocated again is reused."""
from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import resource, sys
from bec.pipeline import heap
if sys.argv[1] == "keep":
    assert heap.keep_freed_memory()
def touch():
    buf = bytearray(48 << 20)   # 48 MB, zero-filled (every page touched): above glibc's default
    del buf                     # mmap threshold, so by default a fresh mapping each time
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    pages = 5 * (48 << 20) // 4096
    assert faults("default") > pages // 2           # glibc maps and unmaps each one
    assert faults("keep") < pages // 50             # the heap keeps it: no new page faults
