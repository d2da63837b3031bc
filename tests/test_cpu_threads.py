"""One long-lived thread per process runs torch's parallel regions: the engine's
(cpu_threads.py). Loading and building the engine run on threads that end; the
long-lived helper threads run serially, so libgomp never holds two pools at once."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from hotswap.server.api.generation import TOKENIZER_POOL
from hotswap.server.api.offload import BLOCKING_POOL
from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.cpu_threads import COMPUTE_THREADS, Turns, in_passing_thread
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


def _turn_log(turns: Turns, who: str, log: list, n: int, hold: float, start: threading.Event) -> None:
    start.wait()
    for _ in range(n):
        with turns.step() if who == "step" else turns.load():
            log.append((who, "in"))
            time.sleep(hold)
            log.append((who, "out"))


def test_steps_and_loads_take_turns():
    """Never both at once; while both want the CPU, a step and a load alternate (so decoding rows wait at
    most one load per step); alone, either runs back to back."""
    turns, log, start = Turns(), [], threading.Event()
    threads = [threading.Thread(target=_turn_log, args=(turns, who, log, 12, 0.003, start)) for who in ("step", "load")]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join(10)
    inside = 0
    for _, edge in log:
        inside += 1 if edge == "in" else -1
        assert inside in (0, 1), "a step and a load ran at once"
    order = [who for who, edge in log if edge == "in"]
    both = order[: 2 * min(order.count("step"), order.count("load")) - 2]  # while both still wanted turns
    assert all(a != b for a, b in zip(both, both[1:])), order
    log.clear()
    start = threading.Event()
    start.set()
    _turn_log(Turns(), "load", log, 5, 0.0, start)
    assert [who for who, edge in log if edge == "in"] == ["load"] * 5


def test_disabled_turns_never_wait():
    """CUDA: steps and loads overlap (a load inside its turn does not hold a step back)."""
    turns = Turns(enabled=False)
    with turns.load():
        done = threading.Event()
        threading.Thread(target=lambda: (turns.step().__enter__(), done.set())).start()
        assert done.wait(5)


def test_adapter_loads_run_between_engine_steps(tiny_checkpoints, tmp_path):
    """On CPU a cold adapter's load (its read, checks and conversion) never overlaps an engine step, while
    the engine keeps decoding base rows and then serves the adapter's rows."""
    from peft_fixtures import save_adapter
    from transformers import AutoModelForCausalLM

    ckpt = tiny_checkpoints["llama"]
    paths = [save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), "lora", tmp_path / f"a{i}", seed=i)
             for i in range(4)]
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    with ServingCore(loaded, EngineConfig(max_batch_size=8, max_seq_len=64)) as core:
        assert core.turns.enabled and core.adapters.turns is core.turns and core.loop.turns is core.turns
        for i, p in enumerate(paths):
            core.register_adapter(f"a{i}", p)
        events, real_step, real_copy = [], core.engine.step, core.adapters._host_copy

        def step():
            events.append("step+")
            try:
                return real_step()
            finally:
                events.append("step-")

        def host_copy(adapter_id):
            events.append("load+")
            try:
                return real_copy(adapter_id)
            finally:
                events.append("load-")

        core.engine.step, core.adapters._host_copy = step, host_copy
        params = SamplingParams(max_new_tokens=24, ignore_eos=True)
        base = [core.submit(GenerateRequest(prompt_ids=[5, 6, 7, 8], params=params)) for _ in range(2)]
        next(iter(base[0]))  # decoding
        lora = [core.submit(GenerateRequest(prompt_ids=[9, 10, 11], adapter_id=f"a{i}", params=params)) for i in range(4)]
        results = [s.result(timeout=60) for s in base + lora]
    assert all(r.error is None and len(r.token_ids) == 24 for r in results)
    assert events.count("load+") == 4
    inside = None
    for e in events:
        assert inside is None or e == inside[:-1] + "-", f"{e} while {inside} ran: {events}"
        inside = e if e.endswith("+") else None
