"""Host memory for training on the CPU: freed blocks stay in the process for the next step.

glibc's malloc serves every block above its mmap threshold (which adapts up to 32 MB) with a
fresh ``mmap`` and gives it back to the kernel when freed. A training step allocates and frees
the same activations, logits chunks and gradients at every step, so on the CPU each step
page-faults and zero-fills them all over again: a 12-step pythia-70m-like fit took 1.3 M minor
page faults and ~10% of its CPU time in the kernel. With mmap and heap trimming off, a freed
block stays in the heap and the next step reuses it (0.55 M faults, most of them start-up).
Peak RSS moves little (within 2% in ``tox -e bench``), since the step's working set is the peak
either way; but a freed block between live ones can be left unused, so a workload of varied
large sizes can fragment the heap (docs/performance.md).

The CPU tuning guides of PyTorch get this with jemalloc or tcmalloc through ``LD_PRELOAD``;
here it is glibc's own knobs (``mallopt``), so no library to install. Nothing is changed when
the user already chose: any ``MALLOC_*_`` variable, ``glibc.malloc`` tunables, a preloaded
allocator, or ``MIDTRAIN_KEEP_FREED_MEMORY=0``. On GPUs it does not apply (device memory has
its own caching allocator), nor off glibc (macOS, musl).
"""

from __future__ import annotations

import ctypes
import os
import platform

from midtrain.errors import MidtrainError

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1

_CHOSEN_ALLOCATOR_ENV = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_ARENA_MAX",
)

_applied = False


def allocator_chosen_by_user() -> str | None:
    """What says the user already tuned or replaced malloc (an environment variable), or None."""
    keep = os.environ.get("MIDTRAIN_KEEP_FREED_MEMORY", "").strip().lower()
    if keep in ("0", "false", "no", "off"):
        return "MIDTRAIN_KEEP_FREED_MEMORY"
    if keep not in ("", "1", "true", "yes", "on"):
        raise MidtrainError(
            f"MIDTRAIN_KEEP_FREED_MEMORY={keep!r}: use 0 to keep glibc's "
            "malloc defaults on the CPU, or 1 (the default) to keep freed memory"
        )
    for name in _CHOSEN_ALLOCATOR_ENV:
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if any(lib in os.environ.get("LD_PRELOAD", "") for lib in ("jemalloc", "tcmalloc", "mimalloc")):
        return "LD_PRELOAD"
    return None


def keep_freed_memory() -> bool:
    """Turn off glibc's mmap for large blocks and its heap trimming, for this process (and the
    processes it forks from now on). Idempotent; returns whether the setting is in effect.
    Raises ``MidtrainError`` for a ``MIDTRAIN_KEEP_FREED_MEMORY`` that is neither on nor off."""
    global _applied
    chosen = allocator_chosen_by_user()  # first: a wrong MIDTRAIN_KEEP_FREED_MEMORY is refused
    if _applied:
        return True
    if chosen is not None or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success; the trim threshold is an int here (the largest: 2 GB)
    _applied = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, _INT_MAX))
    return _applied
