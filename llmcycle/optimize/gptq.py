"""GPTQ (Frantar et al. 2022): weight quantization that corrects each rounding error with the columns not yet
quantized, using second-order statistics of the layer's inputs on calibration text.

For a linear layer with inputs X (calibration tokens x in_features), H = 2 X^T X / n. Columns are quantized
left to right; the error of column i, divided by the i-th diagonal of the (upper Cholesky factor of the)
inverse Hessian, is subtracted from the later columns in proportion to that factor's row i. Done in blocks
of 128 columns (the update to the columns after a block is one matrix product). With groups, a group's
scale is taken from the weights as they are when the group's first column is reached (error corrections
from earlier groups included), as the reference implementation does.

`gptq_quantize_model` runs it block by block through the decoder (llm-compressor's "sequential" mode): the
inputs each decoder block's layers are calibrated on come from the blocks before it *already quantized*,
so later blocks also correct what earlier ones got wrong. The output head stays in full precision. The codes
and scales are the same format as round-to-nearest's (`QuantizedLinear`), so everything downstream
(compressed-tensors directory, kernels) is shared.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize.quantize import QuantizedLinear, set_module

log = logging.getLogger(__name__)

BLOCK = 128  # columns updated together: GPTQ's lazy batch updates


def gptq_weight(w: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int | None,
                damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scale [out, groups]) for weight `w` given H = 2 X^T X / n ([in, in])."""
    qmax = 2 ** (bits - 1) - 1
    W = w.detach().float().clone()
    out_f, in_f = W.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise LlmcycleError(f"gptq: group size {g} does not divide the layer's {in_f} inputs.")
    H = hessian.float().clone()
    dead = torch.diag(H) == 0  # inputs never active in calibration: their weights cannot matter there
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(in_f)  # dampening: H is often near-singular
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale = torch.zeros(out_f, in_f // g)
    Q = torch.zeros(out_f, in_f, dtype=torch.int8)
    for i1 in range(0, in_f, BLOCK):
        i2 = min(i1 + BLOCK, in_f)
        W1, Err = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1)
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # a new group: its scale from the weights as corrected so far
                ahead = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                scale[:, col // g] = ahead.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / qmax
            s = scale[:, col // g]
            q = torch.round(W1[:, i] / s).clamp(-qmax - 1, qmax)
            Q[:, col] = q.to(torch.int8)
            err = (W1[:, i] - q * s) / Hinv[col, col]
            W1[:, i:] -= err[:, None] * Hinv[col, col:i2][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ Hinv[i1:i2, i2:]
    return Q, scale


class _Stop(Exception):
    """Raised by the hook that captures the first block's inputs: nothing after it needs computing."""


def _block_inputs(model: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first decoder block receives for each calibration batch."""
    captured = []

    def hook(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(ids)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _hessians(block: nn.Module, names: list[str], inputs: list[tuple[tuple, dict]]) -> dict[str, torch.Tensor]:
    """H = 2 X^T X / n of each named linear layer of `block` over the calibration inputs."""
    sums = {n: None for n in names}
    counts = dict.fromkeys(names, 0)

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            xtx = x.T @ x
            sums[name] = xtx if sums[name] is None else sums[name] + xtx
            counts[name] += x.shape[0]
        return hook

    handles = [block.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for args, kwargs in inputs:
            block(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return {n: 2 * sums[n] / counts[n] for n in names}


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, batches: list[torch.Tensor], bits: int, group_size: int | None,
                        damp: float = 0.01, act: str | None = None,
                        input_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Quantize every linear layer of every decoder block with GPTQ, block by block (in place). `act` and
    `input_scales` (by full layer name): int8 activations, as `QuantizedLinear` takes them."""
    model.eval()
    inputs = _block_inputs(model, batches)
    for index, block in enumerate(model.model.layers):
        names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        hessians = _hessians(block, names, inputs)
        for name in names:
            layer, full = block.get_submodule(name), f"model.layers.{index}.{name}"
            q, scale = gptq_weight(layer.weight, hessians[name], bits, group_size, damp)
            dev = layer.weight.device
            in_scale = None if act != "static" else input_scales[full].to(dev)
            set_module(block, name, QuantizedLinear(q.to(dev), scale.to(dev), bits, layer.bias, layer.weight.dtype,
                                                    act, in_scale, group_size))
        # the next block is calibrated on what this one, quantized, gives
        inputs = [((block(*args, **kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
        log.info(f"gptq: block {index + 1}/{len(model.model.layers)} quantized ({len(names)} layers)")
    return model
