import pytest
import torch
import torch.nn.functional as F

from llmcycle.model.config import ModelConfig
from llmcycle.model.transformer import Transformer
from llmcycle.train.core.loader import EpochLoader
from llmcycle.train.core.masking import IGNORE
from llmcycle.train.posttrain.batching import packed_batch, pad_batch, per_example_sum, plan_packs, shift


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Transformer(cfg).eval()


def _examples(n: int, seed: int = 1) -> list[tuple[list[int], list[bool]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 20, (1,), generator=g))
        ids = torch.randint(3, 50, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        out.append((ids, [False] * prompt + [True] * (length - prompt)))
    return out


def _per_example_loss(model, batch) -> torch.Tensor:
    logits = batch.forward(model)
    nll = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE, reduction="none")
    return per_example_sum(nll.view_as(batch.targets), batch.segments, batch.num_examples)


def test_shift_masks_untrained_targets():
    inputs, targets = shift([5, 6, 7, 8], [False, False, True, True])
    assert inputs == [5, 6, 7]
    assert targets == [IGNORE, 7, 8]


def test_plan_packs_keeps_order_and_fits():
    assert plan_packs([3, 4, 2, 5, 1], 7) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError):
        plan_packs([8], 7)


def test_example_loss_does_not_depend_on_its_pack():
    model = _model()
    examples = _examples(9)
    with torch.no_grad():
        alone = torch.cat([_per_example_loss(model, pad_batch([e], 0)) for e in examples])
        padded = _per_example_loss(model, pad_batch(examples, 0))
        # Two different packings: in order, and reversed with a different row width.
        packs_a = [[examples[i] for i in row] for row in plan_packs([len(e[0]) - 1 for e in examples], 40)]
        rev = examples[::-1]
        packs_b = [[rev[i] for i in row] for row in plan_packs([len(e[0]) - 1 for e in rev], 64)]
        a = _per_example_loss(model, packed_batch(packs_a, 0))
        b = _per_example_loss(model, packed_batch(packs_b, 0)).flip(0)
    assert len(packs_a) > 1 and len(packs_b) < len(packs_a)
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.allclose(alone, a, atol=1e-5)
    assert torch.allclose(alone, b, atol=1e-5)
    # Without the block mask and position reset the packed losses would differ: the test can fail.
    batch = packed_batch(packs_a, 0)
    leaky = type(batch)(batch.input_ids, batch.targets, batch.segments, batch.lengths)
    with torch.no_grad():
        assert not torch.allclose(alone, _per_example_loss(model, leaky), atol=1e-3)


def test_packed_batch_counts_every_trained_token_once():
    examples = _examples(6, seed=3)
    batch = packed_batch([examples[:3], examples[3:]], 0)
    expected = sum(sum(t[1:]) for _, t in examples)
    assert int((batch.targets != IGNORE).sum()) == expected
    assert batch.lengths.tolist() == [len(ids) - 1 for ids, _ in examples]


def test_epoch_loader_resumes_and_splits_ranks():
    a = EpochLoader(10, 4, seed=7)
    first = [a.next_step() for _ in range(3)]
    state = a.state_dict()
    rest = [a.next_step() for _ in range(4)]
    b = EpochLoader(10, 4, seed=7)
    b.load_state_dict(state)
    assert [b.next_step() for _ in range(4)] == rest
    # Every item once per epoch (the stream runs on across the boundary).
    flat = [i for step in first for i in step][:10]
    assert sorted(flat) == list(range(10))
    r0, r1 = EpochLoader(10, 2, seed=7, rank=0, world_size=2), EpochLoader(10, 2, seed=7, rank=1, world_size=2)
    whole = EpochLoader(10, 4, seed=7)
    for _ in range(3):
        assert r0.next_step() + r1.next_step() == whole.next_step()
