"""The serving core a Python caller (and the gRPC service) uses: one base model,
an adapter registry and two-tier cache, and the engine on its own thread."""
from __future__ import annotations

from pathlib import Path

from .adapters.cache import AdapterCache
from .adapters.load import load_adapter
from .adapters.registry import AdapterRegistry, check_adapter_id
from .adapters.weights import Adapter
from .config import AdapterCacheConfig, EngineConfig, ModelConfig
from .engine.engine import Engine, EngineLoop, RequestStream
from .engine.request import GenerateRequest, GenerateResult
from .model.loader import LoadedModel, load_base_model


class ServingCore:
    def __init__(
        self,
        loaded: LoadedModel,
        engine_cfg: EngineConfig | None = None,
        cache_cfg: AdapterCacheConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.cache_cfg = cache_cfg or AdapterCacheConfig()
        self.registry = AdapterRegistry()
        self.adapters = AdapterCache(self.cache_cfg, self._load_from_store, loaded.device, loaded.dtype)
        self.engine = Engine(loaded, engine_cfg, self.adapters)
        self.loop = EngineLoop(self.engine).start()

    @classmethod
    def from_config(
        cls,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig | None = None,
        cache_cfg: AdapterCacheConfig | None = None,
    ) -> "ServingCore":
        return cls(load_base_model(model_cfg), engine_cfg, cache_cfg)

    def _load_from_store(self, adapter_id: str) -> Adapter:
        return load_adapter(self.registry.path(adapter_id), adapter_id, self.loaded.model, self.cache_cfg.max_lora_rank)

    def register_adapter(self, adapter_id: str, path: str | Path) -> Adapter:
        """Validate the adapter against the base model (reading it once) and make it servable."""
        check_adapter_id(adapter_id)
        adapter = load_adapter(Path(path), adapter_id, self.loaded.model, self.cache_cfg.max_lora_rank)
        self.registry.add(adapter_id, Path(path))
        return adapter

    def submit(self, request: GenerateRequest) -> RequestStream:
        if request.adapter_id:
            self.registry.path(request.adapter_id)  # NOT_FOUND now, not after queueing
        return self.loop.submit(request)

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> GenerateResult:
        return self.submit(request).result(timeout)

    def cancel(self, request_id: str) -> None:
        self.loop.cancel(request_id)

    def close(self) -> None:
        self.loop.shutdown()
        self.adapters.close()

    def __enter__(self) -> "ServingCore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
