"""Make resident memory track live memory on glibc, so the budget holds and peaks are repeatable.

By default glibc raises its mmap threshold after large frees (up to 32 MiB) and gives each
thread its own arena, so freed prefill temporaries stay resident in ways that vary run to run
(±6 MiB at a 4k context on SmolLM2). A fixed 256 KiB threshold returns every large block to the
OS on free; one arena stops per-thread hoarding. Decode-step tensors are far smaller than
256 KiB, so token latency is unaffected.
"""

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 256 * 1024


def tame_glibc_malloc() -> bool:
    """Apply the settings; False where the C library is not glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
        ok &= libc.mallopt(M_ARENA_MAX, 1) == 1
        return bool(ok)
    except (OSError, AttributeError):
        return False


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc's malloc_trim). Small temporaries of a
    generation (below the mmap threshold) are freed into the heap, and holes between live blocks
    are never trimmed on their own: over a profile's 40 turns they held up to 14 MiB more than the
    plan. Called at the end of every generation on a CPU; it takes about a millisecond."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False
