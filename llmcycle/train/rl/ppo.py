"""PPO from a reward signal (`llmcycle ppo`): RLHF with a value model, as TRL's former PPOTrainer did it.

Four models: the policy (trained, from `model`), a value model (trained, a scalar-head transformer that
starts as a copy of the reward model, as in TRL), the frozen reference (the starting policy) and the frozen
reward model. Every iteration:

1. take a batch of prompts, sample one completion each with the policy (`generation.*`);
2. score each completion: reward model at its last token and/or reward functions, minus
   `missing_eos_penalty` when it ran out of tokens before its end-of-turn;
3. compute, with no gradient, the policy's and the reference's log-probs of the sampled tokens and the
   value model's values;
4. per-token rewards -kl_coef * KL_t, the score added at the last completion token; GAE; advantages
   whitened over the batch (llmcycle.train.rl.objectives has the formulas and conventions);
5. `ppo_epochs` passes over the batch in shuffled minibatches of batch_size x grad_accum rollouts, one
   optimizer step each, on the clipped policy loss + vf_coef * clipped value loss (policy and value model
   share the optimizer and the gradient clipping); losses are means over completion tokens;
6. adapt the KL coefficient when `adaptive_kl` (Ziegler et al.).

`train.max_steps` counts iterations (rollout batches); the learning rate follows them. A metrics record's
`step` counts optimizer updates (ppo_epochs x num_minibatches per iteration) and `iteration` the batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.transformer import Transformer
from llmcycle.optimize.lora import AdaptersOff
from llmcycle.paths import check_model_dir
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.config import PPOConfig
from llmcycle.train.core.inputs import model_input
from llmcycle.train.core.loader import chunks
from llmcycle.train.core.session import Session
from llmcycle.train.rl import objectives as rl
from llmcycle.train.rl import online
from llmcycle.train.rl.online import reduce_sums
from llmcycle.train.rl.rewards import (
    RewardModelScorer,
    check_same_tokenizer,
    compute_rewards,
    load_reward_functions,
)
from llmcycle.train.rl.rollout import (
    RolloutBatch,
    Sampler,
    check_generation,
    decode_completions,
    in_chunks,
    iteration_seed,
    make_sampler,
    rollout_batch,
    rollout_logps,
    rollout_values,
    stop_ids,
)

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One iteration's samples and what the updates compare against; tensors [N, C] over completion tokens."""

    batch: RolloutBatch
    old_logp: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor  # whitened
    returns: torch.Tensor
    stats: dict[str, float]  # sums over the rollouts, reduced over processes for the metrics


def kl_controller(cfg: PPOConfig) -> rl.FixedKLController:
    if cfg.adaptive_kl:
        return rl.AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    return rl.FixedKLController(cfg.kl_coef)


def _check(cfg: PPOConfig) -> None:
    check_generation(cfg.generation)
    if cfg.reward_model is None and not cfg.reward_funcs:
        raise LlmcycleError("ppo needs a reward: set reward_model=DIR and/or reward_funcs=[...].")
    if cfg.ppo_epochs < 1 or cfg.num_minibatches < 1:
        raise LlmcycleError("ppo_epochs and num_minibatches must be at least 1.")
    if cfg.adaptive_kl and (cfg.kl_target <= 0 or cfg.kl_horizon <= 0):
        raise LlmcycleError("adaptive_kl needs kl_target > 0 and kl_horizon > 0.")


def _value_model(cfg: PPOConfig) -> ScalarHeadModel:
    src = cfg.value_model or cfg.reward_model
    if src is None:
        return ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(cfg.model))
    check_model_dir(src, "value model")
    try:
        return ScalarHeadModel.from_pretrained(src)
    except LlmcycleError as e:
        if "not a reward/value model" not in str(e):
            raise
        return ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(src))


def _frozen(module: torch.nn.Module) -> torch.nn.Module:
    return module.eval().requires_grad_(False)


def ppo(cfg: PPOConfig, resume: bool = False) -> dict:
    """Train `cfg.model` with PPO; returns the final metrics (also in out_dir/model/manifest.json)."""
    with Session("ppo", cfg, resume) as s:
        return _ppo(cfg, s)


def _ppo(cfg: PPOConfig, s: Session) -> dict:
    t, g = cfg.train, cfg.generation
    _check(cfg)
    tok = s.load_tokenizer(cfg.model)
    online.check_reference(cfg)
    scorer = RewardModelScorer(cfg.reward_model, s.device, t.batch_size) if cfg.reward_model else None
    for what, path in (("reward model", cfg.reward_model), ("value model", cfg.value_model)):
        if path is not None:
            check_same_tokenizer(cfg.model, path, what)
    funcs = load_reward_functions(cfg.reward_funcs, cfg.reward_weights)
    sets = online.prompt_sets(cfg, s, tok)
    ref = _frozen(Transformer.from_pretrained(cfg.model, device=s.device)) if s.lora is None else None

    torch.manual_seed(t.seed)  # a fresh value head's initialisation
    modules = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model), "value": _value_model(cfg)},
                                bases={"value": cfg.value_model or cfg.reward_model or cfg.model})
    policy, value = modules["policy"], modules["value"]
    if ref is None:
        ref = AdaptersOff(policy)  # LoRA: the reference is the policy's base, no second copy
    for name, m in (("policy", policy), ("reward model", scorer.model if scorer else None)):
        if m is not None and m.config.vocab_size < tok.vocab_size:
            raise LlmcycleError(f"the tokenizer has more tokens than the {name}'s vocabulary.")
    online.check_resume(s, sets)
    per_iteration = t.batch_size * t.grad_accum * cfg.num_minibatches
    if s.state is not None and s.extra.get("rollouts_per_iteration") != per_iteration:
        raise LlmcycleError(f"checkpoint {s.resume_from} took {s.extra.get('rollouts_per_iteration')} rollouts per "
                            f"iteration, this recipe {per_iteration} (num_minibatches changed?); cannot resume.")
    loader, max_steps = s.epoch_loader(len(sets.train), per_iteration)
    kl_ctl = kl_controller(cfg)
    if "kl_ctl" in s.extra:
        kl_ctl.load_state_dict(s.extra["kl_ctl"])
    sampler = make_sampler(g)
    log.info(f"train: {max_steps} iterations of {per_iteration} rollouts x {s.dist.world_size} processes, "
             f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches each; kl_coef {kl_ctl.value:g}"
             f"{' (adaptive)' if cfg.adaptive_kl else ''}")
    evaluate = online.exact_match_eval(s, policy, tok, sets, sampler, cfg)
    first_eval = online.first_exact_match(s, evaluate)
    scoring = _Scoring(cfg, s, tok, sampler, scorer, funcs, ref)

    def iterate(indices: list[int], iteration: int, lr: float) -> dict:
        examples = [sets.train[i] for i in indices]
        gen = torch.Generator(device=s.device).manual_seed(iteration_seed(t.seed, iteration, s.dist.rank))
        t0 = time.perf_counter()
        ro = _rollout(scoring, policy, value, kl_ctl.value, examples, gen)
        t1 = time.perf_counter()
        outs, acc = _update(cfg, s, ro, iteration)
        totals = reduce_sums({**ro.stats, **acc}, s)
        kl_coef_used = kl_ctl.value
        kl_ctl.update(totals["kl_sum"] / max(totals["n"], 1.0), int(totals["n"]))
        record = _record(s, totals, outs, iteration + 1, lr, kl_coef_used)
        record.update(rollout_seconds=round(t1 - t0, 5), iteration_seconds=round(time.perf_counter() - t0, 5))
        return record

    last_eval, record, iterations = online.run_iterations(
        s, cfg, "ppo", loader, max_steps, iterate, evaluate,
        lambda: {"kl_ctl": kl_ctl.state_dict(), "rollouts_per_iteration": per_iteration, "data_hash": sets.data_hash,
                 "first_eval": first_eval})
    inputs = {key: model_input(getattr(cfg, key)) for key in ("reward_model", "value_model") if getattr(cfg, key)}
    if cfg.reward_funcs:
        inputs["reward_funcs"] = list(cfg.reward_funcs)
    result = online.publish_result(s, cfg, sets, iterations, first_eval, last_eval, record,
                                   {"kl_coef": kl_ctl.value}, inputs)
    log.info(f"done: PPO-tuned model in {s.out_dir / 'model'}")
    return result


@dataclass
class _Scoring:
    """What a rollout needs besides the trained models: sampling, the reward and the frozen reference."""

    cfg: PPOConfig
    s: Session
    tok: Tokenizer
    sampler: Sampler
    scorer: RewardModelScorer | None
    funcs: list
    ref: torch.nn.Module


@torch.no_grad()
def _rollout(sc: _Scoring, policy, value, kl_coef: float, examples: list, gen: torch.Generator) -> Rollout:
    """Sample, score, and compute everything the updates compare against."""
    cfg, s, g, t = sc.cfg, sc.s, sc.cfg.generation, sc.cfg.train
    stop = stop_ids(sc.tok)
    prompts = [e.prompt_ids for e in examples]
    with s.autocast():
        completions = sc.sampler.generate(policy, prompts, g.max_new_tokens, g.temperature, g.top_k, g.top_p,
                                          stop, gen)
    batch = rollout_batch(prompts, completions, sc.tok.pad_id if sc.tok.pad_id is not None else 0).to(s.device)
    mask = batch.mask
    with s.autocast():
        old_logp = in_chunks(lambda b: rollout_logps(policy, b, g.temperature), batch, t.batch_size)
        ref_logp = in_chunks(lambda b: rollout_logps(sc.ref, b, g.temperature), batch, t.batch_size)
        old_values = in_chunks(lambda b: rollout_values(value, b), batch, t.batch_size)
    scores = torch.zeros(len(examples))
    stats: dict[str, float] = {}
    if sc.scorer is not None:
        rm_scores = sc.scorer.score(prompts, completions, s.autocast)
        scores += rm_scores
        stats["reward_model_sum"] = float(rm_scores.sum())
    if sc.funcs:
        texts = decode_completions(sc.tok, completions, stop)
        total, each = compute_rewards(sc.funcs, [e.prompt for e in examples], texts, [e.reference for e in examples])
        scores += total
        stats.update({f"rewards/{name}_sum": float(v.sum()) for name, v in each.items()})
    ended = torch.tensor([bool(c) and c[-1] in stop for c in completions])
    if cfg.missing_eos_penalty is not None:
        scores -= cfg.missing_eos_penalty * (~ended).float()
    scores = scores.to(s.device)
    rewards, kl = rl.kl_penalized_rewards(old_logp, ref_logp, scores, mask, kl_coef, cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = rl.whiten(rewards, mask, shift_mean=False)
    advantages, returns = rl.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    stats.update({"kl_sum": float(kl.sum()), "scores_sum": float(scores.sum()), "n": len(examples),
                  "entropy_sum": float(-(old_logp * mask).sum()), "length_sum": float(mask.sum()),
                  "ended": float(ended.sum()), "values_sum": float((old_values * mask).sum())})
    return Rollout(batch, old_logp, old_values, rl.whiten(advantages, mask), returns, stats)


def _update(cfg: PPOConfig, s: Session, ro: Rollout, iteration: int) -> tuple[list[dict], dict[str, float]]:
    """ppo_epochs passes over the rollout in shuffled minibatches, one optimizer step each."""
    t, g = cfg.train, cfg.generation
    w_policy, w_value = s.wrapped["policy"], s.wrapped["value"]
    acc: dict[str, float] = {}

    def loss_fn(rows: list[int]):
        idx = torch.tensor(rows, device=s.device)
        mb = ro.batch.select(idx)
        m = mb.mask
        new_logp = rollout_logps(w_policy, mb, g.temperature)
        new_values = rollout_values(w_value, mb)
        pg, pg_clip = rl.ppo_policy_loss(new_logp, ro.old_logp[idx], ro.advantages[idx], m, cfg.cliprange)
        vf, vf_clip = rl.ppo_value_loss(new_values, ro.old_values[idx], ro.returns[idx], m, cfg.cliprange_value)
        n = m.sum()
        diff = (new_logp.detach() - ro.old_logp[idx]) * m
        for key, v in (("loss/policy", pg.detach() * n), ("loss/value", vf.detach() * n),
                       ("policy/clipfrac", pg_clip * n), ("val/clipfrac", vf_clip * n),
                       ("policy/approxkl", 0.5 * (diff ** 2).sum()), ("tokens", n)):
            acc[key] = acc.get(key, 0.0) + float(v)
        # Summed over the micro-batch's tokens: Session.step divides by the tokens of the whole minibatch.
        return (pg + cfg.vf_coef * vf) * n, {}

    outs = []
    for epoch in range(cfg.ppo_epochs):
        seed = iteration_seed(t.seed, iteration, s.dist.rank, f"epoch{epoch}")
        order = torch.randperm(len(ro.batch), generator=torch.Generator().manual_seed(seed)).tolist()
        for minibatch in chunks(order, t.batch_size * t.grad_accum):
            outs.append(s.step(chunks(minibatch, t.batch_size), lambda rows: float(ro.batch.mask[rows].sum()),
                               loss_fn))
    return outs, acc


def _record(s: Session, totals: dict, outs: list[dict], iteration: int, lr: float, kl_coef_used: float) -> dict:
    """The iteration's metrics record, named as TRL's PPOTrainer logs them."""
    n, tokens = max(totals["n"], 1.0), max(totals["tokens"], 1.0)
    mean_kl = totals["kl_sum"] / n
    record = {"step": s.step_count, "iteration": iteration, "episode": iteration * int(totals["n"]), "lr": lr,
              "loss": sum(o["loss"] for o in outs) / len(outs),
              "grad_norm": sum(o["grad_norm"] for o in outs) / len(outs),
              "objective/kl": mean_kl, "objective/entropy": totals["entropy_sum"] / n,
              "objective/non_score_reward": -kl_coef_used * mean_kl,
              "objective/rlhf_reward": totals["scores_sum"] / n - kl_coef_used * mean_kl,
              "objective/scores": totals["scores_sum"] / n, "objective/kl_coef": kl_coef_used,
              "val/mean": totals["values_sum"] / totals["length_sum"],
              "completions/mean_length": totals["length_sum"] / n, "completions/eos_ratio": totals["ended"] / n}
    record.update({k: totals[k] / tokens for k in ("loss/policy", "loss/value", "policy/clipfrac",
                                                  "val/clipfrac", "policy/approxkl")})
    if "reward_model_sum" in totals:
        record["objective/reward_model"] = totals["reward_model_sum"] / n
    record.update({k.removesuffix("_sum") + "/mean": v / n for k, v in totals.items() if k.startswith("rewards/")})
    return record
