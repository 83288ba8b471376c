"""Group relative policy optimisation (`llmcycle grpo`): online RL from verifiable rewards, no value model.

Every iteration takes prompts, samples `num_generations` completions of each with the policy, scores
them with Python reward functions (the shipped `exact_match` by default: 1 when the answer equals the
record's reference), and gives each completion its reward's deviation from its group's mean, divided by
the group's std (`scale_rewards`). The policy then takes `num_iterations` optimizer steps on the clipped
surrogate with those advantages plus beta x the k3 KL estimate to the frozen reference (the starting
policy; each token's KL weighted by its ratio, TRL's default bias correction), as TRL 1.16's GRPOTrainer computes it (llmcycle.train.rl has the formulas; tests/test_rl.py
compares with TRL's own `_compute_loss`).

Batch shape: `train.batch_size` completions per micro-batch and `grad_accum` micro-batches per step, so
each iteration samples batch_size x grad_accum / num_generations prompts per process (the product must
divide). `train.max_steps` counts iterations; a metrics record's `step` counts optimizer updates.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.progress import progress
from llmcycle.train import rl
from llmcycle.train.chat_data import holds_out_user_data
from llmcycle.train.post_config import (
    GRPOConfig,
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
from llmcycle.train.rewards import compute_rewards, load_reward_functions
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
    stop_ids,
)


@dataclass
class Generations:
    """One iteration's completions; tensors [N, C] over completion tokens, rows grouped by prompt."""

    batch: RolloutBatch
    advantages: torch.Tensor  # [N]
    old_logp: torch.Tensor | None  # None with num_iterations 1: the ratio is exactly 1, TRL detaches instead
    ref_logp: torch.Tensor | None  # None with beta 0
    stats: dict[str, float]


def _check(cfg: GRPOConfig) -> int:
    """Prompts per process per iteration."""
    check_generation(cfg.generation)
    t, G = cfg.train, cfg.num_generations
    if G < 2:
        raise LlmcycleError("num_generations must be at least 2: advantages compare completions of one prompt.")
    if (t.batch_size * t.grad_accum) % G:
        raise LlmcycleError(f"train.batch_size x train.grad_accum ({t.batch_size} x {t.grad_accum}) must be a "
                            f"multiple of num_generations ({G}): each step trains on whole groups.")
    if not cfg.reward_funcs:
        raise LlmcycleError("grpo needs at least one reward function in reward_funcs.")
    if cfg.num_iterations < 1:
        raise LlmcycleError("num_iterations must be at least 1.")
    return t.batch_size * t.grad_accum // G


def grpo(cfg: GRPOConfig, resume: bool = False, log=print) -> dict:
    """Train `cfg.model` with GRPO; returns the final metrics (also in out_dir/model/manifest.json)."""
    with Session("grpo", cfg, resume, log) as s:
        return _grpo(cfg, s)


def _grpo(cfg: GRPOConfig, s: Session) -> dict:
    d, t, g, G = cfg.data, cfg.train, cfg.generation, cfg.num_generations
    n_prompts = _check(cfg)
    tok = s.load_tokenizer(cfg.model)
    if cfg.beta != 0.0 and not Path(cfg.model).is_dir():  # on resume the tokenizer came from the checkpoint
        raise LlmcycleError(f"{cfg.model}: the starting policy is needed as the reference; directory not found.")
    funcs = load_reward_functions(cfg.reward_funcs, cfg.reward_weights)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    stop = stop_ids(tok)
    hold = holds_out_user_data(d)
    train_paths, eval_paths = resolve_data(replace(d, eval=None) if hold else d, s.out_dir, "prompts")
    train, heldout, rejects, eval_rejects = load_prompt_sets(train_paths, eval_paths, tok, d.max_length,
                                                             g.max_new_tokens, s.log, holdout=hold)
    ref = None
    if cfg.beta != 0.0:
        ref = Transformer.from_pretrained(cfg.model, device=s.device).eval().requires_grad_(False)

    modules = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model)})
    policy, wrapped = modules["policy"], s.wrapped["policy"]
    if policy.config.vocab_size < tok.vocab_size:
        raise LlmcycleError(f"{cfg.model}: the tokenizer has more tokens than the model's vocabulary.")
    data_hash = prompts_hash(train)
    extra = s.state["extra"] if s.state is not None else {}
    if s.state is not None and extra.get("data_hash") != data_hash:
        raise LlmcycleError(f"the prompts differ from those of checkpoint {s.resume_from}; cannot resume.")

    if s.state is not None and extra.get("num_generations") != G:
        raise LlmcycleError(f"checkpoint {s.resume_from} sampled {extra.get('num_generations')} completions per "
                            f"prompt, this recipe {G}; cannot resume.")
    loader = EpochLoader(len(train), n_prompts, t.seed, s.dist.rank, s.dist.world_size)
    if s.state is not None:
        loader.load_state_dict(s.state["loader"])
    max_steps = total_steps(t, loader)
    iteration = int(extra.get("iteration", 0))
    sampler = make_sampler(g)
    s.log(f"train: {max_steps} iterations of {n_prompts} prompts x {G} completions x {s.dist.world_size} "
          f"processes, {cfg.num_iterations} update(s) each; {cfg.loss_type} loss, beta {cfg.beta:g}")

    with_ref = [e for e in heldout if e.reference is not None][: cfg.eval.generate]

    def evaluate() -> dict:
        if not with_ref or not s.dist.is_main:
            return {}
        return heldout_exact_match(policy, tok, with_ref, sampler, g.max_new_tokens, s.autocast)

    first_eval = first_evaluation(s, evaluate, _eval_line)

    @torch.no_grad()
    def generate(examples: list, gen: torch.Generator) -> Generations:
        prompts = [e.prompt_ids for e in examples for _ in range(G)]
        with s.autocast():
            completions = sampler.generate(policy, prompts, g.max_new_tokens, g.temperature, g.top_k, g.top_p,
                                           stop, gen)
        texts = decode_completions(tok, completions, stop)
        rewards, each = compute_rewards(funcs, [e.prompt for e in examples for _ in range(G)], texts,
                                        [e.reference for e in examples for _ in range(G)])
        advantages = rl.grpo_advantages(rewards, G, cfg.scale_rewards)
        batch = rollout_batch(prompts, completions, pad_id).to(s.device)
        with s.autocast():
            ref_logp = (in_chunks(lambda b: rollout_logps(ref, b, g.temperature), batch, t.batch_size)
                        if ref is not None else None)
            old_logp = (in_chunks(lambda b: rollout_logps(policy, b, g.temperature), batch, t.batch_size)
                        if cfg.num_iterations > 1 else None)
        group_std = rewards.view(-1, G).std(dim=1)
        stats = {"n": len(prompts), "groups": len(examples), "reward_sum": float(rewards.sum()),
                 "reward_std_sum": float(group_std.sum()), "zero_std": float((group_std < 1e-6).sum()),
                 "length_sum": float(batch.mask.sum()),
                 "clipped": float(sum(not c or c[-1] not in stop for c in completions))}
        stats.update({f"rewards/{name}_sum": float(v.sum()) for name, v in each.items()})
        return Generations(batch, advantages.to(s.device), old_logp, ref_logp, stats)

    def count(ro: Generations, rows: list[int]) -> float:
        """Units the step's loss is divided by (TRL's loss_type normalisation)."""
        if cfg.loss_type == "dapo":
            return float(ro.batch.mask[rows].sum())
        return float(len(rows) * (g.max_new_tokens if cfg.loss_type == "dr_grpo" else 1))

    def update(ro: Generations) -> tuple[list[dict], dict[str, float]]:
        acc: dict[str, float] = {}

        def loss_fn(rows: list[int]):
            idx = torch.tensor(rows, device=s.device)
            mb = ro.batch.select(idx)
            m = mb.mask
            new_logp = rollout_logps(wrapped, mb, g.temperature)
            old = ro.old_logp[idx] if ro.old_logp is not None else new_logp.detach()
            ref_logp = ro.ref_logp[idx] if ro.ref_logp is not None else None
            parts = rl.grpo_token_loss(new_logp, old, ref_logp, ro.advantages[idx], cfg.beta, cfg.epsilon,
                                       cfg.epsilon_high, cfg.kl_bias_correction)
            per_token = parts["loss"] * m
            if cfg.loss_type == "grpo":  # each sequence's token mean, summed over sequences
                loss = (per_token.sum(-1) / m.sum(-1).clamp(min=1.0)).sum()
            else:  # token sum; Session.step divides by the step's tokens (dapo) or rows x max_new_tokens
                loss = per_token.sum()
            sums = {"tokens": m.sum(), "clip_low": (parts["low"] * m).sum(), "clip_high": (parts["high"] * m).sum(),
                    "clip_region": (torch.maximum(parts["low"], parts["high"]) * m).sum()}
            if "kl" in parts:
                sums["kl"] = (parts["kl"] * m).sum()
            for key, v in sums.items():
                acc[key] = acc.get(key, 0.0) + float(v)
            return loss, {}

        rows = list(range(len(ro.batch)))
        outs = [s.step(chunks(rows, t.batch_size), lambda r: count(ro, r), loss_fn)
                for _ in range(cfg.num_iterations)]
        return outs, acc

    last_eval: dict = {}
    record: dict = {}
    bar = progress(total=max_steps, initial=iteration, desc="grpo", unit="it", disable=not s.dist.is_main)
    while iteration < max_steps:
        lr = s.set_lr(max_steps, iteration)
        examples = [train[i] for i in loader.next_step()]
        gen = torch.Generator(device=s.device).manual_seed(iteration_seed(t.seed, iteration, s.dist.rank))
        t0 = time.perf_counter()
        ro = generate(examples, gen)
        t1 = time.perf_counter()
        outs, acc = update(ro)
        totals = reduce_sums({**ro.stats, **acc}, s)
        iteration += 1
        n, tokens = max(totals["n"], 1.0), max(totals["tokens"], 1.0)
        record = {"step": s.step_count, "iteration": iteration, "lr": lr,
                  "loss": sum(o["loss"] for o in outs) / len(outs),
                  "grad_norm": sum(o["grad_norm"] for o in outs) / len(outs),
                  "reward": totals["reward_sum"] / n, "reward_std": totals["reward_std_sum"] / totals["groups"],
                  "frac_reward_zero_std": totals["zero_std"] / totals["groups"],
                  "clip_ratio": totals["clip_region"] / tokens, "clip_ratio/low_mean": totals["clip_low"] / tokens,
                  "clip_ratio/high_mean": totals["clip_high"] / tokens,
                  "completions/mean_length": totals["length_sum"] / n,
                  "completions/clipped_ratio": totals["clipped"] / n}
        if "kl" in totals:
            record["kl"] = totals["kl"] / tokens
        record.update({k.removesuffix("_sum") + "/mean": v / n for k, v in totals.items()
                       if k.startswith("rewards/")})
        record.update(rollout_seconds=round(t1 - t0, 5), iteration_seconds=round(time.perf_counter() - t0, 5))
        log_step(s, bar, record)
        last_eval = evaluate_and_checkpoint(
            s, bar, iteration, max_steps, cfg.eval.every, evaluate, _eval_line, loader.state_dict(),
            {"iteration": iteration, "num_generations": G, "data_hash": data_hash, "first_eval": first_eval},
            {"iteration": iteration}) or last_eval
    bar.close()
    if not last_eval:
        last_eval = evaluate()
    result = {"train_prompts": len(train), "iterations": iteration, "rejected": rejects.to_dict(),
              "eval_rejected": eval_rejects.to_dict(),
              "eval_before": {k: v for k, v in first_eval.items() if k != "eval_samples"},
              **{k: v for k, v in last_eval.items() if k != "eval_samples"},
              "last": {k: v for k, v in record.items() if k not in ("step", "iteration")}}
    inputs = {"model": model_input(cfg.model), "data": file_inputs(train_paths + eval_paths),
              "reward_funcs": list(cfg.reward_funcs)}
    final_dir = s.publish(inputs, result)
    s.log(f"done: GRPO-tuned model in {final_dir}")
    return result


def _eval_line(iteration: int, m: dict) -> str:
    return (f"eval iteration {iteration}: exact match {m['eval_exact_match']:.3f} of {m['eval_exact_match_n']} "
            "held-out prompts")
