"""Decode steps through fixed, padded buffers (engine/static_decode.py, what CUDA graphs capture):
the same tokens and log-probs as the plain packed forward, on every kernel path, with LoRA,
prompt-tuning, prefix and base rows in the batch and rows arriving and leaving mid-decode; the
padding writes only its scratch block, which no row is ever given. On CPU the buffers run
eagerly; on a GPU the same test replays captured graphs."""
from __future__ import annotations

import pytest
import torch

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import kernels
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.engine.static_decode import BUCKETS
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapters
from test_engine_fidelity import TRITON_DEVICE, prompts, run_in_waves

KINDS = {"lora": "lora", "lora-mlp": "lora_mlp", "prompt": "prompt_random", "prefix": "prefix"}


@pytest.fixture(scope="module")
def setup(tiny_checkpoints, tmp_path_factory):
    ckpt = tiny_checkpoints["llama"]
    paths = save_adapters(ckpt, KINDS, tmp_path_factory.mktemp("static-decode"))
    # 11 rows: buckets 16, then 8, 4, 2, 1 as rows finish at their own lengths
    jobs = [(list(KINDS)[i % 5] if i % 5 < 4 else "", p) for i, p in enumerate(prompts(11))]
    return ckpt, paths, jobs


def serve(setup, backend: str, graphs: bool):
    ckpt, paths, jobs = setup
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device=device))
    cfg = EngineConfig(max_batch_size=16, max_seq_len=128, block_size=4, attention_backend=backend, decode_graphs=graphs)
    with ServingCore(loaded, cfg) as core:
        for name, path in paths.items():
            core.register_adapter(name, path)
        streams = []
        for i, (adapter, p) in enumerate(jobs):  # each its own length: the batch shrinks through the buckets
            params = SamplingParams(max_new_tokens=4 + 2 * i, ignore_eos=True, logprobs=2)
            streams.append(core.submit(GenerateRequest(prompt_ids=p, adapter_id=adapter, params=params)))
            if i == 5:
                next(iter(streams[-1]))  # the rest arrive mid-decode
        results = [s.result(timeout=120) for s in streams]
        runner = core.engine.runner
        static = runner.static
        if graphs:
            assert core.engine.kv.num_blocks == runner.cache.num_blocks - 1, "the scratch block is not the rows'"
            assert static.steps > 5, "decode steps did not take the static path"
        else:
            assert static is None and core.engine.kv.num_blocks == runner.cache.num_blocks
    return results, static


@pytest.mark.parametrize("backend", ["native", "torch", "triton"])
def test_padded_static_decode_matches_the_packed_forward(setup, backend):
    if backend == "triton" and not kernels.triton_available(TRITON_DEVICE):
        pytest.skip(f"triton kernels unavailable: {kernels.triton_unavailable_reason()}")
    plain, _ = serve(setup, backend, graphs=False)
    static, path = serve(setup, backend, graphs=True)
    for (adapter, _), a, b in zip(setup[2], plain, static):
        assert a.error is None and b.error is None
        assert a.token_ids == b.token_ids, adapter
        ours = torch.tensor([lp.logprob for lp in b.logprobs])
        torch.testing.assert_close(ours, torch.tensor([lp.logprob for lp in a.logprobs]), atol=2e-5, rtol=1e-5, msg=adapter)
    if TRITON_DEVICE == "cuda" and backend == "triton":
        assert path.replays > 0, "no CUDA graph was replayed"


def test_buckets_cover_any_batch():
    assert list(BUCKETS) == sorted(BUCKETS) and BUCKETS[0] == 1
