"""What the server built at start leaves the garbage collector's scans (startup_heap.py): garbage
is collected first, everything alive is frozen, and what is created later is still collected.
In a fresh process: freezing the test process would keep every later test's cycles for good."""
from __future__ import annotations

import subprocess
import sys

PROBE = """
import gc, weakref
from hotswap.server.startup_heap import freeze_startup_objects

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

gc.disable()  # only the calls below collect
dead_before = cycle()  # garbage already at start: must not be frozen for good
kept = Node()
frozen = freeze_startup_objects()
assert dead_before() is None, "garbage from before the freeze was kept"
assert frozen > 1000 and gc.get_freeze_count() == frozen
assert not gc.is_tracked(kept) or kept not in gc.get_objects(), "a live object is still scanned"
dead_after = cycle()
gc.collect()
assert dead_after() is None, "a cycle made after the freeze was not collected"
print("ok", frozen)
"""


def test_startup_objects_are_frozen_and_later_cycles_still_collected():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ok")
