"""Serving LoRA adapters by name over one copy of the base weights (vLLM's `--lora-modules name=path`).

`LoRAAdapters(model)` owns the adapters one engine serves. `add(name, directory)` reads a PEFT adapter
directory (written by llmcycle or by PEFT) and gives it an integer id (0 is the base model alone). Each
targeted linear layer of the model becomes a `MultiLoRALinear`: the base layer, unchanged and shared, plus
every adapter's (A, B, scaling) for that layer. Before each forward the model runner calls
`set_batch(row_ids, num_new, num_logits)` with one adapter id per row of the batch; every layer then adds, for
each adapter present in the batch, `B_a(A_a(x[tokens of a])) * scaling_a` to those rows' tokens only. So requests for
different adapters (and for the base) run in one step, and the base's weights exist once however many
adapters are loaded: each adapter costs its A and B matrices (r x (in + out) per layer).

DoRA adapters are served too: at inference their per-row rescaling `m / ||W + s B A||` is a constant,
computed once at load. What is refused, with the reason: `modules_to_save` (whole replaced modules per
adapter), embedding adapters, and scalar-head (SEQ_CLS) adapters, which are not for generation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.lora import ADAPTER_WEIGHTS, PEFT_PREFIX, read_adapter_config

log = logging.getLogger(__name__)

BASE_ID = 0  # "no adapter": the row runs the base model alone


@dataclass
class _Adapter:
    """One adapter's tensors for one layer, in the model's dtype."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scaling: float
    dora_scale: torch.Tensor | None  # [out]: m / ||W + s B A||, DoRA only


class _BatchRows:
    """Which tokens of the current forward use which adapter, for the packed 3-D activations ([1, N, in]: every
    row's new tokens side by side, kv_pool.PagedBatch) and for the 2-D input of the LM head ([N_logits, in]:
    the selected logit positions, row-major)."""

    def __init__(self) -> None:
        self.by_token: list[tuple[int, torch.Tensor | None]] = []
        self.by_position: list[tuple[int, torch.Tensor | None]] = []

    def set(self, row_ids: list[int], num_new: list[int], num_logits: list[int], device: torch.device) -> None:
        tokens = [i for i, n in zip(row_ids, num_new, strict=True) for _ in range(n)]
        positions = [i for i, n in zip(row_ids, num_logits, strict=True) for _ in range(n)]
        self.by_token = _groups(tokens, device)
        self.by_position = _groups(positions, device)

    def groups(self, x: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
        return self.by_token if x.dim() == 3 else self.by_position


def _groups(ids: list[int], device: torch.device) -> list[tuple[int, torch.Tensor | None]]:
    """[(adapter id, indices of its rows)] for the adapters present; indices None when one adapter has every
    row (no gather needed: the common case of a batch that all asks for the same adapter)."""
    present = sorted(set(ids) - {BASE_ID})
    if len(present) == 1 and BASE_ID not in ids:
        return [(present[0], None)]
    return [(a, torch.tensor([j for j, i in enumerate(ids) if i == a], device=device)) for a in present]


class MultiLoRALinear(nn.Module):
    """A linear layer (kept as `base_layer`, shared) plus the low-rank updates of any number of adapters,
    each applied only to the batch rows that asked for it."""

    def __init__(self, base: nn.Module, rows: _BatchRows) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self._rows = rows
        self.adapters: dict[int, _Adapter] = {}

    @property
    def weight(self) -> torch.Tensor:  # the base's: a tied LM head still reads the embeddings through it
        return self.base_layer.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        if not self.adapters:
            return out
        groups = self._rows.groups(x)
        shape = out.shape
        x, out = x.reshape(-1, x.shape[-1]), out.reshape(-1, shape[-1])  # token rows
        for adapter_id, idx in groups:
            a = self.adapters.get(adapter_id)
            if a is None:  # this adapter leaves this layer alone
                continue
            xs = x if idx is None else x.index_select(0, idx)
            delta = F.linear(F.linear(xs, a.A), a.B) * a.scaling
            if a.dora_scale is not None:
                base = out if idx is None else out.index_select(0, idx)
                if self.base_layer.bias is not None:
                    base = base - self.base_layer.bias
                delta = (a.dora_scale - 1) * base + a.dora_scale * delta
            out = out + delta if idx is None else out.index_add(0, idx, delta)
        return out.view(shape)


class LoRAAdapters:
    """The adapters served over `model`, by name. Not thread-safe: call from the engine's thread."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ids: dict[str, int] = {}
        self.paths: dict[str, str] = {}
        self._rows = _BatchRows()

    def __contains__(self, name: str) -> bool:
        return name in self.ids

    def id_of(self, name: str | None) -> int:
        """The adapter id of `name` (BASE_ID for None); LlmcycleError naming the loaded ones otherwise."""
        if name is None:
            return BASE_ID
        if name not in self.ids:
            loaded = ", ".join(self.ids) or "none"
            raise LlmcycleError(f"no LoRA adapter named {name!r} is loaded (loaded: {loaded}).")
        return self.ids[name]

    def add(self, name: str, directory: str | Path) -> int:
        """Load the PEFT adapter in `directory` under `name`; returns its id. Checks every tensor against
        the model first, so a bad adapter changes nothing."""
        if name in self.ids:
            raise LlmcycleError(f"a LoRA adapter named {name!r} is already loaded.")
        layers = self._read(directory)
        adapter_id = max(self.ids.values(), default=BASE_ID) + 1
        for path, adapter in layers.items():
            layer = self.model.get_submodule(path)
            if not isinstance(layer, MultiLoRALinear):
                layer = MultiLoRALinear(layer, self._rows)
                parent, _, child = path.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
            layer.adapters[adapter_id] = adapter
        self.ids[name], self.paths[name] = adapter_id, str(directory)
        log.debug(f"LoRA adapter {name!r} (id {adapter_id}) from {directory}: {len(layers)} layers")
        return adapter_id

    def set_batch(self, row_ids: list[int], num_new: list[int], num_logits: list[int], device: torch.device
                  ) -> None:
        """Record each row's adapter for the next forward (`num_new[b]`: row b's packed tokens,
        `num_logits[b]`: its logit positions)."""
        self._rows.set(row_ids, num_new, num_logits, device)

    def _read(self, directory: str | Path) -> dict[str, _Adapter]:
        """{module path: its adapter tensors}, checked against the model, cast to its dtype."""
        cfg, raw = read_adapter_config(directory)
        if raw.get("modules_to_save"):
            raise LlmcycleError(f"{directory}: adapters with modules_to_save {raw['modules_to_save']} replace "
                                "whole modules; the engine serves LoRA matrices only (merge it instead).")
        if raw.get("task_type", "CAUSAL_LM") not in ("CAUSAL_LM", None):
            raise LlmcycleError(f"{directory}: task_type {raw['task_type']!r} is not a generation adapter.")
        weights = Path(directory) / ADAPTER_WEIGHTS
        if not weights.exists():
            raise LlmcycleError(f"{directory}: {ADAPTER_WEIGHTS} is missing.")
        state = load_file(weights)
        scaling = cfg.alpha / cfg.r ** 0.5 if cfg.use_rslora else cfg.alpha / cfg.r
        out: dict[str, _Adapter] = {}
        for key in state:
            if not key.startswith(PEFT_PREFIX) or not key.endswith(".lora_A.weight"):
                if key.endswith((".lora_B.weight", ".lora_magnitude_vector")):
                    continue
                raise LlmcycleError(f"{weights}: tensor {key!r} is not a LoRA matrix of a linear layer.")
            path = key[len(PEFT_PREFIX):-len(".lora_A.weight")]
            out[path] = self._layer_adapter(path, state, scaling, str(weights))
        if not out:
            raise LlmcycleError(f"{weights}: no LoRA matrices in it.")
        return out

    def _layer_adapter(self, path: str, state: dict[str, torch.Tensor], scaling: float, source: str) -> _Adapter:
        try:
            layer = self.model.get_submodule(path)
        except AttributeError:
            raise LlmcycleError(f"{source}: the model has no module {path!r}.") from None
        layer = layer.base_layer if isinstance(layer, MultiLoRALinear) else layer
        if not hasattr(layer, "in_features"):
            raise LlmcycleError(f"{source}: {path!r} is not a linear layer.")
        A, B = state[f"{PEFT_PREFIX}{path}.lora_A.weight"], state.get(f"{PEFT_PREFIX}{path}.lora_B.weight")
        if B is None or A.dim() != 2 or B.shape != (layer.out_features, A.shape[0]) or A.shape[1] != layer.in_features:
            raise LlmcycleError(f"{source}: the adapter of {path!r} does not fit the layer "
                                f"({layer.in_features} -> {layer.out_features}).")
        w = layer.weight
        A, B = A.to(w.device, torch.float32), B.to(w.device, torch.float32)
        magnitude = state.get(f"{PEFT_PREFIX}{path}.lora_magnitude_vector")
        dora_scale = None
        if magnitude is not None:  # the row norms of the adapted weight, in fp32 as DoRA computes them
            adapted = w.detach().float() + (B @ A) * scaling
            dora_scale = (magnitude.to(w.device).float() / torch.linalg.norm(adapted, dim=1)).to(w.dtype)
        return _Adapter(A.to(w.dtype), B.to(w.dtype), scaling, dora_scale)
