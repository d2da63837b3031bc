"""Serving across nodes on Ray Serve: each replica is a whole hotswap serving core (one
base model, its own continuous batch and adapter cache); Ray's gRPC proxy speaks our
own `hotswap.v1.InferenceService`, and `@serve.multiplexed` keyed on the adapter id
sends a request to a replica that already holds its adapter.

    serve run hotswap.server.ray_serve:app model=default quantization=nf4   # or build_app({...}) in Python

The router reads the adapter from the `multiplexed_model_id` request metadata (gRPC)
or the `serve_multiplexed_model_id` header (HTTP); the body's adapter_id must agree.
Replicas share the registry (PostgreSQL or one SQLite file) and the adapter store
(object storage or one folder), so an adapter registered anywhere serves everywhere.
"""
from __future__ import annotations

import asyncio
import os
import socket

import grpc
from ray import serve
from ray.serve.grpc_util import RayServegRPCContext

from hotswap.v1 import inference_pb2

from .adapters.registry import AdapterRegistry
from .api import convert, readout
from .api.offload import off_loop
from .engine.request import GenerateRequest, GenerateResult
from .errors import HotswapError, InvalidArgument
from .options import options_from_dict
from .serving import ServingCore
from .startup_heap import freeze_startup_objects

ADAPTERS_PER_REPLICA = 16
"""Default number of adapters the multiplexer keeps leased per replica."""


class AdapterLease:
    """What the multiplexer caches per replica: a loaded adapter. When Serve drops it
    (LRU beyond adapters_per_replica), the adapter leaves this replica's device cache."""

    def __init__(self, core: ServingCore, adapter_id: str) -> None:
        self.core, self.id = core, adapter_id

    def __del__(self) -> None:
        try:
            self.core.adapters.unpin(self.id)
            self.core.adapters.evict(self.id)
        except (HotswapError, AttributeError):
            pass  # in use by running rows: unpinned, it leaves by LRU once they finish


def _set_status(grpc_context: RayServegRPCContext, e: HotswapError) -> None:
    """The same status codes as hotswap-server."""
    grpc_context.set_code(getattr(grpc.StatusCode, e.code, grpc.StatusCode.INTERNAL))
    grpc_context.set_details(str(e))


@serve.deployment(ray_actor_options={"num_cpus": 1})
class HotswapReplica:
    def __init__(self, options: dict, adapters_per_replica: int = ADAPTERS_PER_REPLICA) -> None:
        opts = options_from_dict(options)
        registry = AdapterRegistry(opts.registry_path, opts.store_path, opts.adapter_cache_path)
        self.core = ServingCore.from_config(opts.model_config(), opts.engine_config(), opts.cache_config(), registry)
        freeze_startup_objects()  # one replica per actor process, living as long as it
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.adapters_per_replica = adapters_per_replica
        core = self.core

        async def lease(adapter_id: str) -> AdapterLease:
            resolved = core.resolve(adapter_id)
            await off_loop(core.adapters.load, resolved, True)  # pinned while leased; a serial thread (cpu_threads.py)
            return AdapterLease(core, resolved)

        # Built per replica (not as a class decorator) so the bound is a deployment argument.
        self.lease = serve.multiplexed(max_num_models_per_replica=adapters_per_replica)(lease)

    async def _adapter(self, requested: str) -> str:
        routed = serve.get_multiplexed_model_id()
        if requested and routed and requested != routed:
            raise InvalidArgument(f"adapter_id {requested!r} differs from the routing metadata {routed!r}", field="adapter_id")
        adapter = requested or routed
        return (await self.lease(adapter)).id if adapter else ""

    async def Generate(self, request: inference_pb2.GenerateRequest, grpc_context: RayServegRPCContext) -> inference_pb2.GenerateResponse:
        try:
            adapter = await self._adapter(request.adapter_id)
            req = convert.generate_request(request)
            req.adapter_id = adapter
            stream = self.core.submit(req)
            result = await asyncio.to_thread(stream.result)
            if result.error is not None:
                raise result.error
        except HotswapError as e:
            _set_status(grpc_context, e)
            return inference_pb2.GenerateResponse()
        return convert.generate_response(result, stream.request, self.core.loaded.tokenizer)

    async def _readout(self, requests: list[GenerateRequest], fields: dict[str, str]) -> list[GenerateResult]:
        """Classify / Score rows: all submitted, all waited for; one failure fails the call."""
        streams = await asyncio.to_thread(readout.submit_all, self.core, requests, fields)
        try:
            results = await asyncio.to_thread(lambda: [s.result() for s in streams])
        finally:
            for s in streams:
                if s.finish_reason is None:  # the caller went away
                    self.core.cancel(s)
        for r in results:
            if r.error is not None:
                raise readout.failed(r.error, fields)
        return results

    async def Classify(self, request: inference_pb2.ClassifyRequest, grpc_context: RayServegRPCContext) -> inference_pb2.ClassifyResponse:
        try:
            req = convert.classify_request(request, serve.get_multiplexed_model_id())
            req.adapter_id = await self._adapter(request.adapter_id)
            (result,) = await self._readout([req], {"prompt": "text"})
        except HotswapError as e:
            _set_status(grpc_context, e)
            return inference_pb2.ClassifyResponse()
        return convert.classify_response(result, req.adapter_id)

    async def Score(self, request: inference_pb2.ScoreRequest, grpc_context: RayServegRPCContext) -> inference_pb2.ScoreResponse:
        try:
            reqs = convert.score_requests(request)
            adapter = await self._adapter(request.adapter_id)
            for r in reqs:
                r.adapter_id = adapter
            results = await self._readout(reqs, {})
        except HotswapError as e:
            _set_status(grpc_context, e)
            return inference_pb2.ScoreResponse()
        return await asyncio.to_thread(convert.score_response, results, adapter, self.core.loaded.tokenizer)

    async def GenerateStream(self, request: inference_pb2.GenerateStreamRequest):
        adapter = await self._adapter(request.adapter_id)
        req = convert.generate_request(request)
        req.adapter_id = adapter
        stream = self.core.submit(req)
        events = iter(stream)
        try:
            while True:
                event = await asyncio.to_thread(next, events, None)
                if event is None:
                    return
                if event.error is not None:
                    raise event.error
                chunk = inference_pb2.GenerateStreamResponse(text=event.text, token_ids=event.token_ids,
                                                             request_id=req.request_id, **convert.served_by(stream.request))
                if event.finished:
                    result = stream.result(0)
                    chunk.finish_reason = convert.FINISH_REASONS[event.finish_reason]
                    chunk.prompt_tokens, chunk.generated_tokens = result.prompt_tokens, len(result.token_ids)
                    chunk.timing.CopyFrom(convert.timing(result))
                yield chunk
        finally:
            if stream.finish_reason is None:  # the caller went away: free the row
                self.core.cancel(stream)

    async def replica(self, adapter_id: str = "") -> dict:
        """Which replica answered and what it holds (operations and tests)."""
        if adapter_id:
            await self.lease(adapter_id)
        stats = self.core.adapters.stats()
        return {"replica": self.name, "device_adapters": sorted(stats.device), "host_adapters": sorted(stats.host),
                "max_adapters": self.adapters_per_replica}


def build_app(options: dict, num_replicas: int = 1, adapters_per_replica: int = ADAPTERS_PER_REPLICA,
              num_cpus: float = 1, num_gpus: float = 0) -> serve.Application:
    """`options`: ServerOptions fields for every replica (share the registry and store)."""
    actor = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    return HotswapReplica.options(num_replicas=num_replicas, ray_actor_options=actor).bind(options, adapters_per_replica)


def app(args: dict) -> serve.Application:
    """`serve run hotswap.server.ray_serve:app key=value ...`: ServerOptions fields, plus
    num_replicas, adapters_per_replica, num_cpus and num_gpus."""
    args = dict(args)
    scale = {k: float(args.pop(k)) for k in ("num_cpus", "num_gpus") if k in args}
    return build_app(args, int(args.pop("num_replicas", 1)), int(args.pop("adapters_per_replica", ADAPTERS_PER_REPLICA)), **scale)


GRPC_SERVICERS = ["hotswap.v1.inference_pb2_grpc.add_InferenceServiceServicer_to_server"]
"""For serve.start(grpc_options=gRPCOptions(grpc_servicer_functions=GRPC_SERVICERS))."""
