"""The serving core a Python caller (and the gRPC service) uses: one base model,
an adapter registry and two-tier cache, and the engine on its own thread."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Callable

from .adapters.cache import AdapterCache
from .adapters.load import load_adapter
from .adapters.peft_files import warm_page_cache
from .adapters.registry import AdapterRecord, AdapterRegistry, check_labels
from .adapters.validate import BaseShape
from .adapters.weights import Adapter
from .cpu_threads import Turns, in_passing_thread
from .config import AdapterCacheConfig, EngineConfig, ModelConfig
from .engine.engine import Engine
from .engine.host_memory import bound_cpu_kernel_caches
from .engine.loop import EngineLoop, RequestStream
from .engine.request import GenerateRequest, GenerateResult, StreamEvent, check_lora_controls
from .errors import InvalidArgument
from .model.loader import LoadedModel, load_base_model


class ServingCore:
    def __init__(
        self,
        loaded: LoadedModel,
        engine_cfg: EngineConfig | None = None,
        cache_cfg: AdapterCacheConfig | None = None,
        registry: AdapterRegistry | None = None,
    ) -> None:
        self.loaded = loaded
        self.cache_cfg = cache_cfg or AdapterCacheConfig()
        if registry is None:  # in-process use: a throwaway store
            self._tmp = tempfile.TemporaryDirectory(prefix="hotswap-adapters-")
            registry = AdapterRegistry(Path(self._tmp.name) / "registry.sqlite", Path(self._tmp.name) / "store")
        self.registry = registry
        # On CPU adapter loads and engine steps take turns (cpu_threads.Turns); on CUDA they overlap.
        self.turns = Turns(enabled=loaded.device.type == "cpu")
        self.adapters = AdapterCache(self.cache_cfg, self._load_from_store, loaded.device, loaded.dtype, self.turns,
                                     prefetch_fn=lambda adapter_id: warm_page_cache(self.registry.path(adapter_id)))
        # Built (model probes, the KV pool's first touch) on a thread that ends: cpu_threads.py.
        self.engine = in_passing_thread(Engine, loaded, engine_cfg, self.adapters)
        # Adapters are checked against the key/value layout the engine probed, which a config can
        # misstate (Falcon's multi_query keeps one kv head whatever num_kv_heads says).
        runner = self.engine.runner
        self.base_shape = dataclasses.replace(BaseShape.of(loaded.model), num_kv_heads=runner.kv_heads, head_dim=runner.head_dim)
        self.loop = EngineLoop(self.engine, self.turns).start()

    @classmethod
    def from_config(
        cls,
        model_cfg: ModelConfig,
        engine_cfg: EngineConfig | None = None,
        cache_cfg: AdapterCacheConfig | None = None,
        registry: AdapterRegistry | None = None,
    ) -> "ServingCore":
        bound_cpu_kernel_caches()  # before the model's first matmul
        return cls(load_base_model(model_cfg), engine_cfg, cache_cfg, registry)

    def _load_from_store(self, adapter_id: str) -> Adapter:
        return load_adapter(self.registry.path(adapter_id), adapter_id, self.loaded.model, self.cache_cfg.max_lora_rank, self.base_shape)

    def _validate(self, path: Path) -> Adapter:
        warm_page_cache(path)
        with self.turns.load():  # registration's checks are a load's CPU work: between engine steps
            adapter = load_adapter(path, path.name, self.loaded.model, self.cache_cfg.max_lora_rank, self.base_shape)
        if adapter.num_virtual_tokens >= self.engine.max_seq_len:  # it could never serve a single prompt token
            raise InvalidArgument(f"{adapter.num_virtual_tokens} virtual tokens leave no room in max_seq_len {self.engine.max_seq_len}",
                                  field="num_virtual_tokens")
        return adapter

    def register_adapter(self, name: str, source: str | Path, labels: dict[str, str] | None = None) -> AdapterRecord:
        """Copy the adapter into the store, validate it against the base model and
        publish it as the next version of `name`; returns its record (id "name@v")."""
        return self.registry.register(name, str(source), self._validate, self.loaded.fingerprint, check_labels(dict(labels or {})))

    def resolve(self, adapter_id: str) -> str:
        """"name" -> "name@latest"; "name@v" checked to exist. NotFound otherwise."""
        return self.registry.get(adapter_id).id

    def delete_adapter(self, adapter_id: str) -> list[str]:
        """Unregister (one version or all) and drop from the caches. Rows already
        running keep their device copy until they finish."""
        deleted = [r.id for r in self.registry.delete(adapter_id)]
        for rid in deleted:
            self.adapters.forget(rid)
        return deleted

    def submit(self, request: GenerateRequest, notify: Callable[[StreamEvent], None] | None = None) -> RequestStream:
        """Validate and enqueue; iterate the stream or wait on it. `notify` also gets every
        event, on the engine thread (the gRPC layer wakes its asyncio loop with it)."""
        if request.adapter_id:  # NOT_FOUND now, not after queueing; the cache keys on the versioned id
            request = dataclasses.replace(request, adapter_id=self.resolve(request.adapter_id))
        if request.adapters is not None:
            resolved = [(self.resolve(a), w) for a, w in request.adapters]
            check_lora_controls(request.lora_scale, resolved, "")  # "x" and "x@3" may name one version twice
            request = dataclasses.replace(request, adapters=resolved)
        return self.loop.submit(request, notify)

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> GenerateResult:
        return self.submit(request).result(timeout)

    def cancel(self, stream: RequestStream) -> None:
        """Cancel a submitted request; its row is freed at the engine's next step."""
        self.loop.cancel(stream.key)

    def close(self) -> None:
        self.loop.shutdown()
        self.adapters.close()
        if hasattr(self, "_tmp"):
            self._tmp.cleanup()

    def __enter__(self) -> "ServingCore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
