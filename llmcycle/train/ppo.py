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
   whitened over the batch (llmcycle.train.rl has the formulas and conventions);
5. `ppo_epochs` passes over the batch in shuffled minibatches of batch_size x grad_accum rollouts, one
   optimizer step each, on the clipped policy loss + vf_coef * clipped value loss (policy and value model
   share the optimizer and the gradient clipping); losses are means over completion tokens;
6. adapt the KL coefficient when `adaptive_kl` (Ziegler et al.).

`train.max_steps` counts iterations (rollout batches); the learning rate follows them. A metrics record's
`step` counts optimizer updates (ppo_epochs x num_minibatches per iteration) and `iteration` the batches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.transformer import Transformer
from llmcycle.paths import check_model_dir
from llmcycle.progress import progress
from llmcycle.train import rl
from llmcycle.train.chat_data import holds_out_user_data
from llmcycle.train.post_config import (
    PPOConfig,
)
from llmcycle.train.posttrain import (
    EpochLoader,
    Session,
    chunks,
    evaluate_and_checkpoint,
    file_inputs,
    first_evaluation,
    log_step,
    model_input,
    resolve_data,
    total_steps,
)
from llmcycle.train.rewards import (
    RewardModelScorer,
    check_same_tokenizer,
    compute_rewards,
    load_reward_functions,
)
from llmcycle.train.rollout import (
    RolloutBatch,
    check_generation,
    decode_completions,
    heldout_exact_match,
    in_chunks,
    iteration_seed,
    load_prompt_sets,
    make_sampler,
    prompts_hash,
    reduce_sums,
    rollout_batch,
    rollout_logps,
    rollout_values,
    stop_ids,
)


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


def ppo(cfg: PPOConfig, resume: bool = False, log=print) -> dict:
    """Train `cfg.model` with PPO; returns the final metrics (also in out_dir/model/manifest.json)."""
    with Session("ppo", cfg, resume, log) as s:
        return _ppo(cfg, s)


def _ppo(cfg: PPOConfig, s: Session) -> dict:
    d, t, g = cfg.data, cfg.train, cfg.generation
    _check(cfg)
    tok = s.load_tokenizer(cfg.model)
    if not Path(cfg.model).is_dir():  # on resume the tokenizer came from the checkpoint
        raise LlmcycleError(f"{cfg.model}: the starting policy is needed as the reference; directory not found.")
    scorer = RewardModelScorer(cfg.reward_model, s.device, t.batch_size) if cfg.reward_model else None
    for what, path in (("reward model", cfg.reward_model), ("value model", cfg.value_model)):
        if path is not None:
            check_same_tokenizer(cfg.model, path, what)
    funcs = load_reward_functions(cfg.reward_funcs, cfg.reward_weights)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    stop = stop_ids(tok)
    hold = holds_out_user_data(d)
    train_paths, eval_paths = resolve_data(replace(d, eval=None) if hold else d, s.out_dir, "prompts")
    train, heldout, rejects, eval_rejects = load_prompt_sets(train_paths, eval_paths, tok, d.max_length,
                                                             g.max_new_tokens, s.log, holdout=hold)
    ref = _frozen(Transformer.from_pretrained(cfg.model, device=s.device))

    torch.manual_seed(t.seed)  # a fresh value head's initialisation
    modules = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model), "value": _value_model(cfg)})
    policy, value = modules["policy"], modules["value"]
    w_policy, w_value = s.wrapped["policy"], s.wrapped["value"]
    for name, m in (("policy", policy), ("reward model", scorer.model if scorer else None)):
        if m is not None and m.config.vocab_size < tok.vocab_size:
            raise LlmcycleError(f"the tokenizer has more tokens than the {name}'s vocabulary.")
    data_hash = prompts_hash(train)
    extra = s.state["extra"] if s.state is not None else {}
    if s.state is not None and extra.get("data_hash") != data_hash:
        raise LlmcycleError(f"the prompts differ from those of checkpoint {s.resume_from}; cannot resume.")

    per_iteration = t.batch_size * t.grad_accum * cfg.num_minibatches
    if s.state is not None and extra.get("rollouts_per_iteration") != per_iteration:
        raise LlmcycleError(f"checkpoint {s.resume_from} took {extra.get('rollouts_per_iteration')} rollouts per "
                            f"iteration, this recipe {per_iteration} (num_minibatches changed?); cannot resume.")
    loader = EpochLoader(len(train), per_iteration, t.seed, s.dist.rank, s.dist.world_size)
    if s.state is not None:
        loader.load_state_dict(s.state["loader"])
    max_steps = total_steps(t, loader)
    kl_ctl = kl_controller(cfg)
    if "kl_ctl" in extra:
        kl_ctl.load_state_dict(extra["kl_ctl"])
    iteration = int(extra.get("iteration", 0))
    sampler = make_sampler(g)
    s.log(f"train: {max_steps} iterations of {per_iteration} rollouts x {s.dist.world_size} processes, "
          f"{cfg.ppo_epochs} epochs x {cfg.num_minibatches} minibatches each; kl_coef {kl_ctl.value:g}"
          f"{' (adaptive)' if cfg.adaptive_kl else ''}")

    with_ref = [e for e in heldout if e.reference is not None][: cfg.eval.generate]

    def evaluate() -> dict:
        if not with_ref or not s.dist.is_main:
            return {}
        return heldout_exact_match(policy, tok, with_ref, sampler, g.max_new_tokens, s.autocast)

    first_eval = first_evaluation(s, evaluate, _eval_line)

    @torch.no_grad()
    def rollout(examples: list, gen: torch.Generator) -> Rollout:
        """Sample, score, and compute everything the updates compare against."""
        prompts = [e.prompt_ids for e in examples]
        with s.autocast():
            completions = sampler.generate(policy, prompts, g.max_new_tokens, g.temperature, g.top_k, g.top_p,
                                           stop, gen)
        batch = rollout_batch(prompts, completions, pad_id).to(s.device)
        mask = batch.mask
        with s.autocast():
            old_logp = in_chunks(lambda b: rollout_logps(policy, b, g.temperature), batch, t.batch_size)
            ref_logp = in_chunks(lambda b: rollout_logps(ref, b, g.temperature), batch, t.batch_size)
            old_values = in_chunks(lambda b: rollout_values(value, b), batch, t.batch_size)
        scores = torch.zeros(len(examples))
        stats: dict[str, float] = {}
        if scorer is not None:
            rm_scores = scorer.score(prompts, completions, s.autocast)
            scores += rm_scores
            stats["reward_model_sum"] = float(rm_scores.sum())
        if funcs:
            texts = decode_completions(tok, completions, stop)
            total, each = compute_rewards(funcs, [e.prompt for e in examples], texts, [e.reference for e in examples])
            scores += total
            stats.update({f"rewards/{name}_sum": float(v.sum()) for name, v in each.items()})
        ended = torch.tensor([bool(c) and c[-1] in stop for c in completions])
        if cfg.missing_eos_penalty is not None:
            scores -= cfg.missing_eos_penalty * (~ended).float()
        scores = scores.to(s.device)
        rewards, kl = rl.kl_penalized_rewards(old_logp, ref_logp, scores, mask, kl_ctl.value, cfg.kl_estimator)
        if cfg.whiten_rewards:
            rewards = rl.whiten(rewards, mask, shift_mean=False)
        advantages, returns = rl.gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
        stats.update({"kl_sum": float(kl.sum()), "scores_sum": float(scores.sum()), "n": len(examples),
                      "entropy_sum": float(-(old_logp * mask).sum()), "length_sum": float(mask.sum()),
                      "ended": float(ended.sum()), "values_sum": float((old_values * mask).sum())})
        return Rollout(batch, old_logp, old_values, rl.whiten(advantages, mask), returns, stats)

    def update(ro: Rollout, iteration: int) -> tuple[list[dict], dict[str, float]]:
        """ppo_epochs passes over the rollout in shuffled minibatches, one optimizer step each."""
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

    last_eval: dict = {}
    record: dict = {}
    bar = progress(total=max_steps, initial=iteration, desc="ppo", unit="it", disable=not s.dist.is_main)
    while iteration < max_steps:
        lr = s.set_lr(max_steps, iteration)
        examples = [train[i] for i in loader.next_step()]
        gen = torch.Generator(device=s.device).manual_seed(iteration_seed(t.seed, iteration, s.dist.rank))
        t0 = time.perf_counter()
        ro = rollout(examples, gen)
        t1 = time.perf_counter()
        outs, acc = update(ro, iteration)
        totals = reduce_sums({**ro.stats, **acc}, s)
        n, tokens = max(totals["n"], 1.0), max(totals["tokens"], 1.0)
        mean_kl = totals["kl_sum"] / n
        kl_coef_used = kl_ctl.value
        kl_ctl.update(mean_kl, int(totals["n"]))
        iteration += 1
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
        record.update({k.removesuffix("_sum") + "/mean": v / n for k, v in totals.items()
                       if k.startswith("rewards/")})
        record.update(rollout_seconds=round(t1 - t0, 5), iteration_seconds=round(time.perf_counter() - t0, 5))
        log_step(s, bar, record)
        last_eval = evaluate_and_checkpoint(
            s, bar, iteration, max_steps, cfg.eval.every, evaluate, _eval_line, loader.state_dict(),
            {"iteration": iteration, "kl_ctl": kl_ctl.state_dict(), "rollouts_per_iteration": per_iteration,
             "data_hash": data_hash, "first_eval": first_eval},
            {"iteration": iteration}) or last_eval
    bar.close()
    if not last_eval:
        last_eval = evaluate()
    result = {"train_prompts": len(train), "iterations": iteration, "kl_coef": kl_ctl.value,
              "rejected": rejects.to_dict(), "eval_rejected": eval_rejects.to_dict(),
              "eval_before": {k: v for k, v in first_eval.items() if k != "eval_samples"},
              **{k: v for k, v in last_eval.items() if k != "eval_samples"},
              "last": {k: v for k, v in record.items() if k not in ("step", "iteration")}}
    inputs = {"model": model_input(cfg.model), "data": file_inputs(train_paths + eval_paths)}
    for key in ("reward_model", "value_model"):
        if getattr(cfg, key):
            inputs[key] = model_input(getattr(cfg, key))
    if cfg.reward_funcs:
        inputs["reward_funcs"] = list(cfg.reward_funcs)
    final_dir = s.publish(inputs, result)
    s.log(f"done: PPO-tuned model in {final_dir}")
    return result


def _eval_line(iteration: int, m: dict) -> str:
    return (f"eval iteration {iteration}: exact match {m['eval_exact_match']:.3f} of {m['eval_exact_match_n']} "
            "held-out prompts")
