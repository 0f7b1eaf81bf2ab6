"""glibc's allocator, tuned once per process for tensor work.

By default glibc serves every allocation above a (dynamic) threshold with its own ``mmap`` and gives it back to
the OS with ``munmap`` when freed. Convolutions over audio allocate and free buffers of a few MB on every call,
so each call faults fresh pages in again: measured on the shared benchmark's VAE encoder (2 cores, 10 s windows),
17.2 audio-s/s with glibc's defaults and 29.6 with the settings below on one thread, 25.2 vs 49.5 on two. The same
settings are what ``../shared/bench`` runs both projects under (``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``); :func:`tune` applies them from inside the process with ``mallopt``, so every entry
point (the CLI, preprocessing actors, training workers) gets them without a wrapper script.

The cost: memory freed by the process stays in its heap for reuse rather than going back to the OS (resident
memory stays at its peak). ``LONGPLAY_MALLOC=default`` keeps glibc's behaviour.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: blocks up to 32 MiB come from the heap
TRIM_THRESHOLD = 2**31 - 1  # never give the heap's top back to the OS

_tuned: bool | None = None


def tune() -> bool:
    """Apply the settings once per process; True when they are in effect (glibc on Linux), else False."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if sys.platform.startswith("linux") and os.environ.get("LONGPLAY_MALLOC", "") != "default":
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _tuned = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
                    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                _tuned = False
    return _tuned
