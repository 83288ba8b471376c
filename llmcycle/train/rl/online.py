"""What PPO and GRPO share around their own rollout and update: the prompt sets, the resume guard on them,
held-out exact match, the outer loop over iterations, and the result they publish.

An iteration takes a batch of prompts from the EpochLoader, samples and scores completions, and takes
optimizer steps on them; `train.max_steps` counts iterations and the LR follows them, while a metrics
record's `step` counts optimizer updates.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.progress import progress
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.core.distributed import all_reduce_sum
from llmcycle.train.core.inputs import file_inputs, model_input
from llmcycle.train.core.loader import EpochLoader
from llmcycle.train.core.loop import evaluate_and_checkpoint, first_evaluation, log_step
from llmcycle.train.core.session import Session
from llmcycle.train.posttrain.chat_data import (
    Rejects,
    holds_out_user_data,
    load_prompts,
    load_sets,
    resolve_data,
)
from llmcycle.train.posttrain.examples import PromptExample
from llmcycle.train.rl.rewards import exact_match
from llmcycle.train.rl.rollout import Sampler, decode_completions, stop_ids


@dataclass
class PromptSets:
    train: list[PromptExample]
    heldout: list[PromptExample]
    rejects: Rejects
    eval_rejects: Rejects
    paths: list[Path]  # every file read (training and held-out), for the manifest
    data_hash: str  # of the training prompts: a resumed run must train on the same


def check_reference(cfg: Any) -> None:
    """The starting policy is the frozen reference; on resume the tokenizer came from the checkpoint, so
    the directory itself is checked here."""
    if not Path(cfg.model).is_dir():
        raise LlmcycleError(f"{cfg.model}: the starting policy is needed as the reference; directory not found.")


def prompt_sets(cfg: Any, s: Session, tok: Tokenizer) -> PromptSets:
    """The recipe's training and held-out prompts (`data`, room left for `generation.max_new_tokens`)."""
    d = cfg.data
    hold = holds_out_user_data(d)
    train_paths, eval_paths = resolve_data(replace(d, eval=None) if hold else d, s.out_dir, "prompts")
    train, heldout, rejects, eval_rejects = load_prompt_sets(train_paths, eval_paths, tok, d.max_length,
                                                             cfg.generation.max_new_tokens, holdout=hold)
    return PromptSets(train, heldout, rejects, eval_rejects, train_paths + eval_paths, prompts_hash(train))


def check_resume(s: Session, sets: PromptSets) -> None:
    """A resumed run trains on the checkpoint's prompts."""
    if s.state is not None and s.extra.get("data_hash") != sets.data_hash:
        raise LlmcycleError(f"the prompts differ from those of checkpoint {s.resume_from}; cannot resume.")


def exact_match_eval(s: Session, policy: torch.nn.Module, tok: Tokenizer, sets: PromptSets, sampler: Sampler,
                     cfg: Any) -> Callable[[], dict]:
    """Held-out exact match of greedy answers on up to eval.generate prompts with a reference (main process)."""
    with_ref = [e for e in sets.heldout if e.reference is not None][: cfg.eval.generate]

    def evaluate() -> dict:
        if not with_ref or not s.dist.is_main:
            return {}
        return heldout_exact_match(policy, tok, with_ref, sampler, cfg.generation.max_new_tokens, s.autocast)

    return evaluate


def run_iterations(s: Session, cfg: Any, desc: str, loader: EpochLoader, max_steps: int,
                   iterate: Callable[[list[int], int, float], dict], evaluate: Callable[[], dict],
                   extra_state: Callable[[], dict]) -> tuple[dict, dict, int]:
    """The outer loop: per iteration set the LR, take the loader's next prompt indices, `iterate(indices,
    iteration, lr)` (sample, score, update; returns the metrics record), log it, evaluate and checkpoint when
    due; extra_state() is stored with each checkpoint. Starts at the checkpoint's iteration. Returns (the
    last held-out metrics, the last record, the iterations done)."""
    iteration = int(s.extra.get("iteration", 0))
    last_eval: dict = {}
    record: dict = {}
    bar = progress(total=max_steps, initial=iteration, desc=desc, unit="it", disable=not s.dist.is_main)
    while iteration < max_steps:
        lr = s.set_lr(max_steps, iteration)
        record = iterate(loader.next_step(), iteration, lr)
        iteration += 1
        log_step(s, bar, record)
        last_eval = evaluate_and_checkpoint(
            s, bar, iteration, max_steps, cfg.eval.every, evaluate, eval_line, loader.state_dict(),
            {"iteration": iteration, **extra_state()}, {"iteration": iteration}) or last_eval
    bar.close()
    return last_eval or evaluate(), record, iteration


def publish_result(s: Session, cfg: Any, sets: PromptSets, iterations: int, first_eval: dict, last_eval: dict,
                   record: dict, extra_result: dict | None = None, extra_inputs: dict | None = None) -> dict:
    """The run's result (also the final model's manifest metrics); publishes out_dir/model."""
    result = {"train_prompts": len(sets.train), "iterations": iterations, **(extra_result or {}),
              "rejected": sets.rejects.to_dict(), "eval_rejected": sets.eval_rejects.to_dict(),
              "eval_before": {k: v for k, v in first_eval.items() if k != "eval_samples"},
              **{k: v for k, v in last_eval.items() if k != "eval_samples"},
              "last": {k: v for k, v in record.items() if k not in ("step", "iteration")}}
    inputs = {"model": model_input(cfg.model), "data": file_inputs(sets.paths), **(extra_inputs or {})}
    s.publish(inputs, result)
    return result


def first_exact_match(s: Session, evaluate: Callable[[], dict]) -> dict:
    """Held-out exact match of the starting policy (the checkpoint's record when resuming)."""
    return first_evaluation(s, evaluate, eval_line)


def eval_line(iteration: int, m: dict) -> str:
    return (f"eval iteration {iteration}: exact match {m['eval_exact_match']:.3f} of {m['eval_exact_match_n']} "
            "held-out prompts")


def load_prompt_sets(train_paths: list[Path], eval_paths: list[Path], tok: Tokenizer, max_length: int,
                     max_new_tokens: int, holdout: bool = False
                     ) -> tuple[list[PromptExample], list[PromptExample], Rejects, Rejects]:
    """Training and held-out prompts; prompts longer than max_length - max_new_tokens are rejected (counted).

    holdout=True (data.train is the user's file, data.eval left at 'embedded'): the held-out prompts are a
    share of the training file's, taken out of training (`split_holdout`); eval_paths is not read.
    """
    room = max_length - max_new_tokens
    if room < 1:
        raise LlmcycleError(f"data.max_length ({max_length}) leaves no room for a prompt after "
                            f"generation.max_new_tokens ({max_new_tokens}).")
    # load_prompts keeps prompts shorter than its limit
    load = lambda paths, rejects: load_prompts(paths, tok, room + 1, rejects)  # noqa: E731
    sets = load_sets(train_paths, eval_paths, holdout, load, load, "prompt", "prompts")
    return sets.train, sets.heldout, sets.rejects, sets.eval_rejects


def prompts_hash(examples: list[PromptExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.prompt_ids, e.reference)).encode())
    return h.hexdigest()


def reduce_sums(sums: dict[str, float], session) -> dict[str, float]:
    """Sum each statistic over processes (one all-reduce)."""
    keys = sorted(sums)
    t = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64, device=session.device)
    return dict(zip(keys, all_reduce_sum(t, session.dist).tolist()))


@torch.no_grad()
def heldout_exact_match(model: torch.nn.Module, tok: Tokenizer, examples: list[PromptExample], sampler: Sampler,
                        max_new_tokens: int, autocast) -> dict:
    """Greedy answers to held-out prompts compared with their references (normalised whitespace)."""
    if not examples:
        return {}
    stop = stop_ids(tok)
    with autocast():
        out = sampler.generate(model, [e.prompt_ids for e in examples], max_new_tokens, temperature=0.0,
                               stop_ids=stop)
    answers = decode_completions(tok, out, stop)
    hits = exact_match([e.prompt for e in examples], answers, [e.reference for e in examples])
    samples = [{"answer": a, "reference": e.reference, "correct": bool(h)}
               for a, e, h in zip(answers[:5], examples[:5], hits[:5])]
    return {"eval_exact_match": sum(hits) / len(hits), "eval_exact_match_n": len(hits), "eval_samples": samples}
