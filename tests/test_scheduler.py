"""Admission without a model: batch size, token budget, FIFO, too-long requests."""
from hotswap.server.config import EngineConfig
from hotswap.server.engine.batch import Row
from hotswap.server.engine.detokenize import IncrementalDetokenizer, StopMatcher
from hotswap.server.engine.request import GenerateRequest, SamplingParams
from hotswap.server.engine.scheduler import Scheduler
from hotswap.server.errors import InvalidArgument, NotFound


def row(n_prompt: int, new: int = 8, adapter: str = "") -> Row:
    ids = list(range(1, n_prompt + 1))
    req = GenerateRequest(prompt_ids=ids, adapter_id=adapter, params=SamplingParams(max_new_tokens=new))
    return Row(req, ids, lambda e: None, IncrementalDetokenizer(None, ids), StopMatcher([]))


def test_admits_up_to_max_batch_size_in_arrival_order():
    s = Scheduler(EngineConfig(max_batch_size=3, max_tokens_per_step=1000), None)
    rows = [row(5) for _ in range(5)]
    for r in rows:
        s.add(r)
    out = s.schedule()
    assert out.prefill == rows[:3] and not out.decode
    s.running.concatenate(out.prefill)
    out = s.schedule()
    assert out.prefill == [] and out.decode == rows[:3]
    assert list(s.waiting) == rows[3:]


def test_token_budget_counts_running_rows_and_keeps_fifo():
    s = Scheduler(EngineConfig(max_batch_size=8, max_tokens_per_step=20), None)
    s.running.concatenate([row(3), row(3)])  # 2 decode tokens
    big, small = row(15), row(2)
    for r in (row(10), big, small):
        s.add(r)
    out = s.schedule()
    # 2 + 10 = 12 admitted; the 15-token prompt does not fit in 8 and the 2-token one waits behind it.
    assert [len(r.prompt_ids) for r in out.prefill] == [10]
    assert list(s.waiting) == [big, small]


def test_rows_that_can_never_run_fail_instead_of_blocking():
    s = Scheduler(EngineConfig(max_batch_size=4, max_tokens_per_step=16, max_seq_len=64), None)
    too_wide, too_long, fine = row(17), row(10, new=60), row(4)
    for r in (too_wide, too_long, fine):
        s.add(r)
    out = s.schedule()
    assert out.prefill == [fine]
    errors = {id(r): e for r, e in out.failed}
    assert isinstance(errors[id(too_wide)], InvalidArgument) and "max_tokens_per_step" in str(errors[id(too_wide)])
    assert isinstance(errors[id(too_long)], InvalidArgument) and "max_seq_len" in str(errors[id(too_long)])


def test_adapter_without_store_is_not_found():
    s = Scheduler(EngineConfig(), None)
    r = row(3, adapter="nope")
    s.add(r)
    out = s.schedule()
    assert isinstance(out.failed[0][1], NotFound)
