"""Host memory after long prompts (engine/host_memory.py): with glibc's thresholds fixed high
for speed, the engine thread's own malloc arena keeps a long prefill's freed activations at its
top, which malloc_trim alone did not give back (+25–35 MiB after two 4,000-token prompts on the
default model). The engine's idle trim must. A fresh process, so RSS sees only the engine."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hotswap.server.engine import host_memory

SCRIPT = r"""
import sys, time
import torch
from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

loaded = load_base_model(ModelConfig(source="default", device="cpu", cache_dir=sys.argv[1]))
cfg = EngineConfig(max_batch_size=8, max_tokens_per_step=2048, kv_cache_bytes=256 * 2**20, enable_prefix_caching=False)
gen = torch.Generator().manual_seed(0)
with ServingCore(loaded, cfg) as core:
    core.generate(GenerateRequest(prompt_ids=list(range(100, 164)), params=SamplingParams(max_new_tokens=2)), 600)
    time.sleep(0.5)  # the batch emptied: the engine thread trims
    before = rss_mib()
    for _ in range(2):
        prompt = torch.randint(100, 40000, (4000,), generator=gen).tolist()
        r = core.generate(GenerateRequest(prompt_ids=prompt, params=SamplingParams(max_new_tokens=1)), 600)
        assert r.error is None, r.error
    time.sleep(0.5)
    print(rss_mib() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or host_memory._mallopt is None, reason="glibc only")
def test_long_prefills_leave_no_resident_memory_behind(default_model_cache):
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(default_model_cache[0])], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    grown = float(run.stdout.split()[-1])
    assert grown < 12, f"{grown:.0f} MiB more resident after the engine idled"


@pytest.mark.parametrize("value", ["0", "-3", "lots"])
def test_an_ideep_cache_capacity_that_would_crash_torch_is_refused(monkeypatch, value):
    """LRU_CACHE_CAPACITY=0 makes torch's first bf16 CPU matmul die of a segmentation fault:
    the server refuses it at start with a message naming the variable instead."""
    from hotswap.server.errors import ModelLoadError

    monkeypatch.setenv("LRU_CACHE_CAPACITY", value)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "512")
    with pytest.raises(ModelLoadError, match="LRU_CACHE_CAPACITY") as err:
        host_memory.bound_cpu_kernel_caches()
    assert err.value.field == "LRU_CACHE_CAPACITY"


def test_kernel_cache_capacities_default_to_the_servers_and_keep_the_operators(monkeypatch):
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "64")
    host_memory.bound_cpu_kernel_caches()
    assert os.environ["LRU_CACHE_CAPACITY"] == str(host_memory.CPU_KERNEL_CACHE_ENTRIES)
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "64"
