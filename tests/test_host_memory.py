"""Giving freed heap back to the OS (jaxret/host_memory.py)."""

import ctypes
import ctypes.util
import sys

from jaxret import host_memory

GLIBC = host_memory._malloc_trim() is not None and host_memory.anonymous_bytes() is not None


def test_freed_heap_in_the_middle_goes_back_to_the_os():
    """200 MB of 64 KB blocks (below glibc's mmap threshold: heap, not mmap) are written,
    a block allocated after them keeps the heap's top in use (so free() alone cannot
    shrink it), then all but that block are freed: the pages stay resident until
    `return_free_heap`, which must give back most of them and report it.
    Mutation: `return_free_heap` that does not call malloc_trim → RssAnon stays, fails.
    Without glibc (macOS, musl) the call is a no-op that says so (None)."""
    if not GLIBC:
        assert host_memory.return_free_heap() is None
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size, count = 64 << 10, 3200
    blocks = [libc.malloc(size) for _ in range(count)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, size)  # resident only once written
    top = libc.malloc(size)
    ctypes.memset(top, 1, size)
    for b in blocks:
        libc.free(b)
    kept = host_memory.anonymous_bytes()
    released = host_memory.return_free_heap()
    after = host_memory.anonymous_bytes()
    libc.free(top)
    total = size * count
    assert kept - after > total // 2, (kept, after)
    assert released is not None and released > total // 2


def test_anonymous_bytes_is_the_proc_line():
    """RssAnon is read in kB and given in bytes (mutation: no ×1024 → fails)."""
    if not sys.platform.startswith("linux"):  # no /proc: nothing to read
        assert host_memory.anonymous_bytes() is None
        return
    line = [x for x in open("/proc/self/status") if x.startswith("RssAnon:")][0]
    kb = int(line.split()[1])
    # Same process, moments apart: within 8 MB of each other.
    assert abs(host_memory.anonymous_bytes() - kb * 1024) < 8 << 20
