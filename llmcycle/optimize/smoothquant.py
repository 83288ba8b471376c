"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights before int8 quantization.

Activations of LLMs have a few channels far larger than the rest, which a per-tensor (or per-token) int8
scale cannot hold without crushing the others; weights have no such outliers. For a linear layer fed by
an RMSNorm, dividing input channel j by s_j (folded into the norm's weight) and multiplying the layer's
weight column j by s_j computes the same function with smoother activations. With
s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha) the difficulty is split between the two (alpha 0.5 is the
paper's default). It applies to every layer a norm feeds: q, k and v after input_layernorm, gate and up
after post_attention_layernorm (one s for the layers sharing a norm).
"""

from __future__ import annotations

import torch
from torch import nn

# (the norm, the linear layers it feeds) within each decoder block
NORM_GROUPS = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
               ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))


@torch.no_grad()
def smooth_(model: nn.Module, absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> dict[str, torch.Tensor]:
    """Migrate outliers in place (same function in exact arithmetic); returns the input absmax of each
    linear layer after smoothing (what a static int8 scale is calibrated from)."""
    out = dict(absmax)
    for i, block in enumerate(model.model.layers):
        for norm_name, linear_names in NORM_GROUPS:
            names = [f"model.layers.{i}.{n}" for n in linear_names]
            x_max = absmax[names[0]].clamp(min=1e-5)
            w_max = torch.stack([block.get_submodule(n).weight.abs().amax(0) for n in linear_names]).amax(0).float()
            s = (x_max.pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)).clamp(min=1e-5)
            norm = block.get_submodule(norm_name)
            norm.weight.div_(s.to(norm.weight.dtype))
            for n, full in zip(linear_names, names):
                layer = block.get_submodule(n)
                layer.weight.mul_(s.to(layer.weight.dtype))
                out[full] = absmax[full] / s
    return out
