"""One long-lived thread per process runs torch's parallel regions: the engine's
(cpu_threads.py). Loading and building the engine run on threads that end; the
long-lived helper threads run serially, so libgomp never holds two pools at once."""
from __future__ import annotations

import threading

import pytest
import torch

from hotswap.server.api.generation import TOKENIZER_POOL
from hotswap.server.api.offload import BLOCKING_POOL
from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.cpu_threads import COMPUTE_THREADS, in_passing_thread
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore


def test_a_passing_thread_returns_raises_and_ends():
    seen = {}

    def work(x, *, y):
        seen["thread"] = threading.current_thread()
        seen["threads"] = torch.get_num_threads()
        return x + y

    assert in_passing_thread(work, 1, y=2) == 3
    assert seen["thread"] is not threading.current_thread() and not seen["thread"].is_alive()
    assert seen["threads"] == COMPUTE_THREADS
    assert in_passing_thread(torch.get_num_threads, threads=1) == 1
    with pytest.raises(ZeroDivisionError):
        in_passing_thread(lambda: 1 / 0)


def test_only_the_engine_thread_computes_in_parallel(tiny_checkpoints):
    loaded = load_base_model(ModelConfig(source=str(tiny_checkpoints["llama"]), dtype="float32", device="cpu"))
    with ServingCore(loaded, EngineConfig(max_batch_size=4, max_seq_len=64)) as core:
        on_engine = []
        core.loop.on_step = lambda out, rows: on_engine.append(torch.get_num_threads())
        assert core.generate(GenerateRequest(prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=2)), timeout=60).error is None
        assert on_engine and set(on_engine) == {COMPUTE_THREADS}
        helpers = {"adapter loader": core.adapters._loader, "tokenizer": TOKENIZER_POOL, "blocking": BLOCKING_POOL}
        assert {name: pool.submit(torch.get_num_threads).result() for name, pool in helpers.items()} == dict.fromkeys(helpers, 1)


ENGINE_PROBE = """
import threading, torch
from hotswap.server.cpu_threads import serial, use_threads
from hotswap.server.engine import kernels
seen, helper_done, engine_ready = {}, threading.Event(), threading.Event()

def engine():
    use_threads(2)
    BEFORE
    engine_ready.set()
    helper_done.wait()  # meanwhile an adapter loader, tokenizer or I/O thread goes serial
    AFTER
    seen["after"] = torch.get_num_threads()

def helper():
    engine_ready.wait()
    serial()
    helper_done.set()

threads = [threading.Thread(target=engine), threading.Thread(target=helper)]
[t.start() for t in threads]
[t.join() for t in threads]
print(seen["after"])
"""
MATMUL = "torch.ones(512, 512) @ torch.ones(512, 512)"
NATIVE_PARALLEL = ("assert kernels.native_available(); kernels.lora_shrink(torch.empty(512, 32), torch.randn(512, 576).bfloat16(), "
                   "torch.randn(64, 32, 576).bfloat16(), torch.zeros(512, dtype=torch.int32), torch.full((64,), 32, dtype=torch.int32), "
                   "backend='native')")  # enough work for both threads


def engine_threads_after(before: str, after: str) -> int:
    """The thread count an engine-like thread (use_threads(2)) has after running `before`, a helper thread
    going serial, and `after`, in a fresh process: torch's per-thread init runs once per thread and process."""
    import subprocess
    import sys

    probe = ENGINE_PROBE.replace("BEFORE", before or "pass").replace("AFTER", after)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not __import__("hotswap.server.engine.kernels", fromlist=["x"]).native_available(),
                    reason="native kernels unavailable on this machine")
def test_a_native_kernel_keeps_the_engine_threads_count_after_a_helper_went_serial():
    """The native kernels' parallel regions must not reset the calling thread's thread count to the
    last one any thread set: at::parallel_for did (its lazy init, inlined into the extension), so
    after an adapter loader's serial() the engine's matmuls ran on one core. The thread has computed
    with torch first, as the engine's first step does; its first native parallel region comes after."""
    assert engine_threads_after(MATMUL, NATIVE_PARALLEL) == 2


def test_a_threads_count_survives_a_helper_going_serial_before_its_first_op():
    """torch's per-thread init at a thread's first parallel op applies the count last set by any
    thread: use_threads must run it at once, or an engine thread that had not computed yet when a
    helper went serial computed on one core."""
    assert engine_threads_after("", MATMUL) == 2
