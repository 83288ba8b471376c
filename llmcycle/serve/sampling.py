"""Sampling parameters and the batched sampler of the serving engine.

One forward pass gives logits [B, V] for B running sequences, each with its own `SamplingParams`.
The engine calls `apply_penalties` (needs the token history) and then `sample` (needs only logits).

Filtering order inside `sample`, per row: temperature -> top-k -> top-p -> min-p. Each filter sees the
distribution left by the previous one (top-p's cumulative mass is taken after top-k, renormalised).
Min-p compares against the row's largest probability, a ratio that renormalising does not change.

Randomness is per row: a row whose request has a seed draws its noise from its own `torch.Generator`,
so its tokens do not depend on which other requests share the batch (the vLLM guarantee).

Logprobs: vLLM V1 returns by default `logprobs_mode="raw_logprobs"`, i.e. log-softmax of the model's
logits before penalties, temperature and filtering; `"processed_logprobs"` is the distribution actually
sampled from (after temperature and filtering, filtered tokens at -inf). We default to raw, like vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch

from llmcycle.serve.guided import StructuredOutputsParams

MAX_LOGPROBS = 20  # OpenAI caps top_logprobs at 20; vLLM's default max_logprobs is 20 too.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what a torch long (top_k) or a seed can hold

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]


@dataclass
class SamplingParams:
    """Per-request decoding settings, named and defaulted as in vLLM."""

    n: int = 1
    temperature: float = 1.0
    top_k: int | None = -1  # -1, 0 or None: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    max_tokens: int = 16
    logprobs: int | None = None  # number of top alternatives to return alongside the chosen token
    ignore_eos: bool = False
    structured_outputs: StructuredOutputsParams | None = None  # constrained decoding (serve/guided.py)

    def __post_init__(self) -> None:
        # OpenAI accepts `stop` as one string or a list; keep one shape downstream.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def top_k_value(self) -> int:
        """top_k with "off" normalised to 0."""
        return 0 if self.top_k is None or self.top_k <= 0 else int(self.top_k)

    def validate(self) -> SamplingParams:
        """Raise ValueError naming the offending field; returns self so it can be chained.

        Every value that passes is safe to put in a batch: a request's bad value must fail that request
        here, not the engine step (which would fail every request in flight)."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                     "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or not -1 <= self.top_k <= INT64_MAX):
            raise ValueError(f"top_k must be -1, 0 (off) or a positive integer up to 2**63-1, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or not INT64_MIN <= self.seed <= INT64_MAX):
            raise ValueError(f"seed must be a 64-bit integer or None, got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        return self


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A per-request generator for a seeded request; None (global RNG) for an unseeded one."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    # torch takes seeds in [-2**63, 2**64); the engine derives per-sequence seeds as seed * 1_000_003 + i,
    # which leaves that range for large seeds. Reducing mod 2**64 is what torch does to a negative seed
    # already (-1 and 2**64 - 1 give the same stream), so every seed in range keeps its stream.
    g.manual_seed(seed % 2**64)
    return g


def _counts(ids: list[list[int]], B: int, V: int, device: torch.device) -> torch.Tensor:
    """[B, V] occurrence counts of each token id per row."""
    counts = torch.zeros(B, V, dtype=torch.float32, device=device)
    for i, row in enumerate(ids):
        if row:
            idx = torch.as_tensor(row, dtype=torch.long, device=device)
            counts[i].index_add_(0, idx, torch.ones(len(row), device=device))
    return counts


def apply_penalties(
    logits: torch.Tensor,
    prompt_ids: list[list[int]],
    output_ids: list[list[int]],
    params: list[SamplingParams],
) -> torch.Tensor:
    """Return penalised float32 logits [B, V] (the input is not modified).

    Repetition penalty (HF/vLLM): for tokens seen in prompt or output, divide positive logits by r and
    multiply negative ones by r, so r > 1 always makes them less likely. Presence/frequency (OpenAI,
    output tokens only): logits -= presence * (count > 0) + frequency * count.
    """
    B, V = logits.shape
    out = logits.float().clone()
    dev = out.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], device=dev).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], device=dev).unsqueeze(1)
    out_counts = _counts(output_ids, B, V, dev)
    if bool((rep != 1.0).any()):
        seen = (_counts(prompt_ids, B, V, dev) + out_counts) > 0
        penalised = torch.where(out > 0, out / rep, out * rep)
        out = torch.where(seen, penalised, out)
    if bool((pres != 0).any() or (freq != 0).any()):
        out = out - pres * (out_counts > 0).float() - freq * out_counts
    return out


def _apply_top_k(logits: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Keep, per row, logits >= the k-th largest (ties at the boundary are kept); k == 0 is off."""
    V = logits.shape[-1]
    k = torch.where(k <= 0, torch.full_like(k, V), k.clamp(max=V))
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))
    return logits.masked_fill(logits < kth, float("-inf"))


def _apply_top_p(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest most-probable set whose mass reaches p (the top token always stays)."""
    probs = logits.softmax(dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of strictly more probable tokens
    remove_sorted = mass_before >= p.unsqueeze(1)
    remove_sorted[:, 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def process_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, top-p, min-p; float32 [B, V] with filtered tokens at -inf.

    Greedy rows (temperature 0) are scaled by 1 so the result stays a valid distribution for
    processed logprobs; filters never change their argmax.
    """
    dev = logits.device
    out = logits.float()
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    out = out / temp.unsqueeze(1)
    k = torch.tensor([p.top_k_value for p in params], dtype=torch.long, device=dev)
    if bool((k > 0).any()):
        out = _apply_top_k(out, k)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if bool((top_p < 1.0).any()):
        out = _apply_top_p(out, top_p)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if bool((min_p > 0).any()):
        out = _apply_min_p(out, min_p)
    return out


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    logprobs_mode: LogprobsMode = "raw_logprobs",
    raw_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Pick one token per row.

    Returns (token_ids [B] long, chosen-token logprobs [B], (top ids [B, k], top logprobs [B, k])) where
    k is the largest `logprobs` requested in the batch (0 if none). "raw_logprobs" are log-softmax of
    `raw_logits` if given (pass the pre-penalty logits to match vLLM exactly) else of `logits`.

    Sampling uses the exponential race (argmax of p / E with E ~ Exp(1)), which is exact multinomial
    sampling and lets each row draw its noise from its own generator.
    """
    B, V = logits.shape
    if len(params) != B or len(generators) != B:
        raise ValueError(f"need one SamplingParams and one generator per row: {B} rows")
    all_greedy = all(p.greedy for p in params)
    processed = None
    if all_greedy:  # the common serving case: no filtering, no noise
        tokens = logits.argmax(dim=-1)
    else:
        processed = process_logits(logits, params)
        probs = processed.softmax(dim=-1)
        noise = torch.empty_like(probs)
        for i, (p, g) in enumerate(zip(params, generators)):
            if not p.greedy:  # a greedy row does not draw: its generator state stays untouched
                noise[i].exponential_(generator=g)
            else:
                noise[i].fill_(1.0)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # an exact 0 would make 0/0 = nan win the argmax
        sampled = (probs / noise).argmax(dim=-1)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)

    if logprobs_mode == "raw_logprobs":
        lp = (raw_logits if raw_logits is not None else logits).float().log_softmax(dim=-1)
    elif logprobs_mode == "processed_logprobs":
        lp = (processed if processed is not None else process_logits(logits, params)).log_softmax(dim=-1)
    else:
        raise ValueError(f"logprobs_mode must be raw_logprobs or processed_logprobs, got {logprobs_mode!r}")
    chosen = lp.gather(1, tokens.unsqueeze(1)).squeeze(1)
    k = min(max((p.logprobs or 0) for p in params), V)
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], tokens.new_zeros(B, 0))
    return tokens, chosen, (top_ids, top_lp)


def find_stop(text: str, stop: list[str]) -> int | None:
    """Index where the earliest stop string begins in `text` (truncate there), or None."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else None


def stop_holdback(text: str, stop: list[str]) -> int:
    """How many trailing characters a streamer must hold back: they may be the start of a stop string.

    The length of the longest suffix of `text` that is a prefix of some stop string.
    """
    best = 0
    for s in stop:
        for n in range(min(len(s), len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
