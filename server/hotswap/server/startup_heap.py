"""Keeping what the server built at start out of Python's cyclic garbage collector.

A full collection scans every tracked object while holding the GIL. After the model,
tokenizer and imports are loaded that is ~385,000 objects for the default model and
130 ms a collection (measured: `gc.collect()` in a process holding a ServingCore), during
which the engine thread's step stalls too; CPython runs one whenever enough objects
have survived the younger generations, so a long-running server met such a stall every
so often (one of 200 ms in a 36 s benchmark run). Those objects live as long as the
server, so after start they are frozen (`gc.freeze`): collections then scan only what
was created later."""
from __future__ import annotations

import gc


def freeze_startup_objects() -> int:
    """Collect what is already garbage, then move every object alive now out of the collector's
    reach (objects created later are collected as usual). Returns how many are frozen. Call once,
    when the server is built; a process that builds and drops many servers (tests) should not."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
