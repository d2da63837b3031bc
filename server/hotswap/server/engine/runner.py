"""One packed forward: the new tokens of every scheduled row flattened into one
sequence with per-token positions, no padding. Builds the inputs (embeddings,
cache slots, block tables, per-token LoRA slots), runs the model once, and
returns the next-token logits of the rows that sample (and, for prefill-only
rows, what readout.py reads from the same hidden states). Owns the model, the
paged KV cache tensors and the LoRA slots; knows nothing of requests.

Architectures whose attention cannot be paged (engine/architecture.py decides at
load) run the same inputs row by row through their own attention (own_attention.py)."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

import torch

from ..adapters.weights import AdaptionWeights, LoraWeights, TokenTables
from .adaption import AdaptionGroup, prompt_kv
from ..config import EngineConfig
from ..errors import ModelLoadError
from . import kernels, readout
from .architecture import probe_attention
from .attention import BATCH_KWARG, DENSE_MIN_TOKENS, AttentionBatch, DenseRule, dense_rule
from .fused_norms import fuse_norms
from .fused_rotary import engaged, fuse_rotary
from .head import check_final_logits, decoder_of, final_logit_transform
from .inputs import StepInputs, build_inputs
from .kv_cache import PagedKVCache, default_kv_cache_bytes
from .expert_lora import attach_param_lora
from .lora import LoraStep, attach_lora
from .own_attention import forward_rows
from .packed_linears import can_pack, pack_linears, sibling_groups
from .readout import ForwardOutput
from .scheduler import ScheduledRow
from .static_decode import StaticDecode, eligible
from .token_tables import embed_rows, head_logits

if TYPE_CHECKING:
    from ..model.loader import LoadedModel


def resolve_backend(name: str, device: torch.device) -> str:
    """"auto": the native kernels on CPU when they build (once per machine), the Triton kernels on
    CUDA when Triton imports, else the torch reference ops."""
    if name == "auto":
        if device.type == "cpu":
            return "native" if kernels.native_available() else "torch"
        return "triton" if kernels.triton_available(device) else "torch"
    if name == "native" and not kernels.native_available():
        raise ModelLoadError(f"native kernels unavailable: {kernels.native_unavailable_reason()}", field="attention_backend")
    if name == "triton" and not kernels.triton_available(device):
        why = kernels.triton_unavailable_reason() or f"the model is on {device}: Triton kernels need CUDA"
        raise ModelLoadError(f"triton kernels unavailable: {why}", field="attention_backend")
    return name


class ModelRunner:
    def __init__(self, loaded: LoadedModel, cfg: EngineConfig) -> None:
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        text = self.model.config.get_text_config()
        self.num_layers = text.num_hidden_layers
        # The cache's geometry is what the layers actually produce (probed), not what the config suggests.
        self.layout = probe_attention(self.model)
        self.kv_heads, self.head_dim = self.layout.kv_heads, self.layout.head_dim
        self.context_length = int(getattr(text, "max_position_embeddings", 0) or 0)
        self.backend = resolve_backend(cfg.attention_backend, self.device)
        self.block_size = cfg.block_size
        self.dense_rule = self._dense_rule(text)
        """Which prompt chunks attend through SDPA (attention.py); None: none."""
        self.lora = attach_lora(self.model, cfg.max_loras, self.device, self.dtype)
        attach_param_lora(self.model, self.lora, cfg.max_expert_loras)
        self.decoder = decoder_of(self.model)
        self.embed = self.model.get_input_embeddings()
        self.head = self.model.get_output_embeddings()
        self.final = final_logit_transform(self.model)
        check_final_logits(self.model, self.final)
        self.cache: PagedKVCache | None = None
        self.static: StaticDecode | None = None
        """Decode-only steps through fixed buffers (CUDA graphs); set by allocate_cache with decode_graphs."""
        self.decode_graphs = cfg.decode_graphs
        # Last: the load-time checks above compare the model's own forward with the engine's.
        # packed_bytes: what this engine's packing added (an earlier engine on the model may have packed it).
        self.packed_linears, self.packed_bytes = (pack_linears(self.model, cfg.max_batch_size)
                                                  if cfg.prepack_linears and can_pack(self.device, self.dtype) else (0, 0))
        self.siblings = sibling_groups(self.model)
        self.fused_norms = fuse_norms(self.model, self.device, self.dtype) if self.backend == "native" else 0
        self.fused_rotary = fuse_rotary(self.model, self.device, self.dtype, self.head_dim) if self.backend == "native" else 0

    def allocate_cache(self, budget_bytes: int, max_blocks: int, reserved: int = 0, max_rows: int = 1, row_blocks: int = 1) -> int:
        """Allocate the paged cache within `budget_bytes` (0 = the device default, leaving
        `reserved` bytes for adapters), at most `max_blocks` blocks; returns the number of blocks
        rows may use. With decode_graphs one block more, within the budget, is the padding's
        scratch, and decode steps of up to `max_rows` rows of up to `row_blocks` blocks go
        through fixed buffers (static_decode.py)."""
        per_block = PagedKVCache.bytes_per_block(self.num_layers, self.block_size, self.kv_heads, self.head_dim, self.dtype)
        budget = budget_bytes or default_kv_cache_bytes(self.device, reserved)
        scratch = int(self.decode_graphs)
        num_blocks = min(budget // per_block, max_blocks + scratch) - scratch
        if num_blocks < 1:
            raise ModelLoadError(f"a KV budget of {budget} bytes holds no block of {per_block} bytes", field="kv_cache_mb")
        self.cache = PagedKVCache(self.num_layers, num_blocks + scratch, self.block_size, self.kv_heads, self.head_dim, self.device, self.dtype)
        if scratch:
            self.static = StaticDecode(self, max_rows, row_blocks, num_blocks * self.block_size, capture=True)
        return num_blocks

    def _dense_rule(self, text) -> DenseRule | None:
        if self.backend in ("torch", "triton"):
            return DenseRule((0,), (DENSE_MIN_TOKENS,))
        if not self.layout.paged:
            return None
        heads = int(getattr(text, "num_attention_heads", 0) or 0)
        if heads <= 0 or heads % self.kv_heads:
            return None
        return dense_rule(heads, self.kv_heads, self.head_dim, self.dtype, self.device, self.block_size)

    def load_lora(self, slot: int, weights: LoraWeights) -> None:
        self.lora.load(slot, weights)

    # -- the forward -------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRow]) -> ForwardOutput:
        """Logits [rows that sample, vocab] (float32) in scheduled order, and what the
        prefill-only rows read from the same forward (readout.read)."""
        dev = self.device
        if self.static is not None and self.layout.paged and eligible(scheduled):
            with self._forward_scope():
                hidden = self.static.run(scheduled)  # [rows, hidden]: every row samples
            return ForwardOutput(self._logits(scheduled, hidden))
        step = build_inputs(scheduled, self.block_size, self.dense_rule)
        positions = step.positions.to(dev)
        embeds = self._embeddings(scheduled, step.ids.to(dev), step.first)  # [num_tokens, hidden]
        self._copy_prefixes(scheduled)
        with self._forward_scope():
            hidden = self._forward(step, scheduled, embeds, positions)  # [num_tokens, hidden]
        logits = self._logits(scheduled, hidden[step.sample_at.to(dev)])  # [sampling rows, vocab]
        return ForwardOutput(logits, readout.read(scheduled, step.first, hidden, self.logits))

    @contextmanager
    def _forward_scope(self) -> Iterator[None]:
        """Around one decoder forward: the rotary kernel engaged (when fused), and sibling linears'
        held outputs dropped afterwards, whatever happened."""
        try:
            with engaged() if self.fused_rotary else nullcontext():
                yield
        finally:
            for group in self.siblings:
                group.release()

    def _forward(self, step: StepInputs, scheduled: list[ScheduledRow], embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The decoder over the packed tokens: embeds [num_tokens, hidden] -> final hidden states [num_tokens, hidden]."""
        dev = self.device
        if not self.layout.paged:
            return forward_rows(self.decoder, self.cache, scheduled, step, embeds, self.lora, self.backend)
        paged_tokens = len(step.ids) - sum(d.num_tokens for d in step.dense)
        batch = AttentionBatch(self.cache, step.slots.to(dev), step.block_tables.to(dev), step.token_rows.to(dev),
                               positions.to(torch.int32), step.dense, paged_tokens, self.backend, self._adaption(scheduled, step.first))
        self.lora.step = None if step.lora_slots is None else LoraStep.of(
            step.lora_slots.to(dev), None if step.lora_scales is None else step.lora_scales.to(dev), self.lora.slots.max_loras, self.backend,
            host_slots=step.lora_slot_set)
        try:
            return self.decoder(inputs_embeds=embeds[None], position_ids=positions[None], use_cache=False,
                                **{BATCH_KWARG: batch}).last_hidden_state[0]
        finally:
            self.lora.step = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states [n, hidden] → the base head's next-token logits [n, vocab] float32, with
        what the architecture does after its head (Gemma 2's soft-capping; head.py). Scoring reads these;
        adapters with their own output head are refused for Score."""
        return self.final(self.head(hidden)).float()

    def _logits(self, scheduled: list[ScheduledRow], hidden: torch.Tensor) -> torch.Tensor:
        """The head's logits of the sampling rows [rows, vocab] in the head's dtype (the sampler widens
        what it needs: greedy rows need no fp32 copy); rows whose adapter has its own head (or head
        rows) get theirs, computed once per distinct adapter in the step."""
        logits = self.head(hidden)
        groups: dict[int, tuple[TokenTables, list[int]]] = {}
        for i, s in enumerate(s for s in scheduled if s.samples):
            t = s.row.token_tables
            if t is not None and (t.head is not None or t.head_ids is not None):
                groups.setdefault(id(t), (t, []))[1].append(i)
        for t, rows in groups.values():
            idx = torch.tensor(rows, device=hidden.device)
            logits[idx] = head_logits(t, hidden[idx], logits[idx], self.head.bias)
        return self.final(logits)

    def _embeddings(self, scheduled: list[ScheduledRow], ids: torch.Tensor, first: list[int]) -> torch.Tensor:
        """Token embeddings; prompt-tuning positions take the adapter's virtual-token embeddings,
        rows of adapters with their own embedding changes (`TokenTables`) theirs."""
        embeds = self.embed(ids.clamp(min=0))
        for s, q in zip(scheduled, first):
            tables = s.row.token_tables
            if tables is not None:
                embeds[q: q + s.num_tokens] = embed_rows(tables, ids[q: q + s.num_tokens], embeds[q: q + s.num_tokens])
        for s, q in zip(scheduled, first):
            table = s.row.prompt_embeddings  # [num_virtual, hidden]
            if table is not None and s.start < len(table):
                end = min(s.end, len(table))
                embeds[q: q + end - s.start] = table[s.start: end].to(embeds.dtype)
        return embeds

    def _adaption(self, scheduled: list[ScheduledRow], first: list[int]) -> list[AdaptionGroup]:
        """LLaMA-Adapter rows grouped by adapter, with its prompt keys/values (before any LoRA step is set)."""
        groups: dict[int, tuple[AdaptionWeights, list[torch.Tensor]]] = {}
        for s, q in zip(scheduled, first):
            w = s.row.adaption
            if w is not None:
                groups.setdefault(id(w), (w, []))[1].append(torch.arange(q, q + s.num_tokens))
        out = []
        for w, spans in groups.values():
            keys, values, gates = prompt_kv(self.model, w, self.kv_heads, self.head_dim)
            out.append(AdaptionGroup(torch.cat(spans).to(self.device), keys, values, gates))
        return out

    def _copy_prefixes(self, scheduled: list[ScheduledRow]) -> None:
        """Prefix tuning: the adapter's key/values go straight into the row's first positions."""
        for s in scheduled:
            if s.copy_from < s.start:
                pos = torch.arange(s.copy_from, s.start)
                blocks = torch.tensor(s.row.block_ids)[pos // self.block_size]
                slots = (blocks * self.block_size + pos % self.block_size).to(self.device)
                prefix = s.row.prefix
                self.cache.write_all_layers(prefix.keys[:, :, s.copy_from: s.start], prefix.values[:, :, s.copy_from: s.start], slots)
