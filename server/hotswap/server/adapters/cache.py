"""Two-tier adapter cache: host RAM and device, each an LRU within a byte budget.

registered (files) → resident (host tier) → active (device tier, usable in a
batch). Pinned adapters never leave; adapters in use by running rows are
never evicted from the device. Loads run on a background thread so the engine
keeps decoding while a cold adapter comes in; when the device tier is full of
in-use adapters, a load waits for a release instead of evicting them. A load's CPU work
(parsing, checking, converting) runs in turns with the engine's steps (cpu_threads.Turns), after
its I/O (`prefetch_fn`), which does not."""
from __future__ import annotations

import bisect
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import AdapterCacheConfig
from ..cpu_threads import Turns, serial
from ..errors import HotswapError, InvalidArgument, ResourceExhausted
from .weights import Adapter


LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds (seconds) of the load-duration histogram's buckets (Prometheus' hotswap_adapter_load_duration_seconds)."""
RECENT_SAMPLES = 4096
"""Per-load durations kept for percentiles (the most recent ones): a server loads adapters for as long as it
runs, so the lists must not grow with it; the histogram counts every load."""


@dataclass
class CacheStats:
    device: dict[str, int] = field(default_factory=dict)
    """Resident on the device: id -> bytes."""
    host: dict[str, int] = field(default_factory=dict)
    """Resident in host RAM: id -> bytes."""
    hits: int = 0
    misses: int = 0
    loads: int = 0
    """Completed loads onto the device."""
    evictions: int = 0
    """Device-tier evictions."""
    host_evictions: int = 0
    load_durations: list[float] = field(default_factory=list)
    """Cold loads (disk → host → device): seconds to read, validate and copy, per load (not counting the
    wait for a CPU turn between engine steps); the last RECENT_SAMPLES."""
    promote_durations: list[float] = field(default_factory=list)
    """Warm loads (host tier → device): seconds per load (likewise)."""
    room_waits: list[float] = field(default_factory=list)
    """Seconds a load then waited for device room held by in-use adapters (0 when it fit); the last RECENT_SAMPLES."""
    load_buckets: list[int] = field(default_factory=lambda: [0] * (len(LOAD_BUCKETS) + 1))
    """Every load's duration (cold and warm), counted per LOAD_BUCKETS bucket (the last: above them all)."""
    load_seconds: float = 0.0
    """The sum of every load's duration."""


class AdapterCache:
    def __init__(self, cfg: AdapterCacheConfig, load_fn: Callable[[str], Adapter], device: torch.device, dtype: torch.dtype,
                 turns: Turns | None = None, prefetch_fn: Callable[[str], None] | None = None) -> None:
        self.cfg, self.load_fn, self.device, self.dtype = cfg, load_fn, device, dtype
        self.turns = turns or Turns(enabled=False)
        self.prefetch_fn = prefetch_fn
        """The I/O of a load from disk (fetching a remote store's files, reading them into the page cache),
        run before its CPU turn: a slow disk must not hold the engine's steps back."""
        self.on_ready: Callable[[], None] | None = None
        self._device: OrderedDict[str, Adapter] = OrderedDict()
        self._host: OrderedDict[str, Adapter] = OrderedDict()
        self._refs: Counter[str] = Counter()
        self._pinned: set[str] = set()
        self._pending: set[str] = set()
        self._failures: dict[str, HotswapError] = {}
        self._sizes: dict[str, int] = {}
        """Device bytes of every adapter loaded once (kept after eviction: what `together_error` sums)."""
        self._stats = CacheStats()
        self._recent = {kind: deque(maxlen=RECENT_SAMPLES) for kind in ("load", "promote", "room")}
        self._lock = threading.Condition()
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="hotswap-adapter-load", initializer=serial)

    # -- the engine's calls (non-blocking) -------------------------------------
    def acquire(self, adapter_id: str, load: bool = True) -> Adapter | None:
        """The device copy (reference counted) if active; else start loading it (unless `load` is
        False) and return None. Raises the error of the last load if it failed (once: the next call retries)."""
        with self._lock:
            adapter = self._device.get(adapter_id)
            if adapter is not None:
                self._device.move_to_end(adapter_id)
                self._refs[adapter_id] += 1
                self._stats.hits += 1
                return adapter
            error = self._failures.pop(adapter_id, None)
            if error is not None:
                raise error
            if load and adapter_id not in self._pending:
                self._stats.misses += 1
                self._pending.add(adapter_id)
                self._loader.submit(self._load_async, adapter_id)
            return None

    def release(self, adapter_id: str) -> None:
        with self._lock:
            if self._refs[adapter_id] > 0:
                self._refs[adapter_id] -= 1
            self._lock.notify_all()  # a load may be waiting for room

    def together_error(self, adapter_ids: list[str]) -> ResourceExhausted | None:
        """Why these adapters (the parts of one weighted combination, which must all be on the device at
        once) can never be, or None: their sizes, with the pinned others, exceed the device budget. Known
        once each has loaded; without it such a row waits forever while each part's load evicts the part
        loaded before it."""
        with self._lock:
            if any(a not in self._sizes for a in adapter_ids):
                return None
            need = sum(self._sizes[a] for a in adapter_ids)
            pinned = sum(a.nbytes for k, a in self._device.items() if k in self._pinned and k not in adapter_ids)
        if pinned + need <= self.cfg.device_bytes:
            return None
        held = f" (pinned adapters hold {pinned})" if pinned else ""
        return ResourceExhausted(f"adapters {adapter_ids!r} are used together and need {need} bytes on the device at once; the device "
                                 f"budget is {self.cfg.device_bytes} bytes{held} (adapter_cache.device_bytes)", field="device_bytes")

    # -- management calls (blocking) -----------------------------------------------
    def load(self, adapter_id: str, pin: bool = False) -> Adapter:
        """Make the adapter active now (and optionally pin it)."""
        adapter = self._activate(adapter_id)
        if pin:
            self.pin(adapter_id)
        return adapter

    def pin(self, adapter_id: str) -> None:
        with self._lock:
            self._pinned.add(adapter_id)
        self._activate(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        with self._lock:
            self._pinned.discard(adapter_id)
            self._lock.notify_all()

    def evict(self, adapter_id: str) -> None:
        """Drop from both tiers (e.g. the adapter was deleted or replaced)."""
        with self._lock:
            if self._refs[adapter_id] > 0:
                raise InvalidArgument(f"adapter {adapter_id!r} is in use by {self._refs[adapter_id]} running requests", field="adapter_id")
            self._pinned.discard(adapter_id)
            if self._device.pop(adapter_id, None) is not None:
                self._stats.evictions += 1
            self._host.pop(adapter_id, None)

    def forget(self, adapter_id: str) -> None:
        """The adapter was deleted: drop it from both tiers even while rows use it
        (they hold their own reference and finish; no new row can acquire it)."""
        with self._lock:
            self._pinned.discard(adapter_id)
            if self._device.pop(adapter_id, None) is not None:
                self._stats.evictions += 1
            self._host.pop(adapter_id, None)
            self._failures.pop(adapter_id, None)
            self._sizes.pop(adapter_id, None)

    def residency(self, adapter_id: str) -> str:
        """"device", "host" or "" (files only)."""
        with self._lock:
            return "device" if adapter_id in self._device else "host" if adapter_id in self._host else ""

    def stats(self) -> CacheStats:
        with self._lock:
            s = self._stats
            return CacheStats(
                device={k: a.nbytes for k, a in self._device.items()},
                host={k: a.nbytes for k, a in self._host.items()},
                hits=s.hits, misses=s.misses, loads=s.loads, evictions=s.evictions,
                host_evictions=s.host_evictions, load_durations=list(self._recent["load"]),
                promote_durations=list(self._recent["promote"]), room_waits=list(self._recent["room"]),
                load_buckets=list(s.load_buckets), load_seconds=s.load_seconds,
            )

    def is_pinned(self, adapter_id: str) -> bool:
        with self._lock:
            return adapter_id in self._pinned

    def wait_idle(self, timeout: float | None = None) -> None:
        """Wait until no load is pending (tests, shutdown)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"adapter loads still pending: {sorted(self._pending)}")
                self._lock.wait(left)

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- loading ---------------------------------------------------------------------
    def _load_async(self, adapter_id: str) -> None:
        try:
            self._activate(adapter_id)
        except HotswapError as e:
            with self._lock:
                self._failures[adapter_id] = e
        except Exception as e:  # noqa: BLE001 - an unexpected failure ends the waiting requests, not the loader
            with self._lock:
                self._failures[adapter_id] = HotswapError(f"loading adapter {adapter_id!r} failed: {type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._pending.discard(adapter_id)
                self._lock.notify_all()
            if self.on_ready is not None:
                self.on_ready()

    def _activate(self, adapter_id: str) -> Adapter:
        with self._lock:
            if adapter_id in self._device:
                self._device.move_to_end(adapter_id)
                return self._device[adapter_id]
        start = time.monotonic()
        if self.prefetch_fn is not None and self.residency(adapter_id) != "host":
            self.prefetch_fn(adapter_id)
        asked = time.monotonic()
        with self.turns.load():  # not while waiting for room below: the engine's steps free it
            start += time.monotonic() - asked  # the wait for a turn is not the load's own time
            host, from_disk = self._host_copy(adapter_id)
            if host.nbytes > self.cfg.device_bytes:
                raise ResourceExhausted(
                    f"adapter {adapter_id!r} needs {host.nbytes} bytes, more than the whole device budget of "
                    f"{self.cfg.device_bytes} bytes (adapter_cache.device_bytes)",
                    field="device_bytes",
                )
            active = host.to(self.device, self.dtype)
        ready = time.monotonic()
        with self._lock:
            self._sizes[adapter_id] = active.nbytes
            self._make_room(active.nbytes)
            self._device[adapter_id] = active
            self._stats.loads += 1
            took = ready - start
            self._recent["load" if from_disk else "promote"].append(took)
            self._recent["room"].append(time.monotonic() - ready)
            self._stats.load_buckets[bisect.bisect_left(LOAD_BUCKETS, took)] += 1
            self._stats.load_seconds += took
            return active

    def _host_copy(self, adapter_id: str) -> tuple[Adapter, bool]:
        """(host copy, whether it came from disk)."""
        with self._lock:
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                return self._host[adapter_id], False
        # The host tier keeps the serving dtype: half of fp32's bytes, and on a CPU device the
        # device copy below is then these very tensors (to() of a matching tensor is free).
        adapter = self.load_fn(adapter_id).to("cpu", self.dtype)  # disk I/O outside the lock
        with self._lock:
            if adapter.nbytes <= self.cfg.host_bytes:
                used = sum(a.nbytes for a in self._host.values())
                for victim in [k for k in self._host if k not in self._pinned]:
                    if used + adapter.nbytes <= self.cfg.host_bytes:
                        break
                    used -= self._host.pop(victim).nbytes
                    self._stats.host_evictions += 1
                if used + adapter.nbytes <= self.cfg.host_bytes:
                    self._host[adapter_id] = adapter
        return adapter, True

    def _make_room(self, nbytes: int) -> None:
        """Evict least-recently-used idle, unpinned device adapters; wait while only busy ones remain. Holds the lock."""
        pinned = sum(a.nbytes for k, a in self._device.items() if k in self._pinned)
        if pinned + nbytes > self.cfg.device_bytes:
            raise ResourceExhausted(
                f"pinned adapters hold {pinned} of the {self.cfg.device_bytes}-byte device budget; "
                f"{nbytes} more bytes do not fit (unpin some, or raise adapter_cache.device_bytes)",
                field="device_bytes",
            )
        while True:
            used = sum(a.nbytes for a in self._device.values())
            for victim in [k for k in self._device if self._refs[k] == 0 and k not in self._pinned]:
                if used + nbytes <= self.cfg.device_bytes:
                    break
                used -= self._device.pop(victim).nbytes
                self._stats.evictions += 1
            if used + nbytes <= self.cfg.device_bytes:
                return
            self._lock.wait()  # everything left is in use or pinned: wait for a release
