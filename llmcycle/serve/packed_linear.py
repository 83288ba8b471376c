"""Linear layers whose weights oneDNN lays out once for CPU inference (fp32, and bf16 where the CPU has it).

A decode step multiplies a few token rows (one per running request) by every weight matrix. MKL's sgemm,
which `F.linear` calls, runs that shape far below its peak: on the 2-core AVX2 EPYC a [15, 768] x [768, 2048]
product took 1.70 ms with `F.linear` and 0.95 ms with oneDNN on a weight reordered ahead of time into its
blocked layout, and the [15, 768] x [768, 8192] LM head 10.1 ms against 3.6 ms. On the "base" model that made
a 16-request decode step 1.4x faster, a 4-request one 1.9x and a 128-token prefill 1.2x, with batch-1
decode unchanged (benchmarks/mixed_step.py and benchmarks/serve.py; docs/benchmarks.md). PyTorch's own
`torch.compile` freezing pass uses the same two oneDNN ops for CPU linear layers.

`pack_linears(model)` swaps every plain `nn.Linear` of a CPU model loaded for inference (fp32, or bf16 on
a CPU with native bf16: `can_pack`) for a `PackedLinear`. The reordered weight replaces the original (no
second copy), so `.weight` becomes a dense copy made on request, for the rare readers (LoRA checks, DoRA's
norms); a tied LM head packs its own copy and leaves the embedding table as it was. Only models loaded from
disk for inference are packed: a live policy handed to the engine for rollouts keeps training its own
parameters. Quantized layers are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

# The row count oneDNN tunes the layout for. 16 (a typical decode batch) served 1 to 128 rows well on the AVX2
# machine; 1 made 4- and 16-row steps ~1.3x slower (docs/benchmarks.md).
BATCH_HINT = 16


class PackedLinear(nn.Module):
    """`y = x W^T + b` through oneDNN with W reordered once. Inference only: no gradient flows through it."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), BATCH_HINT)
        self.bias = linear.bias

    @property
    def weight(self) -> torch.Tensor:
        """A dense copy of W [out, in] (for readers that check shapes or compute norms, not for the forward)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(model: nn.Module) -> bool:
    """True for a model on the CPU when this torch has oneDNN, in fp32, or in bf16 where the CPU computes
    bf16 natively (oneDNN's check: AVX-512 BW/VL/DQ, AVX-NE-CONVERT or AMX). There a packed bf16 layer ran
    ~2x a packed fp32 one at 1 to 128 rows (the [768, 8192] LM head at one row: 0.21 ms against 0.53 ms;
    AVX512-BF16 EPYC, docs/benchmarks.md); elsewhere bf16 stays on `F.linear`."""
    p = next(model.parameters())
    if p.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return p.dtype == torch.float32 or (p.dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def pack_linears(model: nn.Module) -> int:
    """Replace every plain `nn.Linear` of `model` by a `PackedLinear` (when `can_pack`); returns how many."""
    if not can_pack(model):
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped


def _concat(linears: list[nn.Module]) -> nn.Linear:
    """One nn.Linear whose output is the given layers' outputs side by side."""
    first = linears[0]
    fused = nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                      device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    return fused


def fuse_projections(model: nn.Module) -> int:
    """Replace each attention's q/k/v and each MLP's gate/up by one linear layer (`qkv_proj`, `gate_up_proj`)
    and drop the originals; returns how many groups were fused. Applies where `can_pack` holds (measured in
    fp32 on the AVX2 EPYC: one [1, 256] x [256, 512] product took 116 us where q, k and v took 235 us; gate/up
    125 against 183 us; 4-8% of a batch-1 decode step). Only for models that take no LoRA adapters: those attach to q_proj
    and friends by name. Call before `pack_linears`."""
    if not can_pack(model):
        return 0
    fused = 0
    for module in list(model.modules()):
        for names, target in ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj")):
            parts = [getattr(module, n, None) for n in names]
            if hasattr(module, target) and all(type(p) is nn.Linear for p in parts) \
                    and len({p.bias is None for p in parts}) == 1:
                setattr(module, target, _concat(parts))
                for n in names:
                    delattr(module, n)
                fused += 1
    return fused
