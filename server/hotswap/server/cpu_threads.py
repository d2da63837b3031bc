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
matters much, and all of it is harmless."""
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
