"""The server's life: NOT_SERVING while the model loads, SERVING after, SIGTERM drains
without losing an accepted request, and registered adapters survive a restart.
Also TLS (mutual), bearer tokens and a full queue. Real processes, real sockets."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from transformers import AutoModelForCausalLM

from hotswap.client import Client, ResourceExhausted, Unauthenticated, Unavailable
from hotswap.v1 import inference_pb2, inference_pb2_grpc
from peft_fixtures import save_adapter
from server_process import ServerProcess
from test_openai_api import free_port


@pytest.fixture(scope="module")
def lora(tiny_checkpoints, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"], dtype=torch.float32)
    return save_adapter(model, "lora", tmp_path_factory.mktemp("lifecycle") / "lora")


def health_status(target: str, credentials=None, metadata=None) -> int:
    ch = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    with ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10, metadata=metadata).status


def test_starting_serving_draining_and_restart(tiny_checkpoints, lora, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    # Hold the registry database locked: the server binds its port, then waits on the
    # lock while loading, which pins it in the "starting" state for as long as we like.
    lock = sqlite3.connect(data / "registry.sqlite", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    # a generous drain: the four streams must finish in full even on a loaded CI machine
    srv = ServerProcess(tiny_checkpoints["llama"], data, "--drain-notice-seconds", "3", "--drain-seconds", "300").start(wait_serving=False)
    try:
        assert health_status(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(srv.target) as ch:  # a raw stub: no SDK retries
            with pytest.raises(grpc.RpcError) as e:
                inference_pb2_grpc.InferenceServiceStub(ch).Generate(inference_pb2.GenerateRequest(prompt="hi"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "starting" in e.value.details()
        with Client(srv.target, timeout=30) as c, pytest.raises(Unavailable, match="starting"):
            c.generate("hi")  # the SDK retries UNAVAILABLE (grpc's retry policy: 5 attempts) before giving up
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/metrics", timeout=10).read().decode()
        assert 'hotswap_request_failures_total{code="UNAVAILABLE"} 6.0' in metrics  # 1 raw call + 5 SDK attempts
        lock.execute("ROLLBACK")
        lock.close()
        srv.wait_serving()
        assert health_status(srv.target) == health_pb2.HealthCheckResponse.SERVING

        with Client(srv.target) as c:
            assert c.register_adapter("keep", str(lora)).id == "keep@1"
            before = c.generate("hello world", adapter="keep", max_new_tokens=8, ignore_eos=True)

            # Streams in flight when SIGTERM arrives all finish in full.
            n_tokens, results, started = 1500, {}, threading.Barrier(5)

            def consume(i: int) -> None:
                chunks = c.stream(f"stream {i}", adapter="keep" if i % 2 else "", max_new_tokens=n_tokens, ignore_eos=True)
                first = next(chunks)
                started.wait(60)
                results[i] = [first, *chunks]

            seen, watching = [], threading.Event()  # what a health watcher (a load balancer) is told, in order

            def watch() -> None:
                with grpc.insecure_channel(srv.target) as ch:
                    try:
                        for r in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=300):
                            seen.append(r.status)
                            watching.set()
                    except grpc.RpcError as e:  # the server closes the stream when it exits
                        seen.append(e.code())
                    finally:
                        watching.set()

            threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)] + [threading.Thread(target=watch)]
            for t in threads:
                t.start()
            started.wait(60)
            assert watching.wait(60), "the health watch never got its first status"  # subscribed before SIGTERM
            srv.proc.send_signal(15)
            time.sleep(0.5)
            # the listener still answers for --drain-notice-seconds: probes hear NOT_SERVING, not a refused connection
            assert health_status(srv.target) == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(Unavailable):  # no new work once draining
                Client(srv.target, timeout=5).generate("late", max_new_tokens=2)
            for t in threads:
                t.join(120)
        assert srv.wait_exit(120) == 0
        assert "hotswap: stopped" in srv.log()
        assert seen[:2] == [health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING], seen
        # The server ended the watch once the streams were done; it did not hold its exit until the watch's deadline.
        assert len(seen) == 3 and seen[2] in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE), seen
        for i in range(4):
            last = results[i][-1]
            assert last.finish_reason == "length" and sum(len(ch.token_ids) for ch in results[i]) == n_tokens == last.generated_tokens
    finally:
        srv.stop()

    with ServerProcess(tiny_checkpoints["llama"], data) as again, Client(again.target) as c:
        assert c.get_adapter("keep").id == "keep@1"
        after = c.generate("hello world", adapter="keep", max_new_tokens=8, ignore_eos=True)
        assert after.token_ids == before.token_ids and after.adapter_id == "keep@1"


def make_certs(d: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, with openssl."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=hotswap test CA",
        "-keyout", "ca.key", "-out", "ca.pem")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.csr")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
            "-extfile", "san.ext", "-out", f"{name}.pem")
    return {n: d / n for n in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


def test_mutual_tls_token_auth_and_a_full_queue(tiny_checkpoints, tmp_path):
    certs = make_certs(tmp_path)
    extra = ["--tls-cert", str(certs["server.pem"]), "--tls-key", str(certs["server.key"]),
             "--tls-client-ca", str(certs["ca.pem"]), "--auth-token", "s3cret", "--max-batch-size", "1", "--max-queue", "1",
             "--http-port", str(free_port())]
    read = lambda k: certs[k].read_bytes()  # noqa: E731
    tls = dict(ca_cert=read("ca.pem"), client_cert=read("client.pem"), client_key=read("client.key"))
    with ServerProcess(tiny_checkpoints["llama"], tmp_path / "data", *extra) as srv:
        creds = grpc.ssl_channel_credentials(read("ca.pem"), read("client.key"), read("client.pem"))
        assert health_status(srv.target, creds) == health_pb2.HealthCheckResponse.SERVING  # probes need no token

        with Client(srv.target, token="s3cret", **tls) as c:
            assert c.generate("hi", max_new_tokens=3, ignore_eos=True).generated_tokens == 3
        # reflection (a bidirectional stream) needs the token like every other call
        with grpc.secure_channel(srv.target, creds) as ch:
            info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
            ask = lambda: iter([reflection_pb2.ServerReflectionRequest(list_services="")])  # noqa: E731
            with pytest.raises(grpc.RpcError) as e:
                list(info(ask(), timeout=10))
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            names = [s.name for r in info(ask(), timeout=10, metadata=[("authorization", "Bearer s3cret")])
                     for s in r.list_services_response.service]
            assert "hotswap.v1.InferenceService" in names
        for token in (None, "wrong"):
            with Client(srv.target, token=token, **tls) as c, pytest.raises(Unauthenticated, match="bearer token"):
                c.generate("hi", max_new_tokens=3)
        with Client(srv.target, token="s3cret", ca_cert=read("ca.pem"), timeout=5) as c, pytest.raises(Unavailable):
            c.generate("hi", max_new_tokens=3)  # no client certificate: the handshake fails
        with Client(srv.target, token="s3cret", timeout=5) as c, pytest.raises(Unavailable):
            c.generate("hi", max_new_tokens=3)  # plaintext to a TLS port
        # the OpenAI-compatible API: HTTPS with the same certificate, client CA and token
        https = ["curl", "-sS", "--cacert", str(certs["ca.pem"]), "-H", "Authorization: Bearer s3cret",
                 f"https://localhost:{srv.http_port}/v1/models"]
        mtls = subprocess.run(https + ["--cert", str(certs["client.pem"]), "--key", str(certs["client.key"])], capture_output=True, text=True)
        assert mtls.returncode == 0 and json.loads(mtls.stdout)["data"][0]["object"] == "model", mtls.stderr
        assert subprocess.run(https, capture_output=True).returncode != 0  # no client certificate: the handshake fails

        # One row, one queue slot: a running request and a waiting one fill the server.
        with Client(srv.target, token="s3cret", **tls) as c:
            running = c.stream("long", max_new_tokens=3000, ignore_eos=True)
            next(running)
            errors, done = [], []

            def extra_call() -> None:
                try:
                    done.append(c.generate("queued", max_new_tokens=2, ignore_eos=True, timeout=120))
                except ResourceExhausted as e:
                    errors.append(e)

            threads = [threading.Thread(target=extra_call) for _ in range(3)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 60
            while len(errors) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            running.close()  # frees the row: the queued request then runs
            for t in threads:
                t.join(120)
        assert len(errors) == 2 and all("queue is full" in e.details for e in errors)
        assert len(done) == 1 and done[0].generated_tokens == 2


def test_public_reflection_answers_without_a_token_and_nothing_else_does():
    """--public-reflection: tools may browse the API; every service still needs the token.
    The real interceptor, reflection and InferenceService on a loopback gRPC server (no model:
    an authenticated call gets as far as 'starting')."""
    import asyncio

    from grpc_reflection.v1alpha import reflection

    from hotswap.server.api.inference import InferenceService
    from hotswap.server.api.interceptors import ErrorInterceptor, TokenAuthInterceptor
    from hotswap.server.api.state import ServerState
    from hotswap.server.metrics import Metrics
    from hotswap.server.options import ServerOptions

    async def main() -> None:
        metrics = Metrics()
        server = grpc.aio.server(interceptors=[TokenAuthInterceptor("s3cret", metrics, public_reflection=True), ErrorInterceptor(metrics)])
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceService(ServerState(ServerOptions(), metrics)), server)
        reflection.enable_server_reflection(["hotswap.v1.InferenceService", reflection.SERVICE_NAME], server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                info = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo
                names = [s.name async for r in info(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
                         for s in r.list_services_response.service]
                assert "hotswap.v1.InferenceService" in names
                info_call = inference_pb2_grpc.InferenceServiceStub(ch).ModelInfo
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await info_call(inference_pb2.ModelInfoRequest(), timeout=10)
                assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await info_call(inference_pb2.ModelInfoRequest(), timeout=10, metadata=[("authorization", "Bearer s3cret")])
                assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # past auth: the model is "still loading"
        finally:
            await server.stop(None)

    asyncio.run(main())
