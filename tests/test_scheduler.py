import pytest

from llmcycle.errors import LlmcycleError
from llmcycle.serve.block_manager import BlockManager
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.scheduler import ScheduledBatch, Scheduler, Sequence, SequenceStatus

BS = 4


def _next_token(context: list[int]) -> int:
    """Fake model: a deterministic function of the whole context, so a wrong recompute shows."""
    return (sum(context) * 31 + len(context)) % 97 + 3


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    out: list[int] = []
    for _ in range(max_tokens):
        out.append(_next_token(prompt + out))
    return out


def _seq(sid: str, prompt: list[int], max_tokens: int = 4, **kw) -> Sequence:
    return Sequence(sid, list(prompt), SamplingParams(max_tokens=max_tokens, **kw.pop("params", {})), **kw)


class FakeModel:
    """Holds what a real KV cache would hold per sequence, and checks the scheduler feeds it right."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.kv: dict[str, list[int]] = {}

    def step(self, batch: ScheduledBatch) -> dict[str, int]:
        bm = self.sched.bm
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        assert len(batch) <= self.sched.max_num_seqs
        sampled = {}
        for item in batch:
            seq = item.seq
            cache = self.kv.get(seq.seq_id, [])
            if len(cache) < item.start:
                cache = seq.tokens[: item.start]  # a prefix-cache hit: the model never computed these
            assert cache[: item.start] == seq.tokens[: item.start]
            cache = cache[: item.start] + item.token_ids
            self.kv[seq.seq_id] = cache
            # The block manager must hold exactly the tokens the model has computed after this step.
            table = bm.block_table(seq.seq_id)
            held = [t for bid in table for t in bm.blocks[bid].token_ids]
            assert held == cache == seq.tokens[: item.start + item.num_new_tokens]
            if item.needs_sample:
                sampled[seq.seq_id] = _next_token(cache)
        bm.check_invariants()
        return sampled


def _run(sched: Scheduler, max_steps: int = 500) -> tuple[list[ScheduledBatch], list[Sequence]]:
    model = FakeModel(sched)
    batches, finished = [], []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert len(batch) > 0, "scheduler stalled"
        batches.append(batch)
        finished += sched.update(batch, model.step(batch))
    assert not sched.has_unfinished()
    return batches, finished


def _assert_empty(sched: Scheduler) -> None:
    assert sched.num_running == 0 and sched.num_waiting == 0
    assert sched.bm.num_free_blocks == sched.bm.num_blocks
    assert sched.bm.usage == 0.0
    sched.bm.check_invariants()


def test_fifo_admission_respects_max_num_seqs():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=2, max_num_batched_tokens=64)
    for sid in "abc":
        sched.add(_seq(sid, [1, 2, 3], max_tokens=2))
    batch = sched.schedule()
    assert [(s.seq.seq_id, s.start, s.num_new_tokens) for s in batch] == [("a", 0, 3), ("b", 0, 3)]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    sched.update(batch, {"a": 5, "b": 5})
    batch = sched.schedule()  # c still waits: both slots taken by decodes
    assert [(s.seq.seq_id, s.num_new_tokens) for s in batch] == [("a", 1), ("b", 1)]
    done = sched.update(batch, {"a": 5, "b": 5})
    assert [s.seq_id for s in done] == ["a", "b"] and all(s.finish_reason == "length" for s in done)
    batch = sched.schedule()
    assert [(s.seq.seq_id, s.num_new_tokens) for s in batch] == [("c", 3)]
    sched.update(batch, {"c": 5})


def test_chunked_prefill_of_long_prompt():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=4)
    prompt = list(range(10, 20))
    sched.add(_seq("a", prompt, max_tokens=3))
    batches, finished = _run(sched)
    assert [(b.seqs[0].start, b.seqs[0].num_new_tokens) for b in batches] == [
        (0, 4), (4, 4), (8, 2), (10, 1), (11, 1)
    ]
    assert [b.seqs[0].needs_sample for b in batches] == [False, False, True, True, True]
    assert finished[0].output_token_ids == _reference(prompt, 3)
    _assert_empty(sched)


def test_chunk_size_caps_per_sequence_prefill():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=16, chunk_size=3)
    sched.add(_seq("a", list(range(1, 8)), max_tokens=1))
    sched.add(_seq("b", list(range(1, 3)), max_tokens=1))
    batch = sched.schedule()
    assert [(s.seq.seq_id, s.start, s.num_new_tokens) for s in batch] == [("a", 0, 3), ("b", 0, 2)]


def test_mixed_prefill_and_decode_with_budget():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=4, max_num_batched_tokens=6)
    model = FakeModel(sched)
    sched.add(_seq("a", [1, 2, 3], max_tokens=5))
    batch = sched.schedule()
    sched.update(batch, model.step(batch))
    sched.add(_seq("b", list(range(30, 40)), max_tokens=2))
    batch = sched.schedule()
    # a decodes first (1 token), b's prefill gets the rest of the budget, then continues next step.
    assert [(s.seq.seq_id, s.start, s.num_new_tokens) for s in batch] == [("a", 3, 1), ("b", 0, 5)]
    sched.update(batch, model.step(batch))
    batch = sched.schedule()
    assert [(s.seq.seq_id, s.start, s.num_new_tokens) for s in batch] == [("a", 4, 1), ("b", 5, 5)]
    sched.update(batch, model.step(batch))
    assert sched.get("b").output_token_ids == [_next_token(list(range(30, 40)))]


def test_every_sequence_finishes_with_max_tokens_outputs():
    sched = Scheduler(BlockManager(64, BS), max_num_seqs=3, max_num_batched_tokens=8)
    prompts = {f"r{i}": [i + 1] * (i + 2) + [50 + i] for i in range(6)}
    for i, (sid, p) in enumerate(prompts.items()):
        sched.add(_seq(sid, p, max_tokens=i + 1))
    batches, finished = _run(sched)
    assert sorted(s.seq_id for s in finished) == sorted(prompts)
    for s in finished:
        assert s.finish_reason == "length"
        assert s.output_token_ids == _reference(prompts[s.seq_id], s.sampling_params.max_tokens)
    assert sched.num_preemptions == 0
    _assert_empty(sched)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_tiny_pool_recomputes_correctly(prefix_caching):
    # 6 blocks of 4 = 24 slots; each request grows to 6 + 10 - 1 = 15 tokens (4 blocks).
    sched = Scheduler(BlockManager(6, BS, enable_prefix_caching=prefix_caching), 4, 16)
    prompts = {f"r{i}": [10 * i + j for j in range(6)] for i in range(4)}
    for sid, p in prompts.items():
        sched.add(_seq(sid, p, max_tokens=10))
    batches, finished = _run(sched)
    assert sched.num_preemptions > 0
    assert sum(s.num_preemptions for s in finished) == sched.num_preemptions
    assert any(b.preempted for b in batches)
    assert len(finished) == 4
    for s in finished:
        assert s.finish_reason == "length" and s.output_token_ids == _reference(prompts[s.seq_id], 10)
    _assert_empty(sched)


def test_preempted_sequence_goes_to_front_and_keeps_outputs():
    sched = Scheduler(BlockManager(3, BS, enable_prefix_caching=False), 4, 16)
    model = FakeModel(sched)
    sched.add(_seq("a", [1, 2, 3, 4], max_tokens=5))  # 4 + 5 - 1 = 8 slots: 2 blocks at most
    sched.add(_seq("b", [5, 6, 7, 8], max_tokens=5))
    sched.add(_seq("c", [9], max_tokens=1))
    batch = sched.schedule()  # a, b take 1 block each; c takes the last
    assert [s.seq.seq_id for s in batch] == ["a", "b", "c"]
    sched.update(batch, model.step(batch))  # c finishes and frees its block
    batch = sched.schedule()  # a's decode needs a new block (takes the free one); b needs one too
    assert [s.seq.seq_id for s in batch] == ["a"] and [s.seq_id for s in batch.preempted] == ["b"]
    b = sched.get("b")
    assert (b.status, b.num_computed, len(b.output_token_ids)) == (SequenceStatus.WAITING, 0, 1)
    assert sched.waiting[0] is b and sched.num_preemptions == 1


def test_abort_waiting_and_running_frees_everything():
    sched = Scheduler(BlockManager(16, BS), max_num_seqs=1, max_num_batched_tokens=8)
    model = FakeModel(sched)
    sched.add(_seq("a", list(range(1, 7)), max_tokens=8))
    sched.add(_seq("b", [1, 2], max_tokens=8))
    batch = sched.schedule()
    sched.update(batch, model.step(batch))
    assert (sched.num_running, sched.num_waiting) == (1, 1)
    b = sched.abort("b")
    assert b.status is SequenceStatus.FINISHED and b.finish_reason == "abort"
    a = sched.abort("a")
    assert a.finish_reason == "abort" and len(a.output_token_ids) == 1
    assert sched.abort("a") is None and sched.abort("nope") is None
    _assert_empty(sched)


def test_abort_while_step_in_flight_defers_free():
    sched = Scheduler(BlockManager(16, BS), max_num_seqs=2, max_num_batched_tokens=16)
    sched.add(_seq("a", list(range(1, 10)), max_tokens=4))
    batch = sched.schedule()
    sched.abort("a")
    assert sched.num_running == 0 and "a" in sched.bm  # blocks registered, not yet computed
    assert sched.update(batch, {"a": 7}) == []
    _assert_empty(sched)
    sched.add(_seq("x", [1]))
    sched.schedule()
    with pytest.raises(RuntimeError):
        sched.schedule()  # the previous batch was never updated


def test_prefix_cache_hit_reduces_prefill():
    sched = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=32)
    shared = list(range(100, 110))  # 2 full blocks + 2 tokens
    sched.add(_seq("a", shared + [1, 2], max_tokens=2))
    _run(sched)
    sched.add(_seq("b", shared + [3], max_tokens=2))
    batches, finished = _run(sched)
    assert (batches[0].seqs[0].start, batches[0].seqs[0].num_new_tokens) == (8, 3)
    assert finished[0].output_token_ids == _reference(shared + [3], 2)
    _assert_empty(sched)  # cached blocks are evictable, which counts as free


def test_stop_tokens_eos_and_ignore_eos():
    sched = Scheduler(BlockManager(32, BS), max_num_seqs=4, max_num_batched_tokens=32)
    sched.add(_seq("eos", [1], max_tokens=5, eos_token_id=7))
    sched.add(_seq("ign", [1], max_tokens=3, eos_token_id=7, params={"ignore_eos": True}))
    sched.add(_seq("stop", [1], max_tokens=5, params={"stop_token_ids": [9]}))
    sched.add(_seq("ext", [1], max_tokens=5))
    finished = []
    for step in range(6):
        batch = sched.schedule()
        finished += sched.update(batch, {s.seq.seq_id: (9 if step == 1 else 7) for s in batch})
        if step == 2:
            assert sched.finish("ext", "stop").finish_reason == "stop"
    got = {s.seq_id: (s.finish_reason, s.output_token_ids) for s in finished}
    assert got == {"eos": ("stop", [7]), "ign": ("length", [7, 9, 7]), "stop": ("stop", [7, 9])}
    assert sched.get("ext") is None
    _assert_empty(sched)


def test_add_validation():
    sched = Scheduler(BlockManager(2, BS), max_num_seqs=2, max_num_batched_tokens=8)
    sched.add(_seq("a", [1] * 4, max_tokens=5))  # 8 slots: fits exactly
    with pytest.raises(ValueError):
        sched.add(_seq("a", [1]))
    with pytest.raises(LlmcycleError):
        sched.add(_seq("b", [1] * 4, max_tokens=6))
    with pytest.raises(LlmcycleError):
        sched.add(_seq("c", []))
    with pytest.raises(ValueError):
        Scheduler(BlockManager(2, BS), max_num_seqs=4, max_num_batched_tokens=2)
