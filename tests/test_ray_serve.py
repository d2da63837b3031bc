"""Ray Serve across replicas: a local Ray cluster, two CPU replicas of the hotswap core,
Ray's gRPC proxy speaking hotswap.v1, and @serve.multiplexed on the adapter id."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from hotswap.server.adapters.load import load_adapter
from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.v1 import inference_pb2, inference_pb2_grpc
from peft_fixtures import save_adapter, save_cls_adapter
from ports import free_port
from test_engine_fidelity import reference
from test_engine_readout import classify_reference, score_reference

ADAPTERS = [f"a{i}" for i in range(5)]
PER_REPLICA = 2
NEW = 5


@pytest.fixture(scope="module")
def cluster(tiny_checkpoints, tmp_path_factory):
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from hotswap.server.ray_serve import GRPC_SERVICERS, build_app

    data = tmp_path_factory.mktemp("ray-data")
    adapters = tmp_path_factory.mktemp("ray-adapters")
    ckpt = tiny_checkpoints["llama"]
    base = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    reg = AdapterRegistry(data / "registry.sqlite", data / "adapters")
    paths = {}
    for i, name in enumerate(ADAPTERS):
        paths[name] = save_adapter(AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32), "lora", adapters / name, seed=i)
        reg.register(name, str(paths[name]), lambda p: load_adapter(p, p.name, base, 64), "fp")
    paths["cls"] = save_cls_adapter(ckpt, "lora", adapters / "cls", seed=7, num_labels=2, id2label={0: "no", 1: "yes"})
    reg.register("cls", str(paths["cls"]), lambda p: load_adapter(p, p.name, base, 64), "fp")

    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=GRPC_SERVICERS), http_options={"port": free_port()})
    options = {"model": str(ckpt), "device": "cpu", "dtype": "float32", "data_dir": str(data), "tuner_workers": 0,
               "max_seq_len": 256, "max_batch_size": 8}
    handle = serve.run(build_app(options, num_replicas=2, adapters_per_replica=PER_REPLICA), name="hotswap")
    try:
        yield {"handle": handle, "target": f"127.0.0.1:{port}", "paths": paths, "ckpt": ckpt}
    finally:
        serve.shutdown()
        ray.shutdown()


def grpc_generate(target: str, adapter: str, prompt: str, timeout: float = 120) -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(target) as ch:
        req = inference_pb2.GenerateRequest(prompt=prompt, adapter_id=adapter,
                                            sampling=inference_pb2.SamplingParameters(max_new_tokens=NEW, ignore_eos=True))
        return inference_pb2_grpc.InferenceServiceStub(ch).Generate(
            req, metadata=[("application", "hotswap"), ("multiplexed_model_id", adapter)], timeout=timeout)


def test_our_proto_through_rays_grpc_proxy_matches_peft(cluster, tiny_checkpoints):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(cluster["ckpt"])("hello world")["input_ids"]
    r = grpc_generate(cluster["target"], "a1", "hello world")
    assert r.adapter_id == "a1@1" and r.finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert list(r.token_ids) == reference(cluster["ckpt"], cluster["paths"]["a1"], ids, NEW)[0]
    with pytest.raises(grpc.RpcError) as e:
        grpc_generate(cluster["target"], "absent", "hello")
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "absent" in e.value.details()


def test_classify_and_score_through_rays_grpc_proxy_match_peft(cluster):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cluster["ckpt"])
    text, prompt, candidates = "the quick brown fox", "once upon a", [" time", " lazy dog"]
    with grpc.insecure_channel(cluster["target"]) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        r = stub.Classify(inference_pb2.ClassifyRequest(text=text), timeout=120,
                          metadata=[("application", "hotswap"), ("multiplexed_model_id", "cls")])
        want = classify_reference(cluster["ckpt"], cluster["paths"]["cls"], tok(text)["input_ids"], num_labels=2)
        assert list(r.labels) == ["no", "yes"] and r.adapter_id == "cls@1" and r.label == r.labels[int(want.argmax())]
        torch.testing.assert_close(torch.tensor(list(r.logits)), want, atol=1e-4, rtol=1e-4)
        s = stub.Score(inference_pb2.ScoreRequest(prompt=prompt, candidates=candidates, adapter_id="a2"), timeout=120,
                       metadata=[("application", "hotswap"), ("multiplexed_model_id", "a2")])
        assert s.adapter_id == "a2@1" and ["".join(c.tokens) for c in s.candidates] == candidates
        for c in s.candidates:
            lp, greedy = score_reference(cluster["ckpt"], cluster["paths"]["a2"], tok(prompt)["input_ids"], list(c.token_ids))
            torch.testing.assert_close(torch.tensor(list(c.token_logprobs)), lp, atol=2e-4, rtol=1e-4)
        with pytest.raises(grpc.RpcError) as e:  # a causal adapter has no classification head: the same status as the server
            stub.Classify(inference_pb2.ClassifyRequest(text=text, adapter_id="a2"), timeout=120,
                          metadata=[("application", "hotswap"), ("multiplexed_model_id", "a2")])
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "adapter_id" in e.value.details()


def test_requests_for_an_adapter_stick_to_a_replica_whose_cache_stays_bounded(cluster):
    handle = cluster["handle"]

    def where(name: str) -> dict:
        return handle.options(multiplexed_model_id=name).replica.remote(name).result(timeout_s=120)

    # Two adapters fit a replica; once each has loaded somewhere (and the replicas have
    # reported it to the router) every request for it goes to that replica.
    for name in ADAPTERS[:2]:
        where(name)
    time.sleep(3)
    seen = {name: {where(name)["replica"] for _ in range(6)} for name in ADAPTERS[:2]}
    assert all(len(replicas) == 1 for replicas in seen.values()), seen

    # More adapters than the replicas hold: each replica's multiplexer keeps at most
    # PER_REPLICA and drops the rest from its device cache.
    for name in ADAPTERS * 2:
        info = where(name)
        assert info["max_adapters"] == PER_REPLICA and len(info["device_adapters"]) <= PER_REPLICA, info


def test_killing_a_replica_mid_load_loses_no_retryable_request(cluster):
    import ray
    from ray import serve

    target = cluster["target"]
    jobs = [(ADAPTERS[i % len(ADAPTERS)], f"request {i}") for i in range(12)]
    results: dict[int, inference_pb2.GenerateResponse] = {}
    retried = []

    def run(i: int) -> None:
        adapter, prompt = jobs[i]
        for attempt in range(6):
            try:
                results[i] = grpc_generate(target, adapter, prompt, timeout=60)
                return
            except grpc.RpcError as e:  # the replica died under it: retry, as a client with retries would
                retried.append((i, e.code()))
                time.sleep(1 + attempt)

    status = serve.status().applications["hotswap"].deployments["HotswapReplica"]
    assert status.replica_states.get("RUNNING") == 2
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True) if "HotswapReplica" in a["name"]]
    victim = ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"])
    with ThreadPoolExecutor(len(jobs)) as ex:
        futures = [ex.submit(run, i) for i in range(len(jobs))]
        time.sleep(0.3)  # requests are in flight, adapters loading
        ray.kill(victim, no_restart=False)
        for f in futures:
            f.result()
    assert sorted(results) == list(range(len(jobs)))
    assert all(r.generated_tokens == NEW and r.adapter_id == f"{jobs[i][0]}@1" for i, r in results.items())
    deadline = time.monotonic() + 120  # Serve replaces the replica
    while serve.status().applications["hotswap"].deployments["HotswapReplica"].replica_states.get("RUNNING") != 2:
        assert time.monotonic() < deadline
        time.sleep(1)
