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

from ..errors import ModelLoadError

CPU_KERNEL_CACHE_ENTRIES = 512
"""Per cache. Half the libraries' default: half the memory they can reach (369
rather than 791 MiB on bench/kernel_cache_memory.py's server mix, no slower there;
~300 MiB less RSS for 2.5% fewer tokens/s in the 10-minute load test)."""

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _trim, _mallopt = _libc.malloc_trim, _libc.mallopt
    _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
    _mallopt.argtypes, _mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _malloc, _free = _libc.malloc, _libc.free
    _malloc.argtypes, _malloc.restype = [ctypes.c_size_t], ctypes.c_void_p
    _free.argtypes, _free.restype = [ctypes.c_void_p], None
except (OSError, AttributeError):
    _trim = _mallopt = _malloc = _free = None


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 2**20
"""Blocks above this are mapped fresh each time: glibc's largest allowed value on 64-bit."""
TRIM_THRESHOLD = 2**30
"""Free heap top kept without an explicit trim: above a step's working set, so steps reuse it."""
_KEEP_ON_TRIM = 2**20
"""Free heap top a thread's arena keeps when it is trimmed (release_free_memory)."""
_TRIGGER = 2**18
"""A block whose free makes glibc consider trimming its arena (at least 64 KiB) and that comes from the heap."""
_fixed = False


def reuse_freed_memory() -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring) for the whole process,
    unless the environment sets either; False where the C library has no mallopt or refuses."""
    global _fixed
    if _mallopt is None or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")):
        return False
    _fixed = bool(_mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(_mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _fixed


def release_free_memory() -> bool:
    """Return free heap memory to the OS, the calling thread's arena's top included; False where
    the C library cannot.

    The engine thread allocates from a malloc arena of its own; a long prefill's freed
    activations merge into that arena's top, which glibc shrinks when the free of a large block
    finds the top above the trim threshold: with the threshold fixed high (reuse_freed_memory),
    never, and malloc_trim did not return it either (tests/test_host_memory.py: ~30 MiB kept
    after two 4,000-token prompts on the default model). So the threshold is lowered for one
    such free on this thread, then restored."""
    if _trim is None:
        return False
    trimmed = bool(_trim(0))
    if _fixed:
        _mallopt(_M_TRIM_THRESHOLD, _KEEP_ON_TRIM)
        try:
            _free(_malloc(_TRIGGER))
        finally:
            _mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return trimmed


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
    does. Both libraries read the variable at their first matmul: call this before it.

    Raises ModelLoadError for an LRU_CACHE_CAPACITY below 1: with 0, torch's first bf16
    matmul on CPU dies of a segmentation fault inside ideep (torch 2.13), which would take
    the server down with no message."""
    for name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
        os.environ.setdefault(name, str(entries))
    value = os.environ["LRU_CACHE_CAPACITY"]
    try:
        ok = int(value) >= 1
    except ValueError:
        ok = False
    if not ok:
        raise ModelLoadError(f"{value!r} is not a whole number of at least 1 (ideep's kernel cache size; 0 crashes torch's "
                             f"CPU matmuls): set one, or leave it unset ({entries})", field="LRU_CACHE_CAPACITY")
