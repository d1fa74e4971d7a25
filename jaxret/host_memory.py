"""Host memory of this process: how much is in use, and giving freed heap back to the OS.

glibc keeps freed small blocks (below its mmap threshold) in the heap for reuse and returns
only the free top of it. A JAX process frees hundreds of MB of such blocks after its first
compilations (the first train step held +374 MB that stayed resident, mostly free heap:
docs/scaling.md, "Host memory against the bar"), so its resident memory stays far above what it
uses. `malloc_trim(0)` returns every free page of every arena (glibc ≥ 2.8 also releases
the middle of the heap with MADV_DONTNEED). Other C libraries (musl, macOS) have no such
call: there `return_free_heap` does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from pathlib import Path


def anonymous_bytes() -> int | None:
    """This process's resident anonymous memory (RssAnon of /proc/self/status), or None
    where /proc has no such line (not Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024  # kB
    return None


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None under another C library."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def return_free_heap() -> int | None:
    """Gives the heap's free pages back to the OS. Returns the anonymous bytes released
    (RssAnon before − after; another thread's allocations in between can make it smaller),
    or None if this C library cannot (not glibc) or /proc cannot tell."""
    trim = _malloc_trim()
    if trim is None:
        return None
    before = anonymous_bytes()
    trim(0)
    after = anonymous_bytes()
    if before is None or after is None:
        return None
    return before - after
