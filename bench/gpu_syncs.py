"""Where a decode step on CUDA waits for the device: runs a tiny Llama (random weights) with
LoRA adapters through the engine and reports each host-device synchronisation torch sees in
steady decode steps (torch.cuda.set_sync_debug_mode), grouped by the line of hotswap code
that caused it. The issue's goal is one device-to-host copy per step (the sampled tokens).

    python bench/gpu_syncs.py          # on a GPU (bench/gpu_session.sh runs it)
    python bench/gpu_syncs.py --smoke  # the same steps on CPU, where there is nothing to see: checks the script
"""
from __future__ import annotations

import collections
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.engine import Engine
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.serving import ServingCore

from bench_gpu import build_checkpoint


def main() -> None:
    cuda = torch.cuda.is_available()
    if not cuda and "--smoke" not in sys.argv:
        print("no CUDA device: nothing to measure (--smoke runs the steps on CPU)")
        return
    work = Path(tempfile.mkdtemp(prefix="hotswap-syncs-"))
    ckpt = build_checkpoint("tiny", work / "tiny")
    cfg = LlamaConfig.from_pretrained(ckpt)
    adapters = []
    for i in range(4):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False)
        get_peft_model(model, lora).save_pretrained(work / f"lora{i}")
        adapters.append(work / f"lora{i}")
    core = ServingCore.from_config(ModelConfig(source=str(ckpt), quantization="none", device="cuda" if cuda else "cpu"),
                                   EngineConfig(max_batch_size=16, max_seq_len=256))
    ids = [core.register_adapter(f"lora{i}", p).id for i, p in enumerate(adapters)]
    for adapter_id in ids:
        core.adapters.load(adapter_id)
    core.loop.shutdown()  # this thread drives the engine
    engine: Engine = core.engine
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    for i in range(16):
        request = GenerateRequest(prompt_ids=[3 + (i * 5 + j) % 90 for j in range(20)], adapter_id=ids[i % 4] if i % 5 else "",
                                  params=params)
        engine.add_row(engine.make_row(request, lambda e: None))
    for _ in range(4):  # prefill and the first decode steps: kernels compiled, shapes seen
        engine.step()
        engine.take_events()
    sites: collections.Counter[str] = collections.Counter()
    steps = 0
    if cuda:
        torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(8):
                engine.step()
                engine.take_events()
                steps += 1
                for w in (w for w in caught if "synchroniz" in str(w.message)):  # the location: the Python line of the op
                    sites[f"{Path(w.filename).name}:{w.lineno} ({str(w.message).splitlines()[0][:60]})"] += 1
                caught.clear()
    finally:
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{sum(sites.values()) / steps:.1f} synchronising calls per steady decode step (16 rows, 4 LoRA adapters, "
          f"backend {engine.runner.backend}):")
    for site, n in sites.most_common():
        print(f"  {n / steps:5.1f}  {site}")
    core.close()


if __name__ == "__main__":
    sys.exit(main())
