"""What every post-training command shares, as small pieces each command composes in its own loop.

- `OptimSection`, `CheckpointSection`: the recipe keys common to sft, reward, dpo, ppo and grpo.
- `Session`: processes and device, the trained modules (one model, or a policy and a value model), AdamW
  with warm-up and cosine decay, crash-safe checkpoints with exact resume, metrics.jsonl, and the final
  Hugging Face model directory with its manifest.
- `Session.step`: one optimizer step over micro-batches, with the loss normalised by a count summed over
  the whole step on every process (trained tokens for SFT, pairs for DPO), so gradient accumulation and
  the number of processes do not change the result.
- `EpochLoader`: reshuffled epochs over a fixed list of items, with a state for resume.

The pieces are plain; the loops stay in sft.py, reward.py, dpo.py, ppo.py and grpo.py where they can be read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from llmcycle.artifacts.hashing import sha256_file
from llmcycle.card import write_card_quietly
from llmcycle.config import dump_yaml
from llmcycle.errors import LlmcycleError
from llmcycle.model.heads import ScalarHeadModel
from llmcycle.model.hf_io import add_end_of_turn_to_generation_config
from llmcycle.model.transformer import Transformer
from llmcycle.paths import check_model_dir
from llmcycle.progress import progress
from llmcycle.tokenizer import Tokenizer
from llmcycle.train import checkpoint as ckpt
from llmcycle.train.distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    init_distributed,
    pick_device,
    shutdown,
)
from llmcycle.train.post_config import (
    DataSection,
    OptimSection,
)
from llmcycle.train.pretrain import MetricsLog, TrainingDiverged, autocast_dtype
from llmcycle.train.schedule import lr_at

TRAINER_STATE = "trainer_state.pt"
MODULES_FILE = "modules.json"
MAIN = "policy"  # the module saved at the top of a checkpoint / final directory
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# Which embedded file feeds each kind of dataset (names returned by synthetic.write_embedded_datasets).
EMBEDDED = {"sft": ("sft_train", "sft_eval"), "pref": ("pref_train", "pref_eval"),
            "kto": ("kto_train", "pref_eval"), "prompts": ("prompts_train", "prompts_eval")}


def resolve_data(data: DataSection, out_dir: Path, kind: str) -> tuple[list[Path], list[Path]]:
    """(train paths, eval paths); 'embedded' is generated into out_dir/data, deterministically."""
    files: dict[str, Path] = {}
    if "embedded" in (data.train, data.eval):
        from llmcycle.train.synthetic import write_embedded_datasets

        files = write_embedded_datasets(out_dir / "data", seed=data.embedded_seed, per_task=data.embedded_per_task)

    def pick(value: str | None, which: int) -> list[Path]:
        if value is None:
            return []
        if value == "embedded":
            return [files[EMBEDDED[kind][which]]]
        p = Path(value)
        if not p.exists():
            raise LlmcycleError(f"data: {p} does not exist.")
        return [p]

    return pick(data.train, 0), pick(data.eval, 1)


class EpochLoader:
    """Indices of `n` items in a fresh permutation each epoch; a step takes `per_step` per process.

    The stream runs on across epoch boundaries, so every step is full. The state is (epoch, cursor):
    resuming reproduces the same order.
    """

    def __init__(self, n: int, per_step: int, seed: int, rank: int = 0, world_size: int = 1):
        if n <= 0:
            raise LlmcycleError("no training examples")
        self.n, self.per_step, self.seed, self.rank, self.world = n, per_step, seed, rank, world_size
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_step(self) -> list[int]:
        """This process's share of the next global step (per_step indices)."""
        take = self.per_step * self.world
        out: list[int] = []
        while len(out) < take:
            if self.cursor >= self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._perm = self._permutation(self.epoch)
            k = min(take - len(out), self.n - self.cursor)
            out.extend(self._perm[self.cursor: self.cursor + k])
            self.cursor += k
        return out[self.rank * self.per_step: (self.rank + 1) * self.per_step]

    def steps_per_epoch(self) -> float:
        return self.n / (self.per_step * self.world)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n:
            raise LlmcycleError(f"checkpoint was trained on {state['n']} items, this data has {self.n}.")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)


def total_steps(opt: OptimSection, loader: EpochLoader) -> int:
    if opt.max_steps > 0:
        return opt.max_steps
    return max(1, math.ceil(opt.epochs * loader.steps_per_epoch()))


def chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[i: i + size] for i in range(0, len(items), size)]


def file_inputs(paths: Sequence[str | Path]) -> dict[str, str]:
    """sha256 of each dataset file (every file of a directory): the data lineage in manifests."""
    out = {}
    for p in paths:
        p = Path(p)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            out[str(f)] = sha256_file(f)
    return out


def model_input(path: str | Path) -> dict[str, Any]:
    """How a manifest names an input model: its path and the hash of its weights (and manifest when present)."""
    path = Path(path)
    info: dict[str, Any] = {"path": str(path)}
    for name in ("model.safetensors", "model.safetensors.index.json", "manifest.json"):
        if (path / name).exists():
            info[name] = sha256_file(path / name)
    return info


def load_module(path: Path, kind: str, device: torch.device) -> nn.Module:
    if kind == "scalar_head":
        return ScalarHeadModel.from_pretrained(path, device=device)
    return Transformer.from_pretrained(path, device=device)


def module_kind(module: nn.Module) -> str:
    return "scalar_head" if isinstance(module, ScalarHeadModel) else "causal_lm"


def save_module(module: nn.Module, path: Path) -> None:
    module.save_pretrained(path)


def copy_tokenizer(src: Path, dst: Path) -> None:
    if not (Path(src) / "tokenizer.json").exists():  # never publish a model without its tokenizer
        raise LlmcycleError(f"{src}: tokenizer.json is gone; cannot copy the tokenizer to {dst}.")
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, dst / name)
    add_end_of_turn_to_generation_config(dst)  # a tuned model stops at end of turn in transformers too


class Session:
    """One post-training run: see the module docstring. Use as a context manager (it owns the process group)."""

    def __init__(self, stage: str, cfg: Any, resume: bool, log: Callable[..., None] = print):
        self.stage, self.cfg, self.opt = stage, cfg, cfg.train
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        if self.opt.threads:
            torch.set_num_threads(self.opt.threads)
        torch.set_flush_denormal(True)
        self.device = pick_device(self.opt.device, int(os.environ.get("LOCAL_RANK", "0")))
        self.dist: DistInfo = init_distributed(self.device)
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_from = ckpt.latest_checkpoint(self.ckpt_root) if resume else None
        if resume and self.resume_from is None:
            self.log(f"resume: no checkpoint in {self.ckpt_root}; starting from step 0")
        if not resume and (self.ckpt_root / ckpt.LATEST).exists():
            raise LlmcycleError(
                f"{self.out_dir} already holds checkpoints; pass --resume to continue it, or choose another out_dir."
            )
        self.state: dict | None = None
        if self.resume_from is not None:
            self.state = torch.load(self.resume_from / TRAINER_STATE, map_location="cpu", weights_only=True)
            self._check_recipe(json.loads(self.state["recipe"]))
        self.step_count = int(self.state["step"]) if self.state else 0
        amp = autocast_dtype(self.opt.dtype, self.device)
        self.amp_dtype = amp
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext
        self.metrics = MetricsLog(self.out_dir / "metrics.jsonl", self.dist.is_main,
                                  self.step_count if self.state else None)
        self.modules: dict[str, nn.Module] = {}
        self.wrapped: dict[str, nn.Module] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        self.tokenizer_dir: Path | None = None
        torch.manual_seed(self.opt.seed)
        self.t_start = time.time()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        shutdown(self.dist)

    # ---- models -------------------------------------------------------------------------------

    def load_tokenizer(self, model_dir: str | Path) -> Tokenizer:
        """The tokenizer travels with the model; on resume it is the checkpoint's copy."""
        src = self.resume_from or Path(model_dir)
        check_model_dir(src, hint="Train one first (`llmcycle run` writes runs/default/pretrain/model and "
                                  "runs/default/sft/model; `llmcycle sft` writes runs/sft/model), or set model=DIR.")
        if not (Path(src) / "tokenizer.json").exists():
            raise LlmcycleError(f"{src}: no tokenizer.json next to the model; post-training needs the model's tokenizer.")
        # A private copy: checkpoints (the source on resume) are rotated away during the run, and the
        # starting model may be replaced; checkpoints and the final model copy the tokenizer from here.
        self.tokenizer_dir = self.out_dir / "tokenizer"
        if self.dist.is_main and Path(src).resolve() != self.tokenizer_dir.resolve():
            shutil.rmtree(self.tokenizer_dir, ignore_errors=True)
            copy_tokenizer(Path(src), self.tokenizer_dir)
        barrier(self.dist)
        return Tokenizer.from_pretrained(self.tokenizer_dir)

    def trained_modules(self, build: Callable[[], dict[str, nn.Module]]) -> dict[str, nn.Module]:
        """The modules this run trains: build() on a fresh start, the checkpoint's weights on resume.
        `policy` is the main model; others (a PPO value model) are saved in sub-directories."""
        if self.resume_from is not None:
            kinds = json.loads((self.resume_from / MODULES_FILE).read_text())
            modules = {name: load_module(self.resume_from if name == MAIN else self.resume_from / name, kind,
                                         self.device) for name, kind in kinds.items()}
        else:
            modules = {k: m.to(self.device) for k, m in build().items()}
        self.modules = modules
        for name, m in modules.items():
            m.train()
            self.wrapped[name] = (DistributedDataParallel(m, device_ids=[self.device.index]
                                                          if self.device.type == "cuda" else None)
                                  if self.dist.enabled else m)
        self.optimizer = self._make_optimizer()
        if self.state is not None:
            self.optimizer.load_state_dict(self.state["optimizer"])
            torch.set_rng_state(self.state["rng"])
            self.log(f"resume: continuing {self.resume_from} at step {self.step_count}")
        return modules

    def _make_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for m in self.modules.values():
            for name, p in m.named_parameters():
                if p.requires_grad:
                    (decay if p.dim() >= 2 and "embed_tokens" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        kwargs = dict(lr=self.opt.lr, betas=(self.opt.beta1, self.opt.beta2), eps=1e-8)
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, **kwargs)

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

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
        n = float(all_reduce_sum(torch.tensor(float(sum(count(mb) for mb in micro_batches))), self.dist))
        n = max(n, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64)
        sums: dict[str, float] = {}
        for i, mb in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1
            ctx = contextlib.ExitStack()
            if self.dist.enabled and not sync:
                for w in self.wrapped.values():
                    ctx.enter_context(w.no_sync())
            with ctx:
                with self.autocast():
                    loss, metrics = loss_fn(mb)
                # DDP averages gradients over processes; scale so the result is the mean over all units.
                (loss * self.dist.world_size / n).backward()
            loss_total += float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        keys = sorted(sums)
        packed = all_reduce_sum(torch.tensor([float(loss_total)] + [sums[k] for k in keys], dtype=torch.float64),
                                self.dist)
        loss_value = float(packed[0]) / n
        if not math.isfinite(loss_value):
            raise TrainingDiverged(
                f"loss became {loss_value} at step {self.step_count + 1}; stopped without saving. The last good "
                f"checkpoint is in {self.ckpt_root} (if any); lower train.lr."
            )
        grad_norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.opt.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        out = {"loss": loss_value, "grad_norm": float(grad_norm)}
        out.update({k: float(v) / n for k, v in zip(keys, packed[1:].tolist())})
        return out

    # ---- checkpoints and the final model --------------------------------------------------------

    def save(self, loader_state: dict | None = None, extra: dict | None = None) -> None:
        """A checkpoint of every trained module, the optimizer, the data position and RNG (main process writes)."""
        if self.dist.is_main:
            def write(tmp: Path) -> None:
                self._write_modules(tmp)
                state = {"step": self.step_count, "optimizer": self.optimizer.state_dict(), "loader": loader_state,
                         "rng": torch.get_rng_state(), "extra": extra or {},
                         "recipe": json.dumps(asdict(self.cfg))}
                torch.save(state, tmp / TRAINER_STATE)
            ckpt.save_checkpoint(self.ckpt_root, self.step_count, write, self.cfg.checkpoint.keep)
        barrier(self.dist)

    def _write_modules(self, root: Path) -> None:
        for name, m in self.modules.items():
            save_module(m, root if name == MAIN else root / name)
        (root / MODULES_FILE).write_text(json.dumps({k: module_kind(m) for k, m in self.modules.items()}))
        copy_tokenizer(self.tokenizer_dir, root)
        (root / "recipe.yaml").write_text(dump_yaml(self.cfg))

    def should_save(self, max_steps: int, position: int | None = None) -> bool:
        """At the end and every checkpoint.every steps (or PPO/GRPO iterations, passed as `position`)."""
        at = self.step_count if position is None else position
        every = self.cfg.checkpoint.every
        return at == max_steps or bool(every and at % every == 0)

    def publish(self, inputs: dict[str, Any], metrics: dict[str, Any], modules: Sequence[str] = (MAIN,)) -> Path:
        """Write `out_dir/model` (the main module, a Hugging Face directory) with its manifest, atomically:
        a previous `out_dir/model` stays whole until the new one, complete, takes its place."""
        from llmcycle.artifacts import publish_dir, staging_dir
        from llmcycle.artifacts.manifest import write_manifest

        final = self.out_dir / "model"
        if not self.dist.is_main:
            return final
        tmp = staging_dir(final)  # complete first; the previous model stays until the swap
        for name in modules:
            save_module(self.modules[name], tmp if name == MAIN else tmp / name)
        copy_tokenizer(self.tokenizer_dir, tmp)
        (tmp / "recipe.yaml").write_text(dump_yaml(self.cfg))
        metrics = {**metrics, "steps": self.step_count, "train_seconds": round(time.time() - self.t_start, 2)}
        write_manifest(tmp, stage=self.stage, config=asdict(self.cfg), inputs=inputs, metrics=metrics)
        publish_dir(tmp, final)
        write_card_quietly(final)
        return final

    def _check_recipe(self, old: dict) -> None:
        """A resumed run must be the same run: same data, seed and batch shape."""
        new = asdict(self.cfg)
        for section, keys in (("train", ("seed", "batch_size", "grad_accum")), ("data", ("train", "max_length"))):
            for key in keys:
                a, b = old.get(section, {}).get(key), new.get(section, {}).get(key)
                if a != b:
                    raise LlmcycleError(
                        f"recipe does not match checkpoint {self.resume_from}: {section}.{key} is {b!r} in the "
                        f"recipe, {a!r} in the checkpoint."
                    )


def log_step(session: Session, bar, record: dict) -> None:
    session.metrics.write(record)
    bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss",) if k in record}, refresh=False)
    bar.update(1)


def first_evaluation(s: Session, evaluate: Callable[[], dict], describe: Callable[[int, dict], str]) -> dict:
    """Held-out metrics of the starting model (read back from the checkpoint when resuming)."""
    if s.state is not None:
        return s.state["extra"].get("first_eval", {})
    m = evaluate()
    if m:
        s.metrics.write({"step": 0, "eval": True, **m})
        s.log(describe(0, m))
    return m


def evaluate_and_checkpoint(s: Session, bar, position: int, max_steps: int, eval_every: int,
                            evaluate: Callable[[], dict], describe: Callable[[int, dict], str], loader_state: dict,
                            extra_state: dict, eval_record: dict | None = None) -> dict:
    """After step (or iteration) `position`: held-out metrics every `eval_every` and at the end, then a
    checkpoint when one is due. Returns the metrics when it evaluated, else {}."""
    metrics: dict = {}
    if eval_every and (position % eval_every == 0 or position == max_steps):
        metrics = evaluate()
        if metrics:
            s.metrics.write({"step": s.step_count, **(eval_record or {}), "eval": True, **metrics})
            bar.write(describe(position, metrics))
    if s.should_save(max_steps, position):
        s.save(loader_state, extra_state)
    return metrics


def train_loop(s: Session, desc: str, max_steps: int, loader: EpochLoader, micro_batches: Callable[[list[int]], list],
               count: Callable[[Any], float], loss_fn: Callable[[Any], tuple[torch.Tensor, dict]],
               evaluate: Callable[[], dict], eval_every: int, describe: Callable[[int, dict], str],
               extra_state: dict) -> dict:
    """The offline loop: step, log, evaluate every `eval_every` steps and at the end, checkpoint. Returns the
    last held-out metrics."""
    last_eval: dict = {}
    bar = progress(total=max_steps, initial=s.step_count, desc=desc, unit="step", disable=not s.dist.is_main)
    while s.step_count < max_steps:
        lr = s.set_lr(max_steps)
        t0 = time.perf_counter()
        record = s.step(micro_batches(loader.next_step()), count, loss_fn)
        record.update(step=s.step_count, lr=lr, epoch=round(loader.epoch + loader.cursor / loader.n, 4),
                      step_seconds=round(time.perf_counter() - t0, 5))
        log_step(s, bar, record)
        last_eval = evaluate_and_checkpoint(s, bar, s.step_count, max_steps, eval_every, evaluate, describe,
                                            loader.state_dict(), extra_state) or last_eval
    bar.close()
    return last_eval or evaluate()  # resumed at the end already: still report where the model stands
