"""The training session every trainer runs on: pre-training, SFT, reward, the DPO family, PPO and GRPO.

A `Session` owns, for one run:

- processes and device (torchrun or one process), the autocast dtype, the seed;
- the resume guard: a run whose out_dir holds checkpoints continues only with --resume, and then only
  with the recipe keys that shape the run (`same_on_resume`) unchanged;
- the trained modules (one model, or a PPO policy and value model), wrapped for DDP or FSDP2;
- which parameters train and how they decay (`trainable_parameters`, `param_groups`) and AdamW over them;
- the LR schedule (`set_lr`) and one optimizer step over micro-batches with the loss normalised by a
  count summed over the whole step on every process (`step`), the divergence check, gradient clipping;
- crash-safe checkpoints (`save`: weights, optimizer, data position, RNG in TRAINER_STATE) and exact resume;
- metrics.jsonl, and publishing the final Hugging Face model directory with its manifest (`publish`).

The loops stay in the trainers (pretrain/loop.py, posttrain/*.py, rl/*.py) where they can be read;
core/loop.py holds the two loop shapes they share.

Where LoRA adapters and quantized bases enter: the `build` a trainer passes to `trained_modules` makes
the modules (a quantized base with adapters attached), `trainable_parameters` decides which parameters
train (a frozen base has requires_grad False; adapters are the trainable rest), `param_groups` how they
decay, and `save_module` / `load_module` how a trained module is written and read back (an adapter-only
save replaces them). Checkpoints and the final directory both go through `save_module`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from llmcycle.card import write_card_quietly
from llmcycle.config import dump_yaml
from llmcycle.errors import LlmcycleError
from llmcycle.logs import quiet_unless_main
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.hf_io import add_end_of_turn_to_generation_config, save_model
from llmcycle.model.transformer import Transformer
from llmcycle.optimize import lora as lora_lib
from llmcycle.paths import check_model_dir
from llmcycle.threads import adapt_threads, set_threads
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.core import checkpoint as ckpt
from llmcycle.train.core.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    pick_device,
    shutdown,
)
from llmcycle.train.core.loader import EpochLoader, total_steps
from llmcycle.train.core.metrics import MetricsLog
from llmcycle.train.core.schedule import lr_at
from llmcycle.train.core.usage import Usage

log = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
MODULES_FILE = "modules.json"
MAIN = "policy"  # the module saved at the top of a checkpoint / final directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# What must not change between a checkpoint and the run that resumes it (post-training's default).
POSTTRAIN_RESUME_KEYS = {"train": ("seed", "batch_size", "grad_accum"), "data": ("train", "max_length")}
LORA_RESUME_KEYS = ("r", "alpha", "dropout", "target_modules", "use_rslora", "use_dora")
QLORA_RESUME_KEYS = ("quantize", "double_quant", "blocksize")  # checked when either side is quantized
# Module kinds of models with adapters, saved as PEFT adapter directories (their base: the recipe's model).
LORA, LORA_SCALAR = "lora", "lora_scalar_head"


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


def load_module(path: Path, kind: str, device: torch.device) -> nn.Module:
    if kind == "scalar_head":
        return ScalarHeadModel.from_pretrained(path, device=device)
    return Transformer.from_pretrained(path, device=device)


def module_kind(module: nn.Module) -> str:
    if lora_lib.has_lora(module):
        return LORA_SCALAR if isinstance(module, ScalarHeadModel) else LORA
    return "scalar_head" if isinstance(module, ScalarHeadModel) else "causal_lm"


def save_module(module: nn.Module, path: Path, state_dict: dict | None = None) -> None:
    """Write one trained module as a Hugging Face directory. `state_dict`: weights gathered from FSDP shards."""
    if state_dict is None:
        module.save_pretrained(path)
    elif isinstance(module, ScalarHeadModel):
        module.save_pretrained(path, state_dict=state_dict)
    else:
        save_model(module, path, state_dict=state_dict)


def copy_tokenizer(src: Path, dst: Path, end_of_turn: bool = True) -> None:
    """Copy the tokenizer files; `end_of_turn`: a tuned model also stops at end of turn in transformers."""
    if not (Path(src) / "tokenizer.json").exists():  # never publish a model without its tokenizer
        raise LlmcycleError(f"{src}: tokenizer.json is gone; cannot copy the tokenizer to {dst}.")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dst / name)
    if end_of_turn:
        add_end_of_turn_to_generation_config(dst)


class Session:
    """One training run: see the module docstring. Use as a context manager (it owns the process group).

    stage: the manifest's stage name. same_on_resume: {section: keys} of the recipe a resumed run must
    share with its checkpoint. parallel / compile: how trained modules are wrapped under torchrun (ddp or
    fsdp) and whether they are compiled. end_of_turn: published chat models stop at end of turn (False
    for a pre-trained base model).
    """

    def __init__(self, stage: str, cfg: Any, resume: bool, *,
                 same_on_resume: dict[str, Sequence[str]] = POSTTRAIN_RESUME_KEYS, parallel: str = "ddp",
                 compile: bool = False, tensorboard: bool = False, end_of_turn: bool = True):
        self.stage, self.cfg, self.opt = stage, cfg, cfg.train
        lora = getattr(cfg, "lora", None)
        if lora is not None:
            lora.check()
        self.lora = lora if lora is not None and lora.r > 0 else None  # None: every parameter trains
        self.lora_bases: dict[str, str] = {}  # module name -> the directory its adapters go on
        self.parallel, self.compile, self.end_of_turn = parallel, compile, end_of_turn
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        set_threads(self.opt.threads)  # the CPUs this process may use, cgroup quota included
        torch.set_flush_denormal(True)  # denormals slowed fp32 training up to 7x on CPU
        self.device = pick_device(self.opt.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist: DistInfo = init_distributed(self.device)
        self._restore_logging = quiet_unless_main(self.dist.is_main)  # progress is reported by rank 0 only
        try:
            self._start(resume, same_on_resume, tensorboard)
        except BaseException:
            self._close()
            raise

    def _close(self) -> None:
        shutdown(self.dist)
        self._restore_logging()

    def _start(self, resume: bool, same_on_resume: dict[str, Sequence[str]], tensorboard: bool) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from = ckpt.latest_checkpoint(self.ckpt_root) if resume else None
        if resume and self.resume_from is None:
            log.info(f"resume: no checkpoint in {self.ckpt_root}; starting from step 0")
        if not resume and (self.ckpt_root / ckpt.LATEST).exists():
            raise LlmcycleError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue it, or choose another out_dir."
            )
        self.state: dict | None = None
        if self.resume_from is not None:
            self.state = torch.load(self.resume_from / TRAINER_STATE, map_location="cpu", weights_only=True)
            old = json.loads(self.state["recipe"])
            if self.lora is not None or old.get("lora", {}).get("r", 0) > 0:
                quantized = (self.lora is not None and self.lora.quantize) or old.get("lora", {}).get("quantize")
                same_on_resume = {**same_on_resume, "lora": LORA_RESUME_KEYS + (QLORA_RESUME_KEYS if quantized else ())}
            self._check_recipe(old, same_on_resume)
        self.step_count = int(self.state["step"]) if self.state else 0
        amp = autocast_dtype(self.opt.dtype, self.device)
        self.amp_dtype = amp
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.dist.is_main,
                                  self.step_count if self.state else None, tensorboard)
        self.usage = Usage(self.device, (self.state or {}).get("usage"))  # step time, memory: `usage_metrics`
        self.modules: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokenizer_dir: Path | None = None
        torch.manual_seed(self.opt.seed)
        self.t_start = time.time()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    @property
    def extra(self) -> dict:
        """What the trainer stored with the checkpoint it resumes ({} on a fresh start)."""
        return self.state.get("extra", {}) if self.state is not None else {}

    @property
    def sharded(self) -> bool:
        """FSDP: every forward, state gathering and evaluation is a collective all processes take part in."""
        return self.dist.enabled and self.parallel == "fsdp"

    # ---- tokenizer and models -------------------------------------------------------------------

    def load_tokenizer(self, model_dir: str | Path) -> Tokenizer:
        """The tokenizer travels with the model; on resume it is the checkpoint's copy."""
        src = self.resume_from or Path(model_dir)
        if self.lora is None or self.resume_from is None:  # a LoRA checkpoint holds adapters, no config.json
            check_model_dir(src, hint="Train one first (`llmcycle run` writes runs/default/pretrain/model and "
                                      "runs/default/sft/model; `llmcycle sft` writes runs/sft/model), or set model=DIR.")
        if not (Path(src) / "tokenizer.json").exists():
            raise LlmcycleError(f"{src}: no tokenizer.json next to the model; post-training needs the model's tokenizer.")
        # A private copy: checkpoints (the source on resume) are rotated away during the run, and the
        # starting model may be replaced; checkpoints and the final model copy the tokenizer from here.
        self.tokenizer_dir = self.out_dir / "tokenizer"
        if self.dist.is_main and Path(src).resolve() != self.tokenizer_dir.resolve():
            shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
            copy_tokenizer(Path(src), self.tokenizer_dir, self.end_of_turn)
        barrier(self.dist)
        return Tokenizer.from_pretrained(self.tokenizer_dir)

    def trained_modules(self, build: Callable[[], dict[str, nn.Module]],
                        bases: dict[str, str] | None = None) -> dict[str, nn.Module]:
        """The modules this run trains: build() on a fresh start, the checkpoint's weights on resume.
        `policy` is the main model; others (a PPO value model) are saved in sub-directories. Then the
        optimizer, and on resume its state and the RNG. With LoRA every module gets adapters (a scalar
        head trains fully beside them); `bases` names the directory each module was built from, written
        into its adapter_config.json and read back on resume (default: the recipe's `model`)."""
        self.lora_bases = {MAIN: str(self.cfg.model), **{k: str(v) for k, v in (bases or {}).items()}}
        if self.resume_from is not None:
            kinds_file = self.resume_from / MODULES_FILE
            # Pre-training checkpoints written before the shared session hold one language model, no list.
            kinds = json.loads(kinds_file.read_text()) if kinds_file.exists() else {MAIN: "causal_lm"}
            modules = {name: self.load_module(self.resume_from if name == MAIN else self.resume_from / name, kind)
                       for name, kind in kinds.items()}
        else:
            modules = {k: m.to(self.device) for k, m in build().items()}
            if self.lora is not None:
                if self.sharded:
                    raise LlmcycleError("lora: adapters under FSDP are not supported yet; use train.parallel=ddp.")
                for m in modules.values():
                    self._quantize_base(m)
                    # A reward or value model's score head trains fully beside the adapted body (PEFT's
                    # modules_to_save).
                    head = ["score"] if isinstance(m, ScalarHeadModel) else []
                    lora_lib.apply_lora(m, self.lora, modules_to_save=head)
        if self.lora is not None:
            log.info(f"lora: r={self.lora.r}, alpha={self.lora.alpha} on {', '.join(self.lora.target_modules)}")
            for name, m in modules.items():
                log.info(f"lora: {name}: {lora_lib.trainable_summary(m)}{self._base_summary(m)}")
        self.modules = modules
        for name, m in modules.items():
            m.train()
            self.wrapped[name] = self._wrap(m)  # before the optimizer: FSDP replaces parameters
        self.optimizer = self._make_optimizer()
        if self.state is not None:
            self._load_optimizer_state(self.state["optimizer"])
            rng = self.state["rng"]
            torch.set_rng_state(rng["torch"] if isinstance(rng, dict) else rng)  # dict: older pre-training layout
            log.info(f"resume: continuing {self.resume_from} at step {self.step_count}")
        return modules

    def load_module(self, path: Path, kind: str) -> nn.Module:
        """A trained module as `save_module` wrote it into a checkpoint (the resume side of that hook).
        An adapter is attached to its base (adapter_config.json's base_model_name_or_path), read afresh."""
        if kind not in (LORA, LORA_SCALAR):
            return load_module(path, kind, self.device)
        src = lora_lib.read_adapter_config(path)[1]["base_model_name_or_path"]
        if kind == LORA:
            return lora_lib.load_adapter(self._quantize_base(Transformer.from_pretrained(src, device=self.device)), path)
        try:  # the head comes from the adapter directory, whatever the base holds
            base = ScalarHeadModel.from_pretrained(src, device=self.device)
        except LlmcycleError as e:
            if "not a reward/value model" not in str(e):
                raise
            base = ScalarHeadModel.from_causal_lm(Transformer.from_pretrained(src, device=self.device))
        return lora_lib.load_adapter(self._quantize_base(base), path)

    def _quantize_base(self, module: nn.Module) -> nn.Module:
        """QLoRA (`lora.quantize=nf4`): the base's linear layers (not the output or score head) become
        frozen `Linear4bit` layers before adapters wrap them, and the blocks recompute their activations
        in backward (gradient checkpointing). Quantizing is deterministic, so a resume rebuilds the same
        4-bit base from the full-precision one. Without quantize: nothing happens."""
        if self.lora is None or not self.lora.quantize:
            return module
        from llmcycle.optimize.nf4 import quantize_model

        quantize_model(module, exclude=("lm_head", "score"), blocksize=self.lora.blocksize,
                       double_quant=self.lora.double_quant)
        module.activation_checkpointing = True
        return module

    def _base_summary(self, module: nn.Module) -> str:
        """'; base: N linear layers in 4-bit NF4 ...' under QLoRA, else ''."""
        from llmcycle.optimize.nf4 import Linear4bit

        layers = [m for m in module.modules() if isinstance(m, Linear4bit)]
        if not layers:
            return ""
        nbytes = sum(m.weight_nbytes() for m in layers)
        full = sum(4 * m.in_features * m.out_features for m in layers)
        dq = ", double quant" if self.lora.double_quant else ""
        return (f"; base: {len(layers)} linear layers in 4-bit NF4 (blocksize {self.lora.blocksize}{dq}): "
                f"{nbytes / 2**20:.2f} MiB instead of {full / 2**20:.2f} MiB in fp32, gradient checkpointing on")

    def save_module(self, name: str, module: nn.Module, path: Path, state_dict: dict | None) -> None:
        """How a trained module is written, in checkpoints and the final directory alike: a full Hugging
        Face directory; with LoRA, the adapters alone in PEFT's format (and the base they go on)."""
        if self.lora is not None and lora_lib.has_lora(module):
            lora_lib.save_adapter(module, path, self.lora_bases.get(name, str(self.cfg.model)), self.lora)
            return
        save_module(module, path, state_dict)

    def _wrap(self, module: nn.Module) -> nn.Module:
        m = module
        if self.sharded:
            # FSDP2: each block's parameters sharded across ranks, gathered just in time for compute.
            for layer in module.model.layers:
                fully_shard(layer)
            fully_shard(module)
        elif self.dist.enabled:
            m = DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.compile:
            m = torch.compile(m)
        return m

    def trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of every parameter the optimizer updates: those with requires_grad. A frozen
        (e.g. quantized) base sets requires_grad False on its weights; LoRA adapters are what remains."""
        for m in self.modules.values():
            for name, p in m.named_parameters():
                if p.requires_grad:
                    yield name, p

    def param_groups(self) -> list[dict]:
        decay, no_decay = [], []
        for name, p in self.trainable_parameters():
            # Matrices decay; norms, biases and embeddings do not (decaying embeddings hurts small models).
            (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
        return [{"params": decay, "weight_decay": self.opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        kwargs = dict(lr=self.opt.lr, betas=(self.opt.beta1, self.opt.beta2), eps=1e-8)
        try:
            return torch.optim.AdamW(self.param_groups(), fused=True, **kwargs)
        except (RuntimeError, TypeError):  # fused needs a supported device/dtype; foreach is the fallback
            return torch.optim.AdamW(self.param_groups(), **kwargs)

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable_parameters()]

    def epoch_loader(self, n: int, per_step: int) -> tuple[EpochLoader, int]:
        """An EpochLoader over n items (at the checkpoint's position on resume) and the run's optimizer
        steps (or PPO/GRPO iterations): train.max_steps, or train.epochs over the items."""
        loader = EpochLoader(n, per_step, self.opt.seed, self.dist.rank, self.dist.world_size)
        if self.state is not None:
            loader.load_state_dict(self.state["loader"])
        return loader, total_steps(self.opt, loader)

    # ---- one optimizer step -------------------------------------------------------------------

    def set_lr(self, max_steps: int, position: int | None = None) -> float:
        """Set the scheduled LR for `position` (default: the optimizer step; PPO/GRPO pass their iteration)."""
        at = self.step_count if position is None else position
        lr = lr_at(at, self.opt.lr, self.opt.warmup_steps, max_steps, self.opt.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def step(self, micro_batches: Sequence[Any], count: Callable[[Any], float],
             loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, float]]]) -> dict[str, float]:
        """Accumulate gradients over `micro_batches` and take one optimizer step.

        loss_fn(mb) returns (loss summed over the micro-batch's units, {metric: sum over its units}); every
        sum is divided by the units of the whole step on all processes, count(mb) summed and all-reduced.
        Returns {"loss", "grad_norm", metrics...} averaged over the step's units.
        """
        adapt_threads()
        started = self.usage.step_started()
        n = float(all_reduce_sum(torch.tensor(float(sum(count(mb) for mb in micro_batches))), self.dist))
        n = max(n, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)  # on device: no sync per micro-batch
        sums: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            ctx = contextlib.ExitStack()
            if self.dist.enabled and not sync:
                for w in self.wrapped.values():
                    if hasattr(w, "no_sync"):  # DDP; FSDP2 reduces gradients itself
                        ctx.enter_context(w.no_sync())
            with ctx:
                with self.autocast():
                    loss, metrics = loss_fn(mb)
                # DDP averages gradients over processes; scale so the result is the mean over all units.
                (loss * self.dist.world_size / n).backward()
            loss_total += loss.detach().double()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        packed = all_reduce_sum(torch.tensor([float(loss_total)] + [sums[k] for k in keys], dtype=torch.float64),
                                self.dist)
        loss_value = float(packed[0]) / n
        self._check_finite(loss_value)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.opt.grad_clip or float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.usage.step_done(started)
        out = {"loss": loss_value, "grad_norm": float(grad_norm)}
        out.update({k: float(v) / n for k, v in zip(keys, packed[1:].tolist())})
        return out

    def usage_metrics(self) -> dict[str, float | int]:
        """What this run used, the same keys for full and LoRA training (core/usage.py): trainable and total
        parameters, mean seconds per optimizer step, peak memory."""
        return self.usage.metrics(self.modules.values())

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            last = ckpt.latest_checkpoint(self.ckpt_root) if (self.ckpt_root / ckpt.LATEST).exists() else None
            raise TrainingDiverged(
                f"loss became {loss} at step {self.step_count + 1}; stopped without saving. The last good checkpoint "
                f"is {last or 'none (no checkpoint was written yet)'}; lower train.lr or raise warmup_steps."
            )

    # ---- checkpoints and the final model --------------------------------------------------------

    def should_save(self, max_steps: int, position: int | None = None) -> bool:
        """At the end and every checkpoint.every steps (or PPO/GRPO iterations, passed as `position`)."""
        at = self.step_count if position is None else position
        every = self.cfg.checkpoint.every
        return at == max_steps or bool(every and at % every == 0)

    def save(self, loader_state: dict | None = None, extra: dict | None = None) -> None:
        """A checkpoint of every trained module, the optimizer, the data position and RNG. Every process
        calls it (under FSDP gathering the state is a collective); the main process writes."""
        weights = self._gathered_weights()
        optim_state = get_optimizer_state_dict(self._root(), self.optimizer, options=self._full_options())
        if self.dist.is_main:
            def write(tmp: Path) -> None:
                self._write_model_dir(tmp, weights)
                (tmp / MODULES_FILE).write_text(json.dumps({k: module_kind(m) for k, m in self.modules.items()}))
                state = {"step": self.step_count, "optimizer": optim_state, "loader": loader_state,
                         "rng": torch.get_rng_state(), "extra": extra or {}, "usage": self.usage.state_dict(),
                         "recipe": json.dumps(asdict(self.cfg))}
                torch.save(state, tmp / TRAINER_STATE)
            ckpt.save_checkpoint(self.ckpt_root, self.step_count, write, self.cfg.checkpoint.keep)
        barrier(self.dist)

    def publish(self, inputs: dict[str, Any], metrics: dict[str, Any], modules: Sequence[str] = (MAIN,)) -> Path:
        """Write `out_dir/model` (the main module, a Hugging Face directory) with its manifest, atomically:
        a previous `out_dir/model` stays whole until the new one, complete, takes its place. Every
        process calls it; the main process writes."""
        from llmcycle.artifacts import publish_dir, staging_dir
        from llmcycle.artifacts.manifest import write_manifest

        final = self.out_dir / "model"
        weights = self._gathered_weights(modules)
        if not self.dist.is_main:
            return final
        tmp = staging_dir(final)  # complete first; the previous model stays until the swap
        self._write_model_dir(tmp, weights)
        metrics = {**metrics, "steps": self.step_count, "train_seconds": round(time.time() - self.t_start, 2)}
        write_manifest(tmp, stage=self.stage, config=asdict(self.cfg), inputs=inputs, metrics=metrics)
        publish_dir(tmp, final)
        write_card_quietly(final)
        return final

    def _write_model_dir(self, root: Path, weights: dict[str, dict | None]) -> None:
        for name, state in weights.items():
            self.save_module(name, self.modules[name], root if name == MAIN else root / name, state)
        copy_tokenizer(self.tokenizer_dir, root, self.end_of_turn)
        (root / "recipe.yaml").write_text(dump_yaml(self.cfg))

    def _gathered_weights(self, names: Sequence[str] | None = None) -> dict[str, dict | None]:
        """Each module's full weights on the CPU under FSDP (a collective), else None: the module's own."""
        names = list(self.modules) if names is None else names
        if not self.sharded:
            return {name: None for name in names}
        return {name: get_model_state_dict(self.modules[name], options=self._full_options()) for name in names}

    def _root(self) -> nn.Module:
        """The module the optimizer state is keyed by: parameter names, so a resume does not depend on order."""
        return next(iter(self.modules.values())) if len(self.modules) == 1 else nn.ModuleDict(self.modules)

    @staticmethod
    def _full_options() -> StateDictOptions:
        return StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _load_optimizer_state(self, state: dict) -> None:
        if all(isinstance(p, int) for g in state["param_groups"] for p in g["params"]):
            self.optimizer.load_state_dict(state)  # keyed by position: post-training checkpoints of before
        else:
            set_optimizer_state_dict(self._root(), self.optimizer, state, options=StateDictOptions(full_state_dict=True))

    def check_replicas_in_sync(self) -> None:
        """DDP keeps replicas identical by construction; verify it, since a silent divergence wastes a run."""
        if not self.dist.enabled or self.sharded:
            return
        local = torch.stack([p.detach().double().sum() for p in self.parameters()]).cpu()
        gathered = [torch.empty_like(local) for _ in range(self.dist.world_size)]
        torch.distributed.all_gather(gathered, local)
        if any(not torch.equal(gathered[0], g) for g in gathered[1:]):
            raise LlmcycleError("processes finished with different weights: the DDP replicas diverged.")

    def _check_recipe(self, old: dict, keys: dict[str, Sequence[str]]) -> None:
        """A resumed run must be the same run: the recipe keys that shape it unchanged."""
        new = asdict(self.cfg)
        for section, names in keys.items():
            for key in names:
                a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
                if a != b:
                    raise LlmcycleError(
                        f"recipe does not match checkpoint {self.resume_from}: {section}.{key} is {b!r} in the "
                        f"recipe, {a!r} in the checkpoint."
                    )
