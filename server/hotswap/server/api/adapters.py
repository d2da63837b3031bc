"""AdapterService: the registry and the adapter cache over gRPC. Blocking work
(registry reads, copying files, validating against the base, copying to the
device) runs in a worker thread so the event loop keeps streaming tokens meanwhile."""
from __future__ import annotations

import asyncio

import grpc

from hotswap.v1 import adapters_pb2, adapters_pb2_grpc

from ..adapters.registry import FETCHED, AdapterRecord
from ..errors import InvalidArgument
from . import convert
from .offload import off_loop
from .state import ServerState


class AdapterService(adapters_pb2_grpc.AdapterServiceServicer):
    def __init__(self, state: ServerState) -> None:
        self.state = state

    def _proto(self, record: AdapterRecord) -> adapters_pb2.Adapter:
        cache = self.state.ready().adapters
        return convert.adapter(record, cache.residency(record.id), cache.is_pinned(record.id))

    async def RegisterAdapter(self, request: adapters_pb2.RegisterAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.RegisterAdapterResponse:
        core = self.state.ready()
        policy = self.state.opts.adapter_policy()

        def register() -> AdapterRecord:
            # the caller names the folder, the server reads it: only under allowed roots / schemes
            source = policy.check(request.source_uri, "source_uri")
            policy.check_members(source, FETCHED, "source_uri")
            return core.register_adapter(request.name, source, dict(request.labels))

        record = await off_loop(register)
        return adapters_pb2.RegisterAdapterResponse(adapter=self._proto(record))

    async def ListAdapters(self, request: adapters_pb2.ListAdaptersRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.ListAdaptersResponse:
        core = self.state.ready()
        records, token = await off_loop(core.registry.list, request.page_size, request.page_token, request.name)
        return adapters_pb2.ListAdaptersResponse(adapters=[self._proto(r) for r in records], next_page_token=token)

    async def GetAdapter(self, request: adapters_pb2.GetAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.GetAdapterResponse:
        record = await off_loop(self.state.ready().registry.get, request.adapter_id)
        return adapters_pb2.GetAdapterResponse(adapter=self._proto(record))

    async def LoadAdapter(self, request: adapters_pb2.LoadAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.LoadAdapterResponse:
        core = self.state.ready()
        record = await off_loop(core.registry.get, request.adapter_id)
        await asyncio.to_thread(core.adapters.load, record.id, request.pin)
        return adapters_pb2.LoadAdapterResponse(adapter=self._proto(record))

    async def UnloadAdapter(self, request: adapters_pb2.UnloadAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.UnloadAdapterResponse:
        core = self.state.ready()
        record = await off_loop(core.registry.get, request.adapter_id)
        core.adapters.unpin(record.id)
        try:
            core.adapters.evict(record.id)
        except InvalidArgument:
            pass  # running requests use it: unpinned, it leaves by LRU once they finish
        return adapters_pb2.UnloadAdapterResponse(adapter=self._proto(record))

    async def DeleteAdapter(self, request: adapters_pb2.DeleteAdapterRequest, context: grpc.aio.ServicerContext) -> adapters_pb2.DeleteAdapterResponse:
        core = self.state.ready()
        deleted = await asyncio.to_thread(core.delete_adapter, request.adapter_id)
        return adapters_pb2.DeleteAdapterResponse(deleted_ids=deleted)
