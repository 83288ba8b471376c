"""The arithmetic of online post-training (PPO, GRPO): pure functions on tensors, no model code.

Conventions shared by every function here:

- Token tensors are [B, T] over *completion* tokens only: column t is the t-th generated token of a row.
  `mask` [B, T] is 1 on real completion tokens (the stop token included) and 0 on the right padding
  after them; a row's tokens are contiguous from column 0.
- Log-probs are log pi(token_t | prompt, tokens_<t) in fp32, of the logits divided by the sampling
  temperature (what TRL computes, so the ratio new/old is that of the distribution actually sampled).
- A value v_t estimates the return from the state *before* token t is generated.
- "Masked mean" is sum(x * mask) / sum(mask) over the whole batch (every token weighs the same).

PPO follows TRL's former PPOTrainer (the "PPOv2" of TRL 0.9-0.11, removed since) and "The N Implementation
Details of RLHF with PPO" (Huang et al. 2024): per-token KL penalty with the sequence score added at the
last completion token, GAE, whitened advantages, clipped policy and value losses. GRPO follows TRL 1.16's
GRPOTrainer (`_compute_loss`), checked against it in tests/test_rl.py.
"""

from __future__ import annotations

from typing import Literal

import torch

GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sum(x * mask) / sum(mask) over all elements (0 when the mask is empty)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance of the masked elements, as TRL's masked_var(unbiased=True)."""
    mask = mask.to(x.dtype)
    var = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    n = mask.sum()
    return var * n / (n - 1) if n > 1 else var


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) over the masked elements of the whole batch; 0 on padding.

    Mean and the unbiased variance are taken over every real token of the batch at once (not per row).
    With shift_mean=False the mean is added back: the spread is normalised, the level kept (how TRL
    whitens rewards before GAE; advantages are whitened with shift_mean=True).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, arXiv:1506.02438) per completion token.

    delta_t = r_t + gamma * v_{t+1} - v_t and A_t = delta_t + gamma * lam * A_{t+1}, run backwards. The
    episode ends at a row's last real token: the value after it is 0 (the completion is finished, nothing
    more is earned). Returns (advantages, returns = advantages + values), both 0 on padding.
    """
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    T = rewards.shape[1]
    last = torch.zeros_like(rewards[:, 0])
    out = []
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        out.append(last)
    advantages = torch.stack(out[::-1], dim=1) * m
    return advantages, (advantages + values) * m


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman, "Approximating KL divergence").

    k1: log pi - log pi_ref (unbiased, can be negative); k3: (r - 1) - log r with r = pi_ref / pi
    (unbiased, always >= 0, lower variance).
    """
    log_r = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_r
    if estimator == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown kl_estimator {estimator!r}; expected 'k1' or 'k3'")


def kl_penalized_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float, kl_estimator: str = "k1"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards for PPO: r_t = -kl_coef * KL_t, plus the sequence's score at its last real token.

    scores [B] come from the reward model / reward functions for the whole completion. The KL term keeps
    the policy near the reference token by token (Ziegler et al. 2019; Stiennon et al. 2020). Returns
    (rewards, kl), both [B, T] and 0 on padding.
    """
    m = mask.to(logprobs.dtype)
    kl = kl_estimate(logprobs, ref_logprobs, kl_estimator) * m
    lengths = mask.sum(1).long()
    score = (scores.to(kl.dtype) * (lengths > 0))[:, None]  # an empty completion has nowhere to put it
    bonus = torch.zeros_like(kl).scatter(1, (lengths - 1).clamp(min=0)[:, None], score)
    return -kl_coef * kl + bonus, kl


def ppo_policy_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), as a loss to minimise.

    ratio = exp(new - old); per token max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip)). Returns
    (masked mean of that, clipfrac = fraction of tokens where the clipped term is the larger one).
    """
    ratio = torch.exp(new_logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(new_logp.dtype), mask)
    return loss, clipfrac.detach()


def ppo_value_loss(new_v: torch.Tensor, old_v: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked mean of max((v - R)^2, (v_clip - R)^2), v_clip = old_v +- clip_value.

    The value may not move further than clip_value from the one that computed the advantages (as in
    OpenAI's baselines and TRL). Returns (loss, clipfrac = fraction of tokens where the clipped error wins).
    """
    v_clipped = old_v + torch.clamp(new_v - old_v, -clip_value, clip_value)
    err = (new_v - returns) ** 2
    err_clipped = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).to(new_v.dtype), mask)
    return loss, clipfrac.detach()


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019 (arXiv:1909.08593, Sec. 2.2): steer the KL coefficient toward a target KL.

    After each batch with observed KL `current` (summed over a completion's tokens, averaged over the batch)
    and n_steps rollouts: e = clip(current / target - 1, -0.2, 0.2), value *= 1 + e * n_steps / horizon.
    KL above target raises the coefficient (pulls harder toward the reference), below target lowers it;
    one batch changes it by at most a factor 1 +- 0.2 * n_steps / horizon.
    """

    def __init__(self, kl_coef: float, target: float, horizon: int):
        if target <= 0 or horizon <= 0:
            raise ValueError("adaptive KL needs target > 0 and horizon > 0")
        super().__init__(kl_coef)
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


def grpo_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, arXiv:2402.03300): (r - group mean) / (group std + 1e-4).

    rewards [N] hold consecutive groups of `group_size` completions of one prompt. The std is the unbiased
    one and 1e-4 is added to it, as in TRL (scale_rewards="group"); scale=False only centres (Dr. GRPO).
    A group whose completions all score the same gets advantage 0: it carries no signal.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    adv = grouped - grouped.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return adv.reshape(-1)


def grpo_token_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
                    advantages: torch.Tensor, beta: float, epsilon: float, epsilon_high: float | None = None,
                    kl_bias_correction: bool = True) -> dict[str, torch.Tensor]:
    """GRPO's per-token loss (unmasked) and what TRL logs about it, all [B, T].

    loss_t = -min(ratio_t * A, clamp(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * KL_t with
    ratio = exp(new - old) and the k3 estimate KL_t = exp(ref - new) - (ref - new) - 1 (differentiated
    through `new`). With kl_bias_correction (TRL 1.16's default `use_bias_correction_kl`), KL_t is
    multiplied by ratio_t: the tokens were sampled from the old policy, and the ratio, which carries a
    gradient even when it equals 1, makes the KL term's gradient that of the true KL (DeepSeek-V3.2).
    advantages [B] are per sequence. Also returns "kl" (as weighted) and the clip indicators "low"
    (ratio < 1 - eps with A < 0) and "high" (ratio > 1 + eps_high with A > 0).
    """
    adv = advantages[:, None]
    eps_high = epsilon if epsilon_high is None else epsilon_high
    ratio = torch.exp(new_logp - old_logp)
    clipped = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    out = {"low": ((ratio < 1.0 - epsilon) & (adv < 0)).float(),
           "high": ((ratio > 1.0 + eps_high) & (adv > 0)).float()}
    if beta != 0.0:
        d = ref_logp - new_logp
        kl = torch.exp(d) - d - 1.0
        if kl_bias_correction:
            kl = kl * ratio
        loss = loss + beta * kl
        out["kl"] = kl.detach()
    out["loss"] = loss
    return out


def grpo_summed_loss(per_token_loss: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """A (micro-)batch's GRPO loss summed over its units, to be divided by the units of the whole step
    (`grpo_units`, summed over micro-batches and processes): token losses summed ("dapo", "dr_grpo"), or
    each sequence's token mean summed over sequences ("grpo")."""
    per_token = per_token_loss * mask
    if loss_type == "grpo":
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum()
    return per_token.sum()


def grpo_units(mask: torch.Tensor, loss_type: str, max_completion_length: int | None = None) -> float:
    """What loss_type normalises by (TRL 1.16): real tokens ("dapo"), sequences ("grpo"), or
    sequences x max_completion_length ("dr_grpo")."""
    if loss_type == "dapo":
        return float(mask.sum())
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_completion_length)
    raise ValueError(f"unknown GRPO loss_type {loss_type!r}; expected one of {list(GRPO_LOSS_TYPES)}")


def grpo_loss(new_logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, beta: float, epsilon: float,
              epsilon_high: float | None = None, loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo",
              max_completion_length: int | None = None, kl_bias_correction: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of one batch, reduced as TRL 1.16's loss_type says (no gradient accumulation; the trainer
    accumulates the same `grpo_summed_loss` over micro-batches and divides by the step's `grpo_units`):

    - "dapo" (TRL's default): sum over all real tokens / number of real tokens: every token weighs the
      same, so long completions are not diluted (DAPO, arXiv:2503.14476).
    - "grpo": mean over each sequence's tokens, then over sequences (the original paper; biased toward
      short correct and long wrong completions).
    - "dr_grpo": sum over tokens / (B * max_completion_length) (Dr. GRPO, arXiv:2503.20783).

    Returns (loss, {"kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"}), the
    statistics as token means over the batch.
    """
    parts = grpo_token_loss(new_logp, old_logp, ref_logp, advantages, beta, epsilon, epsilon_high, kl_bias_correction)
    m = mask.to(new_logp.dtype)
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type 'dr_grpo' needs max_completion_length")
    loss = grpo_summed_loss(parts["loss"], m, loss_type) / max(grpo_units(m, loss_type, max_completion_length), 1.0)
    stats = {"clip_ratio/low_mean": masked_mean(parts["low"], m),
             "clip_ratio/high_mean": masked_mean(parts["high"], m),
             "clip_ratio/region_mean": masked_mean(torch.maximum(parts["low"], parts["high"]), m)}
    if "kl" in parts:
        stats["kl"] = masked_mean(parts["kl"], m)
    return loss, stats
