"""Every architecture in tiny_archs.ARCHS serves a mixed batch — LoRA on all linears,
prompt tuning, P-tuning, prefix tuning and base rows, prompts longer than the sliding
window — with exactly the greedy tokens (and, within float tolerance, the log-probs) PEFT's PeftModel (plain transformers for the
base) gives each row alone, on every kernel path (native, torch, and Triton: on the GPU where there is
one, else interpreted). Llama and Qwen2 are covered,
with every adapter kind, by test_engine_fidelity.py. A model the engine cannot serve
exactly is refused at load, naming its architecture."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from conftest import save_tiny_checkpoint
from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine import kernels
from hotswap.server.errors import ModelLoadError
from hotswap.server.engine.request import FinishReason, GenerateRequest, SamplingParams
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapter
from test_engine_fidelity import TRITON_DEVICE, reference, run_in_waves
from tiny_archs import ARCHS

NEW = 6
KINDS = {"lora": "lora", "prompt": "prompt_random", "ptuning": "ptuning", "prefix": "prefix"}
# In KINDS order, then two base rows. Every row runs past the window; adapter prompts stay short enough that
# the virtual tokens still reach the first generated token where every layer slides (Mistral), and 36 tokens
# is one prompt chunk long enough for the torch path's dense (SDPA) branch.
PROMPT_LENGTHS = [12, 5, 4, 3, 36, 14]
VISIBLE = 1e-3
"""An adapter's least effect on a log-prob, well above the 2e-4 tolerance (BLOOM's tiny init is quiet)."""


def linear_names(model: nn.Module) -> list[str]:
    """Every plain nn.Linear / Conv1D but the output head, by full path (peft_fixtures.linear_paths: by last
    name alone, PEFT >= 0.22 also targets an MoE model's fused experts, as its "all-linear" does; that is
    test_expert_lora.py's subject, and Llama 4's experts it cannot serve; Linear subclasses whose forward
    returns more than a tensor, like Llama 4's router, PEFT cannot run.)"""
    head = model.get_output_embeddings()

    def plain(m: nn.Module) -> bool:
        with torch.no_grad():
            return isinstance(m(torch.zeros(1, m.weight.shape[0] if isinstance(m, Conv1D) else m.in_features)), torch.Tensor)

    return sorted(n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not head and plain(m))


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(11)
    return [torch.randint(3, 400, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=list(ARCHS))
def case(request, tmp_path_factory):
    """(checkpoint, adapter paths, jobs, PEFT's (tokens, their log-probs) per job, kinds PEFT cannot run here)."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    ckpt = save_tiny_checkpoint(ARCHS[arch](), root / "model")
    paths, jobs, refs, unsupported = {}, [], [], {}
    for i, ((name, kind), prompt) in enumerate(zip([*KINDS.items(), ("", ""), ("", "")], _prompts())):
        try:
            if kind:
                base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
                paths[name] = save_adapter(base, kind, root / name, seed=i, targets=linear_names(base))
            tokens, logprobs = reference(ckpt, paths.get(name), prompt, new=NEW)
            if kind:  # the adapter really changes the model, so matching PEFT means applying it
                assert (logprobs - reference(ckpt, None, prompt, new=NEW)[1]).abs().max() > VISIBLE, name
            refs.append((tokens, logprobs[torch.arange(NEW), torch.tensor(tokens)]))
        except (ValueError, TypeError, RuntimeError, NotImplementedError, AttributeError) as e:
            if not kind:
                raise
            # Only PEFT and transformers ran here: this adapter type does not work on this architecture upstream.
            unsupported[name] = f"PEFT cannot run {kind} on {arch}: {type(e).__name__}: {str(e)[:200]}"
            paths.pop(name, None)
            continue
        jobs.append((name, prompt))
    return ckpt, paths, jobs, refs, unsupported


@pytest.mark.parametrize("backend,decode_graphs", [("native", False), ("torch", False), ("triton", False),
                                                   ("native", True), ("triton", True)])
def test_mixed_batch_matches_peft_alone(case, backend, decode_graphs):
    """decode_graphs: decode-only steps run from the fixed, bucket-padded buffers CUDA graphs capture
    (static_decode.py; eager here, captured on a GPU), which every architecture must serve exactly too."""
    ckpt, paths, jobs, refs, unsupported = case
    if backend == "triton" and not kernels.triton_available(TRITON_DEVICE):
        pytest.skip(f"triton kernels unavailable: {kernels.triton_unavailable_reason()}")
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device=device))
    # Small blocks so windows and prefixes cross block edges. Native: 16 tokens a step, so prompts are chunked
    # (a chunk's past comes from the cache); torch: room for the 36-token prompt's dense chunk.
    cfg = EngineConfig(max_batch_size=8, max_tokens_per_step=16 if backend == "native" else 64, max_seq_len=64, block_size=4,
                       attention_backend=backend, decode_graphs=decode_graphs)
    with ServingCore(loaded, cfg) as core:
        for name, path in paths.items():
            core.register_adapter(name, path)
        results = run_in_waves(core, jobs, SamplingParams(max_new_tokens=NEW, ignore_eos=True, logprobs=1), waves=2)
    for (adapter, prompt), res, (ref_tokens, ref_logprobs) in zip(jobs, results, refs):
        name = adapter or f"base ({len(prompt)} tokens)"
        assert res.error is None, (name, res.error)
        assert res.finish_reason == FinishReason.LENGTH
        assert res.token_ids == ref_tokens, name
        ours = torch.tensor([lp.logprob for lp in res.logprobs])
        torch.testing.assert_close(ours, ref_logprobs, atol=2e-4, rtol=1e-4, msg=name)
    runner = core.engine.runner
    if decode_graphs and runner.layout.paged:  # (an architecture on its own attention path never uses them)
        assert runner.static.steps > 0
    if unsupported:
        pytest.skip("; ".join(unsupported.values()) + " (every other row matched)")


def test_unservable_architecture_is_refused_by_name(tmp_path):
    """Jamba's Mamba layers keep state that is neither keys nor values: no path can serve it exactly."""
    cfg = tf.JambaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, num_experts=2)
    ckpt = save_tiny_checkpoint(cfg, tmp_path / "jamba")
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    with pytest.raises(ModelLoadError, match=r"architecture jamba \(JambaForCausalLM\) cannot be served"):
        ServingCore(loaded, EngineConfig(max_batch_size=2, max_seq_len=32))


def test_own_attention_path_under_chunking_prefix_hits_and_preemption(tmp_path):
    """BLOOM runs on the model's own attention (engine/own_attention.py), its past read back from the
    paged cache: chunked prompts, prefix-cache hits and recompute after preemption still give PEFT's tokens."""
    ckpt = save_tiny_checkpoint(ARCHS["bloom"](), tmp_path / "bloom")
    paths = {name: save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), kind, tmp_path / name, seed=i,
                                targets=["query_key_value", "dense_4h_to_h"])
             for i, (name, kind) in enumerate([("lora", "lora"), ("prefix", "prefix")])}
    shared = list(range(40, 63))
    jobs = [("", shared + [5]), ("lora", shared + [7, 8]), ("prefix", shared + [9]), ("", shared + [6, 7]), ("lora", shared + [5])]
    # K and V, 2 layers, block of 4, 4 kv heads of 16, fp32. 16 blocks: the 5 shared blocks plus ~4 of each
    # of 5 rows do not fit, whatever the timing, so rows are preempted.
    per_block = 2 * 2 * 4 * 4 * 16 * 4
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    cfg = EngineConfig(max_batch_size=8, max_seq_len=64, block_size=4, max_tokens_per_step=16, kv_cache_bytes=16 * per_block)
    with ServingCore(loaded, cfg) as core:
        assert not core.engine.runner.layout.paged and core.engine.kv.num_blocks == 16
        for name, path in paths.items():
            core.register_adapter(name, path)
        params = SamplingParams(max_new_tokens=NEW + 2, ignore_eos=True)
        first = core.submit(GenerateRequest(prompt_ids=jobs[0][1], params=params))
        next(iter(first))  # the shared prompt's blocks are cached before the others arrive
        streams = [first] + [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=params)) for a, p in jobs[1:]]
        results = [s.result(120) for s in streams]
        snap = core.loop.snapshot
    assert snap.preemptions > 0 and snap.prefix_cache_hits > 0
    for (adapter, prompt), res in zip(jobs, results):
        assert res.error is None, (adapter, res.error)
        assert res.token_ids == reference(ckpt, paths.get(adapter), prompt, new=NEW + 2)[0], adapter or "base"
