import random

import pytest

from llmcycle.serve import block_manager as bm_mod
from llmcycle.serve.block_manager import (
    NO_HASH,
    BlockManager,
    NoFreeBlocks,
    hash_block_tokens,
    num_blocks_for_budget,
)

BS = 4


def _check(bm: BlockManager) -> None:
    """Invariants checked independently of BlockManager.check_invariants as well."""
    bm.check_invariants()
    holders = {}
    for seq_id in list(bm._seqs):
        for bid in bm.block_table(seq_id):
            holders[bid] = holders.get(bid, 0) + 1
    for block in bm.blocks:
        assert block.ref_count == holders.get(block.block_id, 0)
    used = sum(1 for b in bm.blocks if b.ref_count > 0)
    assert used + bm.num_free_blocks == bm.num_blocks
    assert bm.usage == pytest.approx(used / bm.num_blocks)


def test_hash_is_stable_and_chained():
    assert hash_block_tokens(NO_HASH, [1, 2, 3, 4]) == hash_block_tokens(NO_HASH, (1, 2, 3, 4))
    assert hash_block_tokens(NO_HASH, [1, 2, 3, 4]) != hash_block_tokens(NO_HASH, [1, 2, 3, 5])
    assert hash_block_tokens(7, [1, 2, 3, 4]) != hash_block_tokens(8, [1, 2, 3, 4])


def test_allocate_and_free_basic():
    bm = BlockManager(8, BS)
    assert bm.allocate("a", list(range(10))) == 0  # 10 tokens -> 3 blocks
    assert len(bm.block_table("a")) == 3
    assert bm.num_free_blocks == 5 and bm.usage == pytest.approx(3 / 8)
    _check(bm)
    bm.free("a")
    assert bm.num_free_blocks == 8 and bm.usage == 0.0
    _check(bm)
    with pytest.raises(KeyError):
        bm.free("a")
    with pytest.raises(KeyError):
        bm.free("never")


def test_prefix_hit_on_shared_system_prompt():
    bm = BlockManager(16, BS)
    system = list(range(100, 108))  # exactly 2 full blocks
    assert bm.allocate("a", system + [1, 2, 3]) == 0
    assert bm.allocate("b", system + [9, 9, 9, 9, 9]) == 2 * BS
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert tb[:2] == ta[:2] and tb[2] not in ta
    assert [bm.blocks[b].ref_count for b in ta] == [2, 2, 1]
    assert bm.num_free_blocks == 16 - 3 - 2  # b took only 2 fresh blocks
    _check(bm)
    # exact counters, in tokens
    assert bm.prefix_queries == 11 + 13 and bm.prefix_hits == 8
    bm.free("a")
    assert [bm.blocks[b].ref_count for b in tb] == [1, 1, 1, 1]
    bm.free("b")
    _check(bm)
    assert bm.num_free_blocks == 16


def test_hit_after_free_revives_evictable_blocks():
    bm = BlockManager(6, BS)
    prompt = list(range(9))  # 2 full blocks + 1 partial
    bm.allocate("a", prompt)
    ta = bm.block_table("a")
    bm.free("a")
    assert bm.num_free_blocks == 6
    assert bm.allocate("b", prompt) == 8
    tb = bm.block_table("b")
    assert tb[:2] == ta[:2]
    assert bm.num_free_blocks == 3  # revived blocks are no longer evictable
    _check(bm)


def test_partial_last_block_never_shared_and_last_token_recomputed():
    bm = BlockManager(16, BS)
    assert bm.allocate("a", [1, 2, 3, 4, 5, 6]) == 0
    # identical prompt: only the full block is shared, the partial one is private
    assert bm.allocate("b", [1, 2, 3, 4, 5, 6]) == BS
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert tb[0] == ta[0] and tb[1] != ta[1]
    # block-aligned identical prompt: the last block is recomputed, never a full hit
    bm.allocate("c", list(range(50, 58)))
    assert bm.allocate("d", list(range(50, 58))) == BS
    tc, td = bm.block_table("c"), bm.block_table("d")
    assert td[0] == tc[0] and td[1] != tc[1]
    # a 1-block prompt can never hit
    bm.allocate("e", [1, 2, 3, 4])
    assert bm.allocate("f", [1, 2, 3, 4]) == 0
    _check(bm)


def test_append_token_fills_and_registers_blocks():
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2, 3])
    assert bm.can_append("a")
    bm.append_token("a", 4)  # fills block 0 -> registered
    assert len(bm.block_table("a")) == 1
    bm.append_token("a", 5)  # new block
    assert len(bm.block_table("a")) == 2 and bm.num_tokens("a") == 5
    for t in (6, 7, 8):
        bm.append_token("a", t)
    _check(bm)
    # a new prompt sharing the 8 decoded-into tokens hits both blocks
    assert bm.allocate("b", [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8
    assert bm.block_table("b")[:2] == bm.block_table("a")
    _check(bm)


def test_lru_eviction_order():
    bm = BlockManager(4, BS)
    bm.allocate("a", [1, 1, 1, 1, 0])  # blocks: full A, partial
    bm.allocate("b", [2, 2, 2, 2, 0])  # blocks: full B, partial
    block_a, block_b = bm.block_table("a")[0], bm.block_table("b")[0]
    bm.free("b")  # B freed first -> least recently freed
    bm.free("a")
    # partials went back to the plain free list; the two full blocks are evictable
    assert len(bm._free) == 2 and list(bm._evictable) == [block_b, block_a]
    # 3 fresh blocks: 2 plain-free, then evict B (oldest) while A stays cached
    bm.allocate("c", list(range(20, 31)))
    assert block_b in bm.block_table("c") and block_a not in bm.block_table("c")
    _check(bm)


def test_lru_eviction_keeps_recent_prefix_hittable():
    bm = BlockManager(4, BS)
    bm.allocate("a", [1, 1, 1, 1, 0])
    bm.allocate("b", [2, 2, 2, 2, 0])
    bm.free("b")
    bm.free("a")
    bm.allocate("c", [3, 3, 3])  # takes a plain-free block
    bm.allocate("d", [4, 4, 4])  # takes the other plain-free block
    bm.allocate("e", [5, 5, 5])  # must evict: the least recently freed (b's block)
    bm.free("c")
    # a's prefix block was never evicted, so a repeat of a's prompt still hits
    assert bm.allocate("a2", [1, 1, 1, 1, 7]) == BS
    # b's was evicted: a repeat misses
    bm.free("d")
    bm.free("e")
    assert bm.allocate("b2", [2, 2, 2, 2, 7]) == 0
    _check(bm)


def test_free_releases_tail_first():
    bm = BlockManager(4, BS)
    bm.allocate("a", list(range(12)) + [99])  # 3 full blocks + 1 partial
    t = bm.block_table("a")
    bm.free("a")
    assert list(bm._evictable) == [t[2], t[1], t[0]]  # tail evicted before its prefix


def test_capacity_errors_leave_state_unchanged():
    bm = BlockManager(3, BS)
    bm.allocate("a", list(range(8)))  # 2 blocks
    assert not bm.can_allocate(list(range(100, 109)))  # needs 3, 1 free
    before = (bm.num_free_blocks, list(bm._free), dict(bm._hash_to_block), bm.prefix_queries)
    with pytest.raises(NoFreeBlocks):
        bm.allocate("b", list(range(100, 109)))
    assert "b" not in bm
    assert (bm.num_free_blocks, list(bm._free), dict(bm._hash_to_block), bm.prefix_queries) == before
    _check(bm)
    # a prefix hit makes a too-long prompt fit: 2 hit blocks + 1 fresh
    assert bm.can_allocate(list(range(8)) + [5])
    assert bm.allocate("c", list(range(8)) + [5]) == 8
    assert bm.num_free_blocks == 0
    assert bm.can_append("c")  # last block has room
    for t in (6, 7, 8):
        bm.append_token("c", t)
    assert not bm.can_append("c")
    with pytest.raises(NoFreeBlocks):
        bm.append_token("c", 9)
    assert bm.num_tokens("c") == 12 and len(bm.block_table("c")) == 3
    _check(bm)
    with pytest.raises(ValueError):
        bm.allocate("a", [1])  # duplicate id
    with pytest.raises(ValueError):
        bm.allocate("z", [])


def test_collision_does_not_corrupt(monkeypatch):
    monkeypatch.setattr(bm_mod, "hash_block_tokens", lambda parent, toks: 42)  # everything collides
    bm = BlockManager(8, BS)
    bm.allocate("a", [1, 2, 3, 4, 5])
    assert bm.allocate("b", [6, 7, 8, 9, 5]) == 0  # same hash, different tokens: no hit
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    _check(bm)
    bm.free("a")
    bm.free("b")
    _check(bm)
    assert bm.num_free_blocks == 8


def test_prefix_caching_disabled():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    bm.allocate("a", list(range(9)))
    assert bm.allocate("b", list(range(9))) == 0
    assert set(bm.block_table("a")).isdisjoint(bm.block_table("b"))
    bm.free("a")
    bm.free("b")
    assert bm.num_free_blocks == 8 and not bm._evictable
    assert bm.prefix_queries == 0 and bm.prefix_hits == 0
    _check(bm)


@pytest.mark.parametrize("caching", [True, False])
def test_random_operations_never_leak(caching):
    rng = random.Random(1234)
    bm = BlockManager(24, BS, enable_prefix_caching=caching)
    prefixes = [[rng.randrange(8) for _ in range(rng.randrange(1, 13))] for _ in range(4)]
    live: dict[int, list[int]] = {}
    queries = hits = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.35:
            prompt = rng.choice(prefixes) + [rng.randrange(8) for _ in range(rng.randrange(0, 10))]
            if not prompt:
                continue
            ok = bm.can_allocate(prompt)
            try:
                cached = bm.allocate(step, prompt)
            except NoFreeBlocks:
                assert not ok
                continue
            assert ok and cached % BS == 0 and cached < len(prompt)
            queries += len(prompt)
            hits += cached
            live[step] = list(prompt)
            # cached blocks really hold the prompt's tokens
            for i, bid in enumerate(bm.block_table(step)[: cached // BS]):
                assert bm.blocks[bid].token_ids == prompt[i * BS : (i + 1) * BS]
        elif op < 0.75 and live:
            sid = rng.choice(list(live))
            tok = rng.randrange(8)
            if bm.can_append(sid):
                bm.append_token(sid, tok)
                live[sid].append(tok)
            else:
                with pytest.raises(NoFreeBlocks):
                    bm.append_token(sid, tok)
        elif live:
            sid = rng.choice(list(live))
            bm.free(sid)
            del live[sid]
        if step % 50 == 0:
            _check(bm)
            for sid, toks in live.items():  # each table holds exactly the sequence's tokens
                got = [t for bid in bm.block_table(sid) for t in bm.blocks[bid].token_ids]
                assert got == toks
    if caching:
        assert (bm.prefix_queries, bm.prefix_hits) == (queries, hits) and hits > 0
    for sid in list(live):
        bm.free(sid)
    _check(bm)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0


def test_num_blocks_for_budget():
    # 2 (K,V) * 4 layers * 16 tokens * 2 heads * 8 dim * 2 bytes = 4096 bytes per block
    assert num_blocks_for_budget(4096 * 10, 4, 2, 8, 16, 2) == 10
    assert num_blocks_for_budget(4096 * 10 + 4095, 4, 2, 8, 16, 2) == 10
    assert num_blocks_for_budget(4095, 4, 2, 8, 16, 2) == 0
    assert num_blocks_for_budget(-1, 4, 2, 8, 16, 2) == 0
    with pytest.raises(ValueError):
        num_blocks_for_budget(4096, 0, 2, 8, 16, 2)


def test_num_cached_tokens_predicts_allocate_without_side_effects():
    bm = BlockManager(num_blocks=8, block_size=4)
    prompt = list(range(10, 20))  # 2 full blocks + 2 tokens
    assert bm.num_cached_tokens(prompt) == 0
    bm.allocate("a", prompt)
    queries, hits = bm.prefix_queries, bm.prefix_hits
    assert bm.num_cached_tokens(prompt) == 8
    assert bm.num_cached_tokens(prompt[:8]) == 4  # the last token is always recomputed
    assert (bm.prefix_queries, bm.prefix_hits) == (queries, hits)
    assert bm.allocate("b", prompt) == 8
