"""Paged KV pool: batched paged forwards must match the plain model, token for token."""

import pytest
import torch

from llmcycle.model.config import ModelConfig
from llmcycle.model.generate import generate
from llmcycle.model.transformer import Transformer
from llmcycle.serve.block_manager import BlockManager
from llmcycle.serve.kv_pool import KVPool, PagedBatch
from llmcycle.serve.model_runner import forward_paged

BS = 4  # block size: small, so prompts span several blocks and partial ones


def tiny_model(kv_heads: int = 2, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        initializer_range=0.2,  # peaked logits: greedy ties would make token equality flaky
    )
    return Transformer(cfg).eval()


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 1, 9, 4)]


@pytest.mark.parametrize("kv_heads", [4, 1])  # MHA and GQA (4 query heads share 1 kv head)
def test_batched_greedy_matches_generate(kv_heads):
    model = tiny_model(kv_heads)
    pool = KVPool(model.config, num_blocks=16, block_size=BS)
    bm = BlockManager(16, BS)
    ps, n = prompts(), 6
    seqs = []
    for sid, p in enumerate(ps):
        assert bm.allocate(sid, p) == 0
        seqs.append((bm.block_table(sid), 0, p))
    outs: list[list[int]] = [[] for _ in ps]
    for _ in range(n):
        nxt = forward_paged(model, pool, seqs).argmax(-1).tolist()
        seqs = []
        for sid, tok in enumerate(nxt):
            outs[sid].append(tok)
            cached = bm.num_tokens(sid)
            bm.append_token(sid, tok)
            seqs.append((bm.block_table(sid), cached, [tok]))
        bm.check_invariants()
    for p, out in zip(ps, outs, strict=True):
        assert out == generate(model, p, n, temperature=0)


def test_chunked_prefill_matches_full_prefill():
    model = tiny_model()
    prompt = prompts()[2] + prompts()[0]  # 14 tokens
    pool = KVPool(model.config, num_blocks=8, block_size=BS)
    table = list(range(7, 3, -1))  # non-contiguous, out-of-order blocks
    full = forward_paged(model, pool, [(table, 0, prompt)])
    pool2 = KVPool(model.config, num_blocks=8, block_size=BS)
    # A second row prefilling alongside exercises padding of short rows in every chunk.
    other = prompts()[3]
    for start in range(0, len(prompt), 3):
        chunk = prompt[start : start + 3]
        both = forward_paged(model, pool2, [(table, start, chunk), ([0], 0, other)])
    torch.testing.assert_close(both[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(full[0], model(torch.tensor([prompt]))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], model(torch.tensor([other]))[0, -1], atol=1e-5, rtol=1e-5)
    # The chunked path left the same K/V in the prompt's blocks as the one-shot prefill.
    torch.testing.assert_close(pool2.k[:, :, table], pool.k[:, :, table], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool2.v[:, :, table], pool.v[:, :, table], atol=1e-5, rtol=1e-5)


def test_prefix_cache_hit_matches_uncached():
    model = tiny_model(kv_heads=1)
    pool = KVPool(model.config, num_blocks=16, block_size=BS)
    bm = BlockManager(16, BS)
    first = prompts()[2]  # 9 tokens: two full blocks registered
    assert bm.allocate("a", first) == 0
    forward_paged(model, pool, [(bm.block_table("a"), 0, first)])
    second = first[:8] + [3, 1, 4]
    cached = bm.allocate("b", second)
    assert cached == 8 and bm.block_table("b")[:2] == bm.block_table("a")[:2]
    hit = forward_paged(model, pool, [(bm.block_table("b"), cached, second[cached:])])
    torch.testing.assert_close(hit[0], model(torch.tensor([second]))[0, -1], atol=1e-5, rtol=1e-5)


def test_packed_layout_positions_slots_and_groups():
    model = tiny_model()
    pool = KVPool(model.config, num_blocks=4, block_size=BS)
    batch = PagedBatch(pool, [[2, 0], [1], [3]], num_cached=[5, 0, 2], num_new=[2, 1, 1])
    assert batch.positions.tolist() == [[5, 6, 0, 2]]  # packed: no padding
    assert batch.logits_mask().tolist() == [[False, True, True, True]]
    assert batch.logits_mask([2, 1, 1]).tolist() == [[True, True, True, True]]
    assert batch._write_slots.tolist() == [1, 2, 4, 14]  # position 5: block 0 (table[1]), offset 1
    assert batch.input_ids([[7, 8], [9], [10]]).tolist() == [[7, 8, 9, 10]]
    # Row 1 (fresh, one token) attends itself; rows 0 (continued chunk of 2) and 2 (a decode) gather blocks.
    shapes = sorted((g.n, g.fresh, g.size) for g in batch.groups)
    assert shapes == [(1, False, 1), (1, True, 1), (2, False, 1)]
    chunk = next(g for g in batch.groups if g.n == 2)
    assert chunk.tables.tolist() == [2, 0]
    assert chunk.mask[0, 0].int().tolist() == [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]]
    with pytest.raises(ValueError):
        PagedBatch(pool, [[0]], num_cached=[4], num_new=[1])  # table too short for 5 tokens


def test_mixed_step_runs_only_the_real_tokens():
    """A step mixing decodes with a prefill chunk computes sum(num_new) token rows in every projection, and each
    row's logits equal its rows run alone."""
    model = tiny_model(kv_heads=1)
    pool = KVPool(model.config, num_blocks=32, block_size=BS)
    g = torch.Generator().manual_seed(3)
    long = torch.randint(0, 64, (20,), generator=g).tolist()
    short = [torch.randint(0, 64, (6,), generator=g).tolist() for _ in range(3)]
    tables = [list(range(i * 6, i * 6 + 6)) for i in range(4)]
    for t, p in zip(tables[1:], short):  # the three decoders have their prompts cached
        forward_paged(model, pool, [(t, 0, p[:-1])])
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[:2]))
    rows = [(tables[0], 0, long)] + [(t, 5, p[-1:]) for t, p in zip(tables[1:], short)]
    mixed = forward_paged(model, pool, rows)
    hook.remove()
    assert seen == [torch.Size([1, 23])]  # 20 + 3, where right-padding ran 4 x 20
    for b, row in enumerate(rows):
        torch.testing.assert_close(mixed[b], forward_paged(model, pool, [row])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[0], model(torch.tensor([long]))[0, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[2], model(torch.tensor([short[1]]))[0, -1], atol=1e-5, rtol=1e-5)


def test_mixed_step_costs_no_more_than_its_parts():
    """Decodes beside a prefill chunk in one forward take no longer than the two forwards apart (within 20%,
    best of several runs); right-padding every row to the chunk made it ~12x."""
    import time

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=1024, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    model = Transformer(cfg).eval()
    pool = KVPool(cfg, num_blocks=16 * 9, block_size=16)
    dec = [(list(range(i * 9, i * 9 + 9)), 100, [i + 1]) for i in range(15)]
    pre = [(list(range(135, 144)), 0, list(range(2, 130)))]

    def best(rows, repeats=7):
        forward_paged(model, pool, rows)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            forward_paged(model, pool, rows)
            times.append(time.perf_counter() - t)
        return min(times)

    parts = best(dec) + best(pre)
    assert best(dec + pre) <= 1.2 * parts


def test_bf16_paged_decode_matches_the_fp32_model():
    """A bf16 pool and model (on the CPU the cached-context attention runs in fp32, which is faster there)
    give the fp32 model's logits to bf16 precision, and the same greedy token."""
    model = tiny_model(kv_heads=1)
    half = tiny_model(kv_heads=1).to(torch.bfloat16)
    pool = KVPool(half.config, num_blocks=8, block_size=BS, dtype=torch.bfloat16)
    assert pool.k.dtype == torch.bfloat16
    p = prompts()[2]
    forward_paged(half, pool, [(list(range(8)), 0, p[:-1])])
    logits = forward_paged(half, pool, [(list(range(8)), len(p) - 1, p[-1:])])[0]
    assert logits.dtype == torch.bfloat16
    expected = model(torch.tensor([p]))[0, -1]
    torch.testing.assert_close(logits.float(), expected, atol=0.1, rtol=0.05)
    assert logits.argmax() == expected.argmax()
