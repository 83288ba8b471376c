"""Speculative decoding: the acceptance rules against their definitions, and the engine with a draft model
giving exactly the target's greedy tokens (batched, under preemption, with eos), with acceptance stats."""


import pytest
import torch

from conftest import make_serving_model
from llmcycle.model.generate import generate
from llmcycle.model.transformer import Transformer
from llmcycle.serve.engine import LLM
from llmcycle.serve.sampling import SamplingParams
from llmcycle.serve.speculative import accept_greedy, accept_sampled


@pytest.fixture(scope="module")
def models(tiny_data, tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("spec")
    target = make_serving_model(tiny_data["tokenizer"], root / "target", seed=0, layers=2, hidden=64)
    other = make_serving_model(tiny_data["tokenizer"], root / "draft", seed=1, layers=1, hidden=32)
    return target, other


def test_accept_greedy_rules():
    logits = torch.full((4, 10), -1.0)
    for pos, best in enumerate([3, 5, 7, 9]):
        logits[pos, best] = 1.0
    assert accept_greedy(logits, [3, 5, 7]) == [3, 5, 7, 9]  # all agree: a free extra token
    assert accept_greedy(logits, [3, 4, 7]) == [3, 5]  # first disagreement replaced by the target's
    assert accept_greedy(logits, [0, 5, 7]) == [3]


def test_accept_sampled_keeps_the_target_distribution():
    # Empirical law of the first emitted token vs p, with a draft q far from p (many rejections).
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.05, 0.15, 0.3, 0.5]])
    g = torch.Generator().manual_seed(0)
    n = 20000
    counts = torch.zeros(4)
    accepted = 0
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        out = accept_sampled(p, q, [d], g)
        counts[out[0]] += 1
        accepted += len(out) == 2
        assert 1 <= len(out) <= 2
    torch.testing.assert_close(counts / n, p[0], atol=0.012, rtol=0)
    # acceptance probability = sum_x min(p(x), q(x))
    assert accepted / n == pytest.approx(float(torch.minimum(p[0], q[0]).sum()), abs=0.012)


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1, *torch.randint(8, 500, (int(torch.randint(1, 20, (1,), generator=g)),), generator=g).tolist()]
            for _ in range(n)]


@pytest.mark.parametrize("which,engine_args", [
    ("self", {}),                                 # draft = target: every draft token accepted
    ("other", {}),                                # an unrelated draft: most rejected
    ("other", {"num_blocks": 14, "block_size": 4}),  # too few blocks: preemption and recompute
])
def test_speculative_greedy_equals_target_greedy(models, which, engine_args):
    target, other = models
    draft = target if which == "self" else other
    prompts = _prompts(12, seed=3)
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    args = {"block_size": 4, "num_blocks": 256, **engine_args}
    llm = LLM(target, draft_model=draft, num_speculative_tokens=3, **args)
    outs = llm.generate(prompts, params)
    m = Transformer.from_pretrained(target).eval()
    assert [o.outputs[0].token_ids for o in outs] == [generate(m, p, 20, temperature=0) for p in prompts]
    stats = llm.engine.stats()
    assert stats["spec_decode_num_drafts"] > 0
    rate = stats["spec_decode_num_accepted_tokens"] / stats["spec_decode_num_draft_tokens"]
    if which == "self":
        assert rate == 1.0
        assert stats["spec_decode_num_drafts"] < 12 * 19  # fewer target steps than tokens
    else:
        assert rate < 0.9
    bm = llm.engine.block_manager
    bm.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not llm.engine.drafter.computed
    if "num_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0


def test_speculative_eos_stop_and_seeded_sampling(models):
    target, other = models
    llm = LLM(target, draft_model=other, num_speculative_tokens=4, block_size=4, num_blocks=256)
    plain = LLM(target, block_size=4, num_blocks=256)
    prompts = _prompts(6, seed=5)
    # eos / stop tokens / max_tokens: the same tokens and finish reasons as without a draft
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[17, 42, 99])
    a, b = llm.generate(prompts, params), plain.generate(prompts, params)
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in a] == \
        [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in b]
    # sampling: reproducible with a seed, and every length within max_tokens
    sp = SamplingParams(temperature=0.9, top_p=0.95, max_tokens=16, seed=4, ignore_eos=True)
    first = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    again = [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]
    assert first == again and all(len(t) == 16 for t in first)
