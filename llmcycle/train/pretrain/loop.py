"""Pre-training: causal or masked LM, from scratch or continued, one process or many (torchrun).

The loop is plain: take micro-batches, sum the token losses, normalise by the number of trained tokens
in the whole optimizer step (across micro-batches and processes), clip, step, log. Everything that
decides the next step (weights, optimizer, LR step, RNG, data position, masking RNG) is in the
checkpoint, so a resumed run produces the same losses as one that never stopped. The session
(llmcycle.train.core.session) owns the optimizer, the step, checkpoints and publishing; this file
owns the data, the objective and the held-out evaluation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcycle.data.loader import PackedLoader
from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig, config_for_size, describe
from llmcycle.model.transformer import Transformer
from llmcycle.progress import progress
from llmcycle.train.config import PretrainConfig
from llmcycle.train.core.masking import IGNORE, mask_tokens
from llmcycle.train.core.session import MAIN, Session, TrainingDiverged
from llmcycle.train.pretrain.evaluate import heldout_metrics, sample_continuations, unigram_bpb
from llmcycle.train.pretrain.prepare import PreparedData, prepare_data

log = logging.getLogger(__name__)

__all__ = ["TrainingDiverged", "build_model_config", "pretrain"]

# What a resumed run must share with its checkpoint, besides the architecture (checked on the model).
RESUME_KEYS = {"train": ("objective", "seq_len", "seed")}


def build_model_config(cfg: PretrainConfig, tokenizer) -> ModelConfig:
    m = cfg.model
    overrides = {k: getattr(m, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads", "num_key_value_heads")}
    return config_for_size(
        m.size, **overrides, vocab_size=tokenizer.vocab_size,
        max_position_embeddings=m.max_position_embeddings or cfg.train.seq_len,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
        is_causal=cfg.train.objective == "causal",
        bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
    )


def pretrain(cfg: PretrainConfig, resume: bool = False) -> dict:
    """Run pre-training as the recipe says; returns the final metrics."""
    t = cfg.train
    with Session("pretrain", cfg, resume, same_on_resume=RESUME_KEYS, parallel=t.parallel,
                 compile=t.compile, tensorboard=cfg.tensorboard, end_of_turn=False) as s:
        return _pretrain(cfg, s)


@dataclass
class _Run:
    """What the loop's steps share: the session, data, model and the masking RNG."""

    cfg: PretrainConfig
    s: Session
    data: PreparedData
    model: Transformer
    loader: PackedLoader
    mask_gen: torch.Generator
    token_bytes: torch.Tensor
    special: torch.Tensor
    baseline: float | None = None


def _pretrain(cfg: PretrainConfig, s: Session) -> dict:
    t = cfg.train
    data = prepare_data(cfg, s.out_dir, s.dist)
    tokenizer = data.tokenizer
    if t.objective == "masked" and tokenizer.mask_id is None:
        raise LlmcycleError(f"{data.tokenizer_dir}: the tokenizer has no mask token; masked LM needs one.")
    s.tokenizer_dir = data.tokenizer_dir
    run = _start(cfg, s, data)
    if t.objective == "causal" and s.dist.is_main:
        run.baseline = unigram_bpb(data.train, data.val, run.token_bytes.numpy())
        log.info(f"eval: unigram baseline {run.baseline:.3f} bits/byte on held-out text")
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * s.dist.world_size
    log.info(f"train: {t.max_steps} steps x {tokens_per_step:,} tokens "
             f"({s.dist.world_size} process{'es' if s.dist.world_size > 1 else ''}, "
             f"{'bf16' if s.amp_dtype else 'fp32'}{', compiled' if t.compile else ''}), "
             f"{run.loader.tokens_per_epoch:,} tokens per epoch")

    # With FSDP every forward is a collective, so evaluation and sampling run on all ranks.
    eval_here = s.dist.is_main or s.sharded
    start_step = s.step_count
    last_eval: dict = {}
    t_start = time.time()
    bar = progress(total=t.max_steps, initial=start_step, desc="pretrain", unit="step", disable=not s.dist.is_main)
    train_model = s.wrapped[MAIN]
    train_model.train()
    while s.step_count < t.max_steps:
        lr = s.set_lr(t.max_steps)
        t0 = time.time()
        out = s.step(_micro_batches(run), lambda mb: int((mb[1] != IGNORE).sum()),
                     lambda mb: _loss(train_model, mb))
        step, step_loss = s.step_count, out["loss"]
        record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": out["grad_norm"],
                  "tokens_per_s": tokens_per_step / (time.time() - t0), "tokens": step * tokens_per_step}
        s.metrics.write(record)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        bar.update(1)
        last_eval = _after_step(run, bar, eval_here) or last_eval
    bar.close()
    if not last_eval and eval_here:  # resumed at the end already: still report where the model stands
        last_eval = _evaluate(run)
    s.check_replicas_in_sync()

    result = {"steps": s.step_count, "final_loss": step_loss if s.step_count > start_step else None, **last_eval,
              "train_seconds": time.time() - t_start, "tokens_per_step": tokens_per_step}
    final_dir = s.publish({"data": data.info}, result)
    log.info(f"done: final model in {final_dir} (checkpoints in {s.ckpt_root}, metrics in {s.out_dir / 'metrics.jsonl'})")
    return result


def _start(cfg: PretrainConfig, s: Session, data: PreparedData) -> _Run:
    """The model (fresh, continued from init_from, or the checkpoint's), the data position and masking RNG."""
    t, tokenizer = cfg.train, data.tokenizer
    wanted = build_model_config(cfg, tokenizer)

    def build() -> dict[str, Transformer]:
        if cfg.init_from:
            model = Transformer.from_pretrained(cfg.init_from)
            model.config.is_causal = t.objective == "causal"
            return {MAIN: model}
        return {MAIN: Transformer(wanted)}

    torch.manual_seed(t.seed)  # the model's initialisation
    model = s.trained_modules(build)[MAIN]
    if s.resume_from is not None:
        _check_architecture(cfg, s.resume_from, wanted, model.config)
    if model.config.vocab_size < tokenizer.vocab_size:
        raise LlmcycleError(
            f"{data.tokenizer_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
            f"{model.config.vocab_size}; use the model's own tokenizer."
        )
    model.activation_checkpointing = t.activation_checkpointing
    log.info(f"model: {describe(model.config)} on {s.device}")

    loader = PackedLoader(data.train, t.seq_len, t.batch_size * t.grad_accum, seed=t.seed,
                          rank=s.dist.rank, world_size=s.dist.world_size)
    mask_gen = torch.Generator().manual_seed(t.seed + 1 + s.dist.rank)
    if s.state is not None:
        loader.load_state_dict(s.state["loader"])
        # Older checkpoints kept the masking RNGs next to torch's.
        masks = s.extra.get("mask_rng") or s.state["rng"]["mask"]
        mask_gen.set_state(masks[s.dist.rank] if s.dist.rank < len(masks) else masks[0])
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    if len(token_bytes) < model.config.vocab_size:
        token_bytes = F.pad(token_bytes, (0, model.config.vocab_size - len(token_bytes)))
    special = torch.tensor([i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None])
    return _Run(cfg, s, data, model, loader, mask_gen, token_bytes, special)


def _micro_batches(run: _Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This step's (inputs, targets) micro-batches. One loader batch holds all of them, so the data
    position advances once per step."""
    t, tok = run.cfg.train, run.data.tokenizer
    micro = []
    for chunk in run.loader.next_batch().split(t.batch_size):
        if t.objective == "masked":
            inputs, targets = mask_tokens(chunk[:, :-1], tok.mask_id, tok.vocab_size, t.mask_prob, run.mask_gen,
                                          run.special)
        else:
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
        micro.append((inputs.to(run.s.device), targets.to(run.s.device)))
    return micro


def _loss(model: torch.nn.Module, mb: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    """Summed cross-entropy over the micro-batch's trained tokens (Session.step normalises)."""
    inputs, targets = mb
    logits = model(inputs)
    loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, {}


def _evaluate(run: _Run) -> dict:
    t = run.cfg.train
    m = heldout_metrics(run.model, run.data.val, run.token_bytes, t.seq_len, t.batch_size, run.cfg.eval.sequences,
                        run.s.autocast(), t.objective, run.data.tokenizer.mask_id)
    if run.baseline is not None:
        m["unigram_bpb"] = run.baseline
    return {"step": run.s.step_count, **m}


def _after_step(run: _Run, bar, eval_here: bool) -> dict:
    """Held-out evaluation, sampled continuations and a checkpoint when due. Returns the metrics when it
    evaluated, else {}."""
    cfg, s = run.cfg, run.s
    step = s.step_count
    final = step == cfg.train.max_steps
    metrics: dict = {}
    if cfg.eval.every and (step % cfg.eval.every == 0 or final) and eval_here:
        metrics = _evaluate(run)
        s.metrics.write({"eval": True, **metrics})
        if s.dist.is_main:
            msg = f"eval step {step}: val_loss {metrics['val_loss']:.3f}"
            if "val_bpb" in metrics:
                msg += f", {metrics['val_bpb']:.3f} bits/byte (unigram baseline {run.baseline:.3f})"
            bar.write(msg)
    if cfg.train.objective == "causal" and eval_here and (
            final or (cfg.eval.sample_every and step % cfg.eval.sample_every == 0)):
        samples = sample_continuations(run.model, run.data.tokenizer, cfg.eval.prompts, cfg.eval.sample_tokens)
        s.metrics.write({"step": step, "samples": [{"prompt": p, "text": x} for p, x in samples]})
        for p, x in samples if s.dist.is_main else []:
            bar.write(f"  sample {p!r} -> {(p + x)[:120]!r}")
    # Unlike post-training, checkpoint.every 0 means no checkpoint at all, not only the final one.
    if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or final):
        s.save(run.loader.state_dict(), {"mask_rng": _gather_mask_states(run)})
    return metrics


def _gather_mask_states(run: _Run) -> list[torch.Tensor]:
    """Every rank's masking RNG (a collective), so a resumed multi-process run masks exactly as before."""
    state = run.mask_gen.get_state()
    if not run.s.dist.enabled:
        return [state]
    gathered = [torch.empty_like(state) for _ in range(run.s.dist.world_size)]
    torch.distributed.all_gather(gathered, state)
    return gathered


_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")


def _check_architecture(cfg: PretrainConfig, path: Path, wanted: ModelConfig, found: ModelConfig) -> None:
    for key in _ARCH_KEYS:
        a, b = getattr(wanted, key), getattr(found, key)
        if a != b and not (cfg.init_from and key == "vocab_size"):
            raise LlmcycleError(
                f"recipe does not match checkpoint {path}: model.{key} is {a} in the recipe, {b} in the checkpoint."
            )
