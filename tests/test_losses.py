"""The offline post-training losses against numbers worked out from the papers' formulas.

Each expected list is a literal (computed once with the `math` module from the published formula) so a
change in `losses.py` cannot move both sides; each test also re-derives the literal with `math` in the
test, which pins the literal to the formula written next to it. TRL parity is in test_trl_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from llmcycle.train.posttrain.losses import (
    bradley_terry_loss,
    dpo_loss,
    kl_estimate,
    kto_loss,
    orpo_loss,
    preference_metrics,
    simpo_loss,
)

# Three pairs: summed completion log-probs under the policy and the reference, and completion lengths.
CHOSEN = [-10.0, -12.5, -8.0]
REJECTED = [-11.0, -11.5, -9.5]
REF_CHOSEN = [-10.5, -12.0, -9.0]
REF_REJECTED = [-10.0, -12.0, -9.0]
CHOSEN_LEN = [4, 5, 2]
REJECTED_LEN = [3, 6, 5]


def t(values, **kw) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, **kw)


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def close(actual, expected, tol: float = 1e-9) -> None:
    actual = actual.tolist() if isinstance(actual, torch.Tensor) else actual
    assert actual == pytest.approx(expected, abs=tol, rel=tol)


def dpo(loss_type: str, beta: float, **kw):
    return dpo_loss(t(CHOSEN), t(REJECTED), t(REF_CHOSEN), t(REF_REJECTED), beta=beta, loss_type=loss_type, **kw)


def deltas() -> list[float]:
    # d = (logpi(y_w) - logref(y_w)) - (logpi(y_l) - logref(y_l)) = [1.5, -1.0, 1.5]
    return [(c - rc) - (r - rr) for c, r, rc, rr in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)]


# ---- DPO family ---------------------------------------------------------------------------------


def test_dpo_sigmoid():
    expected = [0.6209570477895321, 0.7443966600735709, 0.6209570477895321]
    close(expected, [-logsigmoid(0.1 * d) for d in deltas()])  # Rafailov et al. Eq. 7
    losses, chosen_rewards, rejected_rewards = dpo("sigmoid", 0.1)
    close(losses, expected)
    close(chosen_rewards, [0.05, -0.05, 0.1])  # beta * (logpi - logref)
    close(rejected_rewards, [-0.1, 0.05, -0.05])
    assert not chosen_rewards.requires_grad


def test_dpo_sigmoid_equal_logratios_is_log2():
    zeros = torch.zeros(2)
    losses, _, _ = dpo_loss(zeros - 3, zeros - 4, zeros - 3, zeros - 4)
    close(losses, [math.log(2)] * 2, 1e-6)


def test_dpo_hinge():
    expected = [0.85, 1.1, 0.85]
    close(expected, [max(0.0, 1 - 0.1 * d) for d in deltas()])
    close(dpo("hinge", 0.1)[0], expected)
    # beta = 1 puts two pairs past the hinge: zero loss there.
    expected = [0.0, 2.0, 0.0]
    close(expected, [max(0.0, 1 - d) for d in deltas()])
    close(dpo("hinge", 1.0)[0], expected)


def test_dpo_ipo_length_normalised():
    expected = [0.29340277777777785, 1.4002777777777777, 0.16000000000000003]
    by_hand = [((c - rc) / cl - (r - rr) / rl - 1 / (2 * 0.5)) ** 2
               for c, r, rc, rr, cl, rl in zip(CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED, CHOSEN_LEN, REJECTED_LEN)]
    close(expected, by_hand)  # Azar et al. Eq. 17, per-token log-ratios (TRL's normalisation)
    losses, _, _ = dpo("ipo", 0.5, chosen_len=torch.tensor(CHOSEN_LEN), rejected_len=torch.tensor(REJECTED_LEN))
    close(losses, expected)


def test_dpo_ipo_needs_lengths():
    with pytest.raises(ValueError, match="chosen_len"):
        dpo("ipo", 0.5)


def test_dpo_robust():
    eps = 0.1
    expected = [0.602207047789532, 0.7568966600735708, 0.602207047789532]
    close(expected, [(-(1 - eps) * logsigmoid(0.1 * d) + eps * logsigmoid(-0.1 * d)) / (1 - 2 * eps)
                     for d in deltas()])  # Chowdhury et al. Eq. 8
    close(dpo("robust", 0.1, label_smoothing=eps)[0], expected)
    # eps = 0 is plain DPO.
    close(dpo("robust", 0.1)[0], dpo("sigmoid", 0.1)[0].tolist())


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"unknown DPO loss_type 'kto'.*sigmoid.*ipo.*hinge.*robust"):
        dpo("kto", 0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo("sigmoid", 0.1, label_smoothing=0.1)
    with pytest.raises(ValueError, match="0.5"):
        dpo("robust", 0.1, label_smoothing=0.5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "robust"])
def test_dpo_gradient_sign(loss_type):
    chosen, rejected = t(CHOSEN, requires_grad=True), t(REJECTED, requires_grad=True)
    kw = dict(chosen_len=torch.tensor(CHOSEN_LEN), rejected_len=torch.tensor(REJECTED_LEN)) if loss_type == "ipo" else {}
    if loss_type == "robust":
        kw["label_smoothing"] = 0.1
    losses, _, _ = dpo_loss(chosen, rejected, t(REF_CHOSEN), t(REF_REJECTED), beta=0.1, loss_type=loss_type, **kw)
    losses.mean().backward()
    # Raising the chosen log-prob (or lowering the rejected one) lowers the loss. The hinge is flat past
    # its margin, so only pairs inside it are checked (all are at beta=0.1).
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()
    # And a step along the gradient really lowers the loss.
    with torch.no_grad():
        stepped, _, _ = dpo_loss(chosen - 0.1 * chosen.grad, rejected - 0.1 * rejected.grad, t(REF_CHOSEN),
                                 t(REF_REJECTED), beta=0.1, loss_type=loss_type, **kw)
    assert stepped.mean() < losses.mean()


# ---- SimPO, ORPO --------------------------------------------------------------------------------


@pytest.mark.parametrize("eps, expected", [
    (0.0, [0.23396252507754833, 2.275125337674476, 5.205501403909658]),
    (0.1, [0.36729585841088164, 2.058458671007809, 4.685501403909658]),
])
def test_simpo(eps, expected):
    beta, ratio = 2.0, 0.5
    by_hand = []
    for c, r, cl, rl in zip(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN):
        z = beta * (c / cl - r / rl) - ratio * beta  # Meng et al. Eq. 6, gamma = ratio * beta
        by_hand.append(-(1 - eps) * logsigmoid(z) - eps * logsigmoid(-z))
    close(expected, by_hand)
    losses, chosen_rewards, rejected_rewards = simpo_loss(
        t(CHOSEN), t(REJECTED), torch.tensor(CHOSEN_LEN), torch.tensor(REJECTED_LEN),
        beta=beta, gamma_beta_ratio=ratio, label_smoothing=eps)
    close(losses, expected)
    close(chosen_rewards, [-5.0, -5.0, -8.0])  # beta * average log-prob
    close(rejected_rewards, [-22 / 3, -23 / 6, -3.8])


def test_simpo_gradient_sign():
    chosen, rejected = t(CHOSEN, requires_grad=True), t(REJECTED, requires_grad=True)
    losses, _, _ = simpo_loss(chosen, rejected, torch.tensor(CHOSEN_LEN), torch.tensor(REJECTED_LEN))
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_orpo():
    nll = [1.5, 2.0, 2.5]
    expected = [1.5257227948861778, 2.1074522733709276, 2.734435175674284]
    expected_log_odds = [1.2264232450183126, -0.6567916793797934, -2.2435261046130077]
    log_odds = []
    for c, r, cl, rl in zip(CHOSEN, REJECTED, CHOSEN_LEN, REJECTED_LEN):
        pw, pl = math.exp(c / cl), math.exp(r / rl)  # Hong et al. Eq. 4: odds = p / (1 - p)
        log_odds.append(math.log(pw / (1 - pw)) - math.log(pl / (1 - pl)))
    close(expected_log_odds, log_odds)
    close(expected, [n - 0.1 * logsigmoid(lo) for n, lo in zip(nll, log_odds)])  # Eq. 6-7, lambda = 0.1
    losses, chosen_rewards, rejected_rewards, extras = orpo_loss(
        t(CHOSEN), t(REJECTED), torch.tensor(CHOSEN_LEN), torch.tensor(REJECTED_LEN), t(nll), beta=0.1)
    close(losses, expected, 1e-6)  # computed in fp32, as TRL does
    close(extras["log_odds_chosen"], expected_log_odds, 1e-6)
    close(extras["log_odds_ratio"], [logsigmoid(lo) for lo in expected_log_odds], 1e-6)
    close(chosen_rewards, [-0.25, -0.25, -0.4], 1e-6)
    close(rejected_rewards, [-11.0 / 30, -11.5 / 60, -0.19], 1e-6)


def test_orpo_scalar_nll_broadcasts_and_gradient_sign():
    chosen, rejected = t(CHOSEN, requires_grad=True), t(REJECTED, requires_grad=True)
    losses, _, _, _ = orpo_loss(chosen, rejected, torch.tensor(CHOSEN_LEN), torch.tensor(REJECTED_LEN),
                                torch.tensor(2.0), beta=0.1)
    assert losses.shape == (3,)
    close(losses, [2.0 - 0.1 * math.log(sigmoid(lo))
                   for lo in [1.2264232450183126, -0.6567916793797934, -2.2435261046130077]], 1e-6)
    losses.sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


def test_orpo_log1mexp_is_stable_near_zero():
    # Average log-prob -1e-6 (p ~ 1): log(1 - exp(x)) ~ log(-x); the naive form loses ~all digits.
    losses, _, _, extras = orpo_loss(t([-1e-6]), t([-2.0]), torch.tensor([1]), torch.tensor([1]), torch.tensor(0.0))
    expected = (-1e-6 + 2.0) - (math.log(1e-6) - math.log(1 - math.exp(-2.0)))  # log(1-e^x) ~ log(-x)
    close(extras["log_odds_chosen"], [expected], 1e-5)
    assert torch.isfinite(losses).all()


# ---- KTO ----------------------------------------------------------------------------------------

KTO_LOGPS = [-10.0, -12.5, -8.0, -7.0]
KTO_REF = [-10.5, -12.0, -9.0, -7.5]
KTO_DESIRABLE = [True, False, True, False]


@pytest.mark.parametrize("w_d, w_u, expected", [
    (1.0, 1.0, [0.49500016666000024, 0.48001065984441815, 0.48250714233361025, 0.5049998333399996]),
    (1.0, 1.5, [0.49500016666000024, 0.7200159897666272, 0.48250714233361025, 0.7574997500099995]),
])
def test_kto(w_d, w_u, expected):
    z, beta = 0.3, 0.1
    by_hand = []
    for lp, ref, good in zip(KTO_LOGPS, KTO_REF, KTO_DESIRABLE):
        r = lp - ref  # Ethayarajh et al. Eq. 7
        by_hand.append(w_d * (1 - sigmoid(beta * (r - z))) if good else w_u * (1 - sigmoid(beta * (z - r))))
    close(expected, by_hand)
    losses, rewards = kto_loss(t(KTO_LOGPS), t(KTO_REF), torch.tensor(KTO_DESIRABLE), torch.tensor(z),
                               beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    close(losses, expected)
    close(rewards, [0.05, -0.05, 0.1, 0.05])


def test_kto_gradient_sign_and_kl_is_a_constant():
    logps = t(KTO_LOGPS, requires_grad=True)
    kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    losses, _ = kto_loss(logps, t(KTO_REF), torch.tensor(KTO_DESIRABLE), kl)
    losses.sum().backward()
    # Desirable examples are pushed up, undesirable ones down; no gradient flows into the reference point.
    assert logps.grad[0] < 0 and logps.grad[2] < 0 and logps.grad[1] > 0 and logps.grad[3] > 0
    assert kl.grad is None


def test_kl_estimate():
    policy = t([-5.0, -6.0, -4.0], requires_grad=True)
    # mean(logpi - logref) = (0.5 + 0.2 + 0.3) / 3
    kl = kl_estimate(policy, t([-5.5, -6.2, -4.3]))
    close(kl, 1 / 3)
    assert not kl.requires_grad
    # A negative batch mean (a bad estimate of a KL) is clamped to 0: mean = (0.5 - 1.0 + 0.2) / 3 = -0.1.
    close(kl_estimate(t([-5.0, -6.0, -4.0]), t([-5.5, -5.0, -4.2])), 0.0)


# ---- Bradley-Terry ------------------------------------------------------------------------------

SCORES_W = [1.2, -0.3, 0.5]
SCORES_L = [0.4, 0.1, 0.9]
MARGINS = [0.5, 0.0, -0.2]


@pytest.mark.parametrize("margin, center, expected", [
    (False, None, [0.37110066594777774, 0.9130152523999526, 0.9130152523999526]),
    (True, None, [0.5543552444685271, 0.9130152523999526, 0.7981388693815918]),
    (False, 0.01, [0.39670066594777775, 0.9134152523999526, 0.9326152523999526]),
    (True, 0.01, [0.5799552444685271, 0.9134152523999526, 0.8177388693815918]),
])
def test_bradley_terry(margin, center, expected):
    margins = MARGINS if margin else [0.0] * 3
    by_hand = [-logsigmoid(w - lose - m) + (center or 0.0) * (w + lose) ** 2
               for w, lose, m in zip(SCORES_W, SCORES_L, margins)]
    close(expected, by_hand)
    losses = bradley_terry_loss(t(SCORES_W), t(SCORES_L), t(MARGINS) if margin else None, center)
    close(losses, expected)


def test_bradley_terry_gradient_sign():
    chosen, rejected = t(SCORES_W, requires_grad=True), t(SCORES_L, requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    assert (chosen.grad < 0).all() and (rejected.grad > 0).all()


# ---- metrics ------------------------------------------------------------------------------------


def test_preference_metrics():
    _, chosen_rewards, rejected_rewards = dpo("sigmoid", 0.1)
    metrics = preference_metrics(chosen_rewards, rejected_rewards, t(CHOSEN), t(REJECTED), prefix="eval_")
    assert list(metrics) == ["eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
                             "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"]
    assert all(isinstance(v, float) for v in metrics.values())
    close(list(metrics.values()), [
        (0.05 - 0.05 + 0.1) / 3,       # chosen rewards [0.05, -0.05, 0.1]
        (-0.1 + 0.05 - 0.05) / 3,      # rejected rewards [-0.1, 0.05, -0.05]
        2 / 3,                         # pair 2 loses
        (0.15 - 0.1 + 0.15) / 3,
        -30.5 / 3,
        -32.0 / 3,
    ], 1e-7)
    tie = preference_metrics(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(2))
    assert tie["rewards/accuracies"] == 0.0 and "rewards/chosen" in tie  # ties count as wrong, as in TRL
