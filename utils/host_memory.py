"""Host memory: a process keeps the blocks it frees for its next tensors instead of giving them back to the OS.

glibc's malloc serves blocks above an adaptive threshold (128 KiB, raised up to 32 MiB as such blocks are freed)
with fresh pages from the OS and returns freed memory at the heap's top beyond a trim threshold. An eager CPU
forward allocates and frees tensors of several MiB at every operator, so each of them came back as new pages the
kernel zero-fills on first touch: a DeiT-S forward ran 1.03-1.28x faster without them on a 2-core VM, evaluation
end to end 1.09x (docs/performance.md). Fixing both thresholds high makes freed blocks reused. The computation is
unchanged (the same values, bit for bit).
"""
import ctypes
import os
import platform
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 << 20  # blocks up to this size come from the heap (glibc's largest)
TRIM_THRESHOLD = 512 << 20  # free memory at the heap's top kept up to this size
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
USER_TUNABLES = ("glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")  # the same, in GLIBC_TUNABLES

_kept = None  # whether keep_freed_memory set the thresholds (None: not called yet)


def keep_freed_memory() -> bool:
    """Set glibc malloc's thresholds (once per process; loader workers forked later inherit them); whether they
    were set. Nothing is changed outside Linux with glibc, or where the user set MALLOC_MMAP_THRESHOLD_ or
    MALLOC_TRIM_THRESHOLD_, or either in GLIBC_TUNABLES (theirs stand). With another allocator preloaded (jemalloc,
    tcmalloc), glibc's settings are simply unused."""
    global _kept
    if _kept is None:
        _kept = _set_thresholds()
    return _kept


def _set_thresholds():
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in USER_SETTINGS):
        return False
    tunables = [item.split("=")[0].strip() for item in os.environ.get("GLIBC_TUNABLES", "").split(":")]
    if any(name in tunables for name in USER_TUNABLES):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
