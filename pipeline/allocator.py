"""The process's memory allocator, tuned once per process for tensor work: glibc's heap, and huge pages.

By default glibc serves every allocation above a (dynamic) threshold with its own ``mmap`` and gives it back to
the OS with ``munmap`` when freed. Convolutions over audio allocate and free buffers of a few MB on every call,
so each call faults fresh pages in again: measured on the shared benchmark's VAE encoder (2 cores, 10 s windows),
17.2 audio-s/s with glibc's defaults and 29.6 with the settings below on one thread, 25.2 vs 49.5 on two. The same
settings are what ``../shared/bench`` runs both projects under (``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``); :func:`tune` applies them from inside the process with ``mallopt``, so every entry
point (the CLI, preprocessing actors, training workers) gets them without a wrapper script.

Huge pages: torch's CPU allocator puts every buffer of 2 MiB or more on transparent huge pages (``madvise``) when
``THP_MEM_ALLOC_ENABLE=1`` is in the environment at its first allocation (it reads the variable once). A
convolution over seconds of audio walks buffers of tens of MB, and with 4 KiB pages the TLB misses dominate: one
thread encoding 4 x 20 s with the shared benchmark's VAE took 6.1-10.0 s per batch on 4 KiB pages and 4.5-5.7 s
on huge pages (docs/architecture.md).
:func:`tune` sets the variable for this process (it must run before the first tensor is allocated) and for every
process it starts; :func:`child_env` is the same for processes started elsewhere (Ray Train's workers).

Blocks above 32 MiB (glibc's largest mmap threshold) would still be mapped and unmapped on every call: 20 s of
stereo at the first stage of the shared benchmark's VAE (16 channels) is 56 MB a piece. ``M_MMAP_MAX = 0`` serves
them from the heap as well. Two encoder processes side by side took 5.1-6.5 s per batch of 4 x 20 s each with
those mappings (4.4-5.1 s alone), and 3.4-4.5 s without them (docs/architecture.md).

The cost: memory freed by the process stays in its heap for reuse rather than going back to the OS (resident
memory stays at its peak), and huge pages round a buffer's memory up to 2 MiB. ``LONGPLAY_MALLOC=default`` keeps
glibc's and torch's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt parameters (glibc's malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit: blocks up to 32 MiB come from the heap
MMAP_MAX = 0  # and larger ones too: no block gets a mapping of its own (faulted in again on every call)
TRIM_THRESHOLD = 2**31 - 1  # never give the heap's top back to the OS

HUGE_PAGES = {"THP_MEM_ALLOC_ENABLE": "1"}  # c10's alloc_cpu: 2 MiB-and-up buffers madvise(MADV_HUGEPAGE)

_tuned: bool | None = None


def enabled() -> bool:
    return sys.platform.startswith("linux") and os.environ.get("LONGPLAY_MALLOC", "") != "default"


def child_env() -> dict[str, str]:
    """Environment variables that give a new process the huge-page setting ({} when the tuning is off)."""
    return dict(HUGE_PAGES) if enabled() else {}


def tune() -> bool:
    """Apply the settings once per process; True when they are in effect (glibc on Linux), else False."""
    global _tuned
    if _tuned is None:
        _tuned = False
        if enabled():
            os.environ.update(child_env())  # before torch's first allocation; inherited by Ray and subprocesses
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _tuned = all(
                    libc.mallopt(param, value)
                    for param, value in (
                        (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                        (M_MMAP_MAX, MMAP_MAX),
                        (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                    )
                )
            except (OSError, AttributeError):  # not glibc (musl has no mallopt)
                _tuned = False
    return _tuned
