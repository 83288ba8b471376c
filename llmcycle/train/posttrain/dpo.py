"""Direct preference optimisation (`llmcycle dpo`): DPO, IPO, hinge, robust DPO, SimPO, ORPO and KTO.

The DPO family scores a completion by beta * (log pi(y|x) - log pi_ref(y|x)). The reference log-probs never
change, so they are computed once, before training, with the starting model (or `ref_model`), and cached
in `out_dir/ref_logps.pt`: the reference model is not in memory while the policy trains, and a resumed run
reads the cache. SimPO and ORPO need no reference. KTO learns from unpaired feedback; its KL baseline
pairs each prompt with another example's completion (example i with completion i+1, fixed, so its
reference log-probs can be cached too), where TRL rotates completions within each batch.

Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (and eval_ prefixed on held-out pairs).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import torch

from llmcycle.artifacts import atomic_open
from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.optimize.lora import disable_adapters
from llmcycle.train.config import (
    DPOConfig,
)
from llmcycle.train.core.distributed import all_reduce_sum
from llmcycle.train.core.inputs import file_inputs, model_input
from llmcycle.train.core.loader import chunks
from llmcycle.train.core.loop import first_evaluation, train_loop
from llmcycle.train.core.session import Session
from llmcycle.train.posttrain import losses as L
from llmcycle.train.posttrain.batching import pad_batch, per_example_sum
from llmcycle.train.posttrain.chat_data import (
    PAIRS,
    load_preferences,
    load_train_and_heldout,
    load_unpaired,
)
from llmcycle.train.posttrain.evaluate import exact_match
from llmcycle.train.posttrain.examples import PreferenceExample, UnpairedExample
from llmcycle.train.posttrain.logps import token_logps

log = logging.getLogger(__name__)

PAIRED = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
REF_CACHE = "ref_logps.pt"


# ---- log-probs of completions --------------------------------------------------------------------

def completion_logps(model: torch.nn.Module, seqs: list[tuple[list[int], list[int]]], pad_id: int, device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of each completion given its prompt, and its token count: [N], [N]."""
    rows = [(p + c, [False] * len(p) + [True] * len(c)) for p, c in seqs]
    batch = pad_batch(rows, pad_id).to(device)
    logits, targets, segments = batch.forward_trained(model)
    logps = token_logps(logits, targets)
    n = len(seqs)
    return per_example_sum(logps, segments, n), per_example_sum(torch.ones_like(logps), segments, n)


def pair_seqs(pairs: list[PreferenceExample]) -> list[tuple[list[int], list[int]]]:
    return [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]


@torch.no_grad()
def _all_logps(model, seqs, pad_id, device, batch_size, autocast) -> torch.Tensor:
    was = model.training
    model.eval()
    out = []
    for i in range(0, len(seqs), batch_size):
        with autocast():
            out.append(completion_logps(model, seqs[i: i + batch_size], pad_id, device)[0].cpu())
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def _hash_seqs(seqs) -> str:
    h = hashlib.sha256()
    for p, c in seqs:
        h.update(repr((p, c)).encode())
    return h.hexdigest()


def reference_cache(path: Path, model_path: str, sets: dict[str, list], pad_id, device, batch_size, autocast,
                    base: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Reference log-probs of every sequence set, computed once and stored; reused when inputs match.
    `base`: a model with LoRA adapters whose base (adapters disabled) is the reference: no second copy."""
    key = {name: _hash_seqs(seqs) for name, seqs in sets.items()}
    key["model"] = model_input(model_path)
    if path.exists():
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") == key:
            log.info(f"reference: cached log-probs from {path}")
            return cached["logps"]
    log.info(f"reference: computing log-probs of {sum(len(s) for s in sets.values())} sequences with {model_path}")
    if base is not None:
        with disable_adapters(base):
            logps = {name: _all_logps(base, seqs, pad_id, device, batch_size, autocast) for name, seqs in sets.items()}
    else:
        ref = Transformer.from_pretrained(model_path, device=device)
        logps = {name: _all_logps(ref, seqs, pad_id, device, batch_size, autocast) for name, seqs in sets.items()}
        del ref  # not kept during training
    with atomic_open(path) as f:
        torch.save({"key": key, "logps": logps}, f)
    return logps


# ---- losses on a micro-batch ----------------------------------------------------------------------

def paired_loss(cfg: DPOConfig, model, pairs: list[PreferenceExample], ref: tuple[torch.Tensor, torch.Tensor] | None,
                pad_id: int, device) -> tuple[torch.Tensor, dict[str, float], torch.Tensor, torch.Tensor]:
    """Summed loss over pairs, summed metrics, and the (chosen, rejected) rewards."""
    B = len(pairs)
    sums, counts = completion_logps(model, pair_seqs(pairs), pad_id, device)
    chosen, rejected = sums[:B], sums[B:]
    c_len, r_len = counts[:B], counts[B:]
    extra: dict[str, float] = {}
    if cfg.loss_type == "simpo":
        losses, c_rew, r_rew = L.simpo_loss(chosen, rejected, c_len, r_len, beta=cfg.beta,
                                            gamma_beta_ratio=cfg.simpo_gamma_beta_ratio,
                                            label_smoothing=cfg.label_smoothing)
    elif cfg.loss_type == "orpo":
        nll = -chosen / c_len.clamp(min=1)
        losses, c_rew, r_rew, odds = L.orpo_loss(chosen, rejected, c_len, r_len, nll, beta=cfg.beta)
        extra = {f"orpo/{k}": float(torch.as_tensor(v).detach().float().mean()) * B for k, v in odds.items()}
        extra["nll_loss"] = float(nll.detach().sum())
    else:
        ref_c, ref_r = (x.to(device) for x in ref)
        losses, c_rew, r_rew = L.dpo_loss(chosen, rejected, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
                                          label_smoothing=cfg.label_smoothing, chosen_len=c_len, rejected_len=r_len)
    if cfg.rpo_alpha:  # DPO alone may lower the chosen answers' likelihood as long as the margin grows
        nll = L.chosen_nll(chosen, c_len)
        losses = losses + cfg.rpo_alpha * nll
        extra["nll_loss"] = float(nll.detach().sum())
    metrics = {k: v * B for k, v in L.preference_metrics(c_rew, r_rew, chosen.detach(), rejected.detach()).items()}
    metrics.update(extra)
    return losses.sum(), metrics, c_rew, r_rew


def dpo(cfg: DPOConfig, resume: bool = False) -> dict:
    with Session("dpo", cfg, resume) as s:
        return _dpo(cfg, s)


def check_config(cfg: DPOConfig) -> None:
    if cfg.label_smoothing and cfg.loss_type not in ("robust", "simpo"):
        raise LlmcycleError(f"label_smoothing applies to the robust and simpo losses, not {cfg.loss_type!r}.")
    if cfg.loss_type == "robust" and not 0 <= cfg.label_smoothing < 0.5:
        raise LlmcycleError(f"label_smoothing must be in [0, 0.5) for the robust loss, got {cfg.label_smoothing}.")
    if cfg.beta <= 0:
        raise LlmcycleError(f"beta must be positive, got {cfg.beta}.")
    if cfg.rpo_alpha is not None and cfg.loss_type in ("orpo", "kto"):
        raise LlmcycleError(f"rpo_alpha adds an NLL term to paired losses; {cfg.loss_type} "
                            + ("has its own" if cfg.loss_type == "orpo" else "is unpaired") + ".")
    if cfg.rpo_alpha is not None and cfg.rpo_alpha < 0:
        raise LlmcycleError(f"rpo_alpha must be >= 0, got {cfg.rpo_alpha}.")


def _dpo(cfg: DPOConfig, s: Session) -> dict:
    check_config(cfg)
    d, t = cfg.data, cfg.train
    kto = cfg.loss_type == "kto"
    tok = s.load_tokenizer(cfg.model)
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    loaded = load_train_and_heldout(
        d, s.out_dir, "kto" if kto else "pref",
        lambda paths, rejects: (load_unpaired if kto else load_preferences)(paths, tok, d.max_length, rejects),
        lambda paths, rejects: load_preferences(paths, tok, d.max_length, rejects),
        "KTO training" if kto else "preference training", "feedback examples" if kto else "preference pairs",
        PAIRS, split_noun="preference pairs",
        # KTO feedback is no pair: nothing of it can be scored as chosen vs rejected
        no_split=(f"eval: none (data.eval is left at 'embedded' but data.train is your file; held-out evaluation "
                  f"takes {PAIRS}: set data.eval to such a file)") if kto else None)
    train, heldout = loaded.train, loaded.heldout
    heldout = heldout[: cfg.eval.max_pairs]
    if kto:
        _check_kto_labels(train)

    # Reference log-probs first, before the policy exists in memory.
    kl_pairs = kl_seqs(train) if kto else []
    sets: dict[str, list] = {}
    if cfg.loss_type not in REFERENCE_FREE:
        if kto:
            sets["train"] = [(e.prompt_ids, e.completion_ids) for e in train]
            sets["train_kl"] = kl_pairs
        else:
            sets["train"] = pair_seqs(train)
        sets["eval"] = pair_seqs(heldout)
    ref_path = cfg.ref_model or cfg.model
    if s.lora is not None and not cfg.ref_model:
        # The reference is the base under the adapters: the policy itself with its adapters disabled.
        modules = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model)})
        ref = (reference_cache(s.out_dir / REF_CACHE, ref_path, sets, pad_id, s.device, t.batch_size, s.autocast,
                               base=modules["policy"]) if sets else {})
    else:
        ref = (reference_cache(s.out_dir / REF_CACHE, ref_path, sets, pad_id, s.device, t.batch_size, s.autocast)
               if sets else {})
        modules = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model)})
    model, wrapped = modules["policy"], s.wrapped["policy"]
    loader, max_steps = s.epoch_loader(len(train), t.batch_size * t.grad_accum)
    log.info(f"train: {cfg.loss_type} loss, beta {cfg.beta}, {max_steps} steps, batch {t.batch_size} x "
             f"{t.grad_accum} x {s.dist.world_size}")

    def loss_fn(idx: list[int]):
        if kto:
            return kto_step_loss(cfg, wrapped, train, kl_pairs, idx, ref, pad_id, s)
        pairs = [train[i] for i in idx]
        r = None
        if "train" in ref:
            B = len(ref["train"]) // 2
            r = (ref["train"][idx], ref["train"][[B + i for i in idx]])
        loss, metrics, _, _ = paired_loss(cfg, wrapped, pairs, r, pad_id, s.device)
        return loss, metrics

    gen = heldout[: cfg.eval.generate]

    def evaluate() -> dict:
        if not heldout or not s.dist.is_main:
            return {}
        m = evaluate_pairs(cfg, model, heldout, ref.get("eval"), pad_id, s.device, t.batch_size, s.autocast)
        if gen:
            em = exact_match(model, tok, [e.prompt_ids for e in gen],
                             [tok.decode(e.chosen_ids, skip_special_tokens=True) for e in gen], cfg.eval.max_new_tokens)
            m.update(eval_exact_match=em["exact_match"], eval_exact_match_n=em["exact_match_n"])
        return m

    first_eval = first_evaluation(s, evaluate, _eval_line)
    last_eval = train_loop(s, cfg.loss_type, max_steps, loader, lambda idx: [list(c) for c in chunks(idx, t.batch_size)],
                           len, loss_fn, evaluate, cfg.eval.every, _eval_line, {"first_eval": first_eval})
    result = {"loss_type": cfg.loss_type, "train_examples": len(train), "rejected": loaded.rejects.to_dict(),
              "eval_rejected": loaded.eval_rejects.to_dict(), "eval_before": first_eval, **last_eval}
    inputs = {"model": model_input(cfg.model), "data": file_inputs(loaded.paths)}
    if cfg.ref_model:
        inputs["ref_model"] = model_input(cfg.ref_model)
    result.update(s.usage_metrics())  # parameters trained, step time, peak memory (core/usage.py)
    final = s.publish(inputs, result)
    log.info(f"done: tuned model in {final}")
    return result


# ---- KTO ----------------------------------------------------------------------------------------

def kl_seqs(examples: list[UnpairedExample]) -> list[tuple[list[int], list[int]]]:
    """Each prompt with the next example's completion: the mismatched pairs KTO's KL baseline is taken on."""
    n = len(examples)
    return [(e.prompt_ids, examples[(i + 1) % n].completion_ids) for i, e in enumerate(examples)]


def _check_kto_labels(train: list[UnpairedExample]) -> None:
    labels = {e.label for e in train}
    if len(labels) < 2:
        kind = "desirable" if True in labels else "undesirable"
        raise LlmcycleError(f"KTO needs both desirable and undesirable examples; all {len(train)} are {kind}.")


def kto_step_loss(cfg: DPOConfig, model, train: list[UnpairedExample], kl_pairs: list, idx: list[int], ref: dict,
                  pad_id: int, s: Session) -> tuple[torch.Tensor, dict[str, float]]:
    batch = [train[i] for i in idx]
    n = len(batch)
    logps, _ = completion_logps(model, [(e.prompt_ids, e.completion_ids) for e in batch], pad_id, s.device)
    with torch.no_grad():
        kl_logps, _ = completion_logps(model, [kl_pairs[i] for i in idx], pad_id, s.device)
    kl = L.kl_estimate(kl_logps, ref["train_kl"][idx].to(s.device))
    if s.dist.enabled:  # one baseline for the whole step, as TRL gathers it across processes
        kl = all_reduce_sum(kl.clone(), s.dist) / s.dist.world_size
    desirable = torch.tensor([e.label for e in batch], device=s.device)
    ref_logps = ref["train"][idx].to(s.device)
    losses, rewards = L.kto_loss(logps, ref_logps, desirable, kl, beta=cfg.beta,
                                 desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    d, u = desirable, ~desirable
    metrics = {"kl": float(kl) * n, "rewards/chosen_sum": float(rewards.detach()[d].sum()),
               "rewards/rejected_sum": float(rewards.detach()[u].sum()), "count/chosen": float(d.sum()),
               "count/rejected": float(u.sum())}
    return losses.sum(), metrics


# ---- held-out evaluation -------------------------------------------------------------------------

@torch.no_grad()
def evaluate_pairs(cfg: DPOConfig, model, pairs, ref_eval, pad_id, device, batch_size, autocast) -> dict:
    """Preference metrics on held-out pairs with the loss's own reward definition."""
    was = model.training
    model.eval()
    totals: dict[str, float] = {}
    B_all = len(pairs)
    for i in range(0, B_all, batch_size):
        chunk = pairs[i: i + batch_size]
        r = None
        if ref_eval is not None and len(ref_eval):
            r = (ref_eval[i: i + len(chunk)], ref_eval[B_all + i: B_all + i + len(chunk)])
        eval_cfg = cfg if cfg.loss_type in PAIRED else _as_sigmoid(cfg)
        with autocast():
            loss, metrics, _, _ = paired_loss(eval_cfg, model, chunk, r, pad_id, device)
        totals["loss"] = totals.get("loss", 0.0) + float(loss)
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + v
    model.train(was)
    return {f"eval_{k}": v / max(B_all, 1) for k, v in totals.items()} | {"eval_pairs": B_all}


def _as_sigmoid(cfg: DPOConfig) -> DPOConfig:
    return replace(cfg, loss_type="sigmoid", label_smoothing=0.0)


def _eval_line(step: int, m: dict) -> str:
    line = (f"eval step {step}: reward accuracy {m.get('eval_rewards/accuracies', float('nan')):.3f}, "
            f"margin {m.get('eval_rewards/margins', float('nan')):.3f}")
    if "eval_exact_match" in m:
        line += f", exact match {m['eval_exact_match']:.3f} of {m['eval_exact_match_n']}"
    return line
