"""Prefill-only rows: classification (SEQ_CLS adapters' score heads) and scoring (continuation
log-likelihoods) served in the same batch as generating rows, with chunked prefill and the
prefix cache on, against PEFT running each adapter alone in fp32."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hotswap.server.config import EngineConfig, ModelConfig
from hotswap.server.engine.request import FinishReason, GenerateRequest, SamplingParams, Task
from hotswap.server.errors import AdapterIncompatible, InvalidArgument
from hotswap.server.model.loader import load_base_model
from hotswap.server.serving import ServingCore
from peft_fixtures import save_adapter, save_cls_adapter
from test_engine_fidelity import reference

CLS_KINDS = ["lora", "prompt_random", "ptuning", "prefix"]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
NEW = 6


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 400, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, tiny_checkpoints, tmp_path_factory):
    ckpt = tiny_checkpoints[request.param]  # qwen2: tied embeddings, a head with no bias on a model with qkv biases
    root = tmp_path_factory.mktemp(f"readout-adapters-{request.param}")
    cls = {k: save_cls_adapter(ckpt, k, root / f"cls-{k}", seed=i, id2label=LABELS if k == "lora" else None)
           for i, k in enumerate(CLS_KINDS)}
    causal = {k: save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), k, root / k, seed=7 + i)
              for i, k in enumerate(("lora", "prompt_random", "prefix"))}
    return ckpt, cls, causal


def classify_reference(ckpt, path, prompt: list[int], num_labels: int = 3) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(ckpt, dtype=torch.float32, num_labels=num_labels)
    peft = PeftModel.from_pretrained(model, path).eval()
    with torch.inference_mode():
        x = torch.tensor([prompt])
        return peft(input_ids=x, attention_mask=torch.ones_like(x)).logits[0]  # [num_labels]


def score_reference(ckpt, path, prompt: list[int], cont: list[int]) -> tuple[torch.Tensor, bool]:
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    if path is not None:
        model = PeftModel.from_pretrained(model, path).eval()
    with torch.inference_mode():
        # from the end: a prompt-tuning PeftModel's logits also cover its virtual tokens
        logits = model(input_ids=torch.tensor([prompt + cont])).logits[0, -len(cont) - 1: -1]  # [len(cont), vocab]
    lp = torch.log_softmax(logits.float(), -1)
    return lp[torch.arange(len(cont)), torch.tensor(cont)], bool((lp.argmax(-1) == torch.tensor(cont)).all())


def test_classify_and_score_rows_in_a_generating_batch_match_peft(setup):
    ckpt, cls, causal = setup
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    # a small step budget and block size: prompts are chunked over steps and share cached blocks
    cfg = EngineConfig(max_batch_size=16, max_tokens_per_step=24, max_seq_len=128, block_size=4)
    gen_jobs = [("", ids(9, 1)), ("lora", ids(5, 2))]
    pad = loaded.tokenizer.pad_token_id
    cls_jobs = [(k, ids(n, 10 + i)) for i, k in enumerate(CLS_KINDS) for n in (7, 37)]
    cls_jobs.append(("lora", ids(11, 30) + [pad, pad]))  # transformers pools the last non-pad token
    prompt = ids(13, 40)
    candidates = [ids(1, 41), ids(6, 42), ids(30, 43)]
    score_jobs = [(a, prompt, c) for a in ("", *causal) for c in candidates]
    with ServingCore(loaded, cfg) as core:
        for k, path in causal.items():
            core.register_adapter(k, path)
        for k, path in cls.items():
            core.register_adapter(f"cls-{k}", path)
        gen = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, params=SamplingParams(max_new_tokens=NEW, ignore_eos=True)))
               for a, p in gen_jobs]
        next(iter(gen[0]))  # the batch is decoding when the prefill-only rows land
        rows = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=f"cls-{k}", task=Task.CLASSIFY)) for k, p in cls_jobs]
        rows += [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, task=Task.SCORE, continuation=c)) for a, p, c in score_jobs]
        results = [s.result(timeout=120) for s in rows]
        # the same candidates again: their prompt blocks now come from the prefix cache
        again = [core.submit(GenerateRequest(prompt_ids=p, adapter_id=a, task=Task.SCORE, continuation=c)).result(timeout=120)
                 for a, p, c in score_jobs]
        hits = core.engine.kv.stats.hits
        gen_results = [s.result(timeout=120) for s in gen]

    for (a, p), r in zip(gen_jobs, gen_results):
        assert r.error is None and r.token_ids == reference(ckpt, causal.get(a), p, NEW)[0], a
    for (k, p), r in zip(cls_jobs, results):
        assert r.error is None, (k, r.error)
        want = classify_reference(ckpt, cls[k], p)
        got = torch.tensor(r.readout.logits)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=k)
        assert int(got.argmax()) == int(want.argmax())
        assert r.readout.labels == (list(LABELS.values()) if k == "lora" else ["LABEL_0", "LABEL_1", "LABEL_2"])
        torch.testing.assert_close(torch.tensor(r.readout.probabilities, dtype=torch.float64), torch.softmax(want.double(), 0), atol=1e-5, rtol=1e-5)
        assert r.finish_reason == FinishReason.LENGTH and r.token_ids == []
    assert hits > 0
    for (a, p, c), r, r2 in zip(score_jobs, results[len(cls_jobs):], again):
        want, greedy = score_reference(ckpt, causal.get(a), p, c)
        for res in (r, r2):
            assert res.error is None, res.error
            assert res.readout.token_ids == c
            torch.testing.assert_close(torch.tensor(res.readout.logprobs), want, atol=2e-4, rtol=1e-4)
            assert res.readout.greedy == greedy
            assert res.readout.total == pytest.approx(float(want.sum()), abs=1e-3)


def test_tasks_refuse_the_wrong_adapter_without_harming_the_batch(setup):
    ckpt, cls, causal = setup
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    with ServingCore(loaded, EngineConfig(max_batch_size=4, max_seq_len=128)) as core:
        core.register_adapter("lora", causal["lora"])
        core.register_adapter("cls", cls["lora"])
        with pytest.raises(InvalidArgument) as e:
            core.submit(GenerateRequest(prompt_ids=[5, 6], task=Task.CLASSIFY))
        assert e.value.field == "adapter_id"
        with pytest.raises(InvalidArgument) as e:
            core.submit(GenerateRequest(prompt_ids=[5, 6], task=Task.SCORE, continuation=[]))
        assert e.value.field == "continuation"
        with pytest.raises(InvalidArgument) as e:
            core.submit(GenerateRequest(prompt_ids=[5] * 100, task=Task.SCORE, continuation=[6] * 30))
        assert e.value.field == "continuation"
        ok = core.submit(GenerateRequest(prompt_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=4, ignore_eos=True)))
        wrong = [core.submit(GenerateRequest(prompt_ids=[5, 6], adapter_id="lora", task=Task.CLASSIFY)),
                 core.submit(GenerateRequest(prompt_ids=[5, 6], adapter_id="cls", task=Task.SCORE, continuation=[7])),
                 core.submit(GenerateRequest(prompt_ids=[5, 6], adapter_id="cls"))]
        for s in wrong:
            r = s.result(timeout=60)
            assert isinstance(r.error, AdapterIncompatible) and r.error.field == "adapter_id", r.error
        assert ok.result(timeout=60).error is None and len(ok.result().token_ids) == 4


def test_seq_cls_adapters_are_checked_at_registration(setup, tmp_path):
    """A head that is missing or misshapen, or label names that do not name the head, are refused naming the field."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from hotswap.server.errors import HotswapError

    ckpt, cls, _ = setup

    def variant(name: str, tensors=None, labels=None):
        out = tmp_path / name
        shutil.copytree(cls["prefix"], out)
        if tensors is not None:
            save_file(tensors(load_file(out / "adapter_model.safetensors")), out / "adapter_model.safetensors")
        if labels is not None:
            (out / "config.json").write_text(json.dumps({"id2label": labels}))
        return out

    cases = [
        (variant("no-head", tensors=lambda t: {k: v for k, v in t.items() if "score" not in k}), "modules_to_save"),
        (variant("wide-head", tensors=lambda t: {**t, "base_model.score.weight": torch.zeros(3, 65)}), "hidden_size"),
        (variant("two-labels", labels={"0": "a", "1": "b"}), "id2label"),
        (variant("bad-labels", labels={"0": "a", "x": "b", "2": "c"}), "id2label"),
    ]
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    with ServingCore(loaded, EngineConfig(max_batch_size=2, max_seq_len=64)) as core:
        for path, field in cases:
            with pytest.raises(HotswapError) as e:
                core.register_adapter("bad", path)
            assert e.value.field == field, (path.name, e.value)
        placeholder = variant("placeholder", labels={"0": "LABEL_0", "1": "LABEL_1"})  # a base model's config.json
        core.register_adapter("ok", placeholder)
        r = core.submit(GenerateRequest(prompt_ids=[5, 6, 7], adapter_id="ok", task=Task.CLASSIFY)).result(timeout=60)
        assert r.error is None and r.readout.labels == ["LABEL_0", "LABEL_1", "LABEL_2"]


def test_a_preempted_score_row_recomputes_to_the_same_answer(setup):
    """A pool of 7 KV blocks (4 positions each), a generating row growing to 6 of them and a scoring row
    of 5 whose prompt moves at most 3 positions a step beside it: the pool runs dry while the scoring row
    is part-way through, so it (the newer) is preempted and recomputed later."""
    ckpt, _, causal = setup
    loaded = load_base_model(ModelConfig(source=str(ckpt), dtype="float32", device="cpu"))
    text = loaded.model.config
    head_dim = text.hidden_size // text.num_attention_heads
    per_block = 2 * text.num_hidden_layers * 4 * text.num_key_value_heads * head_dim * 4  # K and V, fp32, 4 positions
    cfg = EngineConfig(max_batch_size=2, max_tokens_per_step=4, max_seq_len=64, block_size=4, kv_cache_bytes=7 * per_block)
    prompt, cont = ids(4, 50), ids(16, 51)
    with ServingCore(loaded, cfg) as core:
        assert core.engine.kv.num_blocks == 7
        core.register_adapter("lora", causal["lora"])
        gen = core.submit(GenerateRequest(prompt_ids=ids(4, 52), params=SamplingParams(max_new_tokens=20, ignore_eos=True)))
        r = core.submit(GenerateRequest(prompt_ids=prompt, adapter_id="lora", task=Task.SCORE, continuation=cont)).result(timeout=60)
        assert gen.result(timeout=60).error is None
        assert core.engine.scheduler.num_preemptions >= 1
    want, greedy = score_reference(ckpt, causal["lora"], prompt, cont)
    assert r.error is None, r.error
    torch.testing.assert_close(torch.tensor(r.readout.logprobs), want, atol=2e-4, rtol=1e-4)
    assert r.readout.greedy == greedy


def test_candidates_of_one_score_call_share_the_prompt_through_the_prefix_cache():
    """Scheduler only: candidate rows arriving together read the prompt's full blocks the first computes
    in the same step (each layer writes them before its queries attend) and start after them, not from
    position 0."""
    from hotswap.server.engine.detokenize import IncrementalDetokenizer, StopMatcher
    from hotswap.server.engine.kv_blocks import KVBlockManager
    from hotswap.server.engine.row import Row
    from hotswap.server.engine.scheduler import Scheduler

    s = Scheduler(EngineConfig(max_batch_size=8, max_tokens_per_step=64, block_size=4, max_decode_slowdown=0), KVBlockManager(64, 4), 256)
    prompt = list(range(1, 14))  # 13 tokens: 3 full blocks of 4
    rows = []
    for cont in ([20, 21], [30], [40, 41, 42]):
        ids = prompt + cont
        r = Row(GenerateRequest(prompt_ids=prompt, task=Task.SCORE, continuation=cont), ids, lambda e: None,
                IncrementalDetokenizer(None, ids), StopMatcher([]), score_from=len(prompt))
        rows.append(r)
        s.add(r)
    out = s.schedule()
    assert [(x.row, x.start) for x in out.scheduled] == [(rows[0], 0), (rows[1], 12), (rows[2], 12)]
    assert [x.leaders for x in out.scheduled] == [(), (rows[0],), (rows[0],)]
    assert rows[1].block_ids[:3] == rows[2].block_ids[:3] == rows[0].block_ids[:3]
    assert s.kv.stats.hits == 24
