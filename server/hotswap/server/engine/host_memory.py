"""Keeping the server's host memory flat.

glibc keeps freed heap memory for reuse; per-step tensors of a few MiB (logits
[rows, vocab], sampling scratch) land in its arenas and their high-water mark
would otherwise stay in the server's RSS for good. `malloc_trim` returns the
unused part. Elsewhere (musl, macOS) this is a no-op.

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
    _trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
except (OSError, AttributeError):
    _trim = None


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
