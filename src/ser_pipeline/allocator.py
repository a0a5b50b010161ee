"""glibc malloc settings for training processes: keep freed memory for the next batch.

PyTorch's CPU allocator is plain ``malloc``/``free`` (it caches nothing, unlike its CUDA
allocator). With glibc's defaults a training step's activations (megabytes each, allocated
and freed every batch) are handed back to the kernel when freed - ``munmap`` for chunks above
the mmap threshold, heap trimming for the rest - and every next batch takes them again as
fresh pages, each page a minor fault that the kernel must zero. Profiling a 2-worker synthetic
cross-validation (``perf record -e page-faults``: 6.3 million faults in 8 epochs, almost all in
PyTorch's fill/mul/threshold kernels touching new tensors) put 13 % of its CPU time in the
kernel. Raising the mmap threshold to its maximum (32 MiB on 64-bit glibc) and never trimming
the heap lets ``malloc`` reuse the memory of the previous batch: 3.6x fewer faults and 2.4x
less system time on the same run (``bench/kernel_time.py`` measures a whole cross-validation
both ways: README, "Where a parallel cross-validation's CPU time goes"). The cost is that a process
keeps its peak heap until it exits, which is what a training process needs anyway.

This is done by hand because neither PyTorch nor Lightning sets it (jemalloc or tcmalloc via
``LD_PRELOAD`` would too, but are not Python packages). Only glibc has ``mallopt``; elsewhere,
when the user has set glibc's own ``MALLOC_*`` / ``GLIBC_TUNABLES`` variables, or with
``SER_PIPELINE_MALLOC=system`` (glibc's defaults, what ``bench/kernel_time.py`` compares
against), nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
#: the largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2)
MMAP_THRESHOLD = 32 * 1024 * 1024
#: mallopt takes a C int: the largest trim threshold it can be given (2 GiB, i.e. never trim)
TRIM_THRESHOLD = 2**31 - 1
#: variables through which a user sets glibc's malloc: theirs win
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set this process's malloc to reuse freed memory; True when the settings took effect."""
    if (not sys.platform.startswith("linux") or any(v in os.environ for v in USER_SETTINGS)
            or os.environ.get("SER_PIPELINE_MALLOC") == "system"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    done = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and done
    if not done:
        log.debug("mallopt refused the allocator settings; glibc's defaults stay")
    return done
