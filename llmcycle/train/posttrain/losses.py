"""Offline preference / reward losses: pure functions on per-example tensors, no model code.

Every input is a 1-D tensor over a batch of B examples. Sequence log-probs are SUMS of token log-probs
over the completion (prompt excluded); `*_len` are completion token counts. Each loss returns per-example
losses [B] (the trainer takes the mean) plus the rewards TRL logs, so that our numbers and TRL 1.16's
can be compared line for line (tests/test_trl_parity.py drives TRL's own trainers for that).

Conventions follow TRL 1.16.0 exactly, including the places where it departs from the papers: IPO is
length-normalised, SimPO and ORPO work on *average* per-token log-probs, KTO's KL term is a detached,
clamped batch mean of mismatched pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _lengths(n, like: torch.Tensor, name: str) -> torch.Tensor:
    if n is None:
        raise ValueError(f"{name} is required (completion token counts) for this loss")
    # Clamp at 1 as TRL does for IPO: an empty completion gives a zero average, not 0/0 = NaN.
    return torch.as_tensor(n, device=like.device).to(like.dtype).clamp(min=1.0)


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_len: torch.Tensor | None = None,
    rejected_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO family on summed sequence log-probs -> (losses [B], chosen_rewards, rejected_rewards).

    With log-ratios  c = logpi(y_w|x) - logref(y_w|x),  r = logpi(y_l|x) - logref(y_l|x),  d = c - r:

    - "sigmoid" (DPO, Rafailov et al. 2023, arXiv:2305.18290, Eq. 7):  -log sigmoid(beta * d)
    - "hinge" (SLiC, Zhao et al. 2023, arXiv:2305.10425):                max(0, 1 - beta * d)
    - "ipo" (IPO, Azar et al. 2023, arXiv:2310.12036, Eq. 17, beta = tau): (d' - 1/(2 beta))^2 where
      d' = c/|y_w| - r/|y_l| uses log-ratios averaged per completion token (TRL's length-normalised form,
      which the IPO authors confirmed is what the paper's results used); needs chosen_len/rejected_len.
    - "robust" (rDPO, Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8) with flip rate eps = label_smoothing:
      [-(1-eps) log sigmoid(beta d) + eps log sigmoid(-beta d)] / (1 - 2 eps); unbiased under label noise.

    label_smoothing is used only by "robust" (as in TRL 1.16, whose "sigmoid" has no cDPO smoothing); a
    non-zero value with another loss type is rejected rather than silently ignored.
    Rewards are the implicit DPO rewards beta * log-ratio, detached (what TRL logs as rewards/*).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; expected one of {list(DPO_LOSS_TYPES)}")
    if label_smoothing and loss_type != "robust":
        raise ValueError(f"label_smoothing is only used by loss_type='robust', not {loss_type!r}")
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_logratios - rejected_logratios

    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        # Summed log-ratios make the squared loss grow with completion length; per-token averages keep
        # beta (tau) comparable across lengths.
        avg_delta = (chosen_logratios / _lengths(chosen_len, chosen_logps, "chosen_len")
                     - rejected_logratios / _lengths(rejected_len, rejected_logps, "rejected_len"))
        losses = (avg_delta - 1 / (2 * beta)) ** 2
    else:  # robust
        eps = label_smoothing
        if not 0.0 <= eps < 0.5:
            raise ValueError(f"robust DPO needs 0 <= label_smoothing < 0.5, got {eps}")
        losses = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)

    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma_beta_ratio: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, Eq. 6): reference-free, length-normalised DPO.

    With average log-probs  a_w = logpi(y_w|x)/|y_w|,  a_l = logpi(y_l|x)/|y_l|  and target margin
    gamma = gamma_beta_ratio * beta:  z = beta * (a_w - a_l) - gamma,
    loss = -(1-eps) log sigmoid(z) - eps log sigmoid(-z)   (eps = label_smoothing, 0 in the paper).

    TRL runs this as CPOTrainer(loss_type="simpo", cpo_alpha=0) with simpo_gamma = gamma (the absolute
    margin); here the ratio is the parameter because that is how the SimPO paper tunes it.
    Rewards: beta * a_w, beta * a_l, detached.
    """
    avg_chosen = chosen_logps / _lengths(chosen_len, chosen_logps, "chosen_len")
    avg_rejected = rejected_logps / _lengths(rejected_len, rejected_logps, "rejected_len")
    z = beta * (avg_chosen - avg_rejected - gamma_beta_ratio)
    losses = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012): log1p(-exp) far from 0,
    log(-expm1) near 0, switching at -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_len: torch.Tensor,
    rejected_len: torch.Tensor,
    chosen_nll: torch.Tensor,
    *,
    beta: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, Eqs. 4-7): SFT NLL plus an odds-ratio penalty.

    On average per-token log-probs a = logpi(y|x)/|y|, odds(y) = p/(1-p) with p = exp(a), so
    log_odds = (a_w - a_l) - (log(1 - exp(a_w)) - log(1 - exp(a_l)))  and
    loss = chosen_nll - beta * log sigmoid(log_odds)   (beta is the paper's lambda).

    chosen_nll is the SFT term: per-example [B], or a scalar that broadcasts. TRL's value is one scalar,
    the token-mean cross-entropy over the chosen rows' prompt AND completion tokens across the batch;
    passing that scalar makes mean(losses) equal TRL's loss. Computed in fp32 as TRL does.
    Returns (losses [B], chosen_rewards = beta*a_w, rejected_rewards = beta*a_l, extras) with detached
    per-example extras whose batch means are what TRL logs under the same keys:
    "log_odds_ratio" = log sigmoid(log_odds) and "log_odds_chosen" = log_odds.
    """
    avg_chosen = chosen_logps.float() / _lengths(chosen_len, chosen_logps.float(), "chosen_len")
    avg_rejected = rejected_logps.float() / _lengths(rejected_len, rejected_logps.float(), "rejected_len")
    log_odds = (avg_chosen - avg_rejected) - (_log1mexp(avg_chosen) - _log1mexp(avg_rejected))
    ratio = F.logsigmoid(log_odds)
    losses = chosen_nll - beta * ratio
    extras = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    return losses, beta * avg_chosen.detach(), beta * avg_rejected.detach(), extras


def kl_estimate(mismatched_logps: torch.Tensor, mismatched_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_ref (Ethayarajh et al. 2024, arXiv:2402.01306, Sec. 4.1): a biased
    estimate of KL(pi || ref) from log-ratios of mismatched (prompt, other example's completion) pairs,
    batch-averaged, clamped at 0 (a KL is non-negative) and detached: it is a baseline, not a target.
    Under data parallelism average the per-rank means before clamping, as TRL does."""
    return (mismatched_logps - mismatched_ref_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 7) on unpaired examples -> (losses [B], rewards).

    With r = logpi(y|x) - logref(y|x) and z = kl (from kl_estimate):
      desirable:   lambda_D * (1 - sigmoid(beta * (r - z)))
      undesirable: lambda_U * (1 - sigmoid(beta * (z - r)))
    Losses keep the input order; their mean is TRL's loss (TRL concatenates chosen then rejected, which
    has the same mean). Rewards: beta * r, detached.
    """
    logratios = logps - ref_logps
    kl = kl.detach()
    desirable = desirable.to(torch.bool)
    chosen_losses = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    rejected_losses = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    losses = torch.where(desirable, chosen_losses, rejected_losses)
    return losses, beta * logratios.detach()


def bradley_terry_loss(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin: torch.Tensor | None = None,
    center_coefficient: float | None = None,
) -> torch.Tensor:
    """Per-pair reward-model loss (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, Eq. 1):
    -log sigmoid(s_w - s_l - m), with the optional margin m of Llama 2 (Touvron et al. 2023, Eq. 2) and
    the optional centering penalty c * (s_w + s_l)^2 of Eisenstein et al. 2023 (arXiv:2312.09244), which
    pins the scores' mean near 0 since the BT loss only sees differences. The mean over pairs is TRL's
    RewardTrainer loss."""
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_coefficient is not None:
        losses = losses + center_coefficient * (chosen_scores + rejected_scores) ** 2
    return losses


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    prefix: str = "",
) -> dict[str, float]:
    """Batch means under TRL's metric names (prefix e.g. "eval_"): rewards/{chosen,rejected,accuracies,
    margins} and logps/{chosen,rejected}. Accuracy counts strict wins (ties are wrong), as TRL does."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        f"{prefix}rewards/chosen": chosen_rewards.mean().item(),
        f"{prefix}rewards/rejected": rejected_rewards.mean().item(),
        f"{prefix}rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        f"{prefix}rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        f"{prefix}logps/chosen": chosen_logps.detach().float().mean().item(),
        f"{prefix}logps/rejected": rejected_logps.detach().float().mean().item(),
    }


def chosen_nll(chosen_logps: torch.Tensor, chosen_len: torch.Tensor) -> torch.Tensor:
    """RPO's NLL term per pair, scaled so its batch mean is the mean NLL over all chosen tokens of the batch
    (TRL's loss type "sft", used as RPO with loss_type=["sigmoid", "sft"]): longer answers weigh more."""
    return -chosen_logps * chosen_logps.numel() / chosen_len.sum().clamp(min=1)

