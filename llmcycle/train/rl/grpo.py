"""Group relative policy optimisation (`llmcycle grpo`): online RL from verifiable rewards, no value model.

Every iteration takes prompts, samples `num_generations` completions of each with the policy, scores
them with Python reward functions (the shipped `exact_match` by default: 1 when the answer equals the
record's reference), and gives each completion its reward's deviation from its group's mean, divided by
the group's std (`scale_rewards`). The policy then takes `num_iterations` optimizer steps on the clipped
surrogate with those advantages plus beta x the k3 KL estimate to the frozen reference (the starting
policy; each token's KL weighted by its ratio, TRL's default bias correction), as TRL 1.16's GRPOTrainer computes it (llmcycle.train.rl.objectives has the formulas; tests/test_rl.py
compares with TRL's own `_compute_loss`).

Batch shape: `train.batch_size` completions per micro-batch and `grad_accum` micro-batches per step, so
each iteration samples batch_size x grad_accum / num_generations prompts per process (the product must
divide). `train.max_steps` counts iterations; a metrics record's `step` counts optimizer updates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.optimize.lora import AdaptersOff
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.config import GRPOConfig
from llmcycle.train.core.loader import chunks
from llmcycle.train.core.session import Session
from llmcycle.train.rl import objectives as rl
from llmcycle.train.rl import online
from llmcycle.train.rl.online import reduce_sums
from llmcycle.train.rl.rewards import compute_rewards, load_reward_functions
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
    stop_ids,
)

log = logging.getLogger(__name__)


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


def grpo(cfg: GRPOConfig, resume: bool = False) -> dict:
    """Train `cfg.model` with GRPO; returns the final metrics (also in out_dir/model/manifest.json)."""
    with Session("grpo", cfg, resume) as s:
        return _grpo(cfg, s)


def _grpo(cfg: GRPOConfig, s: Session) -> dict:
    t, g, G = cfg.train, cfg.generation, cfg.num_generations
    n_prompts = _check(cfg)
    tok = s.load_tokenizer(cfg.model)
    if cfg.beta != 0.0:
        online.check_reference(cfg)
    funcs = load_reward_functions(cfg.reward_funcs, cfg.reward_weights)
    sets = online.prompt_sets(cfg, s, tok)
    ref = None
    if cfg.beta != 0.0 and s.lora is None:
        ref = Transformer.from_pretrained(cfg.model, device=s.device).eval().requires_grad_(False)

    policy = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model)})["policy"]
    if cfg.beta != 0.0 and s.lora is not None:
        ref = AdaptersOff(policy)  # the base under the adapters: no second copy of the weights
    if policy.config.vocab_size < tok.vocab_size:
        raise LlmcycleError(f"{cfg.model}: the tokenizer has more tokens than the model's vocabulary.")
    online.check_resume(s, sets)
    if s.state is not None and s.extra.get("num_generations") != G:
        raise LlmcycleError(f"checkpoint {s.resume_from} sampled {s.extra.get('num_generations')} completions per "
                            f"prompt, this recipe {G}; cannot resume.")
    loader, max_steps = s.epoch_loader(len(sets.train), n_prompts)
    sampler = make_sampler(g)
    log.info(f"train: {max_steps} iterations of {n_prompts} prompts x {G} completions x {s.dist.world_size} "
             f"processes, {cfg.num_iterations} update(s) each; {cfg.loss_type} loss, beta {cfg.beta:g}")
    evaluate = online.exact_match_eval(s, policy, tok, sets, sampler, cfg)
    first_eval = online.first_exact_match(s, evaluate)

    def iterate(indices: list[int], iteration: int, lr: float) -> dict:
        examples = [sets.train[i] for i in indices]
        gen = torch.Generator(device=s.device).manual_seed(iteration_seed(t.seed, iteration, s.dist.rank))
        t0 = time.perf_counter()
        ro = _generate(cfg, s, tok, sampler, funcs, policy, ref, examples, gen)
        t1 = time.perf_counter()
        outs, acc = _update(cfg, s, ro)
        record = _record(s, reduce_sums({**ro.stats, **acc}, s), outs, iteration + 1, lr)
        record.update(rollout_seconds=round(t1 - t0, 5), iteration_seconds=round(time.perf_counter() - t0, 5))
        return record

    last_eval, record, iterations = online.run_iterations(
        s, cfg, "grpo", loader, max_steps, iterate, evaluate,
        lambda: {"num_generations": G, "data_hash": sets.data_hash, "first_eval": first_eval})
    result = online.publish_result(s, cfg, sets, iterations, first_eval, last_eval, record,
                                   extra_inputs={"reward_funcs": list(cfg.reward_funcs)})
    log.info(f"done: GRPO-tuned model in {s.out_dir / 'model'}")
    return result


@torch.no_grad()
def _generate(cfg: GRPOConfig, s: Session, tok: Tokenizer, sampler: Sampler, funcs: list, policy, ref,
              examples: list, gen: torch.Generator) -> Generations:
    """num_generations completions per prompt, their rewards and group advantages, and the log-probs the
    loss compares against."""
    g, t, G = cfg.generation, cfg.train, cfg.num_generations
    stop = stop_ids(tok)
    prompts = [e.prompt_ids for e in examples for _ in range(G)]
    with s.autocast():
        completions = sampler.generate(policy, prompts, g.max_new_tokens, g.temperature, g.top_k, g.top_p,
                                       stop, gen)
    texts = decode_completions(tok, completions, stop)
    rewards, each = compute_rewards(funcs, [e.prompt for e in examples for _ in range(G)], texts,
                                    [e.reference for e in examples for _ in range(G)])
    advantages = rl.grpo_advantages(rewards, G, cfg.scale_rewards)
    batch = rollout_batch(prompts, completions, tok.pad_id if tok.pad_id is not None else 0).to(s.device)
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


def _count(cfg: GRPOConfig, ro: Generations, rows: list[int]) -> float:
    """Units the step's loss is divided by (TRL's loss_type normalisation); summed over the step's micro-batches."""
    return rl.grpo_units(ro.batch.mask[rows], cfg.loss_type, cfg.generation.max_new_tokens)


def _update(cfg: GRPOConfig, s: Session, ro: Generations) -> tuple[list[dict], dict[str, float]]:
    """num_iterations optimizer steps on the generation batch."""
    t, g = cfg.train, cfg.generation
    wrapped = s.wrapped["policy"]
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
        loss = rl.grpo_summed_loss(parts["loss"], m, cfg.loss_type)  # Session.step divides by the step's units
        sums = {"tokens": m.sum(), "clip_low": (parts["low"] * m).sum(), "clip_high": (parts["high"] * m).sum(),
                "clip_region": (torch.maximum(parts["low"], parts["high"]) * m).sum()}
        if "kl" in parts:
            sums["kl"] = (parts["kl"] * m).sum()
        for key, v in sums.items():
            acc[key] = acc.get(key, 0.0) + float(v)
        return loss, {}

    rows = list(range(len(ro.batch)))
    outs = [s.step(chunks(rows, t.batch_size), lambda r: _count(cfg, ro, r), loss_fn)
            for _ in range(cfg.num_iterations)]
    return outs, acc


def _record(s: Session, totals: dict, outs: list[dict], iteration: int, lr: float) -> dict:
    """The iteration's metrics record, named as TRL's GRPOTrainer logs them."""
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
    record.update({k.removesuffix("_sum") + "/mean": v / n for k, v in totals.items() if k.startswith("rewards/")})
    return record
