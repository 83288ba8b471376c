"""Supervised fine-tuning (`llmcycle sft`): conversations and instructions, loss on the assistant's tokens.

Examples are rendered through the tokenizer's chat template; by default only assistant tokens (content and
end-of-turn) are trained. With packing, examples are laid end to end in rows of `max_length` tokens with
positions restarting per example and a block-diagonal causal mask, so no example attends to another and
its loss is what it would be alone. The loss is summed over trained tokens and divided by the trained
tokens of the whole optimizer step (all micro-batches, all processes): long and short examples weigh per
token, whatever the accumulation.
"""

from __future__ import annotations

import hashlib
import logging

import torch
import torch.nn.functional as F

from llmcycle.errors import LlmcycleError
from llmcycle.model.transformer import Transformer
from llmcycle.train.config import (
    SFTConfig,
)
from llmcycle.train.core.inputs import file_inputs, model_input
from llmcycle.train.core.loader import chunks
from llmcycle.train.core.loop import first_evaluation, train_loop
from llmcycle.train.core.masking import IGNORE
from llmcycle.train.core.session import Session
from llmcycle.train.posttrain.batching import packed_batch, pad_batch, plan_packs
from llmcycle.train.posttrain.chat_data import (
    load_sft,
    load_train_and_heldout,
)
from llmcycle.train.posttrain.evaluate import exact_match, heldout_loss
from llmcycle.train.posttrain.examples import SFTExample
from llmcycle.train.posttrain.replay import ReplayRows, pretrain_shards_of, rows_per_epoch

log = logging.getLogger(__name__)


def examples_hash(examples: list[SFTExample]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.ids, e.trained)).encode())
    return h.hexdigest()


def sft_loss(model: torch.nn.Module, batch) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy over trained tokens, with the count of correct argmax predictions (sums, for
    Session.step). Logits are computed at trained positions only."""
    logits, targets, _ = batch.forward_trained(model)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    correct = (logits.detach().argmax(-1) == targets).sum()
    return loss, {"mean_token_accuracy": float(correct)}


def sft(cfg: SFTConfig, resume: bool = False) -> dict:
    with Session("sft", cfg, resume) as s:
        return _sft(cfg, s)


def _sft(cfg: SFTConfig, s: Session) -> dict:
    d, t = cfg.data, cfg.train
    tok = s.load_tokenizer(cfg.model)
    load = lambda paths, rejects: load_sft(paths, tok, d.max_length, rejects, loss_on=d.loss_on)  # noqa: E731
    sets = load_train_and_heldout(d, s.out_dir, "sft", load, load, "SFT training", "training examples",
                                  split_noun="examples")
    train, heldout = sets.train, sets.heldout
    n_tokens = sum(sum(e.trained[1:]) for e in train)
    replay, replay_rows = None, rows_per_epoch(d.pretrain_mix, n_tokens, d.max_length)
    if replay_rows:
        shards = pretrain_shards_of(cfg.model, d.pretrain_shards)
        replay = ReplayRows(shards, d.max_length, t.seed, tok.vocab_size, tok.content_hash())
        log.info(f"data: {replay_rows} new rows of {d.max_length} pre-training tokens per epoch from {shards} "
                 f"(pretrain_mix {d.pretrain_mix})")
        sets.paths.append(shards)

    modules = s.trained_modules(lambda: {"policy": Transformer.from_pretrained(cfg.model)})
    model = modules["policy"]
    wrapped = s.wrapped["policy"]
    if model.config.vocab_size < tok.vocab_size:
        raise LlmcycleError(f"{cfg.model}: the tokenizer has more tokens than the model's vocabulary.")
    if d.max_length > model.config.max_position_embeddings:
        log.info(f"note: data.max_length {d.max_length} exceeds the model's context "
                 f"{model.config.max_position_embeddings}; positions past it were never trained")
    data_hash = examples_hash(train)
    if replay is not None:
        data_hash += f"+replay:{replay.content_hash}:{replay_rows}"
    if s.state is not None and s.state["extra"].get("data_hash") != data_hash:
        raise LlmcycleError(f"the training data differ from those of checkpoint {s.resume_from}; cannot resume.")

    # Units of data: packed rows, or single examples. Packing uses a seeded order so it is reproducible.
    pad_id = tok.pad_id if tok.pad_id is not None else 0
    if d.packing:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(t.seed)).tolist()
        plan = plan_packs([len(train[i].ids) - 1 for i in order], d.max_length)
        units = [[order[j] for j in row] for row in plan]
    else:
        units = [[i] for i in range(len(train))]
    # Replay slots: unit -1 - j is the epoch's j-th row of pre-training text (each epoch reads new rows).
    units += [[-1 - j] for j in range(replay_rows)]
    loader, max_steps = s.epoch_loader(len(units), t.batch_size * t.grad_accum)
    log.info(f"train: {max_steps} steps, {len(units)} {'packed rows' if d.packing else 'examples'} "
             f"({n_tokens + replay_rows * (d.max_length - 1):,} trained tokens) per epoch, batch {t.batch_size} "
             f"x {t.grad_accum} x {s.dist.world_size}")

    def example(i: int) -> tuple[list[int], list[bool]]:
        if i < 0:  # `loader.epoch`: the batch is built right after the loader hands out its indices
            return replay.example(loader.epoch * replay_rows + (-1 - i))
        return train[i].ids, train[i].trained

    def make_batch(unit_ids: list[int]):
        if d.packing:
            return packed_batch([[example(i) for i in units[u]] for u in unit_ids], pad_id).to(s.device)
        return pad_batch([example(units[u][0]) for u in unit_ids], pad_id).to(s.device)

    with_ref = [e for e in heldout if e.reference is not None and e.prompt_ids][: cfg.eval.generate]

    def evaluate() -> dict:
        if not heldout or not s.dist.is_main:
            return {}
        m = heldout_loss(model, heldout[: cfg.eval.max_examples], pad_id, t.batch_size, s.device, s.autocast)
        if with_ref:
            em = exact_match(model, tok, [e.prompt_ids for e in with_ref], [e.reference for e in with_ref],
                             cfg.eval.max_new_tokens)
            m.update(eval_exact_match=em["exact_match"], eval_exact_match_n=em["exact_match_n"],
                     eval_samples=em["samples"])
        return m

    first_eval = first_evaluation(s, evaluate, _eval_line)
    last_eval = train_loop(
        s, "sft", max_steps, loader, lambda idx: [make_batch(list(c)) for c in chunks(idx, t.batch_size)],
        lambda b: float((b.targets != IGNORE).sum()), lambda b: sft_loss(wrapped, b), evaluate, cfg.eval.every,
        _eval_line, {"data_hash": data_hash, "first_eval": first_eval})
    result = {"train_examples": len(train), "pretrain_rows_per_epoch": replay_rows,
              "rejected": sets.rejects.to_dict(), "eval_rejected": sets.eval_rejects.to_dict(),
              "eval_before": {k: v for k, v in first_eval.items() if k != "eval_samples"},
              **{k: v for k, v in last_eval.items() if k != "eval_samples"}}
    result.update(s.usage_metrics())  # parameters trained, step time, peak memory (core/usage.py)
    final = s.publish({"model": model_input(cfg.model), "data": file_inputs(sets.paths)}, result)
    log.info(f"done: fine-tuned model in {final}")
    return result


def _eval_line(step: int, m: dict) -> str:
    line = f"eval step {step}: eval_loss {m['eval_loss']:.3f}, token accuracy {m['eval_mean_token_accuracy']:.3f}"
    if "eval_exact_match" in m:
        line += f", exact match {m['eval_exact_match']:.3f} of {m['eval_exact_match_n']}"
    return line
