"""The RL arithmetic (llmcycle.train.rl.objectives), the batched sampler and the reward functions.

PPO is checked against values worked out by hand from the published formulas (TRL removed its
PPOTrainer, so there is no reference implementation to drive); GRPO against hand values and against
TRL 1.16's own `GRPOTrainer._compute_loss` on a tiny Hugging Face Llama.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig
from llmcycle.model.generate import generate
from llmcycle.model.transformer import Transformer
from llmcycle.train.rl import objectives as rl
from llmcycle.train.rl.rewards import (
    compute_rewards,
    exact_match,
    load_reward_function,
    load_reward_functions,
)
from llmcycle.train.rl.rollout import SimpleSampler, rollout_batch, rollout_logps, sample_next

ATOL = 1e-6


def close(a, b, atol=ATOL):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=0), (a.tolist(), b.tolist())


# ---- PPO pieces, by hand -------------------------------------------------------------------------


def test_gae_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, -1.0], [2.0, 1.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = rl.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # Row 0, backwards: d2 = 2 - (-1) = 3; d1 = 0 + .9(-1) - 1 = -1.9, A1 = -1.9 + .72 * 3 = .26;
    # d0 = 1 + .9(1) - .5 = 1.4, A0 = 1.4 + .72 * .26 = 1.5872.
    # Row 1 ends at t=1 (the padding's reward 7 and value 9 must not leak in): d1 = 1 + 0 - 1 = 0; d0 = .5 + .9 - 2.
    close(adv, [[1.5872, 0.26, 3.0], [-0.6, 0.0, 0.0]])
    close(ret, [[2.0872, 1.26, 2.0], [1.4, 1.0, 0.0]])


def test_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, -8.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # Real values 1..4: mean 2.5, unbiased variance 5/3.
    s = math.sqrt(5 / 3)
    close(rl.whiten(x, mask), [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])
    close(rl.whiten(x, mask, shift_mean=False), [[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s], [2.5 + 1.5 / s, 0, 0]])


def test_kl_penalized_rewards_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.0, -4.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -2.0, -1.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = rl.kl_penalized_rewards(logp, ref, scores, mask, kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [-0.2, 1.0, 0.0]])  # k1 = logp - ref, 0 on padding
    # -0.1 * kl, and the score on each row's last real token (row 1: t=1, not the padding).
    close(rewards, [[-0.05, 0.1, 2.0], [0.02, -1.1, 0.0]])
    _, k3 = rl.kl_penalized_rewards(logp, ref, scores, mask, kl_coef=0.1, kl_estimator="k3")
    # k3 = e^(ref-logp) - 1 - (ref-logp)
    close(k3, [[math.exp(-0.5) - 0.5, math.e - 2.0, 0.0], [math.exp(0.2) - 1.2, math.exp(-1.0), 0.0]])


def test_ppo_policy_loss_by_hand():
    new = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.2, -1.5], [-0.5, 3.0]])
    adv = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipfrac = rl.ppo_policy_loss(new, old, adv, mask, clip=0.2)
    # Ratios e^.2 = 1.2214 (A = 1: max(-1.2214, -1.2) = -1.2, clipped), e^-.5 = .6065 (A = -2:
    # max(1.2131, 1.6) = 1.6, clipped), 1 (A = .5: -.5, not clipped); the padded token is ignored.
    close(loss, (-1.2 + 1.6 - 0.5) / 3)
    close(clipfrac, 2 / 3)


def test_ppo_value_loss_by_hand():
    new_v = torch.tensor([[1.0, 0.0], [2.0, 5.0]])
    old_v = torch.tensor([[0.5, 0.5], [2.1, 0.0]])
    returns = torch.tensor([[2.0, 0.2], [1.0, 0.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, clipfrac = rl.ppo_value_loss(new_v, old_v, returns, mask, clip_value=0.2)
    # Token 0: clipped value .7, errors 1 vs 1.69 -> 1.69 (clipped); token 1: clipped .3, errors .04 vs
    # .01 -> .04; token 2: clipped 2.0 = new value, 1 vs 1 (not counted as clipped).
    close(loss, 0.5 * (1.69 + 0.04 + 1.0) / 3)
    close(clipfrac, 1 / 3)


def test_kl_controllers():
    ctl = rl.AdaptiveKLController(0.1, target=6.0, horizon=100)
    ctl.update(9.0, 10)  # error clipped to +0.2: x (1 + 0.2 * 10 / 100)
    close(ctl.value, 0.102)
    ctl.update(6.6, 10)  # error 0.1
    close(ctl.value, 0.102 * 1.01)
    ctl.update(0.0, 50)  # error clipped to -0.2: x 0.9
    close(ctl.value, 0.102 * 1.01 * 0.9)
    again = rl.AdaptiveKLController(0.5, target=6.0, horizon=100)
    again.load_state_dict(ctl.state_dict())
    assert again.value == ctl.value
    fixed = rl.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05


# ---- GRPO, by hand ---------------------------------------------------------------------------------


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    # Group 1: mean .5, unbiased std sqrt(1/3); TRL adds 1e-4 to the std. Group 2 has no spread: 0.
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    close(rl.grpo_advantages(rewards, 4), [a, -a, -a, a, 0, 0, 0, 0])
    close(rl.grpo_advantages(rewards, 4, scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError):
        rl.grpo_advantages(rewards, 3)


def test_grpo_loss_by_hand():
    new = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]])
    old = torch.tensor([[-1.2, -2.0], [-0.5, 0.0]])
    ref = torch.tensor([[-1.1, -1.9], [-0.5, 0.0]])
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    # Row 0: ratios e^.2 (clipped to 1.2: -2.4) and 1 (-2); k3 at d = ref - new = -.1 and +.1.
    k3 = [math.exp(-0.1) + 0.1 - 1, math.exp(0.1) - 0.1 - 1]
    t = [-2.4 + 0.1 * k3[0], -2.0 + 0.1 * k3[1], 1.0]  # row 1: ratio 1, A = -1 -> +1
    kwargs = dict(beta=0.1, epsilon=0.2, kl_bias_correction=False)
    loss, stats = rl.grpo_loss(new, old, ref, adv, mask, loss_type="dapo", **kwargs)
    close(loss, sum(t) / 3)
    close(stats["kl"], (k3[0] + k3[1]) / 3)
    # TRL's default bias correction weighs each token's KL by its ratio (e^.2 and 1 here).
    loss, stats = rl.grpo_loss(new, old, ref, adv, mask, beta=0.1, epsilon=0.2)
    close(loss, (t[0] + 0.1 * k3[0] * (math.exp(0.2) - 1) + t[1] + t[2]) / 3)
    close(stats["kl"], (k3[0] * math.exp(0.2) + k3[1]) / 3)
    close(stats["clip_ratio/high_mean"], 1 / 3)
    close(stats["clip_ratio/region_mean"], 1 / 3)
    loss, _ = rl.grpo_loss(new, old, ref, adv, mask, loss_type="grpo", **kwargs)
    close(loss, ((t[0] + t[1]) / 2 + t[2]) / 2)
    loss, _ = rl.grpo_loss(new, old, ref, adv, mask, loss_type="dr_grpo", max_completion_length=4, **kwargs)
    close(loss, sum(t) / (2 * 4))
    # The gradient reaches the policy through the ratio and the KL term.
    new = new.clone().requires_grad_(True)
    rl.grpo_loss(new, old, ref, adv, mask, **kwargs)[0].backward()
    assert new.grad[0, 1] != 0 and new.grad[1, 1] == 0


# ---- GRPO against TRL 1.16's GRPOTrainer._compute_loss ---------------------------------------------

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
# Equal-length prompts: TRL's training forward gives a left-padded row positions shifted by its padding
# (transformers numbers positions 0..T-1 whatever the mask), while we start every prompt at position 0;
# with equal lengths both layouts are the same, and completions of different lengths still test masking.
PROMPTS = [[BOS, 10, 11, 12], [BOS, 13, 14, 15], [BOS, 16, 17, 18], [BOS, 19, 20, 21]]
COMPLETIONS = [[30, 31, EOS], [32, EOS], [33, 34, 35, 36], [37, EOS]]


@pytest.fixture(scope="module")
def trl_setup(tmp_path_factory):
    pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl_grpo")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = transformers.LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # log-probs far from uniform, so a misaligned token shows
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else 0.15 * noise)
    model.save_pretrained(root / "policy")
    vocab = {"<pad>": PAD, "<bos>": BOS, "<eos>": EOS, "<unk>": 3} | {f"w{i}": i for i in range(4, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                               pad_token="<pad>", unk_token="<unk>")
    return {"root": root, "tok": tok, "datasets": datasets, "transformers": transformers}


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "dr_grpo"])
def test_grpo_loss_matches_trl(trl_setup, loss_type):
    from trl import GRPOConfig, GRPOTrainer

    s = trl_setup
    beta, eps, max_len = 0.1, 0.2, 4
    args = GRPOConfig(output_dir=str(s["root"] / "out"), report_to="none", use_cpu=True, bf16=False, fp16=False,
                      per_device_train_batch_size=4, num_generations=4, beta=beta, epsilon=eps, loss_type=loss_type,
                      temperature=1.0, max_completion_length=max_len, save_strategy="no", logging_strategy="no",
                      disable_tqdm=True, seed=0)
    hf = s["transformers"].AutoModelForCausalLM.from_pretrained(s["root"] / "policy", dtype=torch.float32)
    dataset = s["datasets"].Dataset.from_dict({"prompt": ["w10 w11"] * 4})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = GRPOTrainer(model=hf, reward_funcs=lambda prompts, completions, **kw: [0.0] * len(completions),
                              args=args, train_dataset=dataset, processing_class=s["tok"])
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop, which we do not run
    assert args.steps_per_generation == 1

    # Ours: the same weights through our Transformer, the same ids through our rollout layout.
    batch = rollout_batch(PROMPTS, COMPLETIONS, PAD)
    policy = Transformer.from_pretrained(s["root"] / "policy").eval()
    with torch.no_grad():
        new = rollout_logps(policy, batch)
    g = torch.Generator().manual_seed(1)
    # The old policy and the reference differ from the current one, so ratios clip on both sides.
    old = (new + 0.3 * torch.randn(new.shape, generator=g)) * batch.mask
    ref = (new + 0.5 * torch.randn(new.shape, generator=g)) * batch.mask
    advantages = torch.tensor([1.5, -0.7, 0.4, -1.2])
    loss, stats = rl.grpo_loss(new, old, ref, advantages, batch.mask, beta, eps, loss_type=loss_type,
                               max_completion_length=max_len)

    C = batch.mask.shape[1]
    inputs = {"prompt_ids": torch.tensor(PROMPTS), "prompt_mask": torch.ones(4, 4, dtype=torch.long),
              "completion_ids": batch.completion_ids, "completion_mask": batch.mask.long(),
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": batch.mask.sum()}
    assert C == max_len
    trainer.model.train()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = trainer._compute_loss(trainer.model, inputs).item()
        trl_logps, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), C)
    close(new * batch.mask, trl_logps * batch.mask, atol=1e-5)
    close(loss, expected, atol=1e-5)
    metrics = trainer._metrics["train"]
    close(stats["kl"], metrics["kl"][-1], atol=1e-5)
    close(stats["clip_ratio/region_mean"], metrics["clip_ratio/region_mean"][-1], atol=1e-6)
    assert 0 < stats["clip_ratio/region_mean"] < 1  # both sides of the clip are in the batch
    assert abs(expected) > 1e-2


# ---- the sampler ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=40, initializer_range=0.3)
    return Transformer(cfg).eval()


SAMPLER_PROMPTS = [[1, 5, 6, 7, 8, 9, 10], [1, 3], [1, 20, 21, 22], [1, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]


def test_batched_greedy_equals_one_at_a_time(tiny_lm):
    stop = [2, 7]
    out = SimpleSampler().generate(tiny_lm, SAMPLER_PROMPTS, 30, temperature=0.0, stop_ids=stop)
    one = [generate(tiny_lm, p, 30, temperature=0.0, stop_ids=stop) for p in SAMPLER_PROMPTS]
    assert out == one
    lengths = [len(x) for x in out]
    assert len(set(lengths)) > 1 and 30 in lengths  # some rows stopped early, some ran to the limit
    assert all(x[-1] in stop for x in out if len(x) < 30)
    # Smaller generation batches give the same rows.
    assert SimpleSampler(batch_size=3).generate(tiny_lm, SAMPLER_PROMPTS, 30, temperature=0.0, stop_ids=stop) == out


def test_sampler_stops_at_the_context(tiny_lm):
    # 40 positions: after a 12-token prompt, 28 more can be fed, and the last one predicts a 29th.
    out = SimpleSampler().generate(tiny_lm, SAMPLER_PROMPTS, 100, temperature=0.0)
    assert [len(x) for x in out] == [41 - len(p) for p in SAMPLER_PROMPTS]
    assert out == [generate(tiny_lm, p, 100, temperature=0.0) for p in SAMPLER_PROMPTS]


def test_seeded_sampling_reproduces(tiny_lm):
    def run(seed):
        return SimpleSampler().generate(tiny_lm, SAMPLER_PROMPTS, 12, temperature=1.0, top_k=20, top_p=0.9,
                                        stop_ids=[2], generator=torch.Generator().manual_seed(seed))

    a, b, c = run(3), run(3), run(4)
    assert a == b and a != c


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).tolist()) == {2, 3}
    # probs .032 .087 .237 .644: top_p .5 keeps only the first (its predecessors cover nothing yet), .7 two.
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=g).tolist()) == {3}
    assert set(sample_next(logits, 1.0, top_p=0.7, generator=g).tolist()) == {2, 3}
    assert sample_next(logits[:1], 0.0).tolist() == [3]


def test_rollout_logps_match_full_sequences(tiny_lm):
    prompts, completions = [[1, 5, 6], [1, 9, 10, 11, 12]], [[20, 21, 2], [22]]
    batch = rollout_batch(prompts, completions, pad_id=0)
    with torch.no_grad():
        got = rollout_logps(tiny_lm, batch, temperature=0.5)
        for r, (p, c) in enumerate(zip(prompts, completions)):
            logits = tiny_lm(torch.tensor([p + c]))[0].float() / 0.5
            want = torch.log_softmax(logits, -1)[torch.arange(len(p) - 1, len(p) + len(c) - 1), torch.tensor(c)]
            close(got[r, : len(c)], want, atol=1e-5)
    assert got[1, 1:].abs().sum() == 0 and batch.mask.tolist() == [[1, 1, 1], [1, 0, 0]]


# ---- rewards -------------------------------------------------------------------------------------


def test_exact_match_reward():
    assert exact_match([None] * 4, [" 42 ", "4 2", "43", "x"], ["42", "4  2", "42", None]) == [1.0, 1.0, 0.0, 0.0]


def test_user_reward_functions(tmp_path, monkeypatch):
    f = tmp_path / "my_rewards.py"
    f.write_text("def length(prompts, completions, references):\n    return [len(c) for c in completions]\n")
    fn = load_reward_function(f"{f}:length")
    assert fn([None], ["abc"], [None]) == [3]
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_function("my_rewards:length")([None], ["ab"], [None]) == [2]
    funcs = load_reward_functions(["exact_match", f"{f}:length"], [2.0, 0.5])
    total, each = compute_rewards(funcs, [None, None], ["42", "abcd"], ["42", "42"])
    close(total, [2.0 + 1.0, 0.0 + 2.0])
    assert each["exact_match"].tolist() == [1.0, 0.0]
    for bad, message in [(f"{tmp_path}/nope.py:f", "does not exist"), (f"{f}:missing", "no attribute"),
                         ("no_such_module_xyz:f", "no module named"), ("exact", "expected a shipped name")]:
        with pytest.raises(LlmcycleError, match=message):
            load_reward_function(bad)
    f.write_text("def bad(prompts, completions, references):\n    return [1.0]\n")
    with pytest.raises(LlmcycleError, match="returned 1 values for 2"):
        compute_rewards(load_reward_functions([f"{f}:bad"]), [None, None], ["a", "b"], [None, None])
