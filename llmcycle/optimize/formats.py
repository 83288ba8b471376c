"""One loader for every model directory the engine and `eval` read: plain, compressed-tensors (int8/int4
weights, W8A8) or bitsandbytes NF4, told apart by config.json's `quantization_config.quant_method`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.paths import check_model_dir


def quant_method(model_dir: str | Path) -> str | None:
    """`quantization_config.quant_method` of a model directory (None: not quantized)."""
    config = json.loads((check_model_dir(model_dir) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method")


def load_model_dir(model_dir: str | Path, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> nn.Module:
    """The model of `model_dir` in eval mode, whatever of the formats above it is in."""
    method = quant_method(model_dir)
    if method is None:
        from llmcycle.model.transformer import Transformer

        return Transformer.from_pretrained(model_dir, device=device, dtype=dtype).eval()
    if method == "compressed-tensors":
        from llmcycle.optimize.compressed import load_quantized

        return load_quantized(model_dir, device=device, dtype=dtype)
    if method == "bitsandbytes":
        from llmcycle.optimize.bnb_format import load_nf4

        return load_nf4(model_dir, device=device, dtype=dtype)
    raise LlmcycleError(f"{model_dir}: quant_method {method!r} is not one llmcycle reads "
                        "(compressed-tensors, or bitsandbytes NF4).")
