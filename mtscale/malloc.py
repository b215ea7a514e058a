"""Process-level settings for the processes mtscale owns (its CLI, entry points, loader workers).

``tune_malloc``: glibc's defaults return every large freed block to the kernel (blocks over
the dynamic mmap threshold, at most 32 MB, are ``munmap``-ed; a freed heap top over twice that
is trimmed), so a loop that allocates an 18 MB batch, frees it and allocates the next one takes
~4,500 page faults and the kernel's zeroing of every page, every batch. On the loader's hot
path that was a third of its CPU time (sys 6-8 ms of ~22 ms per batch of 256 x 120 clips;
``benchmarks/README.md``). Raising both thresholds keeps freed blocks in the process for
reuse: the peak RSS is unchanged, but RSS no longer shrinks after a peak. The same habit as
setting ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` (or preloading jemalloc /
tcmalloc) for CPU training, done from Python so nobody has to remember it.

Applied only where mtscale owns the process: the ``mtscale`` CLI, ``python -m
mtscale.pretrain`` / ``deepspeed mtscale/pretrain.py``, and DataLoader workers. A script that
iterates a loader in its own process can call :func:`tune_malloc` itself. ``MTSCALE_TUNE_MALLOC=0``
turns it off; on a libc other than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
MMAP_THRESHOLD_BYTES = 256 << 20
"""Allocations below this come from the heap (reused after free) instead of fresh mmaps."""
TRIM_THRESHOLD_BYTES = 1 << 30
"""Free memory at the top of the heap kept for reuse before it is returned to the kernel."""

@functools.cache
def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (once). True if applied."""
    applied = False
    if os.environ.get("MTSCALE_TUNE_MALLOC", "1") != "0":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.gnu_get_libc_version  # noqa: B018 - AttributeError on a libc other than glibc
            # older glibc refuses an mmap threshold above 32 MB: fall back to that maximum
            mmap_ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) or libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
            applied = bool(mmap_ok) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
        except (OSError, AttributeError):
            applied = False
    log.debug("malloc thresholds raised: %s", applied)
    return applied
