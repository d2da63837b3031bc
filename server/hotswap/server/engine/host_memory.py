"""Keeping the server's host memory flat, and its steps off the page-fault path.

glibc keeps freed heap memory for reuse; per-step tensors of a few MiB (logits
[rows, vocab], sampling scratch) land in its arenas and their high-water mark
would otherwise stay in the server's RSS for good. `malloc_trim` returns the
unused part. Elsewhere (musl, macOS) this is a no-op.

glibc's defaults work against a prefill step on CPU, though: blocks above a
threshold that starts at 128 KiB are mapped fresh and unmapped on free, and a
heap top above twice that threshold is given back after every free, so a step's
MiB-sized activations (a 2,048-token step's MLP outputs, 6 MiB per op) are
page-faulted in again, zero-filled by the kernel, layer after layer. With the
thresholds fixed high, 2,048-token prefills took ~9% less time and decode ran
~6% faster, with no more resident memory (`python bench/allocator.py`, fresh
processes alternating; bench/RESULTS.md). So on CPU the engine fixes them
(`reuse_freed_memory`): blocks up to 32 MiB (glibc's ceiling) come from the
heap, and the heap is given back by the explicit trims above (when the batch
empties and every 10 s), not after every free.

On CPU, oneDNN (primitive cache) and ideep (LRU cache) keep one compiled kernel
per matmul shape, a fraction of a MiB each, 1,024 entries apiece by default. The
packed forward meets a new token count most steps, so under varied traffic those
caches grow for minutes (measured in bench/RESULTS.md, load test 18:19)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import time

CPU_KERNEL_CACHE_ENTRIES = 512
"""Per cache. Half the libraries' default: half the memory they can reach (369
rather than 791 MiB on bench/kernel_cache_memory.py's server mix, no slower there;
~300 MiB less RSS for 2.5% fewer tokens/s in the 10-minute load test)."""

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim, _mallopt = _libc.malloc_trim, _libc.mallopt
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
except (OSError, AttributeError):
    _trim = _mallopt = None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20
"""Blocks above this are mapped fresh each time: glibc's largest allowed value on 64-bit."""
TRIM_THRESHOLD = 2**30
"""Free heap top kept without an explicit trim: above a step's working set, so steps reuse it."""


def reuse_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring) for the whole process,
    unless the environment sets either; False where the C library has no mallopt or refuses."""
    if _mallopt is None or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    return bool(_mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Return free heap memory to the OS; False where the C library cannot."""
    return bool(_trim is not None and _trim(0))


class PeriodicTrim:
    """Trims at most once per `interval` seconds (a trim walks the heap: milliseconds)."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self._last = interval, time.monotonic()

    def __call__(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self._last >= self.interval:
            self._last = now
            release_free_memory()


def bound_cpu_kernel_caches(entries: int = CPU_KERNEL_CACHE_ENTRIES) -> None:
    """Cap oneDNN's and ideep's per-shape kernel caches unless the environment already
    does. Both libraries read the variable at their first matmul: call this before it."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))
