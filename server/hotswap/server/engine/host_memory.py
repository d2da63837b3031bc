"""Handing freed host memory back to the operating system.

glibc keeps freed heap memory for reuse; per-step tensors of a few MiB (logits
[rows, vocab], sampling scratch) land in its arenas and their high-water mark
would otherwise stay in the server's RSS for good. `malloc_trim` returns the
unused part. Elsewhere (musl, macOS) this is a no-op."""
from __future__ import annotations

import ctypes
import ctypes.util
import time

_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim = _libc.malloc_trim
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
