"""Reward model (`llmcycle reward`): the transformer with a scalar head, trained on preference pairs.

Bradley-Terry: P(chosen > rejected) = sigmoid(r_chosen - r_rejected); the loss is its negative log, with an
optional margin per pair and optional centering (a small penalty on (r_c + r_r)^2 that keeps rewards near
zero). A sequence's reward is the head's output at its last token (the completion's end-of-turn), which is
what `transformers`' LlamaForSequenceClassification computes on the saved model.
"""

from __future__ import annotations

import logging

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel, last_token_scores
from llmcycle.model.transformer import Transformer
from llmcycle.train.config import (
    RewardConfig,
)
from llmcycle.train.core.inputs import file_inputs, model_input
from llmcycle.train.core.loader import chunks
from llmcycle.train.core.loop import first_evaluation, train_loop
from llmcycle.train.core.session import Session
from llmcycle.train.posttrain.chat_data import (
    PAIRS,
    load_preferences,
    load_train_and_heldout,
)
from llmcycle.train.posttrain.examples import PreferenceExample
from llmcycle.train.posttrain.losses import bradley_terry_loss

log = logging.getLogger(__name__)


def pair_rows(pairs: list[PreferenceExample], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen rows; rejected rows] right-padded, and the length of each row."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    for r, x in enumerate(seqs):
        ids[r, : len(x)] = torch.tensor(x)
    return ids.to(device), torch.tensor([len(x) for x in seqs], device=device)


def pair_scores(model: torch.nn.Module, pairs: list[PreferenceExample], pad_id: int, device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    ids, lengths = pair_rows(pairs, pad_id, device)
    scores = last_token_scores(model(ids), lengths)
    return scores[: len(pairs)], scores[len(pairs):]


def reward_loss(model, pairs, pad_id, device, center: float | None = None):
    chosen, rejected = pair_scores(model, pairs, pad_id, device)
    losses = bradley_terry_loss(chosen, rejected, None, center)
    d = (chosen - rejected).detach()
    return losses.sum(), {"accuracy": float((d > 0).sum()), "margin": float(d.sum()),
                          "mean_reward": float((chosen + rejected).detach().sum() / 2)}


@torch.no_grad()
def evaluate_pairs(model, pairs, pad_id, device, batch_size, autocast) -> dict:
    was = model.training
    model.eval()
    correct, margin, n = 0, 0.0, 0
    for i in range(0, len(pairs), batch_size):
        with autocast():
            c, r = pair_scores(model, pairs[i: i + batch_size], pad_id, device)
        correct += int((c > r).sum())
        margin += float((c - r).sum())
        n += len(c)
    model.train(was)
    return {"eval_accuracy": correct / max(n, 1), "eval_margin": margin / max(n, 1), "eval_pairs": n}


def train_reward(cfg: RewardConfig, resume: bool = False) -> dict:
    with Session("reward", cfg, resume) as s:
        return _train_reward(cfg, s)


def _start_model(path: str) -> ScalarHeadModel:
    try:
        return ScalarHeadModel.from_pretrained(path)
    except LlmcycleError as e:
        if "not a reward/value model" not in str(e):
            raise
        return ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(path))


def _train_reward(cfg: RewardConfig, s: Session) -> dict:
    d, t = cfg.data, cfg.train
    tok = s.load_tokenizer(cfg.model)
    load = lambda paths, rejects: load_preferences(paths, tok, d.max_length, rejects)  # noqa: E731
    sets = load_train_and_heldout(d, s.out_dir, "pref", load, load, "reward-model training", "preference pairs",
                                  PAIRS)
    train, heldout = sets.train, sets.heldout
    heldout = heldout[: cfg.eval.max_pairs]

    torch.manual_seed(t.seed)  # the fresh head's initialisation
    modules = s.trained_modules(lambda: {"policy": _start_model(cfg.model)})
    model, wrapped = modules["policy"], s.wrapped["policy"]
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    loader, max_steps = s.epoch_loader(len(train), t.batch_size * t.grad_accum)
    log.info(f"train: {max_steps} steps, batch {t.batch_size} pairs x {t.grad_accum} x {s.dist.world_size}")

    def evaluate() -> dict:
        if not heldout or not s.dist.is_main:
            return {}
        return evaluate_pairs(model, heldout, pad_id, s.device, t.batch_size, s.autocast)

    first_eval = first_evaluation(s, evaluate, _eval_line)
    last_eval = train_loop(
        s, "reward", max_steps, loader, lambda idx: [[train[i] for i in c] for c in chunks(idx, t.batch_size)],
        len, lambda mb: reward_loss(wrapped, mb, pad_id, s.device, center=cfg.center_coefficient), evaluate,
        cfg.eval.every, _eval_line, {"first_eval": first_eval})
    result = {"train_pairs": len(train), "rejected": sets.rejects.to_dict(), "eval_rejected": sets.eval_rejects.to_dict(),
              "eval_before": first_eval, **last_eval}
    final = s.publish({"model": model_input(cfg.model), "data": file_inputs(sets.paths)}, result)
    log.info(f"done: reward model in {final}")
    return result


def _eval_line(step: int, m: dict) -> str:
    return (f"eval step {step}: accuracy {m['eval_accuracy']:.3f}, margin {m['eval_margin']:.3f} "
            f"on {m['eval_pairs']} held-out pairs")
