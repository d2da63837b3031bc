"""The scheduler and the KV block manager without a model: token budget, chunked
prefill, preemption, prefix caching, LoRA slots, rows that can never run."""
import pytest
import torch

from hotswap.server.adapters.weights import Adapter, LoraModuleWeights, LoraWeights, PrefixWeights
from hotswap.server.config import EngineConfig
from hotswap.server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from hotswap.server.engine.kv_blocks import BlockPool, KVBlockManager
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.engine.row import Row
from hotswap.server.engine.scheduler import Scheduler
from hotswap.server.errors import InvalidArgument, NotFound, ResourceExhausted

BS = 4  # block size


def row(n_prompt: int, new: int = 8, adapter: Adapter | None = None, first: int = 1) -> Row:
    ids = list(range(first, first + n_prompt))
    req = GenerateRequest(prompt_ids=ids, adapter_id=adapter.id if adapter else "", params=SamplingParams(max_new_tokens=new))
    return Row(req, ids, lambda e: None, IncrementalDetokenizer(None, ids), StopMatcher([]), adapter=adapter)


def lora(adapter_id: str) -> Adapter:
    w = LoraModuleWeights(torch.zeros(2, 8), torch.zeros(8, 2), 1.0)
    return Adapter(adapter_id, "LORA", LoraWeights({"layer.q_proj": w}))


def prefix(adapter_id: str, nv: int) -> Adapter:
    return Adapter(adapter_id, "PREFIX_TUNING", PrefixWeights(torch.zeros(1, 1, nv, 4), torch.zeros(1, 1, nv, 4)))


def scheduler(blocks: int = 64, **cfg) -> Scheduler:
    """Prompt chunks bounded by the token budget alone unless a test turns pacing on (see the pacing test)."""
    cfg = {"max_batch_size": 8, "max_tokens_per_step": 64, "block_size": BS, "max_decode_slowdown": 0, **cfg}
    return Scheduler(EngineConfig(**cfg), KVBlockManager(blocks, BS), max_seq_len=256)


def step(s: Scheduler, next_token: int = 7):
    """What the engine does with a step: positions computed, blocks offered to the cache,
    one token sampled for each row whose chunk reached its end."""
    out = s.schedule()
    for sr in out.scheduled:
        sr.row.num_computed = sr.end
        s.kv.commit(sr.row)
        if sr.samples:
            sr.row.output_ids.append(next_token)
    return out


def test_admits_up_to_max_batch_size_in_arrival_order():
    s = scheduler(max_batch_size=3)
    rows = [row(5, first=100 * i) for i in range(5)]  # different prompts: nothing shared to wait for
    for r in rows:
        s.add(r)
    out = step(s)
    assert [x.row for x in out.scheduled] == rows[:3]
    out = step(s)
    assert [x.row for x in out.scheduled] == rows[:3] and all(x.num_tokens == 1 for x in out.scheduled)
    assert list(s.waiting) == rows[3:]


def test_long_prompt_is_chunked_and_decoding_rows_never_stall():
    s = scheduler(max_tokens_per_step=16)
    decoding = [row(3), row(3)]
    for r in decoding:
        s.add(r)
    step(s)
    long = row(40)
    s.add(long)
    chunks = []
    while long.num_computed < 40:
        out = step(s)
        by_row = {id(x.row): x for x in out.scheduled}
        assert all(by_row[id(r)].num_tokens == 1 for r in decoding)  # a token for every decoding row, every step
        chunks.append(by_row[id(long)].num_tokens)
        assert out.num_tokens <= 16
    assert chunks == [14, 14, 12] and long.output_ids == [7]  # only the last chunk samples
    assert long.num_computed == 40 and len(long.block_ids) == 40 // BS


def test_prompt_chunks_are_paced_by_measured_step_times():
    """With rows decoding, a step carrying prompt tokens may take at most max_decode_slowdown × a
    decode-only step: chunks shrink as the prompt's context (and so each token's cost) grows; more rows
    waiting for a first token than decoding lift the limit."""
    s = scheduler(blocks=1024, max_batch_size=32, max_tokens_per_step=512, max_decode_slowdown=3.0)
    decoding = [row(3, new=240, first=10 + i) for i in range(8)]
    for r in decoding:
        s.add(r)
    step(s)
    s.observe(step(s), 0.080)  # a decode-only step of 8 rows: 10 ms per row

    def prefill(first: int) -> tuple[list[int], list[float]]:
        long = row(250, new=1, first=first)
        s.add(long)
        chunks, seconds = [], []
        while long.num_computed < 250:
            start = long.num_computed
            out = step(s)
            chunk = next((x.num_tokens for x in out.scheduled if x.row is long), 0)
            assert out.num_decoding == 8
            # A "device" where a prompt token costs 1 ms plus 10 µs per position of context before it.
            seconds.append(0.080 + chunk * (0.001 + 1e-5 * (start + chunk / 2)))
            chunks.append(chunk)
            s.observe(out, seconds[-1])
        s.finish(long)
        return chunks, seconds

    chunks, _ = prefill(300)
    # 2 × 80 ms of spare time per step: one block until a prompt token's cost is measured, then
    # about 160 tokens, then fewer as the fit learns that context makes each token dearer.
    assert chunks[0] == BS and 150 <= chunks[1] <= 160 and chunks[2] < chunks[1]
    # The next prompt is paced by what the first taught: no step goes past 3 × the decode-only 80 ms.
    chunks, seconds = prefill(600)
    assert chunks[-1] < chunks[0] and max(seconds) <= 3.0 * 0.080 * 1.05, seconds
    idle = scheduler(max_tokens_per_step=512, max_decode_slowdown=3.0)
    lone = row(250, new=1)
    idle.add(lone)
    assert idle.schedule().scheduled[0].num_tokens == 250  # nobody decoding: the whole budget
    # More rows waiting for a first token than decoding (a burst behind the 8): prompts take the budget.
    burst = [row(60, new=1, first=2000 + 100 * i) for i in range(9)]
    for r in burst:
        s.add(r)
    out = s.schedule()
    assert out.num_decoding == 8 and out.num_tokens == 512
    assert [x.num_tokens for x in out.scheduled if not x.decode] == [60] * 8 + [24]


def test_rows_that_can_never_run_fail_instead_of_blocking():
    s = scheduler(blocks=8)  # 32 positions in the whole pool
    too_long, too_big, fine = row(10, new=250), row(20, new=20), row(4)
    for r in (too_long, too_big, fine):
        s.add(r)
    out = s.schedule()
    assert [x.row for x in out.scheduled] == [fine]
    errors = {id(r): e for r, e in out.failed}
    assert isinstance(errors[id(too_long)], InvalidArgument) and "max_seq_len" in str(errors[id(too_long)])
    assert isinstance(errors[id(too_big)], ResourceExhausted) and "KV blocks" in str(errors[id(too_big)])


def test_adapter_without_store_is_not_found():
    s = scheduler()
    r = row(3)
    r.request.adapter_id = "nope"
    s.add(r)
    assert isinstance(s.schedule().failed[0][1], NotFound)


def test_dry_pool_preempts_the_newest_row_which_resumes_by_recompute():
    s = scheduler(blocks=6, max_tokens_per_step=64)  # 24 positions
    old, new = row(8, new=12), row(8, new=12, first=50)
    s.add(old)
    step(s)
    s.add(new)
    step(s)
    assert s.kv.num_used == 5  # old: 9 positions in 3 blocks, new: 8 in 2
    preempted_at = None
    for i in range(40):
        out = step(s)
        if out.preempted:
            preempted_at = i
            assert out.preempted == [new] and new.block_ids == [] and new.num_computed == 0
            assert s.waiting[0] is new and s.running == [old]
        if not old.finish_reason and len(old.output_ids) >= 12:
            old.finish_reason = "length"
            s.finish(old)
        if len(new.output_ids) >= 12:
            break
    assert preempted_at is not None and new.num_preemptions == 1
    # Recomputed from its prompt and the tokens it had already generated.
    assert len(new.output_ids) == 12 and new.num_computed == new.num_tokens - 1


def test_prefix_cache_hits_per_adapter_and_always_leaves_a_token_to_compute():
    s = scheduler()
    first = row(13)
    s.add(first)
    step(s)
    assert s.kv.stats.hits == 0
    twin = row(13)  # same tokens, same (base) adapter
    s.add(twin)
    out = step(s)
    sr = next(x for x in out.scheduled if x.row is twin)
    assert sr.start == 12 and twin.block_ids[:3] == first.block_ids[:3]  # 3 full blocks shared
    exact = row(12)  # all 12 tokens cached: the last block is recomputed so the step yields logits
    s.add(exact)
    out = step(s)
    sr = next(x for x in out.scheduled if x.row is exact)
    assert sr.start == 8 and sr.num_tokens == 4 and sr.samples
    other = row(13, adapter=lora("a@1"))  # same tokens, another adapter: nothing shared
    other.lora_slot = -1
    s.add(other)
    out = step(s)
    sr = next(x for x in out.scheduled if x.row is other)
    assert sr.start == 0 and not set(other.block_ids) & set(first.block_ids)


def test_prefix_adapter_rows_copy_their_virtual_positions_and_key_them():
    s = scheduler()
    a = row(6, adapter=prefix("p@1", nv=5))
    s.add(a)
    sr = step(s).scheduled[0]
    assert (sr.copy_from, sr.start, sr.num_tokens) == (0, 5, 6)  # positions 0..4 copied, 5..10 computed
    b = row(6, adapter=prefix("p@1", nv=5))
    s.add(b)
    sr = step(s).scheduled[-1]
    assert (sr.copy_from, sr.start) == (8, 8) and b.block_ids[:2] == a.block_ids[:2]


def test_freed_blocks_stay_cached_until_reused_least_recently_used_first():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.register(blocks[0], b"k0")
    pool.release(blocks)  # the unkeyed block goes to the front, the keyed one is kept longest
    assert pool.lookup(b"k0") == blocks[0]
    again = pool.allocate(3)
    assert blocks[0] not in again and pool.lookup(b"k0") == blocks[0]
    pool.allocate(1)  # only the cached block is left: reusing it drops its key
    assert pool.lookup(b"k0") is None


def test_more_lora_adapters_than_slots_wait_for_a_free_slot():
    s = scheduler(max_loras=2)
    rows = [row(3, new=2, adapter=lora(f"a{i}@1")) for i in range(3)] + [row(3, new=2)]
    for r in rows:
        s.add(r)
    out = step(s)
    assert {x.row for x in out.scheduled} == {rows[0], rows[1], rows[3]}  # the base row passes the waiting one
    assert sorted(slot for slot, _ in out.lora_loads) == [0, 1]
    for r in rows[:2] + rows[3:]:
        step(s)
        r.finish_reason = "length"
    for r in rows[:2] + rows[3:]:
        s.finish(r)
    out = step(s)
    assert [x.row for x in out.scheduled] == [rows[2]] and len(out.lora_loads) == 1
    again = row(3, new=2, adapter=lora("a2@1"))
    s.add(again)
    assert step(s).lora_loads == []  # already in a slot: no copy


def test_only_the_next_batch_of_waiting_rows_starts_adapter_loads():
    """Rows further back than max_batch_size run early only if their adapter is already on the device:
    loads for rows that cannot run yet would evict the adapters of rows that can."""
    from hotswap.server.adapters.cache import AdapterCache
    from hotswap.server.config import AdapterCacheConfig

    requested: list[str] = []

    def load(adapter_id: str) -> Adapter:
        requested.append(adapter_id)
        return lora(adapter_id)

    cache = AdapterCache(AdapterCacheConfig(device_bytes=10**6, host_bytes=10**6), load, torch.device("cpu"), torch.float32)
    s = Scheduler(EngineConfig(max_batch_size=2, max_tokens_per_step=64, block_size=BS, max_decode_slowdown=0),
                  KVBlockManager(64, BS), max_seq_len=256, adapters=cache)
    ids = [f"a{i}@1" for i in range(5)]
    rows = []
    for i, adapter_id in enumerate(ids):
        prompt = list(range(1 + 10 * i, 4 + 10 * i))
        req = GenerateRequest(prompt_ids=prompt, adapter_id=adapter_id, params=SamplingParams(max_new_tokens=2))
        rows.append(Row(req, prompt, lambda e: None, IncrementalDetokenizer(None, prompt), StopMatcher([]), adapter=None))
        s.add(rows[-1])
    assert step(s).scheduled == []  # every adapter still loading
    cache.wait_idle(10)
    assert sorted(requested) == ids[:2]
    cache.load(ids[4])  # already on the device (another request loaded it): a row further back may use it
    out = step(s)
    assert {x.row for x in out.scheduled} == {rows[0], rows[1]}  # the batch is full: nobody passes
    for r in rows[:2]:
        s.finish(r)
    out = step(s)
    assert rows[4] in {x.row for x in out.scheduled}  # resident: runs although rows 2 and 3 are ahead of it
    cache.wait_idle(10)
    assert sorted(requested) == sorted(ids)  # rows 2 and 3 are now the first two waiting: their loads start
    cache.close()


def test_rows_sharing_a_prompt_wait_for_its_blocks_and_cached_rows_go_first():
    """Cache-aware admission: a row whose next block another row computes in a later step waits for
    it (one computes a shared prompt, the others read it), even with budget left that a row behind
    it takes; and once cached, a row that reuses it passes an older row that computes everything."""
    s = scheduler(max_batch_size=8, max_tokens_per_step=48)
    shared = list(range(1, 57))  # 14 blocks
    first, copy_a, copy_b = (row(0) for _ in range(3))
    for r in (first, copy_a, copy_b):
        r.prompt_ids[:] = shared + [99]
    other = row(25, first=500)  # arrives before the copies, shares nothing
    s.add(first), s.add(other), s.add(copy_a), s.add(copy_b)
    out = step(s)  # first's chunk ends on the step grid (32); the copies wait for its later blocks, other takes the rest
    assert [(x.row, x.start, x.num_tokens) for x in out.scheduled] == [(first, 0, 32), (other, 0, 16)]
    assert list(s.waiting) == [copy_a, copy_b]
    out = step(s)  # first completes its blocks; the copies read them as they are written and compute 1 token each
    assert [(x.row, x.start, x.num_tokens) for x in out.scheduled] == [
        (other, 16, 9), (first, 32, 25), (copy_a, 56, 1), (copy_b, 56, 1)]
    assert s.kv.stats.hits == 2 * 56
    late_other, late_copy = row(25, first=900), row(0)
    late_copy.prompt_ids[:] = shared + [98]
    s.add(late_other), s.add(late_copy)
    out = step(s)  # the four decode; the cached copy goes before the older row that computes everything
    assert [x.row for x in out.scheduled if not x.decode] == [late_copy, late_other]
    assert next(x for x in out.scheduled if x.row is late_copy).num_tokens == 1


def test_rows_starting_alike_follow_the_first_of_them():
    """Requests over two system prompts arriving interleaved (A, B, A, B): each system prompt's
    followers are admitted right after it, so its group gets first tokens before the next system
    prompt takes the budget; and a follower cheaper than a running prompt goes before its chunk."""
    s = scheduler(max_batch_size=8, max_tokens_per_step=48)
    prompt_a, prompt_b = list(range(1, 41)), list(range(500, 540))  # 10 blocks each
    a1, b1, a2, b2 = row(0), row(0), row(0), row(0)
    for r, p, last in ((a1, prompt_a, 91), (b1, prompt_b, 92), (a2, prompt_a, 93), (b2, prompt_b, 94)):
        r.prompt_ids[:] = p + [last]
        s.add(r)
    out = step(s)  # a1's 41 tokens, a2 reads a1's blocks as they are written; b1 takes what is left
    assert [(x.row, x.start, x.num_tokens) for x in out.scheduled] == [(a1, 0, 41), (a2, 40, 1), (b1, 0, 6)]
    out = step(s)  # b2 waits for b1's blocks until b1's chunk writes them, then reads them in that step
    assert [(x.row, x.num_tokens) for x in out.scheduled if not x.decode] == [(b1, 35), (b2, 1)]
    assert list(s.waiting) == []


def test_a_waiting_row_cheaper_than_a_running_prompt_goes_before_its_chunk():
    """Two prompts part-way through (5 and 68 tokens left): a new row needing 10 tokens (the rest is
    cached) goes after the first and before the second, not after both."""
    s = scheduler(max_batch_size=8, max_tokens_per_step=32)
    cached = list(range(1, 41))
    q = row(0, new=1)
    q.prompt_ids[:] = cached + [91]
    s.add(q)
    while not q.output_ids:
        step(s)
    s.finish(q)  # its 10 full blocks stay in the prefix cache
    long, short = row(100, first=600), row(37, first=300)
    s.add(long)
    step(s)
    s.add(short)
    step(s)  # short (37 left, fewer than long's 68) goes first and takes the step
    assert (long.num_computed, short.num_computed) == (32, 32)
    follower = row(0)
    follower.prompt_ids[:] = cached[:36] + list(range(900, 910))  # 9 cached blocks, 10 tokens to compute
    s.add(follower)
    out = step(s)
    assert [(x.row, x.start, x.num_tokens) for x in out.scheduled] == [(short, 32, 5), (follower, 36, 10), (long, 32, 17)]


def test_rows_sharing_a_prompt_read_its_blocks_in_the_step_that_writes_them():
    """A burst of rows with one prompt: the first computes it, and the others, scheduled after it in the
    same step, take its blocks (their keys and values are written before any query attends) and compute
    only their own last position; they wait instead where rows run one by one (share_writes off)."""
    shared = list(range(1, 25))  # 6 blocks

    def burst(s: Scheduler, n: int = 3) -> list:
        rows = [row(0) for _ in range(n)]
        for r in rows:
            r.prompt_ids[:] = shared + [99]
            s.add(r)
        return rows

    s = scheduler(max_batch_size=8, max_tokens_per_step=64)
    first, copy_a, copy_b = burst(s)
    out = step(s)
    assert [(x.row, x.start, x.num_tokens) for x in out.scheduled] == [(first, 0, 25), (copy_a, 24, 1), (copy_b, 24, 1)]
    assert copy_a.block_ids[:6] == copy_b.block_ids[:6] == first.block_ids[:6]
    assert len({first.block_ids[6], copy_a.block_ids[6], copy_b.block_ids[6]}) == 3  # the partial block is each row's own
    assert [x.leaders for x in out.scheduled] == [(), (first,), (first,)] and s.num_shared_blocks == 12
    assert s.kv.stats.hits == 48 and all(s.kv.pool.ref[b] == 3 for b in first.block_ids[:6])

    s = Scheduler(EngineConfig(max_batch_size=8, max_tokens_per_step=64, block_size=BS, max_decode_slowdown=0),
                  KVBlockManager(64, BS), max_seq_len=256, share_writes=False)
    first, copy_a, copy_b = burst(s)
    assert [x.row for x in step(s).scheduled] == [first] and list(s.waiting) == [copy_a, copy_b]
    assert [(x.row, x.start) for x in step(s).scheduled] == [(first, 25), (copy_a, 24), (copy_b, 24)]  # read from the cache



def test_cached_rows_go_first_but_a_passed_over_row_is_not_starved():
    from hotswap.server.engine.scheduler import MAX_BYPASS
    s = scheduler(max_batch_size=1, max_tokens_per_step=64, blocks=256)
    warm = row(20, new=1)
    s.add(warm)
    step(s)
    s.finish(warm)  # its 5 blocks stay cached
    old = row(20, new=1, first=700)  # nothing cached
    s.add(old)
    for i in range(MAX_BYPASS + 1):  # one row a step; a new row that reuses the cached prompt arrives each step
        hit = row(0, new=1)
        hit.prompt_ids[:] = warm.prompt_ids + [1000 + i]
        s.add(hit)
        admitted = [x.row for x in step(s).scheduled]
        for r in list(s.running):
            s.finish(r)
        if old in admitted:
            break
    assert old in admitted and old.bypassed == MAX_BYPASS and i == MAX_BYPASS


def test_running_prompts_go_shortest_remaining_first_and_short_new_rows_pass_long_prompts():
    """Prompt work goes to the least prompt left: a long prompt part-way through waits a step for a
    row that needs a few tokens, and of two long prompts the one nearer its end finishes first."""
    s = scheduler(max_tokens_per_step=24, blocks=128)
    long_a, long_b = row(60, first=100), row(60, first=300)
    s.add(long_a), s.add(long_b)
    out = step(s)
    assert [(x.row, x.num_tokens) for x in out.scheduled] == [(long_a, 24)]
    out = step(s)  # a has 36 left, b 60: a first
    assert [(x.row, x.num_tokens) for x in out.scheduled] == [(long_a, 24)]
    short = row(5, first=600)
    s.add(short)
    out = step(s)  # short (5) before a (12 left) before b (60)
    assert [(x.row, x.num_tokens) for x in out.scheduled] == [(short, 5), (long_a, 12), (long_b, 7)]
    out = step(s)  # short and a decode; b's prompt goes on
    assert [(x.row, x.num_tokens) for x in out.scheduled] == [(long_a, 1), (short, 1), (long_b, 22)]


def test_a_long_prompt_passed_over_by_short_ones_is_not_starved():
    from hotswap.server.engine.scheduler import MAX_BYPASS
    s = scheduler(max_tokens_per_step=64, max_batch_size=64, blocks=1024)
    long = row(200, new=1, first=5000)
    s.add(long)
    step(s)  # its first 64 tokens; 136 left
    got = []
    for i in range(MAX_BYPASS + 2):  # each step a new 64-token prompt arrives: shorter than the long one's rest
        s.add(row(64, new=1, first=10_000 + 100 * i))
        out = step(s)
        got.append(sum(x.num_tokens for x in out.scheduled if x.row is long))
        for x in out.scheduled:
            if x.row is not long and x.row.finish_reason is None and len(x.row.output_ids) >= 1:
                x.row.finish_reason = "length"
                s.finish(x.row)
    assert got[0] == 0 and long.num_computed > 64  # passed over at first, served once passed over MAX_BYPASS times


def test_a_prompt_chunk_never_preempts_a_row_already_scheduled_this_step():
    """Decoding rows are scheduled before prompt chunks: when the pool is dry, an older row's
    prompt chunk waits rather than take a newer decoding row's blocks after its token was planned."""
    s = scheduler(max_tokens_per_step=64, blocks=6)
    older = row(8, new=1, first=100)  # 2 blocks
    s.add(older)
    s.schedule()  # admitted: its first chunk is planned, not yet computed
    older.num_computed = 4  # as though only its first block was computed
    newer = row(11, new=8, first=300)  # 3 blocks, then a 4th once it decodes past position 12
    s.add(newer)
    out = step(s)
    assert newer in s.running
    while not out.preempted and newer in s.running:
        out = step(s)
        assert all(x.row in s.running or x.row.finish_reason for x in out.scheduled)
        for p in out.preempted:
            assert all(x.row is not p for x in out.scheduled)


def test_a_prompt_chunk_cut_by_the_budget_ends_the_step_on_the_grid():
    """Steps carrying part of a prompt hold a multiple of STEP_GRID tokens (CPU matmul kernels are
    built per token count), however many rows decode; the prompt's last chunk ends where it ends."""
    from hotswap.server.engine.scheduler import STEP_GRID
    s = scheduler(max_tokens_per_step=100, max_batch_size=8, blocks=512)
    decoding = [row(3, new=200, first=1000 * (i + 1)) for i in range(5)]
    for r in decoding:
        s.add(r)
    step(s)
    long = row(240, new=1, first=9000)
    s.add(long)
    totals = []
    while long.num_computed < 240 and len(totals) < 10:
        out = step(s)
        totals.append((out.num_tokens, long.num_computed < 240))
    assert all(n % STEP_GRID == 0 for n, cut in totals if cut) and totals[0][0] == 96
    assert sum(n - 5 for n, _ in totals) == 240  # every prompt token computed once


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_traffic_on_a_small_pool_keeps_every_invariant(seed):
    """Seeded random arrivals (shared prompts, long and short, a pool that runs dry): every step
    schedules only running rows, each at most once and from where it stopped, never a row it
    preempts, within the token budget; every row finishes with its tokens and no block leaks."""
    import random
    rnd = random.Random(seed)
    s = scheduler(blocks=40, max_batch_size=6, max_tokens_per_step=48)
    shared = list(range(500, 530))
    rows, steps = [], 0
    while steps < 2000 and (len(rows) < 60 or s.running or s.waiting):
        if len(rows) < 60 and rnd.random() < 0.4:
            r = row(rnd.choice([2, 5, 17, 40, 90]), new=rnd.randint(1, 12), first=rnd.randrange(1, 10_000))
            if rnd.random() < 0.3:
                r.prompt_ids[:] = shared[: rnd.randint(8, 30)] + r.prompt_ids[:5]
            rows.append(r)
            s.add(r)
        before = {id(r): r.num_computed for r in s.running}
        out = step(s)
        steps += 1
        assert len({id(x.row) for x in out.scheduled}) == len(out.scheduled) and out.num_tokens <= 48
        assert not {id(p) for p in out.preempted} & {id(x.row) for x in out.scheduled}
        for x in out.scheduled:
            assert x.row in s.running and x.start == before.get(id(x.row), x.start)
            assert len(x.row.block_ids) * BS >= x.end
        for r in list(s.running):
            if len(r.output_ids) >= r.request.params.max_new_tokens:
                r.finish_reason = "length"
                s.finish(r)
        assert not out.failed
    assert all(len(r.output_ids) == r.request.params.max_new_tokens for r in rows), steps
    assert s.kv.num_used == 0 and not s.running and not s.waiting
    assert s.num_preemptions > 0 and s.kv.stats.hits > 0  # the pool did run dry; shared prompts were reused
