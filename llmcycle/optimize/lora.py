"""LoRA (and DoRA): low-rank adapters on chosen linear layers, read and written in PEFT's format.

`apply_lora(model, cfg)` freezes every parameter of `model` and replaces each linear layer whose path
matches `cfg.target_modules` by a `LoRALinear`: the same weight and bias (shared, not copied, so a tied
output head stays tied and the state dict keeps its keys) plus `lora_A` (r x in, Kaiming-uniform with
a=sqrt(5), as PEFT and nn.Linear initialise) and `lora_B` (out x r, zeros: the adapted model starts equal
to the base). The output is `base(x) + lora_B(lora_A(dropout(x))) * scaling`, scaling alpha / r, or
alpha / sqrt(r) with rsLoRA: PEFT's forward, term for term. DoRA adds a trained magnitude per output row.

Because llmcycle's module paths are transformers' (`model.layers.0.self_attn.q_proj`), PEFT's tensor names
are ours with a prefix: `base_model.model.<path>.lora_A.weight`. `save_adapter` writes adapter_config.json
+ adapter_model.safetensors that `peft.PeftModel.from_pretrained` loads onto the transformers model;
`load_adapter` reads an adapter PEFT made (LoRA or DoRA, without per-layer rank/alpha patterns or biases;
`modules_to_save` heads load whole) onto our model. `disable_adapters(model)` / `AdaptersOff(model)` run
the base alone (the DPO/RL reference, without a second copy of the weights); `merge_lora(model)` folds the
adapters back into plain nn.Linear layers.

QLoRA: a targeted layer may be a frozen 4-bit `Linear4bit` (`optimize/nf4.py`, quantized first by the
Session under `lora.quantize=nf4`); the `LoRALinear` then keeps it as `base_layer`, calls it for W x + b,
and uses its dequantized weight where W itself is needed (DoRA's norms, `merged()`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.config import LoRAConfig
from llmcycle.optimize.nf4 import Linear4bit

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
# PEFT options this implementation does not reproduce, with the value that means "not used".
_UNSUPPORTED = {"bias": "none", "fan_in_fan_out": False, "layers_to_transform": None,
                "rank_pattern": {}, "alpha_pattern": {}}


class LoRALinear(nn.Linear):
    """An nn.Linear with a low-rank update. Holds the base layer's own weight and bias Parameters (frozen)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 use_dora: bool = False):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        # A 4-bit base (QLoRA) stays a module of its own, called for W x + b; the adapters are fp32.
        self.base_layer = base if isinstance(base, Linear4bit) else None
        if self.base_layer is None:
            self.weight = base.weight  # the same Parameters: tying and keys survive
            kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        else:
            self.weight = None
            kw = dict(device=base.weight_nf4.device, dtype=torch.float32)
        self.bias = base.bias
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_A = nn.Linear(base.in_features, r, bias=False, **kw)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, **kw)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        self.reset_lora_parameters()
        # DoRA (Liu et al. 2024): a trained magnitude per output row, starting at the row norms of W + s B A.
        self.lora_magnitude_vector = nn.Parameter(self._row_norm()) if use_dora else None

    def reset_lora_parameters(self) -> None:
        # PEFT's init_lora_weights=True: A like nn.Linear's default (Kaiming-uniform, a=sqrt(5)), B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def base_weight(self) -> torch.Tensor:
        """The frozen base weight W [out, in] (dequantized from NF4 under QLoRA, fp32)."""
        return self.weight if self.base_layer is None else self.base_layer.dequantize()

    def _row_norm(self) -> torch.Tensor:
        """||W + scaling * B A|| per output row, with no gradient (DoRA treats it as a constant, sec. 4.3)."""
        with torch.no_grad():
            w = self.base_weight()
            return torch.linalg.norm(w + self.delta_weight().to(w.dtype), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias) if self.base_layer is None else self.base_layer(x)
        if self.disabled:
            return out
        xd = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        lora = self.lora_B(self.lora_A(xd)) * self.scaling
        if self.lora_magnitude_vector is None:
            return out + lora
        # DoRA as PEFT computes it: (m / ||W + sBA|| - 1) W x + (m / ||W + sBA||) s B A x, added to W x + b.
        scale = (self.lora_magnitude_vector / self._row_norm()).view(*([1] * (out.dim() - 1)), -1)
        dropped = self.training and isinstance(self.lora_dropout, nn.Dropout)
        base = F.linear(xd, self.base_weight().to(xd.dtype)) if dropped else (out if self.bias is None else out - self.bias)
        return out + (scale - 1) * base + scale * lora

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this layer computes (W + scaling * B @ A; with DoRA, each row
        rescaled to its learned magnitude). Over a 4-bit base, W is the dequantized weight: `llmcycle
        merge` merges into the full-precision base from disk instead."""
        base = self.base_weight()
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device=base.device, dtype=base.dtype)
        with torch.no_grad():
            w = base + self.delta_weight().to(base.dtype)
            if self.lora_magnitude_vector is not None:
                w = w * (self.lora_magnitude_vector / torch.linalg.norm(w, dim=1)).view(-1, 1)
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias)
        return out

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scaling={self.scaling:g}"


def matches(name: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a string is a regex the whole path must match; a list entry matches the path's last
    dotted components (`q_proj` matches `model.layers.0.self_attn.q_proj`)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def has_lora(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, cfg: LoRAConfig, modules_to_save: Sequence[str] = ()) -> nn.Module:
    """Freeze `model` and attach adapters to the linear layers `cfg.target_modules` names (in place;
    returns the model). Initialisation draws from torch's global RNG, as PEFT's does. `modules_to_save`
    (PEFT's name): modules that train fully and are saved whole beside the adapters (a reward model's
    `score` head)."""
    if cfg.r <= 0:
        raise LlmcycleError(f"lora.r must be positive to attach adapters (got {cfg.r}).")
    for p in model.parameters():
        p.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Linear4bit))
             and not isinstance(m, LoRALinear) and "lora_" not in n and "base_layer" not in n
             and matches(n, cfg.target_modules)]
    if not names:
        raise LlmcycleError(f"lora.target_modules {cfg.target_modules} match no linear layer of the model.")
    for name in names:
        base = model.get_submodule(name)
        _set_module(model, name, LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, cfg.use_dora))
    model.lora_modules_to_save = [m for m in modules_to_save if hasattr(model, m)]
    for m in model.lora_modules_to_save:
        model.get_submodule(m).requires_grad_(True)
    return model


def trainable_summary(model: nn.Module) -> str:
    """'trainable parameters: N of M (x%)', counting tied weights once and a 4-bit base's weights (buffers)
    as the frozen parameters they stand for."""
    seen, trained = set(), 0
    total = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear4bit))
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trained += p.numel() if p.requires_grad else 0
    return f"trainable parameters: {trained:,} of {total:,} ({100 * trained / max(total, 1):.3f}%)"


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Run the base model alone inside the block (PEFT's `with model.disable_adapter():`)."""
    layers = [m for _, m in lora_layers(model)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m, b in zip(layers, before, strict=True):
            m.disabled = b


class AdaptersOff(nn.Module):
    """`model`'s base as a module of its own (adapters disabled in every call): a frozen reference that
    shares the weights. `model` is not registered as a submodule, so nothing is trained or saved twice."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.__dict__["base"] = model

    def forward(self, *args, **kwargs):
        with disable_adapters(self.base), torch.no_grad():
            return self.base(*args, **kwargs)


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under PEFT's names (`base_model.model.<path>.lora_A.weight`)."""
    out = {}
    for name, m in lora_layers(model):
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.weight.detach()
        if m.lora_magnitude_vector is not None:  # PEFT's file name for it has no ".weight"
            out[f"{PEFT_PREFIX}{name}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach()
    for name in getattr(model, "lora_modules_to_save", ()):
        for k, v in model.get_submodule(name).state_dict().items():
            out[f"{PEFT_PREFIX}{name}.{k}"] = v.detach()
    return out


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-named adapter tensors into the model's LoRALinear layers; every one must be matched."""
    # PEFT's in-memory names carry the adapter name (".default"); its files do not.
    state = {k.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")
             .replace(".default.weight", ".weight"): v for k, v in state.items()}
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LlmcycleError(f"{source}: adapter tensors do not match the model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}.")
    with torch.no_grad():
        for k, v in expected.items():
            if state[k].shape != v.shape:
                raise LlmcycleError(f"{source}: {k} has shape {tuple(state[k].shape)}, expected {tuple(v.shape)}.")
            v.copy_(state[k])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put plain nn.Linear layers back (in place). A tied
    output head with an adapter is untied: its merged weight no longer equals the embeddings."""
    for name, m in list(lora_layers(model)):
        _set_module(model, name, m.merged())
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            model.config.tie_word_embeddings = False
    return model


# ---- the PEFT directory ---------------------------------------------------------------------------


def adapter_config(cfg: LoRAConfig, base_model: str, task_type: str = "CAUSAL_LM",
                   modules_to_save: Sequence[str] = ()) -> dict:
    """adapter_config.json as PEFT writes it (the keys PEFT's LoraConfig reads). task_type SEQ_CLS: a
    scalar-head model (reward, value), its head in `modules_to_save`."""
    targets = cfg.target_modules
    return {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": str(base_model),
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": targets if isinstance(targets, str) else sorted(targets), "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": True, "inference_mode": True, "revision": None,
        **_UNSUPPORTED, "modules_to_save": list(modules_to_save) or None,
    }


def save_adapter(model: nn.Module, directory: str | Path, base_model: str | Path, cfg: LoRAConfig) -> None:
    """Write the adapters alone: adapter_config.json + adapter_model.safetensors, PEFT's names."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous().cpu() for k, v in lora_state_dict(model).items()}
    save_file(state, d / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    extra = getattr(model, "lora_modules_to_save", [])
    task = "SEQ_CLS" if hasattr(model, "score") else "CAUSAL_LM"
    (d / ADAPTER_CONFIG).write_text(json.dumps(adapter_config(cfg, str(base_model), task, extra), indent=2) + "\n")


def read_adapter_config(directory: str | Path) -> tuple[LoRAConfig, dict]:
    """(our LoRAConfig, the raw json) of a PEFT LoRA adapter directory; refuses what we cannot reproduce."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise LlmcycleError(f"{directory}: not an adapter directory (no {ADAPTER_CONFIG}).")
    raw = json.loads(path.read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise LlmcycleError(f"{path}: peft_type {raw.get('peft_type')!r}; only LORA adapters load.")
    for key, off in _UNSUPPORTED.items():
        if raw.get(key, off) not in (off, None, [], {}) and not (key == "bias" and raw[key] == "none"):
            raise LlmcycleError(f"{path}: {key}={raw[key]!r} is not supported (LoRA only, as {key}={off!r}).")
    targets = raw.get("target_modules") or []
    cfg = LoRAConfig(r=int(raw["r"]), alpha=float(raw.get("lora_alpha", 8)),
                     dropout=float(raw.get("lora_dropout", 0.0)),
                     target_modules=targets if isinstance(targets, str) else list(targets),
                     use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)))
    return cfg, raw


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Attach the adapter saved in `directory` (by llmcycle or by PEFT) to `model` and load its tensors."""
    cfg, raw = read_adapter_config(directory)
    apply_lora(model, cfg, raw.get("modules_to_save") or ())
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.exists():
        raise LlmcycleError(f"{directory}: {ADAPTER_WEIGHTS} is missing.")
    load_lora_state_dict(model, load_file(path), source=str(path))
    for _, m in lora_layers(model):
        for p in (m.lora_A.weight, m.lora_B.weight, m.lora_magnitude_vector):
            if p is not None:
                p.requires_grad_(True)
    return model
