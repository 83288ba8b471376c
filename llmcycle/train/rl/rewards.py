"""Rewards for online post-training: verifiable reward functions, user functions, and a reward model.

A reward function has TRL's shape, with the reference answer passed explicitly:

    fn(prompts: list, completions: list[str], references: list[str | None]) -> list[float]

`prompts` are as the dataset holds them (text, or a list of {"role", "content"} messages), `completions`
the generated text without its end-of-turn token, `references` the records' "answer" (or "reference",
"solution"), None where a record has none. It returns one number per completion (None counts as 0.0).
Recipes name functions in `reward_funcs`: a shipped one (`exact_match`), `package.module:function`, or
`path/to/file.py:function`.

`RewardModelScorer` scores token ids with a trained reward model (a scalar-head transformer): the head's
output at the last token of prompt+completion, as the reward model was trained.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.paths import check_model_dir
from llmcycle.train.posttrain.evaluate import normalize_answer
from llmcycle.train.rl.rollout import rollout_batch, sequence_scores

RewardFn = Callable[[list, list[str], list], list]


def exact_match(prompts: list, completions: list[str], references: list[str | None]) -> list[float]:
    """1.0 when the completion equals the reference after whitespace normalisation, else 0.0 (also when
    there is no reference): the verifiable reward of the embedded tasks."""
    return [float(ref is not None and normalize_answer(c) == normalize_answer(ref))
            for c, ref in zip(completions, references)]


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match}


def load_reward_function(spec: str) -> RewardFn:
    """A shipped function by name, `module:function`, or `path/to/file.py:function`."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise LlmcycleError(f"reward function {spec!r}: expected a shipped name ({', '.join(BUILTIN)}), "
                            "'package.module:function' or 'path/to/file.py:function'.")
    if where.endswith(".py") or "/" in where or "\\" in where:
        path = Path(where)
        if not path.is_file():
            raise LlmcycleError(f"reward function {spec!r}: file {path} does not exist.")
        module_name = f"llmcycle_reward_{path.stem}"
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise LlmcycleError(f"reward function {spec!r}: cannot load {path} as Python.")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[module_name] = module  # so pickling / dataclasses inside it work
        loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as e:
            if e.name and where.startswith(e.name):
                raise LlmcycleError(f"reward function {spec!r}: no module named {where!r} (is it on PYTHONPATH?)."
                                    ) from None
            raise
    fn = getattr(module, name, None)
    if fn is None:
        raise LlmcycleError(f"reward function {spec!r}: {where} has no attribute {name!r}.")
    if not callable(fn):
        raise LlmcycleError(f"reward function {spec!r}: {where}.{name} is not callable.")
    return fn


def load_reward_functions(specs: Sequence[str], weights: Sequence[float] | None = None
                          ) -> list[tuple[str, RewardFn, float]]:
    """(name, function, weight) per spec; weights default to 1.0 each."""
    if weights is not None and len(weights) != len(specs):
        raise LlmcycleError(f"reward_weights has {len(weights)} entries for {len(specs)} reward_funcs.")
    return [(s, load_reward_function(s), float(w)) for s, w in zip(specs, weights or [1.0] * len(specs))]


def _record(prompt, completion, reference) -> str:
    def cut(x) -> str:
        text = repr(x)
        return text if len(text) <= 200 else text[:200] + "..."

    return f"prompt={cut(prompt)}, completion={cut(completion)}, reference={cut(reference)}"


def _call(name: str, fn: RewardFn, prompts: list, completions: list[str], references: list) -> list:
    """fn(prompts, completions, references); an exception becomes an LlmcycleError naming the function
    and the record it fails on (found by calling it on one record at a time), not a raw traceback."""
    try:
        return fn(prompts, completions, references)
    except Exception as batch_error:  # user code: anything can come out of it
        for i, args in enumerate(zip(prompts, completions, references)):
            try:
                fn(*([a] for a in args))
            except Exception as e:
                raise LlmcycleError(f"reward function {name!r} raised {type(e).__name__}: {str(e)[:300]} on "
                                    f"completion {i} of the batch: {_record(*args)}") from e
        where = _record(prompts[0], completions[0], references[0]) if prompts else "an empty batch"
        raise LlmcycleError(f"reward function {name!r} raised {type(batch_error).__name__}: "
                            f"{str(batch_error)[:300]} on a batch of {len(completions)} completions "
                            f"(each alone is fine); the first: {where}") from batch_error


def compute_rewards(funcs: list[tuple[str, RewardFn, float]], prompts: list, completions: list[str],
                    references: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of every function's rewards [N] (fp32), and each function's own rewards by name."""
    total = torch.zeros(len(completions))
    each: dict[str, torch.Tensor] = {}
    for name, fn, weight in funcs:
        values = _call(name, fn, list(prompts), list(completions), list(references))
        if values is None or len(values) != len(completions):
            got = "None" if values is None else f"{len(values)} values"
            raise LlmcycleError(f"reward function {name!r} returned {got} for {len(completions)} completions.")
        try:
            r = torch.tensor([0.0 if v is None else float(v) for v in values])
        except (TypeError, ValueError):
            raise LlmcycleError(f"reward function {name!r} returned a value that is not a number.") from None
        if not all(math.isfinite(v) for v in r.tolist()):
            raise LlmcycleError(f"reward function {name!r} returned a non-finite reward.")
        each[name] = r
        total += weight * r
    return total, each


class RewardModelScorer:
    """A frozen reward model: the score of prompt+completion token ids at their last token."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", batch_size: int = 16):
        path = Path(path)
        check_model_dir(path, "reward model", hint="Train one with `llmcycle reward` (it writes runs/reward/model), "
                                                   "or set reward_model=DIR.")
        self.path = path
        self.model = ScalarHeadModel.from_pretrained(path, device=device).eval().requires_grad_(False)
        self.batch_size = batch_size

    @torch.no_grad()
    def score(self, prompt_ids: Sequence[Sequence[int]], completion_ids: Sequence[Sequence[int]],
              autocast=contextlib.nullcontext) -> torch.Tensor:
        """Scores [N] (fp32, on the CPU) of prompts[i] + completions[i]."""
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(prompt_ids), self.batch_size):
            batch = rollout_batch(prompt_ids[i: i + self.batch_size], completion_ids[i: i + self.batch_size],
                                  pad_id=0).to(device)
            with autocast():
                out.append(sequence_scores(self.model, batch).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


def check_same_tokenizer(policy_dir: str | Path, other_dir: str | Path, what: str) -> None:
    """A model that scores the policy's token ids must share its tokenizer; refuse when both directories
    hold a tokenizer.json and they differ."""
    a, b = Path(policy_dir) / "tokenizer.json", Path(other_dir) / "tokenizer.json"
    if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
        raise LlmcycleError(f"{what} {other_dir} has a different tokenizer from the policy {policy_dir}; it must "
                            "score the policy's token ids, so both must come from the same base model.")
