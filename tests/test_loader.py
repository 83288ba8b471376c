import json
import tempfile
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import write_shards
from llmcycle.data.loader import PackedLoader, pack_epoch
from llmcycle.data.shards import ShardSet
from llmcycle.errors import LlmcycleError

BOS = 0
SEQ = 31  # rows of 32 tokens


def tagged_docs(n=120, seed=0, max_len=90):
    """Document i is [BOS, t(i,1), t(i,2), ...] with t(i,j) = 1 + 1000*i + j, so any token tells
    which document and position it came from. Some documents are longer than a row."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(2, max_len, size=n)
    return [[BOS] + [1 + 1000 * i + j for j in range(1, int(n_))] for i, n_ in enumerate(lens)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    write_shards(d, tagged_docs(), vocab_size=200_000, tokenizer_hash="h", bos_id=BOS, shard_tokens=1500)
    return ShardSet(d)


def take(loader, k):
    return [loader.next_batch() for _ in range(k)]


def check_row(row):
    """A row starts with BOS, and between BOS tokens holds consecutive tokens of one document."""
    assert row[0] == BOS
    cuts = np.flatnonzero(row == BOS).tolist() + [len(row)]
    for a, b in zip(cuts[:-1], cuts[1:]):
        piece = row[a + 1:b]
        if len(piece):
            assert len({(t - 1) // 1000 for t in piece}) == 1
            assert np.all(np.diff(piece) == 1)


def test_rows_are_bos_aligned_slices_of_documents(shards):
    loader = PackedLoader(shards, SEQ, batch_size=8)
    for x in take(loader, 3 * loader.rows_per_epoch // 8):
        assert x.dtype == torch.long and x.shape == (8, SEQ + 1)
        for row in x.numpy():
            check_row(row)


def test_every_document_and_piece_is_packed(shards):
    offsets = shards.doc_offsets()
    R = SEQ + 1
    for epoch in range(3):
        plan = pack_epoch(offsets, SEQ, seed=0, epoch=epoch, bos_prefix=True)
        assert np.all(plan.row_ptr[1:] > plan.row_ptr[:-1])
        row_tokens = np.add.reduceat(plan.seg_len, plan.row_ptr[:-1])
        assert np.all(row_tokens == R)
        assert sorted(plan.order.tolist()) == list(range(plan.num_rows))
        starts = set(plan.seg_start.tolist())
        single = set(plan.seg_start[plan.seg_len == 1].tolist())
        for a, b in zip(offsets[:-1], offsets[1:]):
            assert a in starts  # the document's first piece
            # Continuation pieces of a document longer than a row (R tokens, then R-1 after a BOS
            # copy); one cropped to a single token shows only as its BOS copy.
            for p in range(a + R, b, R - 1):
                assert p in starts or a in single
        # Rows hold the corpus, less what cropping cut off, plus one BOS copy per continuation
        # piece and a partial repeat (< one row) that completes the epoch's last row.
        lengths = np.diff(offsets)
        bos_copies = int(np.sum(np.maximum(lengths - 2, 0) // (R - 1)))
        extra = plan.num_rows * R - (shards.num_tokens - plan.wasted_tokens + bos_copies)
        assert 0 <= extra < R
        assert 0 <= plan.wasted_tokens < 0.1 * shards.num_tokens


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 60), min_size=1, max_size=25), seq_len=st.integers(1, 40),
       seed=st.integers(0, 2**31))
def test_packing_invariants_hold_for_any_corpus(lengths, seq_len, seed):
    docs = [[BOS] + [1 + 1000 * i + j for j in range(1, n)] for i, n in enumerate(lengths)]
    if sum(lengths) < seq_len + 1:
        return
    with tempfile.TemporaryDirectory() as d:
        write_shards(d, docs, 200_000, "h", BOS, shard_tokens=50)
        loader = PackedLoader(ShardSet(d), seq_len, batch_size=3, seed=seed)
        for x in take(loader, loader.rows_per_epoch // 3 + 2):  # into the second epoch
            assert x.shape == (3, seq_len + 1)
            for row in x.numpy():
                check_row(row)
        assert loader.epoch >= 1 and 0 <= loader.wasted_fraction < 1


def test_deterministic_and_seed_dependent(shards):
    a = take(PackedLoader(shards, SEQ, 4, seed=1), 5)
    b = take(PackedLoader(shards, SEQ, 4, seed=1), 5)
    c = take(PackedLoader(shards, SEQ, 4, seed=2), 5)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_epochs_differ_and_straddle(shards):
    loader = PackedLoader(shards, SEQ, batch_size=7)
    n0 = loader.rows_per_epoch
    assert n0 % 7  # so that some batch straddles the epoch boundary
    assert loader.tokens_per_epoch == n0 * (SEQ + 1) and 0 <= loader.wasted_fraction < 0.25
    rows = torch.cat(take(loader, n0 // 7 + 1))
    assert loader.epoch == 1 and loader.cursor == 7 * (n0 // 7 + 1) - n0
    # The straddling batch ends with the first rows of epoch 1's plan.
    fresh = PackedLoader(shards, SEQ, batch_size=1)
    epoch0 = torch.cat(take(fresh, n0))
    assert fresh.epoch == 1
    epoch1_head = torch.cat(take(fresh, len(rows) - n0))
    assert torch.equal(rows, torch.cat([epoch0, epoch1_head]))
    assert not torch.equal(epoch0[: len(epoch1_head)], epoch1_head)


def test_epoch_shorter_than_a_batch(tmp_path):
    write_shards(tmp_path, tagged_docs(n=3, max_len=20), 200_000, "h", BOS)
    loader = PackedLoader(ShardSet(tmp_path), seq_len=9, batch_size=16)
    assert loader.rows_per_epoch < 16
    for x in take(loader, 3):
        assert x.shape == (16, 10)
        for row in x.numpy():
            check_row(row)
    assert loader.epoch >= 3


def test_resume_is_exact(shards):
    loader = PackedLoader(shards, SEQ, 5, seed=3)
    take(loader, 11)
    state = json.loads(json.dumps(loader.state_dict()))
    expected = take(loader, 40)  # runs past at least one epoch boundary
    restored = PackedLoader(shards, SEQ, 5, seed=3)
    restored.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(expected, take(restored, 40)))


def test_rank_split_matches_single_process(shards):
    single = PackedLoader(shards, SEQ, batch_size=8, seed=5)
    ranks = [PackedLoader(shards, SEQ, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    steps = single.rows_per_epoch // 8 + 3  # crosses the epoch boundary
    for _ in range(steps):
        assert torch.equal(single.next_batch(), torch.cat([r.next_batch() for r in ranks]))
    assert single.epoch == 1
    # A state saved by the 2-rank run resumes in a 1-rank run with the same global batch.
    single2 = PackedLoader(shards, SEQ, batch_size=8, seed=5)
    single2.load_state_dict(ranks[1].state_dict())
    assert torch.equal(single2.next_batch(), single.next_batch())


def test_refuses_mismatched_state(shards, tmp_path):
    state = PackedLoader(shards, SEQ, 4, seed=0).state_dict()
    for other in (PackedLoader(shards, SEQ + 1, 4), PackedLoader(shards, SEQ, 4, seed=1),
                  PackedLoader(shards, SEQ, 8), PackedLoader(shards, SEQ, 4, rank=1, world_size=2)):
        with pytest.raises(LlmcycleError, match="cannot resume"):
            other.load_state_dict(state)
    write_shards(tmp_path, tagged_docs(seed=9), 200_000, "h", BOS)
    with pytest.raises(LlmcycleError, match="content hash"):
        PackedLoader(ShardSet(tmp_path), SEQ, 4).load_state_dict(state)
    PackedLoader(shards, SEQ, 2, world_size=2).load_state_dict(state)  # same global batch: fine


def test_too_little_data(tmp_path):
    write_shards(tmp_path, [[BOS, 5, 6], [BOS, 7]], 200_000, "h", BOS)
    s = ShardSet(tmp_path)
    with pytest.raises(LlmcycleError, match="has 5 tokens, fewer than one sequence of seq_len"):
        PackedLoader(s, seq_len=5, batch_size=1)
    x = PackedLoader(s, seq_len=4, batch_size=2).next_batch()  # exactly one row: repeated every epoch
    assert x.shape == (2, 5) and x[0, 0] == BOS and x[1, 0] == BOS


def test_without_bos_pieces_are_plain_slices(tmp_path):
    docs = [list(range(1 + 100 * i, 1 + 100 * i + n)) for i, n in enumerate([70, 5, 12, 33, 9])]
    write_shards(tmp_path, docs, 1000, "h", bos_id=None)
    plan = pack_epoch(ShardSet(tmp_path).doc_offsets(), 15, seed=0, epoch=0, bos_prefix=False)
    assert set(range(0, 70, 16)) <= set(plan.seg_start.tolist())
    x = PackedLoader(ShardSet(tmp_path), 15, 3).next_batch()
    assert x.shape == (3, 16)


def test_plan_is_cheap(tmp_path):
    rng = np.random.default_rng(0)
    lens = rng.integers(20, 400, size=10_000)  # ~2M tokens
    docs = (np.concatenate([[BOS], rng.integers(1, 50_000, size=n - 1)]) for n in lens)
    write_shards(tmp_path, docs, 50_257, "h", BOS)
    s = ShardSet(tmp_path)
    t = time.perf_counter()
    loader = PackedLoader(s, 255, 16)
    assert loader.rows_per_epoch > 7000
    x = loader.next_batch()
    assert time.perf_counter() - t < 1.0
    assert bool((x[:, 0] == BOS).all())
