import math

import pytest
import torch

from llmcycle.serve.sampling import (
    SamplingParams,
    apply_penalties,
    find_stop,
    make_generator,
    process_logits,
    sample,
    stop_holdback,
)

INF = float("inf")


def _kept(params: SamplingParams, logits: list[float]) -> list[int]:
    out = process_logits(torch.tensor([logits]), [params])[0]
    return torch.isfinite(out).nonzero().flatten().tolist()


def _logits_of(probs: list[float]) -> list[float]:
    return [math.log(p) for p in probs]


# ---------------------------------------------------------------- parameters


def test_defaults_match_vllm_and_stop_is_normalised():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_k, p.top_p, p.min_p, p.max_tokens, p.logprobs) == (
        1,
        1.0,
        -1,
        1.0,
        0.0,
        16,
        None,
    )
    assert p.validate() is p and not p.greedy and p.top_k_value == 0
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=None).top_k_value == 0 and SamplingParams(top_k=0).top_k_value == 0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"n": 0}, "n must"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"top_k": -2}, "top_k"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 1.5}, "seed"),
        # values a JSON body can carry that would otherwise reach a batch tensor (int64) or torch's seed
        ({"top_k": 10**20}, "top_k"),
        ({"seed": 2**63}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
    ],
)
def test_validate_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs).validate()


def test_validate_accepts_edges():
    SamplingParams(temperature=0, top_p=1.0, min_p=1.0, logprobs=20, top_k=0, seed=3).validate()
    SamplingParams(logprobs=0, top_k=None, presence_penalty=-2.0).validate()
    SamplingParams(top_k=2**63 - 1, seed=-(2**63)).validate()


def test_any_valid_seed_makes_a_generator():
    # The engine seeds sequence i with seed * 1_000_003 + i, beyond torch's range for large seeds.
    for seed in (2**63 - 1, -(2**63), -1, 0):
        SamplingParams(seed=seed).validate()
        torch.rand(1, generator=make_generator(seed * 1_000_003 + 7))
    # a reduced seed keeps the stream torch gives the seed itself (-1 is 2**64 - 1 to torch)
    assert torch.equal(torch.rand(3, generator=make_generator(-1)), torch.rand(3, generator=make_generator(2**64 - 1)))


# ---------------------------------------------------------------- penalties


def test_penalties_exact():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    params = [
        SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
        SamplingParams(),
    ]
    out = apply_penalties(logits, [[0], [0]], [[1, 1, 2], [1, 1, 2]], params)
    # token 0: prompt only -> 2/2; token 1: seen twice, -2*2 - 0.5 - 2*0.25; token 2: 1/2 - 0.5 - 0.25
    assert out[0].tolist() == [1.0, -5.0, -0.25, 0.5]
    assert out[1].tolist() == logits[1].tolist()  # neutral params leave the row alone
    assert logits[0].tolist() == [2.0, -2.0, 1.0, 0.5]  # input untouched


def test_repetition_penalty_below_one_and_prompt_only():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    out = apply_penalties(
        logits, [[0, 1]], [[]], [SamplingParams(repetition_penalty=0.5, presence_penalty=1.0)]
    )
    # prompt tokens get the repetition penalty but not presence (OpenAI counts only output tokens)
    assert out[0].tolist() == [4.0, -1.0, 1.0]


# ---------------------------------------------------------------- filters


def test_top_k_mask():
    logits = [3.0, 1.0, 2.0, 0.0, 2.0]
    assert _kept(SamplingParams(top_k=1), logits) == [0]
    assert _kept(SamplingParams(top_k=2), logits) == [0, 2, 4]  # ties at the k-th value are kept
    assert _kept(SamplingParams(top_k=4), logits) == [0, 1, 2, 4]
    assert _kept(SamplingParams(top_k=100), logits) == [0, 1, 2, 3, 4]
    assert _kept(SamplingParams(top_k=-1), logits) == [0, 1, 2, 3, 4]


def test_top_p_mask():
    logits = _logits_of([0.5, 0.25, 0.15, 0.1])
    assert _kept(SamplingParams(top_p=0.1), logits) == [0]
    assert _kept(SamplingParams(top_p=0.7), logits) == [0, 1]
    assert _kept(SamplingParams(top_p=0.8), logits) == [0, 1, 2]
    assert _kept(SamplingParams(top_p=1.0), logits) == [0, 1, 2, 3]
    probs = process_logits(torch.tensor([logits]), [SamplingParams(top_p=0.7)]).softmax(-1)[0]
    torch.testing.assert_close(probs, torch.tensor([2 / 3, 1 / 3, 0.0, 0.0]))


def test_min_p_mask():
    logits = _logits_of([0.5, 0.25, 0.15, 0.1])
    assert _kept(SamplingParams(min_p=0.4), logits) == [0, 1]  # threshold 0.2
    assert _kept(SamplingParams(min_p=0.25), logits) == [0, 1, 2]  # threshold 0.125
    assert _kept(SamplingParams(min_p=1.0), logits) == [0]


def test_filter_order_temperature_top_k_top_p():
    logits = _logits_of([0.5, 0.25, 0.15, 0.1])
    # top-p alone at 0.8 keeps three; after top-k=3 the renormalised mass before token 2 is 0.75/0.9 > 0.8
    assert _kept(SamplingParams(top_p=0.8), logits) == [0, 1, 2]
    assert _kept(SamplingParams(top_k=3, top_p=0.8), logits) == [0, 1]
    # temperature 0.5 squares the probabilities before top-p: token 0 alone then holds 0.725 >= 0.7
    assert _kept(SamplingParams(top_p=0.7), logits) == [0, 1]
    assert _kept(SamplingParams(temperature=0.5, top_p=0.7), logits) == [0]


def test_filters_are_per_row():
    logits = torch.tensor([_logits_of([0.5, 0.25, 0.15, 0.1])] * 3)
    out = process_logits(logits, [SamplingParams(top_k=1), SamplingParams(), SamplingParams(min_p=0.4)])
    assert torch.isfinite(out).tolist() == [
        [True, False, False, False],
        [True] * 4,
        [True, True, False, False],
    ]


# ---------------------------------------------------------------- sampling


def test_greedy_equals_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, 50)
    params = [SamplingParams(temperature=0, top_k=5, top_p=0.5)] * 6
    tokens, chosen, (ids, lps) = sample(logits, params, [None] * 6)
    assert tokens.tolist() == logits.argmax(-1).tolist()
    torch.testing.assert_close(chosen, logits.log_softmax(-1).max(-1).values)
    assert ids.shape == (6, 0) and lps.shape == (6, 0)


def _run(rows_logits: torch.Tensor, params: list[SamplingParams], steps: int) -> list[list[int]]:
    gens = [make_generator(p.seed) for p in params]
    out = []
    for _ in range(steps):
        out.append(sample(rows_logits, params, gens)[0].tolist())
    return [list(col) for col in zip(*out, strict=True)]


def test_seeded_row_is_the_same_alone_and_in_a_batch():
    torch.manual_seed(1)
    logits = torch.randn(4, 32)
    mine = SamplingParams(seed=1234, top_p=0.95)
    alone = _run(logits[2:3], [mine], steps=25)[0]
    torch.manual_seed(99)  # the unseeded neighbours use the global RNG: must not matter
    batch = _run(
        logits,
        [SamplingParams(seed=7), SamplingParams(), mine, SamplingParams(temperature=0.3, top_k=4)],
        steps=25,
    )
    assert batch[2] == alone
    again = _run(logits[[3, 2]], [SamplingParams(seed=5), mine], steps=25)
    assert again[1] == alone
    other_seed = _run(logits[2:3], [SamplingParams(seed=4321, top_p=0.95)], steps=25)[0]
    assert other_seed != alone
    assert len(set(alone)) > 3  # it really samples


def test_sampling_frequencies_match_filtered_distribution():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -3.0])
    params = SamplingParams(temperature=0.7, top_k=4, min_p=0.05)
    expected = process_logits(logits[None], [params]).softmax(-1)[0]
    # top-k=4 drops tokens 3 and 5; token 2 survives min-p: exp(-2/0.7) = 0.057 >= 0.05 of the top
    assert (expected > 0).tolist() == [True, True, True, False, True, False]
    B, rounds = 4000, 5
    counts = torch.zeros(6)
    for _ in range(rounds):
        tokens = sample(logits.expand(B, 6), [params] * B, [None] * B)[0]
        counts += torch.bincount(tokens, minlength=6).float()
    n = B * rounds
    assert counts[3] == 0 and counts[5] == 0  # filtered tokens are never drawn
    kept = expected > 0
    chi2 = float((((counts - n * expected) ** 2)[kept] / (n * expected[kept])).sum())
    assert chi2 < 20.0, (chi2, counts / n, expected)  # 3 dof: p < 0.001 for chi2 > 16.3


def test_logprobs_raw_and_processed():
    logits = torch.tensor([_logits_of([0.5, 0.25, 0.15, 0.1]), _logits_of([0.1, 0.2, 0.3, 0.4])])
    params = [SamplingParams(top_k=2, logprobs=3, seed=0), SamplingParams(temperature=0, logprobs=1)]
    gens = [make_generator(p.seed) for p in params]
    tokens, chosen, (ids, lps) = sample(logits, params, gens)
    assert tokens[1].item() == 3 and tokens[0].item() in (0, 1)
    raw = logits.log_softmax(-1)
    torch.testing.assert_close(chosen, raw.gather(1, tokens[:, None])[:, 0])
    assert ids.tolist() == [[0, 1, 2], [3, 2, 1]]  # k = largest requested in the batch
    torch.testing.assert_close(lps, raw.gather(1, ids))

    gens = [make_generator(p.seed) for p in params]
    tokens2, chosen2, (ids2, lps2) = sample(logits, params, gens, logprobs_mode="processed_logprobs")
    assert tokens2.tolist() == tokens.tolist()  # same seed, same draw whatever the logprobs mode
    torch.testing.assert_close(lps2[0, :2], torch.tensor([2 / 3, 1 / 3]).log())
    assert lps2[0, 2].item() == -INF  # filtered by top-k
    torch.testing.assert_close(lps2[1], raw[1, [3, 2, 1]])  # greedy row: temperature treated as 1, unfiltered

    pre = torch.zeros(2, 4)
    _, chosen3, _ = sample(logits, params, [make_generator(0), None], raw_logits=pre)
    torch.testing.assert_close(chosen3, torch.full((2,), math.log(0.25)))


def test_sample_checks_row_counts():
    with pytest.raises(ValueError, match="one generator per row"):
        sample(torch.zeros(2, 3), [SamplingParams()], [None, None])


# ---------------------------------------------------------------- stop strings


def test_find_stop():
    assert find_stop("hello world</s>", ["</s>", "wor"]) == 6
    assert find_stop("hello world</s>", ["</s>"]) == 11
    assert find_stop("hello", ["</s>", "xyz"]) is None
    assert find_stop("hello", []) is None
    assert find_stop("", ["a"]) is None
    assert find_stop("aaa", ["aa"]) == 0


def test_stop_holdback():
    assert stop_holdback("abc</", ["</s>"]) == 2
    assert stop_holdback("abc<", ["<|end|>", "x"]) == 1
    assert stop_holdback("abc", ["</s>"]) == 0
    assert stop_holdback("a</s", ["</s>"]) == 3
    assert stop_holdback("xx ab", ["abc", "b c"]) == 2
    assert stop_holdback("xx ab ", ["abc", "b c"]) == 2  # "b " starts "b c"
    assert stop_holdback("xx ab.", ["abc", "b c"]) == 0
    assert stop_holdback("</", ["</s>", "x</"]) == 2
    assert stop_holdback("ab", ["xab"]) == 0
    assert stop_holdback("", ["a"]) == 0
    assert stop_holdback("END", ["END"]) == 3  # a whole stop string is a prefix of itself
