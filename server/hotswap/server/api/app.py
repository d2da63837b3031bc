"""The server process: gRPC (asyncio) + health + reflection + /metrics, and its lifecycle.

    start gRPC (health NOT_SERVING) → load and warm the model → SERVING
    SIGTERM/SIGINT → NOT_SERVING, refuse new calls, finish in-flight ones
    (up to --drain-seconds) → exit 0
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hotswap.tuner.jobs import JobStore
from hotswap.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc, tuner_pb2, tuner_pb2_grpc

from ..adapters.registry import AdapterRegistry
from ..cpu_threads import serial
from ..engine.request import GenerateRequest, SamplingParams
from ..metrics import Metrics
from ..model.sources import model_name
from ..options import ServerOptions, parse_options
from ..serving import ServingCore
from ..startup_heap import freeze_startup_objects
from .adapters import AdapterService
from .inference import InferenceService
from .interceptors import CallCounter, ErrorInterceptor, TokenAuthInterceptor
from .state import ServerState
from .tuner import TunerService

log = logging.getLogger("hotswap.server")

SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["AdapterService"].full_name,
    tuner_pb2.DESCRIPTOR.services_by_name["TunerService"].full_name,
)


def channel_options(opts: ServerOptions) -> list[tuple[str, int]]:
    size = opts.max_message_mb * 2**20
    return [
        ("grpc.max_send_message_length", size),
        ("grpc.max_receive_message_length", size),
        # Long streams idle between tokens: keep the connection alive through proxies,
        # and let clients ping as often as every 10 s without being told off.
        ("grpc.keepalive_time_ms", opts.keepalive_seconds * 1000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def _credentials(opts: ServerOptions) -> grpc.ServerCredentials | None:
    if not opts.tls_cert:
        return None
    key, cert = Path(opts.tls_key).read_bytes(), Path(opts.tls_cert).read_bytes()
    ca = Path(opts.tls_client_ca).read_bytes() if opts.tls_client_ca else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


class Server:
    def __init__(self, opts: ServerOptions) -> None:
        self.opts = opts
        self.metrics = Metrics()
        self.state = ServerState(opts, self.metrics)
        self.health = health.aio.HealthServicer()
        interceptors: list[grpc.aio.ServerInterceptor] = [CallCounter(self.state)]
        if opts.auth_token:
            interceptors.append(TokenAuthInterceptor(opts.auth_token, self.metrics, opts.public_reflection))
        interceptors.append(ErrorInterceptor(self.metrics))
        self.grpc = grpc.aio.server(options=channel_options(opts), interceptors=interceptors)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceService(self.state), self.grpc)
        adapters_pb2_grpc.add_AdapterServiceServicer_to_server(AdapterService(self.state), self.grpc)
        self.jobs = JobStore(opts.jobs_path)
        self.metrics.attach_jobs(self.jobs)
        tuner_pb2_grpc.add_TunerServiceServicer_to_server(TunerService(self.state, self.jobs), self.grpc)
        self.workers: list[subprocess.Popen] = []
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        reflection.enable_server_reflection((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        address = f"{opts.host}:{opts.port}"
        creds = _credentials(opts)
        self.port = self.grpc.add_secure_port(address, creds) if creds else self.grpc.add_insecure_port(address)
        self.metrics_port: int | None = None
        self.http = None
        if opts.http_port:
            from ..http.server import HTTPServer  # the HTTP stack is loaded only when asked for

            self.http = HTTPServer(self.state, opts.served_model_name or model_name(opts.model))
        self.stopping = asyncio.Event()

    async def _set_health(self, status: int) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, status)

    def _load(self) -> ServingCore:
        opts = self.opts
        registry = AdapterRegistry(opts.registry_path, opts.store_path, opts.adapter_cache_path)
        core = ServingCore.from_config(opts.model_config(), opts.engine_config(), opts.cache_config(), registry)
        # Warm-up: the first forward allocates and picks kernels; do it before SERVING.
        warm = core.generate(GenerateRequest(prompt="Hello", params=SamplingParams(max_new_tokens=2)), timeout=600)
        if warm.error is not None:
            core.close()
            raise RuntimeError(f"warm-up generation failed: {warm.error}")
        log.info("%d objects built at start frozen out of the garbage collector's scans", freeze_startup_objects())
        return core

    async def run(self) -> int:
        # asyncio.to_thread / run_in_executor(None) threads live as long as the loop: serial (cpu_threads.py).
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(thread_name_prefix="hotswap-default", initializer=serial))
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        if self.opts.metrics_port >= 0:
            httpd, _ = self.metrics.serve(self.opts.metrics_port, self.opts.metrics_host)
            self.metrics_port = httpd.server_port
        # One line a supervisor (or a test) can parse for the bound ports.
        print(f"hotswap: grpc port {self.port} metrics port {self.metrics_port if self.metrics_port is not None else 'off'} "
              f"http port {self.http.port if self.http is not None else 'off'}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

        quantization, why = self.opts.quantization_choice()
        print(f"hotswap: loading {model_name(self.opts.model)}, {'no quantization' if quantization == 'none' else quantization} ({why})", flush=True)
        load = asyncio.ensure_future(asyncio.to_thread(self._load))
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait([load, stop], return_when=asyncio.FIRST_COMPLETED)
        if load.done():
            if load.exception() is not None:
                log.error("could not start: %s", load.exception())
                await self.grpc.stop(0)
                if self.http is not None:
                    await self.http.stop()
                return 1
            self.state.core = load.result()
            self.metrics.attach(self.state.core)
            await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            print(self.banner(), flush=True)
            self.start_workers()
            await stop
        return await self.drain(load)

    async def drain(self, load: asyncio.Future) -> int:
        log.info("draining: up to %.0fs for %d in-flight requests", self.opts.drain_seconds, self.state.inflight)
        self.state.draining = True
        await self.health.enter_graceful_shutdown()  # NOT_SERVING to every Check and Watch
        await asyncio.sleep(min(self.opts.drain_notice_seconds, self.opts.drain_seconds))  # ...while the listener still answers
        for w in self.workers:  # their jobs resume from the last checkpoint on the next start
            w.terminate()
        await self._calls_done(self.opts.drain_seconds)
        # What is left — open-ended streams (health Watch, WatchTrainingJob), calls past the drain time — is
        # cancelled: grpc would otherwise wait its whole grace for watches that end only with their clients.
        await asyncio.gather(self.grpc.stop(0), *([self.http.stop()] if self.http is not None else []))
        if not load.done():
            await asyncio.wait([load])  # a model load cannot be interrupted; let it finish, then close
        if load.done() and not load.cancelled() and load.exception() is None:
            load.result().close()
        for w in self.workers:  # each saves a checkpoint at the end of its step and requeues its job
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()  # its job resumes from the last periodic checkpoint instead
        print("hotswap: stopped", flush=True)
        return 0

    async def _calls_done(self, timeout: float) -> None:
        """Until no generation (gRPC or HTTP) and no other gRPC call but open-ended streams is in flight,
        or `timeout` seconds. New calls meanwhile get UNAVAILABLE (state.ready) and end at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (self.state.inflight or self.state.calls) and loop.time() < deadline:
            await asyncio.sleep(0.05)

    def banner(self) -> str:
        """The last lines of start-up: what is served, where, and a command to try."""
        loaded, opts = self.state.core.loaded, self.opts
        host = "localhost" if opts.host in ("0.0.0.0", "::", "127.0.0.1", "") else opts.host
        quant = loaded.config.quantization
        lines = [f"hotswap: serving {model_name(opts.model)} on {loaded.device} ({'no quantization' if quant == 'none' else quant}, "
                 f"{str(loaded.dtype).removeprefix('torch.')})",
                 f"  gRPC        {host}:{self.port}" + ("  (TLS)" if opts.tls_cert else "") + ("  (bearer token)" if opts.auth_token else "")]
        if self.http is not None:
            lines.append(f"  OpenAI API  http{'s' if opts.tls_cert else ''}://{host}:{self.http.port}/v1  (model \"{self.http.base_name}\")")
        if self.metrics_port is not None:
            lines.append(f"  metrics     http://{host}:{self.metrics_port}/metrics")
        target = "" if (host, self.port) == ("localhost", 50051) else f" --target {host}:{self.port}"
        lines.append(f'  try:        hotswap generate "Who are you?"{target}')
        return "\n".join(lines)

    def start_workers(self) -> None:
        """Tuner workers beside the server, with the same options (so the same stores)."""
        argv = []
        for f in dataclasses.fields(ServerOptions):
            if f.name in ("auth_token", "tls_key"):  # workers serve no network; keep secrets out of `ps`
                continue
            value = getattr(self.opts, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
            else:
                argv += [flag, str(value)]
        for _ in range(self.opts.tuner_workers):
            env = {**os.environ, "HOTSWAP_TUNER_PARENT_PID": str(os.getpid())}
            self.workers.append(subprocess.Popen([sys.executable, "-m", "hotswap.tuner.worker", *argv], env=env))


async def serve(opts: ServerOptions) -> int:
    # grpc.aio binds the server to the running event loop: build it inside.
    return await Server(opts).run()


def main(argv: list[str] | None = None) -> None:
    opts = parse_options(argv)
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(serve(opts)))


if __name__ == "__main__":
    main()
