"""Which threads run torch's intra-op parallelism on CPU.

torch's CPU wheels parallelise with libgomp (OpenMP), which keeps a pool of worker
threads for every thread that ever ran a parallel region, until that thread exits.
Once the pools together hold more threads than the machine has cores, libgomp stops
letting any worker spin between regions: every matmul then waits for its workers to
wake from a futex. Measured on 2 cores: a [64, 576] x [576, 1536] bf16 matmul takes
110 µs on the first pool and 205 µs on a second thread's pool; the engine's decode
step took twice as long on its thread as on the thread that loaded the model.

So one long-lived thread per process runs parallel regions: the engine's. Work that
must also use every core (loading the model, building the engine) runs on a thread
that ends when it is done, taking its pool with it; long-lived helper threads
(adapter loading, tokenising, blocking I/O) run serially. On CUDA none of this
matters much, and all of it is harmless. Adapter loads and engine steps also take
turns (`Turns`): beside a busy Python thread, the engine's step waits for the GIL at
every op."""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")

COMPUTE_THREADS = torch.get_num_threads()
"""The threads the engine computes with: torch's count on the thread that imported hotswap
(OMP_NUM_THREADS, else the cores this process may use), read before any helper went serial."""


def _pin(n: int) -> None:
    """This thread's intra-op thread count is `n` for good. torch (OpenMP backend) runs a
    per-thread init at a thread's first parallel op (and at its first get_num_threads) that
    applies the count last set by *any* thread: a thread that only called set_num_threads
    and had not computed yet was reset to a serial helper's 1 if one went serial in between
    (measured: the engine thread then ran on one core). So the init runs here, between two
    sets, and nothing later resets this thread's count."""
    torch.set_num_threads(n)
    torch.get_num_threads()  # the per-thread init, now
    torch.set_num_threads(n)


def use_threads(n: int = COMPUTE_THREADS) -> None:
    """For the engine's thread: parallel regions on this thread use `n` threads."""
    _pin(max(1, n))


def serial() -> None:
    """For long-lived helper threads (a ThreadPoolExecutor's initializer): no parallel
    region, hence no libgomp pool, on this thread. torch also makes 1 the default of
    threads started later that never set their own; every thread of ours sets its own."""
    _pin(1)


def in_passing_thread(fn: Callable[..., T], *args, threads: int | None = None, **kwargs) -> T:
    """fn(*args, **kwargs) on a new thread that ends when it returns (its libgomp pool
    ends with it), computing with `threads` (default COMPUTE_THREADS); returns its
    result or raises its exception in the caller."""
    n = threads or COMPUTE_THREADS
    box: dict[str, object] = {}

    def run() -> None:
        use_threads(n)
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    thread = threading.Thread(target=run, name="hotswap-passing", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["result"]  # type: ignore[return-value]


class Turns:
    """Engine steps and adapter loads take turns on the CPU instead of running at once.

    A long-lived Python thread busy beside the engine's costs it far more than its own CPU
    time: the engine thread gives up the GIL around each of the ~700 torch ops and module
    calls of a step and waits for it at every one. Measured on 2 cores (default model, 64
    decoding rows, 45 ms a step alone): beside a thread loading adapters without pause a
    step took 300 ms at the median (with turns: 57 ms, one load between two steps); beside
    a pure-Python loop, 4 s. So a load's CPU work (read, check, convert) runs only while no
    step does; while both want the CPU they alternate, one load between two steps, so
    decoding rows wait at most one load (5-15 ms on CPU) per step; an idle engine lets loads
    run back to back. Waiting for device room must happen outside a turn (the engine's
    steps free it). (Letting loads take up to as much time as the steps before them moved
    bench_engine's Zipf run within its noise: 0.57x -> 0.59x.)

    On CUDA the engine's steps mostly wait on the device and loads overlap with them:
    ServingCore passes `Turns(enabled=False)`, whose turns never wait."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cond = threading.Condition()
        self._busy = False
        self._wanting = {"step": 0, "load": 0}
        self._last = "load"

    def step(self) -> "_Turn":
        """The engine's turn for one step (a context manager)."""
        return _Turn(self, "step")

    def load(self) -> "_Turn":
        """A turn for one adapter load's CPU work (a context manager)."""
        return _Turn(self, "load")

    def _acquire(self, who: str) -> None:
        other = "load" if who == "step" else "step"
        with self._cond:
            self._wanting[who] += 1
            self._cond.wait_for(lambda: not self._busy and (not self._wanting[other] or self._last != who))
            self._wanting[who] -= 1
            self._busy, self._last = True, who

    def _release(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


class _Turn:
    def __init__(self, turns: Turns, who: str) -> None:
        self.turns, self.who = turns, who

    def __enter__(self) -> None:
        if self.turns.enabled:
            self.turns._acquire(self.who)

    def __exit__(self, *exc: object) -> None:
        if self.turns.enabled:
            self.turns._release()
