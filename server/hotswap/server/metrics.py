"""Prometheus metrics, all under `hotswap_`, in base units.

Per-request values are observed by the gRPC layer when a request ends; engine
and adapter-cache state is read at scrape time from what those components
already publish (the engine's LoopSnapshot, the cache's stats), so nothing here
runs on the engine thread except the per-step batch-size observation. No label
carries an adapter id (unbounded cardinality); the `lora_requests_info` gauge
lists running and waiting adapters in label values the way vLLM does, so an
inference gateway can route by adapter.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .adapters.cache import LOAD_BUCKETS
from .engine.request import Task

if TYPE_CHECKING:
    from .engine.loop import RequestStream
    from .engine.scheduler import SchedulerOutput
    from .serving import ServingCore

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("hotswap_time_to_first_token_seconds", "Time from receiving a request to its first generated token.", buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("hotswap_time_per_output_token_seconds", "Mean time between generated tokens of a request, after the first.", buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("hotswap_e2e_request_latency_seconds", "Time from receiving a request to its last token.", buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("hotswap_request_queue_time_seconds", "Time a request waited for a batch row (including its adapter's cold load).", buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("hotswap_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("hotswap_generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("hotswap_requests_finished", "Requests finished, by finish reason.", ["finish_reason"], registry=r)
        self.requests = Counter("hotswap_requests", "Requests finished, by task: generate, classify, score (one per candidate).", ["task"], registry=r)
        self.failures = Counter("hotswap_request_failures", "RPCs that ended with an error status, by gRPC status code.", ["code"], registry=r)
        self.batch_size = Histogram("hotswap_batch_size", "Rows in one engine step (decoding plus newly prefilled).", buckets=BATCH_BUCKETS, registry=r)
        self._engine: EngineCollector | None = None
        for reason in ("length", "stop", "eos", "cancelled", "error"):
            self.finished.labels(reason)
        for task in Task:
            self.requests.labels(task.value)

    def attach(self, core: ServingCore) -> None:
        """Start exporting engine and adapter-cache state (once the model is loaded)."""
        self._engine = EngineCollector(core)
        self.registry.register(self._engine)
        core.loop.on_step = self.observe_step
        core.loop.on_finish = self.observe_request

    def attach_jobs(self, store) -> None:
        """Export training jobs by state from the job store (read at scrape time)."""
        self.registry.register(JobsCollector(store))

    def observe_step(self, out: SchedulerOutput, rows: int) -> None:
        self.batch_size.observe(rows)

    def observe_request(self, stream: RequestStream) -> None:
        """Engine thread, once per request however it ended (cancelled and failed ones too)."""
        n, start = stream.generated_tokens, stream.submitted_at
        self.prompt_tokens.inc(stream.prompt_tokens)
        self.generation_tokens.inc(n)
        self.finished.labels(stream.finish_reason.value).inc()
        self.requests.labels(stream.request.task.value).inc()
        self.queue.observe(stream.queue_time)
        self.e2e.observe(stream.finished_at - start)
        if n and stream.first_token_at is not None:
            self.ttft.observe(stream.first_token_at - start)
        if n > 1 and stream.first_token_at is not None:
            self.tpot.observe((stream.finished_at - stream.first_token_at) / (n - 1))

    def serve(self, port: int, addr: str = "0.0.0.0"):
        """Start the /metrics HTTP server on a daemon thread; returns (httpd, thread)."""
        return start_http_server(port, addr=addr, registry=self.registry)


class EngineCollector(Collector):
    """Gauges and counters read at scrape time from the engine and the adapter cache."""

    def __init__(self, core: ServingCore) -> None:
        self.core = core

    def collect(self) -> Iterable:
        snap = self.core.loop.snapshot
        yield _gauge("hotswap_requests_running", "Requests in the running batch.", snap.running)
        yield _gauge("hotswap_requests_waiting", "Requests queued for a batch row.", snap.waiting)
        info = GaugeMetricFamily(
            "hotswap_lora_requests_info",
            "Adapters of running and waiting requests (comma-separated label values); the value is the time of the reading.",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        info.add_metric([",".join(snap.running_adapters), ",".join(snap.waiting_adapters), str(self.core.engine.cfg.max_loras)], time.time())
        yield info
        yield _gauge("hotswap_kv_cache_used_blocks", "Paged KV cache blocks held by running rows.", snap.kv_blocks_used)
        yield _gauge("hotswap_kv_cache_capacity_blocks", "Paged KV cache blocks in the pool (--kv-cache-mb).", snap.kv_blocks_total)
        yield _gauge("hotswap_kv_cache_usage_ratio", "Fraction of the KV cache's blocks held by running rows.",
                     snap.kv_blocks_used / max(1, snap.kv_blocks_total))
        yield _counter("hotswap_preemptions", "Rows preempted when the KV cache ran dry (their blocks freed, recomputed later).", snap.preemptions)
        yield _counter("hotswap_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", snap.prefix_cache_queries)
        yield _counter("hotswap_prefix_cache_hits", "Prompt tokens whose key/values were found in the prefix cache.", snap.prefix_cache_hits)
        yield _gauge("hotswap_lora_slots_busy", "LoRA device slots serving running rows (of --max-loras).", snap.lora_slots_busy)
        yield _gauge("hotswap_expert_lora_slots_busy", "Of those, slots that may hold an adapter with LoRA on MoE experts / routers "
                     "(of --max-expert-loras; such adapters wait while all are busy).", snap.expert_lora_slots_busy)

        stats = self.core.adapters.stats()
        resident = GaugeMetricFamily("hotswap_adapters_resident", "Adapters held in each cache tier.", labels=["tier"])
        resident.add_metric(["device"], len(stats.device))
        resident.add_metric(["host"], len(stats.host))
        yield resident
        resident_bytes = GaugeMetricFamily("hotswap_adapters_resident_bytes", "Bytes of adapter weights held in each cache tier.", labels=["tier"])
        resident_bytes.add_metric(["device"], sum(stats.device.values()))
        resident_bytes.add_metric(["host"], sum(stats.host.values()))
        yield resident_bytes
        yield _counter("hotswap_adapter_cache_hits", "Adapter lookups that found the adapter on the device.", stats.hits)
        yield _counter("hotswap_adapter_cache_misses", "Adapter lookups that had to load the adapter.", stats.misses)
        yield _counter("hotswap_adapter_loads", "Adapters loaded onto the device.", stats.loads)
        evictions = CounterMetricFamily("hotswap_adapter_evictions", "Adapters evicted from a cache tier.", labels=["tier"])
        evictions.add_metric(["device"], stats.evictions)
        evictions.add_metric(["host"], stats.host_evictions)
        yield evictions
        cumulative, total = [], 0
        for bound, count in zip([*map(str, LOAD_BUCKETS), "+Inf"], stats.load_buckets):
            total += count
            cumulative.append((bound, total))
        h = HistogramMetricFamily("hotswap_adapter_load_duration_seconds", "Time to bring an adapter onto the device (from disk or from the host tier).")
        h.add_metric([], cumulative, sum_value=stats.load_seconds)
        yield h


class JobsCollector(Collector):
    def __init__(self, store) -> None:
        self.store = store

    def collect(self) -> Iterable:
        g = GaugeMetricFamily("hotswap_training_jobs", "Training jobs in the job store, by state.", labels=["state"])
        for state, n in self.store.counts_by_state().items():
            g.add_metric([state], n)
        yield g


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)
