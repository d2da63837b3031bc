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
