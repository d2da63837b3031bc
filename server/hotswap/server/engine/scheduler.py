"""Which rows compute which positions this step. Never touches tensors, so it is
tested without a model.

Every step spends a token budget: first one token for each decoding row, then
chunks of prompts (a long prompt is spread over several steps, so decoding rows
never stall behind it) and new rows, the least prompt left first (a prompt found
in the prefix cache costs a fraction of its length; finishing one prompt before
starting the next gives first tokens sooner), a prompt passed over MAX_BYPASS
times before all others. A row needs KV blocks for what it
computes; when the pool runs dry the newest running row is preempted — its
blocks are freed and it is recomputed later — so the cache never runs out of
memory. A new row starts from the longest prefix of its tokens already cached
for its adapter.

New rows are admitted cache-aware (SGLang's longest-prefix-match order, with
aging): among the first waiting rows, those with more of their prompt cached go
first, since they cost a fraction of their length, and rows that start like an
earlier one (same adapter, same first block of tokens) follow it, so a burst
sharing a system prompt finishes one group before the next group's prompt
starts; a row whose next block another row is computing waits for it instead of
computing it again. A waiting row cheaper than a running prompt goes before that
prompt's chunk (a follower needs only the tokens after the system prompt its
leader just finished). A row passed over MAX_BYPASS times goes first, so nothing
waits forever.

A row that shares blocks a row scheduled earlier in the same step completes (a
burst of requests with one system prompt) reads them in that same step
(`share_writes`): each layer writes the whole step's keys and values into the
cache before any of its queries attend, so the follower attends over blocks its
leader fills moments before. It then waits no step for them; if the leader's
forward fails, the engine recomputes the follower (`ScheduledRow.leaders`)."""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..adapters.combine import combine
from ..adapters.weights import Adapter, LoraWeights
from ..config import EngineConfig
from ..errors import AdapterIncompatible, HotswapError, InvalidArgument, NotFound, ResourceExhausted
from .kv_blocks import KVBlockManager
from .lora_slots import LoraSlotTable
from .pacing import PrefillPacer, context_sum
from .request import Task
from .row import Row

if TYPE_CHECKING:
    from ..adapters.cache import AdapterCache

ORDER_WINDOW = 128
"""Waiting rows looked up in the prefix cache each step to order admission (SGLang falls back to
arrival order past a similar queue length: the lookups are per row and step)."""
MAX_BYPASS = 32
"""Steps a waiting row may be passed over by later rows with more cached before it goes first."""
STEP_GRID = 32
"""A prompt chunk cut short by the step's budget ends where the step's token count is a multiple of
this: on CPU, oneDNN builds (and caches) kernels per token count, and a pass over the default
model's linears at token counts not seen before took ~1.5 times as long (bench/token_counts.py)."""

Computing = dict[bytes, tuple[int, Row] | None]
"""Prefix-cache keys of the full blocks rows complete this step or a later one: for this step's, the
block and the row writing it (rows admitted after it may read them), None for a later step's."""


@dataclass
class ScheduledRow:
    row: Row
    start: int
    """First position fed through the forward this step."""
    num_tokens: int
    """Positions start..start+num_tokens-1 are computed this step (laid out contiguously in the packed batch)."""
    copy_from: int
    """Prefix-tuning rows: positions copy_from..start-1 take the adapter's key/values without
    any compute (copy_from == start: nothing to copy)."""
    samples: bool = False
    """The chunk reaches a generating row's last known position, so its logits give the next token."""
    last: bool = False
    """The chunk reaches the row's last known position (a prefill-only row ends with it)."""
    decode: bool = False
    """The row feeds back one token it generated (it is not part-way through a prompt)."""
    leaders: tuple[Row, ...] = ()
    """Rows scheduled before it this step whose blocks it reads as they are written (share_writes):
    if one of them fails, what this row computed is void."""

    def __post_init__(self) -> None:
        self.last = self.end == self.row.num_tokens
        self.samples = self.last and self.row.generates
        self.decode = self.num_tokens == 1 and self.start >= self.row.num_virtual + len(self.row.prompt_ids)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    """What one engine step executes (after vLLM v1's SchedulerOutput)."""

    scheduled: list[ScheduledRow] = field(default_factory=list)
    """Rows that compute this step, in packed order: decoding rows, prompt chunks, then new rows."""
    lora_loads: list[tuple[int, LoraWeights]] = field(default_factory=list)
    """LoRA slots to fill before the forward: (slot, the adapter's weights)."""
    preempted: list[Row] = field(default_factory=list)
    """Rows that lost their KV blocks this step; they wait at the front of the queue and are recomputed."""
    failed: list[tuple[Row, HotswapError]] = field(default_factory=list)
    """Waiting rows that can never run (their adapter failed to load, or they cannot fit)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def num_decoding(self) -> int:
        """Rows feeding one generated token (the rest of the step's tokens are prompt chunks)."""
        return sum(1 for s in self.scheduled if s.decode)

    @property
    def empty(self) -> bool:
        return not (self.scheduled or self.failed or self.preempted)


class PromptBudget:
    """One step's allowance of prompt work (see pacing): the first chunk always moves."""

    def __init__(self, pacer: PrefillPacer, spare: float | None) -> None:
        self.pacer, self.spare, self.first = pacer, spare, True

    def peek(self, context: int, cap: int) -> int:
        return self.pacer.tokens(self.spare, context, cap, self.first)[0]

    def take(self, context: int, cap: int) -> int:
        n, seconds = self.pacer.tokens(self.spare, context, cap, self.first)
        if n > 0:
            self.first = False
            if self.spare is not None:
                self.spare = max(0.0, self.spare - seconds)
        return n


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVBlockManager, max_seq_len: int, adapters: AdapterCache | None = None,
                 share_writes: bool = True) -> None:
        self.cfg = cfg
        self.kv = kv
        self.share_writes = share_writes
        """New rows may read blocks rows scheduled before them complete in the same step (the forward writes
        every layer's keys and values before its attention reads any); False where rows run one by one."""
        self.num_shared_blocks = 0
        """Blocks new rows took from rows computing them in the same step, since start."""
        self.max_seq_len = max_seq_len
        self.adapters = adapters
        self.lora_slots = LoraSlotTable(cfg.max_loras, cfg.max_expert_loras)
        self.pacer = PrefillPacer(cfg.max_decode_slowdown, cfg.block_size)
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        """Admission order, newest last (the first to be preempted)."""
        self.num_preemptions = 0

    def add(self, row: Row) -> None:
        self.waiting.append(row)

    def remove_waiting(self, key: int) -> Row | None:
        for row in self.waiting:
            if row.key == key:
                self.waiting.remove(row)
                return row
        return None

    def finish(self, row: Row) -> None:
        """The row ended (done, failed or cancelled): give back its blocks and its LoRA slot."""
        if row in self.running:
            self.running.remove(row)
        self.kv.free(row)
        self._release_slot(row)

    # -- the step ------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.cfg.max_tokens_per_step
        computing: Computing = {}
        decoding = [r.num_computed for r in self.running if self._remaining(r) == 1]  # their tokens' contexts
        # paced so decoding rows are spared, unless more rows wait for their first token (pacing.py)
        prompts = PromptBudget(self.pacer, self.pacer.spare(len(decoding), sum(decoding), self._num_awaiting_prompt()))
        i = 0
        while i < len(self.running) and budget > 0:  # decoding rows first: one token each, oldest first
            row = self.running[i]
            i += 1
            if self._remaining(row) != 1:
                continue
            if not self._grow_or_preempt(row, row.num_computed + 1, out):
                break  # the row preempted itself: nothing newer is left to run
            self._schedule(out, computing, ScheduledRow(row, row.num_computed, 1, row.num_computed))
            budget -= 1
        # prompt work, shortest remaining first (a prompt mostly found in the prefix cache costs a
        # fraction of its length, and finishing one prompt before the next starts its tokens sooner)
        chunked = sorted((r for r in self.running if self._remaining(r) > 1), key=self._prompt_order)
        admitting = not out.preempted and budget > 0  # a dry pool: admitting now would only preempt again
        if admitting and self.kv.caching and len(self.running) < self.cfg.max_batch_size:
            for key in self._pending_keys():
                computing.setdefault(key, None)
            self._cache_aware_order()
        admitted: list[ScheduledRow] = []
        max_need = -1
        for row in chunked:
            # waiting rows cheaper than this running prompt go before it (a follower needing the few
            # tokens after a system prompt its leader just finished, before the next system prompt)
            if admitting and not out.preempted and row.bypassed < MAX_BYPASS and self._remaining(row) > max_need:
                max_need = self._remaining(row)
                budget = self._admit(out, budget, prompts, computing, admitted, max_need=max_need)
            if budget <= 0:
                break
            if row not in self.running:  # preempted for a chunk before it
                continue
            n = prompts.peek(row.num_computed, min(self._remaining(row), budget))
            if n <= 0:
                break  # this step's prompt work is spent
            n = self._on_grid(n, self._remaining(row), budget)
            if not self._grow_or_preempt(row, row.num_computed + n, out):
                continue
            prompts.take(row.num_computed, n)
            self._schedule(out, computing, ScheduledRow(row, row.num_computed, n, row.num_computed))
            budget -= n
        if admitting and not out.preempted:
            budget = self._admit(out, budget, prompts, computing, admitted)
        self._count_bypasses(out, chunked, admitted)
        return out

    def _num_awaiting_prompt(self) -> int:
        """Rows whose first token waits on prompt work this step could start: running rows part-way
        through their prompt, and waiting rows up to the batch's free rows (rows past that wait on
        running rows ending, which prompt work does not hasten)."""
        chunking = sum(1 for r in self.running if self._remaining(r) > 1)
        return chunking + min(len(self.waiting), max(0, self.cfg.max_batch_size - len(self.running)))

    def _on_grid(self, n: int, need: int, budget: int) -> int:
        """A chunk of n of a prompt's `need` tokens, cut short (n < need), shortened so the step's
        token count ends on STEP_GRID — unless that would leave nothing."""
        if n >= need:
            return n
        over = (self.cfg.max_tokens_per_step - budget + n) % STEP_GRID
        return n - over if n > over else n

    @staticmethod
    def _remaining(row: Row) -> int:
        return row.num_tokens - row.num_computed

    def _prompt_order(self, row: Row) -> tuple[bool, int]:
        """Rows passed over MAX_BYPASS times first, then the least prompt left (ties: admission order)."""
        return row.bypassed < MAX_BYPASS, self._remaining(row)

    def _schedule(self, out: SchedulerOutput, computing: Computing, s: ScheduledRow) -> None:
        keys = self.kv.new_block_keys(s.row, s.end)
        for i, key in enumerate(keys, start=s.row.num_cached_blocks):
            computing[key] = (s.row.block_ids[i], s.row)
        if s.end < s.row.compute_from:  # its blocks of later steps: rows sharing them wait rather than compute them too
            for key in self.kv.new_block_keys(s.row, s.row.compute_from)[len(keys):]:
                computing.setdefault(key, None)
        out.scheduled.append(s)

    def _pending_keys(self) -> set[bytes]:
        """Prefix-cache keys of the prompt blocks running rows have yet to compute."""
        keys: set[bytes] = set()
        for row in self.running:
            if row.num_computed < row.compute_from:
                keys.update(self.kv.new_block_keys(row, row.compute_from))
        return keys

    def _cache_aware_order(self) -> None:
        """Reorder the first ORDER_WINDOW waiting rows: rows passed over MAX_BYPASS times first (in
        arrival order), then by cached prompt tokens, most first; ties keep arrival order."""
        if len(self.waiting) < 2:
            return
        window = [self.waiting.popleft() for _ in range(min(len(self.waiting), ORDER_WINDOW))]
        cached = [len(self.kv.cached_prefix(r)) if r.adapter is not None or not r.adapter_ids else 0 for r in window]
        order = sorted(range(len(window)), key=lambda i: (window[i].bypassed < MAX_BYPASS, -cached[i], i))
        groups: dict[tuple, list[Row]] = {}
        for i in order:  # rows likely to share a prefix follow the first of them
            row = window[i]
            groups.setdefault((row.adapter_key, tuple(row.prompt_ids[:self.kv.block_size])), []).append(row)
        self.waiting.extendleft(reversed([row for group in groups.values() for row in group]))

    def _count_bypasses(self, out: SchedulerOutput, chunked: list[Row], admitted: list[ScheduledRow]) -> None:
        """A row counts a bypass when a row that arrived after it (row keys grow in arrival order) got
        prompt work this step and it got none: waiting rows (those the admission order looks at) passed
        by an admitted row, and running prompts passed by any prompt chunk."""
        if admitted:
            newest = max(s.row.key for s in admitted)
            for row in itertools.islice(self.waiting, ORDER_WINDOW):
                if row.key < newest:
                    row.bypassed += 1
        served = {s.row.key for s in out.scheduled if not s.decode}
        if served:
            newest = max(served)
            for row in chunked:
                if row.key not in served and row.key < newest and row in self.running:
                    row.bypassed += 1

    def observe(self, out: SchedulerOutput, seconds: float) -> None:
        """The engine's wall time for the step `out` described (paces the next prompt chunks)."""
        context = sum(context_sum(s.start, s.num_tokens) for s in out.scheduled)
        self.pacer.observe(out.num_tokens, context, seconds, prompts=out.num_decoding < len(out.scheduled))

    def _grow_or_preempt(self, row: Row, end: int, out: SchedulerOutput) -> bool:
        """Blocks for positions ..end-1, preempting the newest rows until they fit; False if `row` itself
        went, or if the newest row is already scheduled this step (a prompt chunk after the decoding rows):
        then `row` waits. (A decoding row never meets one: the rows planned before it are older.)"""
        while not self.kv.grow(row, end):
            victim = self.running[-1]
            if any(s.row is victim for s in out.scheduled):
                return False
            self.running.pop()
            self._preempt(victim, out)
            if victim is row:
                return False
        return True

    def recompute(self, row: Row, out: SchedulerOutput) -> None:
        """A running row whose step is void (a leader it read from failed): it gives back its blocks
        and slot and waits at the front of the queue, to be computed again like a preempted row."""
        self.running.remove(row)
        self._preempt(row, out)

    def _preempt(self, row: Row, out: SchedulerOutput) -> None:
        self.kv.free(row)
        self._release_slot(row)
        row.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(row)
        out.preempted.append(row)

    def _admit(self, out: SchedulerOutput, budget: int, prompts: PromptBudget, computing: Computing,
               admitted: list[ScheduledRow], max_need: int | None = None) -> int:
        """Admit waiting rows in queue order while blocks, rows and the prompt budget last (rows
        waiting on their adapter or on a block another row computes are passed); with `max_need`,
        only rows with at most that many prompt tokens left, among the first ORDER_WINDOW. Returns
        the budget left."""
        skipped: list[Row] = []  # waiting on their own resource (adapter load, LoRA slot); later rows may pass
        looked = 0
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_batch_size:
            if max_need is not None and looked == ORDER_WINDOW:
                break
            looked += 1
            row = self.waiting.popleft()
            ready = self._resolve_adapter(row, may_load=looked <= self.cfg.max_batch_size)
            if isinstance(ready, HotswapError) or (ready and (ready := self._check_fits(row)) is not True) \
                    or (ready and (ready := check_task(row)) is not True):
                out.failed.append((row, ready))
                continue
            if not ready:
                skipped.append(row)
                continue
            hits = self.kv.cached_prefix(row)
            shared = self.kv.written_prefix(row, hits, computing) if self.share_writes else []
            hits += [block for block, _ in shared]
            if self.kv.first_missing_key(row, hits) in computing:
                # another row is computing this row's next block (requests sharing a system prompt, the
                # candidates of one Score call): wait for it and read it from the prefix cache
                skipped.append(row)
                continue
            copy_from = len(hits) * self.kv.block_size
            start = max(copy_from, row.num_virtual) if row.prefix is not None else copy_from
            if max_need is not None and row.num_tokens - start > max_need:
                if row.bypassed >= MAX_BYPASS:  # passed over long enough: nothing behind it goes first
                    self.waiting.appendleft(row)
                    break
                skipped.append(row)  # a running prompt is shorter: it goes first
                continue
            n = self._on_grid(prompts.peek(start, min(row.num_tokens - start, budget)), row.num_tokens - start, budget)
            if n <= 0:
                self.waiting.appendleft(row)  # this step's prompt work is spent
                break
            if not self.kv.can_admit(row, hits, start - copy_from + n):
                self.waiting.appendleft(row)  # first come, first served: it goes first once blocks free up
                break
            if not self._acquire_slot(row, out):
                skipped.append(row)
                continue
            prompts.take(start, n)
            self.kv.admit(row, hits)
            self.kv.grow(row, start + n)
            row.mark_admitted()
            self.running.append(row)
            leaders = tuple({id(leader): leader for _, leader in shared}.values())
            self.num_shared_blocks += len(shared)
            self._schedule(out, computing, ScheduledRow(row, start, n, copy_from, leaders=leaders))
            admitted.append(out.scheduled[-1])
            budget -= n
        self.waiting.extendleft(reversed(skipped))
        return budget

    # -- per-row resources ---------------------------------------------------------------
    def _resolve_adapter(self, row: Row, may_load: bool = True) -> HotswapError | bool:
        """True when the row's adapter(s) are on the device (or it needs none), False while
        one loads (or, without `may_load`, is not on the device), or the error that makes the row
        unservable. Only rows among the first max_batch_size waiting start loads: a row further back
        runs early only if its adapter is already there, so loads for rows that cannot run yet do not
        evict the adapters of rows that can (with 1,000 Zipf-popular adapters, 256 queued requests and a
        48-adapter cache, loads went 440 -> 431: that cache is smaller than two batches' adapters anyway)."""
        ids = row.adapter_ids
        if not ids or row.adapter is not None:
            return True
        if self.adapters is None:
            return NotFound(f"unknown adapter {ids[0]!r}: this engine has no adapter store", field="adapter_id")
        got: list[Adapter | None] = []
        try:
            for adapter_id in ids:  # acquire them all, so every cold one starts loading now
                got.append(self.adapters.acquire(adapter_id, load=may_load))
        except HotswapError as error:
            self._release(ids[: len(got)], got)
            return error
        if any(a is None for a in got):
            self._release(ids, got)
            if len(ids) > 1 and (error := self.adapters.together_error(ids)) is not None:
                return error  # parts that cannot be on the device together would evict each other forever
            return False
        try:
            adapter = got[0] if row.request.adapters is None else combine(
                [(a, w) for a, (_, w) in zip(got, row.request.adapters)], row.lora_key, self.adapters.cfg.max_lora_rank)
            if row.request.lora_scale != 1.0 and not (isinstance(adapter.weights, LoraWeights) and adapter.weights.scalable):
                raise AdapterIncompatible(f"adapter {adapter.id!r} ({adapter.peft_type}) does not scale linearly: a per-request scale "
                                          "applies to LoRA / AdaLoRA deltas and lora_B biases only (not DoRA, IA3, embedding / head "
                                          "tables or virtual tokens)", field="lora_scale")
        except HotswapError as error:
            self._release(ids, got)
            return error
        row.adapter = adapter
        return True

    def _release(self, ids: list[str], got: list[Adapter | None]) -> None:
        for adapter_id, adapter in zip(ids, got):
            if adapter is not None:
                self.adapters.release(adapter_id)

    def _check_fits(self, row: Row) -> HotswapError | bool:
        new = row.max_len - row.num_virtual - len(row.prompt_ids)
        field = "max_new_tokens" if row.generates else "prompt"
        if row.max_len > self.max_seq_len:
            return InvalidArgument(
                f"{row.num_virtual} virtual + {len(row.prompt_ids)} prompt + {new} "
                f"new tokens exceed max_seq_len {self.max_seq_len}", field=field)
        need = self.kv.blocks_for(row.max_len)
        if need > self.kv.num_blocks:
            return ResourceExhausted(
                f"{row.max_len} positions need {need} KV blocks; the whole KV cache holds {self.kv.num_blocks} "
                f"(raise kv_cache_mb{', or lower max_new_tokens' if row.generates else ''})", field=field)
        return True

    def _acquire_slot(self, row: Row, out: SchedulerOutput) -> bool:
        if row.lora is None or row.lora_slot >= 0:
            return True
        got = self.lora_slots.acquire(row.lora_key, experts=bool(row.lora.params))
        if got is None:
            return False  # every slot it may take serves a running row: wait for one to finish
        row.lora_slot, needs_load = got
        if needs_load:
            out.lora_loads.append((row.lora_slot, row.lora))
        return True

    def _release_slot(self, row: Row) -> None:
        if row.lora_slot >= 0:
            self.lora_slots.release(row.lora_slot)
            row.lora_slot = -1


def check_task(row: Row) -> HotswapError | bool:
    """A classification adapter serves Classify only, and Classify needs one (known once the adapter is loaded)."""
    if row.request.task is Task.CLASSIFY and row.score_head is None:
        return AdapterIncompatible(f"adapter {row.request.adapter_id!r} has no classification head: Classify needs a "
                                   "sequence-classification adapter (PEFT task_type SEQ_CLS)", field="adapter_id")
    if row.request.task is not Task.CLASSIFY and row.score_head is not None:
        return AdapterIncompatible(f"adapter {row.request.adapter_id!r} is a sequence-classification adapter (task_type "
                                   f"SEQ_CLS): it serves Classify, not {row.request.task.value}", field="adapter_id")
    tables = row.token_tables
    if row.request.task is Task.SCORE and tables is not None and (tables.head is not None or tables.head_ids is not None):
        # Scoring reads the base head's logits for every continuation token; a per-adapter head there is not built yet
        return AdapterIncompatible(f"adapter {row.request.adapter_id!r} has its own output head (modules_to_save / trainable "
                                   "tokens on lm_head): Score does not serve such adapters yet", field="adapter_id")
    return True
