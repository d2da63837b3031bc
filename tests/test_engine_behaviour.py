"""Engine behaviour beyond fidelity: errors stay with their request, cancellation,
queue limits, cache eviction, sampling per request, stop strings, chat input."""
from __future__ import annotations

import threading

import pytest
import torch
from safetensors.torch import load_file, save_file

from hotswap.server.config import AdapterCacheConfig, EngineConfig, ModelConfig
from hotswap.server.engine.request import FinishReason, GenerateRequest, SamplingParams
from hotswap.server.errors import InvalidArgument, NotFound, ResourceExhausted
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapters
from test_engine_fidelity import reference

PROMPTS = [[5, 17, 33, 41], [7, 8, 9, 10, 11, 12, 13], [100, 200], [300, 301, 302, 303, 304, 305]]
GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="module")
def adapter_paths(llama, tmp_path_factory):
    kinds = {"lora-a": "lora", "lora-b": "rslora", "lora-c": "lora_mlp", "prefix": "prefix", "prompt": "prompt_random"}
    return save_adapters(llama, kinds, tmp_path_factory.mktemp("behaviour-adapters"))


def make_core(llama, adapter_paths=None, **engine_kw) -> ServingCore:
    loaded = load_base_model(ModelConfig(source=str(llama), dtype="float32", device="cpu"))
    cfg = dict(max_batch_size=8, max_tokens_per_step=128, max_seq_len=128)
    cfg.update(engine_kw.pop("engine", {}))
    core = ServingCore(loaded, EngineConfig(**cfg), engine_kw.pop("cache", None))
    for name, path in (adapter_paths or {}).items():
        core.register_adapter(name, path)
    return core


def corrupt_copy(src, dst, value: float):
    """A PEFT adapter whose LoRA B weights are `value` (e.g. 1e30 overflows to inf in the forward)."""
    dst.mkdir()
    (dst / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    tensors = {k: (torch.full_like(v, value) if "lora_B" in k else v) for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def test_non_finite_row_fails_alone(llama, adapter_paths, tmp_path):
    bad = corrupt_copy(adapter_paths["lora-a"], tmp_path / "overflow", 1e30)
    with make_core(llama, adapter_paths) as core:
        core.register_adapter("overflow", bad)
        jobs = [("lora-b", PROMPTS[0]), ("overflow", PROMPTS[1]), ("", PROMPTS[2])]
        results = [s.result(60) for s in [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=GREEDY)) for a, p in jobs]]
    assert results[1].finish_reason == FinishReason.ERROR and "non-finite" in str(results[1].error)
    for (a, p), r in zip([jobs[0], jobs[2]], [results[0], results[2]]):
        assert r.error is None and r.token_ids == reference(llama, adapter_paths.get(a), p)[0]


def test_exception_in_one_rows_adapter_fails_only_that_row(llama, adapter_paths):
    with make_core(llama, adapter_paths) as core:
        broken = core.adapters.load(core.resolve("lora-c"), pin=True)
        name, module = next(iter(broken.weights.modules.items()))
        module.a = module.a[:, :-1]  # a shape the matmul rejects, as a corrupted device copy would
        jobs = [("lora-a", PROMPTS[0]), ("lora-c", PROMPTS[1]), ("prefix", PROMPTS[2]), ("", PROMPTS[3])]
        results = [s.result(60) for s in [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=GREEDY)) for a, p in jobs]]
    # Caught when its weights go into a LoRA slot, before any forward could mix it into other rows' tokens.
    assert results[1].finish_reason == FinishReason.ERROR and "LoRA weights" in str(results[1].error)
    for (a, p), r in zip(jobs[::2] + jobs[3:], [results[0], results[2], results[3]]):
        assert r.error is None and r.token_ids == reference(llama, adapter_paths.get(a), p)[0], a


def test_adapter_that_fails_to_load_ends_its_requests_only(llama, adapter_paths, tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    for f in adapter_paths["lora-a"].iterdir():
        (gone / f.name).write_bytes(f.read_bytes())
    with make_core(llama, adapter_paths) as core:
        core.register_adapter("gone", gone)
        (core.registry.path("gone") / "adapter_model.safetensors").unlink()
        s_bad = core.submit(GenerateRequest(prompt_ids=PROMPTS[0], adapter_id="gone", params=GREEDY))
        s_ok = core.submit(GenerateRequest(prompt_ids=PROMPTS[1], params=GREEDY))
        bad, ok = s_bad.result(60), s_ok.result(60)
    assert bad.finish_reason == FinishReason.ERROR and bad.error is not None
    assert ok.error is None and ok.token_ids == reference(llama, None, PROMPTS[1])[0]


def test_unknown_adapter_and_bad_requests_are_refused_at_submit(llama):
    with make_core(llama) as core:
        with pytest.raises(NotFound, match="nope"):
            core.submit(GenerateRequest(prompt_ids=[1, 2], adapter_id="nope"))
        with pytest.raises(InvalidArgument) as e:
            core.submit(GenerateRequest(prompt_ids=list(range(3, 130)), params=SamplingParams(max_new_tokens=8)))
        assert e.value.field == "max_new_tokens" and "at most 1 new tokens" in str(e.value)  # the prompt fits; the ask does not
        with pytest.raises(InvalidArgument) as e:
            core.submit(GenerateRequest(prompt_ids=list(range(3, 131)), params=SamplingParams(max_new_tokens=1)))
        assert e.value.field == "prompt_ids" and "max_seq_len" in str(e.value)
        with pytest.raises(InvalidArgument) as e:  # refused by its size, before the tokenizer sees it
            core.submit(GenerateRequest(prompt="x" * (128 * 32 + 1)))
        assert e.value.field == "prompt" and "characters" in str(e.value)
        with pytest.raises(InvalidArgument) as e:
            core.submit(GenerateRequest(prompt_ids=[1, 10_000]))
        assert e.value.field == "prompt_ids"
        with pytest.raises(InvalidArgument) as e:
            SamplingParams(top_p=0)
        assert e.value.field == "top_p"


def test_queue_full_is_resource_exhausted(llama):
    with make_core(llama, engine=dict(max_batch_size=1, max_queue=2)) as core:
        long = SamplingParams(max_new_tokens=60, ignore_eos=True)
        streams = [core.submit(GenerateRequest(prompt_ids=[3, 4], params=long)) for _ in range(2)]
        with pytest.raises(ResourceExhausted, match="queue is full"):
            for _ in range(3):
                streams.append(core.submit(GenerateRequest(prompt_ids=[3, 4], params=long)))
        for s in streams:
            assert s.result(60).error is None


def test_cancel_mid_stream_frees_the_row_and_others_still_match(llama, adapter_paths):
    with make_core(llama, adapter_paths) as core:
        victim = core.submit(GenerateRequest(prompt_ids=PROMPTS[0], adapter_id="lora-a",
                                             params=SamplingParams(max_new_tokens=100, ignore_eos=True)))
        other = core.submit(GenerateRequest(prompt_ids=PROMPTS[1], adapter_id="prefix", params=GREEDY))
        seen = 0
        for event in victim:
            seen += len(event.token_ids)
            if seen == 3:
                core.cancel(victim)
        res = victim.result()
        assert res.finish_reason == FinishReason.CANCELLED and 3 <= len(res.token_ids) < 100
        assert other.result(60).token_ids == reference(llama, adapter_paths["prefix"], PROMPTS[1])[0]
        assert len(core.engine.scheduler.running) == 0


def test_evicted_adapters_reload_and_still_match(llama, adapter_paths):
    names = ["lora-a", "lora-c", "prefix", "prompt", "lora-a", "lora-c", "prefix"]
    one = max(adapter_paths[n].joinpath("adapter_model.safetensors").stat().st_size for n in names)
    cache = AdapterCacheConfig(device_bytes=int(one * 1.2), host_bytes=int(one * 1.5))  # one LoRA at a time
    with make_core(llama, adapter_paths, cache=cache) as core:
        outs = [core.generate(GenerateRequest(prompt_ids=PROMPTS[i % 4], adapter_id=n, params=GREEDY), 60) for i, n in enumerate(names)]
        stats = core.adapters.stats()
    assert stats.evictions >= 3
    for i, (n, r) in enumerate(zip(names, outs)):
        assert r.error is None and r.token_ids == reference(llama, adapter_paths[n], PROMPTS[i % 4])[0], n


def test_a_combination_the_device_budget_cannot_hold_at_once_is_refused_not_left_waiting(llama, adapter_paths):
    """Each part fits the device tier alone but not both together: loading one evicted the other, every
    step, and the request waited forever. It fails naming the budget; a row beside it is unaffected."""
    sizes = [adapter_paths[n].joinpath("adapter_model.safetensors").stat().st_size for n in ("lora-a", "lora-c")]
    cache = AdapterCacheConfig(device_bytes=int(max(sizes) * 1.2), host_bytes=10 * sum(sizes))
    with make_core(llama, adapter_paths, cache=cache) as core:
        combo = core.submit(GenerateRequest(prompt_ids=PROMPTS[0], adapters=[("lora-a", 0.5), ("lora-c", 0.5)], params=GREEDY))
        other = core.submit(GenerateRequest(prompt_ids=PROMPTS[1], adapter_id="lora-a", params=GREEDY))
        res = combo.result(30)
        assert res.finish_reason == FinishReason.ERROR and isinstance(res.error, ResourceExhausted), res.error
        assert res.error.field == "device_bytes" and "at once" in str(res.error)
        assert other.result(30).token_ids == reference(llama, adapter_paths["lora-a"], PROMPTS[1])[0]


def test_seeded_sampling_is_the_same_alone_and_in_a_crowd(llama, adapter_paths):
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=1234)
    with make_core(llama, adapter_paths) as core:
        alone = core.generate(GenerateRequest(prompt_ids=PROMPTS[0], adapter_id="lora-a", params=params), 60)
        crowd = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=SamplingParams(max_new_tokens=12, temperature=1.0, seed=i)))
                 for i, (a, p) in enumerate([("prefix", PROMPTS[1]), ("", PROMPTS[2])])]
        again = core.submit(GenerateRequest(prompt_ids=PROMPTS[0], adapter_id="lora-a", params=params))
        crowd.append(core.submit(GenerateRequest(prompt_ids=PROMPTS[3], params=SamplingParams(max_new_tokens=12, temperature=1.0))))
        assert again.result(60).token_ids == alone.token_ids
        other_seed = core.generate(GenerateRequest(prompt_ids=PROMPTS[0], adapter_id="lora-a",
                                                   params=SamplingParams(**{**params.__dict__, "seed": 99})), 60)
        assert other_seed.token_ids != alone.token_ids
        for s in crowd:
            s.result(60)


def test_stop_string_and_eos_and_chat_messages(llama):
    with make_core(llama) as core:
        tok = core.loaded.tokenizer
        free = core.generate(GenerateRequest(prompt="Who are you?", params=SamplingParams(max_new_tokens=16, ignore_eos=True)), 60)
        assert free.finish_reason == FinishReason.LENGTH and len(free.token_ids) == 16
        full = tok.decode(free.token_ids, skip_special_tokens=True)
        assert free.text == full
        # A two-character stop string from the second half of the text: cut before it, finish "stop".
        at = next(i for i in range(len(full) // 2, len(full) - 1) if len(full[i: i + 2].strip()) == 2)
        stop = full[at: at + 2]
        cut = core.generate(GenerateRequest(prompt="Who are you?", params=SamplingParams(max_new_tokens=16, stop=[stop, "never-seen"])), 60)
        assert cut.finish_reason == FinishReason.STOP and cut.text == full[: full.index(stop)]
        # EOS ends the request with the EOS token as its last token.
        eos = free.token_ids[5]
        core.engine.eos_ids = {eos}
        ended = core.generate(GenerateRequest(prompt="Who are you?", params=SamplingParams(max_new_tokens=16)), 60)
        assert ended.finish_reason == FinishReason.EOS
        assert ended.token_ids == free.token_ids[: free.token_ids.index(eos) + 1]
        # Chat messages are rendered with the model's chat template.
        msgs = [{"role": "user", "content": "Who are you?"}]
        chat = core.generate(GenerateRequest(messages=msgs, params=GREEDY), 60)
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert chat.prompt_tokens == len(ids)
        same = core.generate(GenerateRequest(prompt_ids=ids, params=GREEDY), 60)
        assert chat.token_ids == same.token_ids


def test_cold_adapter_load_does_not_stall_decoding_rows(llama, adapter_paths):
    with make_core(llama, adapter_paths) as core:
        gate, started = threading.Event(), threading.Event()
        real_read = core.adapters.prefetch_fn

        def slow_disk(adapter_id):  # the load's reading of the files, held back as a slow disk would
            started.set()
            gate.wait(60)
            return real_read(adapter_id)

        core.adapters.prefetch_fn = slow_disk
        running = core.submit(GenerateRequest(prompt_ids=PROMPTS[0], params=SamplingParams(max_new_tokens=30, ignore_eos=True)))
        next(iter(running))
        cold = core.submit(GenerateRequest(prompt_ids=PROMPTS[1], adapter_id="lora-b", params=GREEDY))
        assert started.wait(10)
        # While the adapter is still "on disk", the running row decodes to the end.
        done = running.result(60)
        assert done.error is None and len(done.token_ids) == 30
        assert not cold._history  # the cold request has not produced anything yet
        gate.set()
        res = cold.result(60)
    assert res.error is None and res.token_ids == reference(llama, adapter_paths["lora-b"], PROMPTS[1])[0]


def test_out_of_memory_ends_only_the_row_that_does_not_fit(llama):
    """A CUDA OOM cannot happen on this CPU, so the forward raises torch's own
    OutOfMemoryError whenever a batch holds the oversized prompt: the batch is retried
    row by row, the other rows finish, and that row ends with RESOURCE_EXHAUSTED."""
    big = [7] * 40
    with make_core(llama) as core:
        def oom(module, args, kwargs):
            if kwargs["inputs_embeds"].shape[1] >= len(big):  # a forward holding the big prompt
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        handle = core.engine.runner.decoder.register_forward_pre_hook(oom, with_kwargs=True)
        try:
            streams = [core.submit(GenerateRequest(prompt_ids=p, params=GREEDY)) for p in (PROMPTS[0], big, PROMPTS[1])]
            results = [s.result(60) for s in streams]
        finally:
            handle.remove()
    assert results[1].finish_reason == FinishReason.ERROR and isinstance(results[1].error, ResourceExhausted)
    assert "out of device memory" in str(results[1].error)
    for p, r in zip((PROMPTS[0], PROMPTS[1]), (results[0], results[2])):
        assert r.error is None and r.token_ids == reference(llama, None, p)[0]


def test_engines_built_one_after_another_on_one_loaded_model_serve_alike(tiny_checkpoints):
    """The first engine leaves its paged attention selected on the model; the next one still probes
    against the model's own attention (it failed with a KeyError), and answers the same."""
    loaded = load_base_model(ModelConfig(source=str(tiny_checkpoints["llama"]), dtype="float32", device="cpu"))
    answers = []
    for _ in range(2):
        with ServingCore(loaded, EngineConfig(max_batch_size=4, max_seq_len=64)) as core:
            assert core.engine.runner.layout.paged
            answers.append(core.generate(GenerateRequest(prompt_ids=[5, 6, 7, 8], params=SamplingParams(max_new_tokens=6)), timeout=60))
    assert answers[0].error is None and answers[0].token_ids == answers[1].token_ids
    assert answers[0].token_ids == reference(tiny_checkpoints["llama"], None, [5, 6, 7, 8], new=6)[0]
