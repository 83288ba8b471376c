"""Pre-training: causal or masked LM, from scratch or continued, one process or many (torchrun).

The loop is plain: take micro-batches, sum the token losses, normalise by the number of trained tokens
in the whole optimizer step (across micro-batches and processes), clip, step, log. Everything that
decides the next step (weights, optimizer, LR step, RNG, data position) is in the checkpoint, so a
resumed run produces the same losses as one that never stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from llmcycle.artifacts import atomic_write_text
from llmcycle.card import write_card_quietly
from llmcycle.config import dump_yaml
from llmcycle.data.loader import PackedLoader
from llmcycle.errors import LlmcycleError
from llmcycle.model.config import ModelConfig, config_for_size, describe
from llmcycle.model.hf_io import save_model
from llmcycle.model.transformer import Transformer
from llmcycle.progress import progress
from llmcycle.train import checkpoint as ckpt
from llmcycle.train.config import PretrainConfig
from llmcycle.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    pick_device,
    shutdown,
)
from llmcycle.train.evaluate import heldout_metrics, sample_continuations, unigram_bpb
from llmcycle.train.masking import IGNORE, mask_tokens
from llmcycle.train.prepare import prepare_data
from llmcycle.train.schedule import lr_at

TRAINER_STATE = "trainer_state.pt"


class TrainingDiverged(LlmcycleError):
    pass


def autocast_dtype(choice: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the device computes it fast (CUDA with bf16, CPUs with AVX-512 BF16 / AMX), else fp32."""
    if choice == "fp32":
        return None
    if choice == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    fast = getattr(torch.backends.cpu, "get_cpu_capability", lambda: "")() == "AVX512" and (
        getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
        or getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    )
    return torch.bfloat16 if fast else None


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


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # Matrices decay; norms, biases and embeddings do not (decaying embeddings hurts small models).
        (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.AdamW:
    t = cfg.train
    kwargs = dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(_param_groups(model, t.weight_decay), fused=True, **kwargs)
    except (RuntimeError, TypeError):  # fused needs a supported device/dtype; foreach is the fallback
        return torch.optim.AdamW(_param_groups(model, t.weight_decay), **kwargs)


class MetricsLog:
    """metrics.jsonl on the main process: one JSON object per record, flushed as written."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None, tensorboard: bool = False):
        self.enabled = enabled
        self.path = path
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and path.exists():
            # Drop records the interrupted run wrote after its last checkpoint: they will be redone.
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
        elif resume_step is None:
            path.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise LlmcycleError("tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(path.parent / "tensorboard"))

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))


def pretrain(cfg: PretrainConfig, resume: bool = False, log=print) -> dict:
    """Run pre-training as the recipe says; returns the final metrics."""
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.set_flush_denormal(True)  # denormals slowed fp32 training up to 7x on CPU
    device = pick_device(t.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = init_distributed(device)
    try:
        return _pretrain(cfg, resume, dist, device, log if dist.is_main else (lambda *a, **k: None))
    finally:
        shutdown(dist)


def _pretrain(cfg: PretrainConfig, resume: bool, dist: DistInfo, device: torch.device, log) -> dict:
    t = cfg.train
    out_dir = Path(cfg.out_dir)
    ckpt_root = out_dir / "checkpoints"
    out_dir.mkdir(parents=True, exist_ok=True)

    # ---- where to start --------------------------------------------------------------------
    resume_from = ckpt.latest_checkpoint(ckpt_root) if resume else None
    if resume and resume_from is None:
        log(f"resume: no checkpoint in {ckpt_root}; starting from step 0")
    if not resume and (ckpt_root / ckpt.LATEST).exists() and dist.is_main:
        raise LlmcycleError(
            f"{out_dir} already holds checkpoints; pass --resume to continue it, or choose another out_dir."
        )

    data = prepare_data(cfg, out_dir, dist, log)
    tokenizer = data.tokenizer
    if t.objective == "masked" and tokenizer.mask_id is None:
        raise LlmcycleError(f"{data.tokenizer_dir}: the tokenizer has no mask token; masked LM needs one.")

    torch.manual_seed(t.seed)
    if resume_from is not None:
        model = Transformer.from_pretrained(resume_from, device=device)
        state = torch.load(resume_from / TRAINER_STATE, map_location="cpu", weights_only=True)
        _check_resume_matches(cfg, state, resume_from, build_model_config(cfg, tokenizer), model.config)
    elif cfg.init_from:
        model = Transformer.from_pretrained(cfg.init_from, device=device)
        state = None
        model.config.is_causal = t.objective == "causal"
    else:
        model = Transformer(build_model_config(cfg, tokenizer)).to(device)
        state = None
    if model.config.vocab_size < tokenizer.vocab_size:
        raise LlmcycleError(
            f"{data.tokenizer_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary holds "
            f"{model.config.vocab_size}; use the model's own tokenizer."
        )
    model.activation_checkpointing = t.activation_checkpointing
    log(f"model: {describe(model.config)} on {device}")

    train_model = _wrap(model, cfg, dist, device)  # before the optimizer: FSDP replaces parameters
    optimizer = make_optimizer(model, cfg)
    loader = PackedLoader(data.train, t.seq_len, t.batch_size * t.grad_accum, seed=t.seed,
                          rank=dist.rank, world_size=dist.world_size)
    mask_gen = torch.Generator().manual_seed(t.seed + 1 + dist.rank)
    start_step = 0
    if state is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        mask_gen.set_state(state["rng"]["mask"][dist.rank] if dist.rank < len(state["rng"]["mask"])
                           else state["rng"]["mask"][0])
        start_step = int(state["step"])
        log(f"resume: continuing {resume_from} at step {start_step}")

    amp_dtype = autocast_dtype(t.dtype, device)
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long)
    if len(token_bytes) < model.config.vocab_size:
        token_bytes = F.pad(token_bytes, (0, model.config.vocab_size - len(token_bytes)))
    metrics = MetricsLog(out_dir / "metrics.jsonl", dist.is_main,
                         start_step if resume_from is not None else None, cfg.tensorboard)
    special = torch.tensor([i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if i is not None])

    baseline = None
    if t.objective == "causal" and dist.is_main:
        baseline = unigram_bpb(data.train, data.val, token_bytes.numpy())
        log(f"eval: unigram baseline {baseline:.3f} bits/byte on held-out text")
    tokens_per_step = t.batch_size * t.grad_accum * t.seq_len * dist.world_size
    log(f"train: {t.max_steps} steps x {tokens_per_step:,} tokens "
        f"({dist.world_size} process{'es' if dist.world_size > 1 else ''}, "
        f"{'bf16' if amp_dtype else 'fp32'}{', compiled' if t.compile else ''}), "
        f"{loader.tokens_per_epoch:,} tokens per epoch")

    def evaluate(step: int) -> dict:
        m = heldout_metrics(model, data.val, token_bytes, t.seq_len, t.batch_size, cfg.eval.sequences,
                            autocast(), t.objective, tokenizer.mask_id)
        if baseline is not None:
            m["unigram_bpb"] = baseline
        return {"step": step, **m}

    def save(step: int) -> None:
        # Collectives first (every rank takes part): full weights, optimizer state and masking RNGs.
        model_state, optim_state = _full_state(model, optimizer)
        mask_states = _gather_mask_states(mask_gen, dist)
        if dist.is_main:
            def write(tmp: Path) -> None:
                save_model(model, tmp, state_dict=model_state)
                _copy_tokenizer(data.tokenizer_dir, tmp)
                state = _trainer_state(step, optim_state, loader, mask_states, cfg, model)
                torch.save(state, tmp / TRAINER_STATE)
                (tmp / "recipe.yaml").write_text(dump_yaml(cfg))
            ckpt.save_checkpoint(ckpt_root, step, write, cfg.checkpoint.keep)
        barrier(dist)

    # With FSDP every forward is a collective, so evaluation and sampling run on all ranks.
    sharded = dist.enabled and t.parallel == "fsdp"
    eval_here = dist.is_main or sharded

    last_eval: dict = {}
    step = start_step
    t_start = time.time()
    bar = progress(total=t.max_steps, initial=start_step, desc="pretrain", unit="step", disable=not dist.is_main)
    train_model.train()
    while step < t.max_steps:
        lr = lr_at(step, t.lr, t.warmup_steps, t.max_steps, t.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t0 = time.time()
        # One loader batch holds all micro-batches of this step, so the data position advances once.
        rows = loader.next_batch()
        micro = []
        for chunk in rows.split(t.batch_size):
            if t.objective == "masked":
                inputs, targets = mask_tokens(chunk[:, :-1], tokenizer.mask_id, tokenizer.vocab_size,
                                              t.mask_prob, mask_gen, special)
            else:
                inputs, targets = chunk[:, :-1], chunk[:, 1:]
            micro.append((inputs.to(device), targets.to(device)))
        # Token-count-normalised loss: divide by the trained tokens of the whole step on all ranks.
        n_tokens = all_reduce_sum(torch.tensor(float(sum(int((y != IGNORE).sum()) for _, y in micro))), dist)
        n_tokens = max(float(n_tokens), 1.0)
        loss_sum = torch.zeros((), device=device)
        for i, (inputs, targets) in enumerate(micro):
            sync = i == len(micro) - 1
            ctx = train_model.no_sync() if dist.enabled and not sync and hasattr(train_model, "no_sync") \
                else contextlib.nullcontext()
            with ctx:
                with autocast():
                    logits = train_model(inputs)
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                       ignore_index=IGNORE, reduction="sum")
                # DDP averages gradients over ranks; scale so the result is the global token mean.
                (loss * dist.world_size / n_tokens).backward()
            loss_sum += loss.detach()
        step_loss = float(all_reduce_sum(loss_sum, dist)) / n_tokens
        if not math.isfinite(step_loss):
            last = ckpt.latest_checkpoint(ckpt_root) if (ckpt_root / ckpt.LATEST).exists() else None
            raise TrainingDiverged(
                f"loss became {step_loss} at step {step + 1}; stopped without saving. The last good checkpoint "
                f"is {last or 'none (no checkpoint was written yet)'}; lower train.lr or raise warmup_steps."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        dt = time.time() - t0
        record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                  "tokens_per_s": tokens_per_step / dt, "tokens": step * tokens_per_step}
        metrics.write(record)
        bar.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}", refresh=False)
        bar.update(1)

        final = step == t.max_steps
        if cfg.eval.every and (step % cfg.eval.every == 0 or final) and eval_here:
            last_eval = evaluate(step)
            metrics.write({"eval": True, **last_eval})
            if dist.is_main:
                msg = f"eval step {step}: val_loss {last_eval['val_loss']:.3f}"
                if "val_bpb" in last_eval:
                    msg += f", {last_eval['val_bpb']:.3f} bits/byte (unigram baseline {baseline:.3f})"
                bar.write(msg)
        if t.objective == "causal" and eval_here and (
                final or (cfg.eval.sample_every and step % cfg.eval.sample_every == 0)):
            samples = sample_continuations(model, tokenizer, cfg.eval.prompts, cfg.eval.sample_tokens)
            metrics.write({"step": step, "samples": [{"prompt": p, "text": s} for p, s in samples]})
            for p, s in samples if dist.is_main else []:
                bar.write(f"  sample {p!r} -> {(p + s)[:120]!r}")
        if cfg.checkpoint.every and (step % cfg.checkpoint.every == 0 or final):
            save(step)
    bar.close()
    if not last_eval and eval_here:  # resumed at the end already: still report where the model stands
        last_eval = evaluate(step)
    if dist.enabled and not sharded:
        _check_ranks_in_sync(model, dist)
    final_state, _ = _full_state(model, None)

    result = {"steps": step, "final_loss": step_loss if step > start_step else None, **last_eval,
              "train_seconds": time.time() - t_start, "tokens_per_step": tokens_per_step}
    if dist.is_main:
        final_dir = out_dir / "model"
        _publish_final(model, final_state, data.tokenizer_dir, final_dir, cfg, data.info, result)
        log(f"done: final model in {final_dir} (checkpoints in {ckpt_root}, metrics in {out_dir / 'metrics.jsonl'})")
    return result


def _wrap(model: Transformer, cfg: PretrainConfig, dist: DistInfo, device: torch.device) -> torch.nn.Module:
    m: torch.nn.Module = model
    if dist.enabled and cfg.train.parallel == "fsdp":
        # FSDP2: each block's parameters sharded across ranks, gathered just in time for compute.
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    elif dist.enabled:
        m = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.train.compile:
        m = torch.compile(m)
    return m


def _check_ranks_in_sync(model: torch.nn.Module, dist: DistInfo) -> None:
    """DDP keeps replicas identical by construction; verify it, since a silent divergence wastes a run."""
    local = torch.stack([p.detach().double().sum() for p in model.parameters()]).cpu()
    gathered = [torch.empty_like(local) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, local)
    if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
        raise LlmcycleError("processes finished with different weights: the DDP replicas diverged.")


def _gather_mask_states(mask_gen: torch.Generator, dist: DistInfo) -> list[torch.Tensor]:
    """Every rank's masking RNG, so a resumed multi-process run masks exactly as before."""
    state = mask_gen.get_state()
    if not dist.enabled:
        return [state]
    gathered = [torch.empty_like(state) for _ in range(dist.world_size)]
    torch.distributed.all_gather(gathered, state)
    return gathered


def _full_state(model: torch.nn.Module, optimizer) -> tuple[dict, dict | None]:
    """Unsharded weights (and optimizer state, keyed by parameter name) on the CPU; works for a plain,
    DDP or FSDP model alike. Under FSDP this is a collective: call it on every rank."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=opts)
    optim_state = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return model_state, optim_state


def _trainer_state(step, optim_state, loader, mask_states, cfg, model) -> dict:
    return {
        "step": step,
        "optimizer": optim_state,
        "loader": loader.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "mask": mask_states},
        "recipe": json.dumps(asdict(cfg)),
        "model_config": json.dumps(model.config.to_hf_dict(), sort_keys=True),
    }


_ARCH_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "tie_word_embeddings")


def _check_resume_matches(cfg: PretrainConfig, state: dict, path: Path, wanted: ModelConfig, found: ModelConfig):
    for key in _ARCH_KEYS:
        a, b = getattr(wanted, key), getattr(found, key)
        if a != b and not (cfg.init_from and key == "vocab_size"):
            raise LlmcycleError(
                f"recipe does not match checkpoint {path}: model.{key} is {a} in the recipe, {b} in the checkpoint."
            )
    old = json.loads(state["recipe"])["train"]
    for key in ("objective", "seq_len", "seed"):
        if old[key] != getattr(cfg.train, key):
            raise LlmcycleError(
                f"recipe does not match checkpoint {path}: train.{key} is {getattr(cfg.train, key)!r} in the "
                f"recipe, {old[key]!r} in the checkpoint."
            )


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _publish_final(model, model_state, tokenizer_dir: Path, final_dir: Path, cfg, data_info: dict, result: dict) -> None:
    from llmcycle.artifacts import publish_dir, staging_dir
    from llmcycle.artifacts.manifest import write_manifest

    tmp = staging_dir(final_dir)  # complete first; the previous model stays until the swap
    save_model(model, tmp, state_dict=model_state)
    _copy_tokenizer(tokenizer_dir, tmp)
    (tmp / "recipe.yaml").write_text(dump_yaml(cfg))
    write_manifest(tmp, stage="pretrain", config=asdict(cfg), inputs={"data": data_info}, metrics=result)
    publish_dir(tmp, final_dir)
    write_card_quietly(final_dir)
