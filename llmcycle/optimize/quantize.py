"""Weight-only integer quantization: int8 per output channel, int4 group-wise, round-to-nearest.

`quantize_weight(w, bits, group_size)` gives symmetric integer codes `q` (int8 storage, in
[-2^(b-1), 2^(b-1) - 1]) and one scale per output row (group_size None) or per `group_size` inputs of a
row, so that `w ~ q * scale`. `QuantizedLinear` holds (q, scale) in place of a linear layer's weight and
computes `x @ (q * scale)^T + b` with the integer kernels PyTorch has on this CPU:

- int8 per channel: `aten._weight_int8pack_mm` (int8 weights, bf16 activations);
- int4 groups: `aten._weight_int4pack_mm_for_cpu` (weights repacked once at load by
  `_convert_weight_to_int4pack_for_cpu`, scales and zero points as [groups, out, 2]).

With int8 activations too (W8A8, `act`): each row of x is quantized at run time with its own scale
(`dynamic`, per token) or with one scale calibrated beforehand (`static`, per tensor, `input_scale`), and
`torch._int_mm` multiplies int8 by int8 into int32 (VNNI on this CPU), rescaled by both scales.

Int8 products of a few rows (batch-1 decode) go instead to llmcycle's own GEMV (`optimize/gemv.c`, via
`gemv.py`), which streams the weights at memory speed where torch's kernels are compute-bound at one row:
W8A8 with the same integers as `_int_mm`, weight-only int8 with 15-bit activations per block of 128.

The weight-only kernels run with bf16 activations: with fp32 activations these kernels are several times slower than an
fp32 matmul on the machines measured (docs/benchmarks.md), with bf16 several times faster. Where a
kernel is missing (another device, an int4 shape it refuses) the layer dequantizes then multiplies,
after one warning: slower, never different numbers.

The model directory these layers come from and go to is compressed-tensors' `pack-quantized` format
(`optimize/compressed.py`), the one vLLM and llm-compressor read.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from llmcycle.errors import LlmcycleError
from llmcycle.optimize import gemv

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the activations' dtype inside the integer kernels (see the docstring)
_warned: set[str] = set()


def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric round-to-nearest: (q int8 [out, in], scale fp32 [out, groups]); groups = 1 without
    group_size. The scale maps a row's (group's) largest magnitude to the largest positive code."""
    if bits not in (4, 8):
        raise LlmcycleError(f"quantize: {bits}-bit weights are not supported (4 or 8).")
    out_f, in_f = w.shape
    g = in_f if group_size is None else group_size
    if in_f % g:
        raise LlmcycleError(f"quantize: group size {g} does not divide the layer's {in_f} inputs.")
    qmax = 2 ** (bits - 1) - 1
    groups = w.detach().float().reshape(out_f, in_f // g, g)
    scale = groups.abs().amax(-1).clamp(min=torch.finfo(torch.float32).tiny) / qmax
    q = torch.round(groups / scale[..., None]).clamp(-qmax - 1, qmax).to(torch.int8)
    return q.reshape(out_f, in_f), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q * scale, each scale over its group of a row: [out, in] in `dtype`."""
    out_f, in_f = q.shape
    groups = scale.shape[1]
    w = q.float().reshape(out_f, groups, in_f // groups) * scale.float()[..., None]
    return w.reshape(out_f, in_f).to(dtype)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


ACTIVATIONS = (None, "dynamic", "static")


def quantize_rows(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 codes of x / scale (scale [M, 1] per row, or a scalar), rounded to nearest, saturated."""
    return torch.round(x / scale).clamp(-128, 127).to(torch.int8)


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is (q, scale): int8 per channel or int4 in groups of `group_size`; with
    `act`, int8 activations too (per token at run time, or with the calibrated `input_scale`)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int, bias: torch.Tensor | None = None,
                 dtype: torch.dtype = torch.float32, act: str | None = None,
                 input_scale: torch.Tensor | None = None, group_size: int | None = None) -> None:
        super().__init__()
        if act not in ACTIVATIONS or (act and (bits != 8 or group_size is not None)):
            raise LlmcycleError(f"quantize: int8 activations need int8 per-channel weights (got {bits} bits, act={act}).")
        if (act == "static") != (input_scale is not None):
            raise LlmcycleError("quantize: static activations need an input scale, and only they have one.")
        self.act = act
        if input_scale is not None:
            self.register_buffer("input_scale", input_scale.float().reshape(1))
        else:
            self.input_scale = None
        self.out_features, self.in_features = q.shape
        self.bits = bits
        # Said, not inferred: a layer whose inputs make one group of `group_size` has one scale per row, as
        # per-channel int8 has, yet belongs to the model's group-wise scheme (and int4's kernel needs the size).
        if group_size is not None and self.in_features != group_size * scale.shape[1]:
            raise LlmcycleError(f"quantize: {scale.shape[1]} scale(s) per row do not make groups of {group_size} "
                                f"over {self.in_features} inputs.")
        if group_size is None and scale.shape[1] != 1:
            raise LlmcycleError("quantize: scales per group need the group size.")
        self.group_size = group_size
        self.dtype = dtype  # the model's dtype: what the layer returns
        self.register_buffer("q", q.to(torch.int8))
        self.register_buffer("scale", scale.float())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)
        self._kernel, self._kernel_device = "", None  # chosen at the first forward on a device

    @classmethod
    def from_linear(cls, layer: nn.Linear, bits: int, group_size: int | None, act: str | None = None,
                    input_scale: torch.Tensor | None = None) -> QuantizedLinear:
        q, scale = quantize_weight(layer.weight, bits, group_size)
        dev = layer.weight.device
        return cls(q.to(dev), scale.to(dev), bits, layer.bias, layer.weight.dtype, act,
                   None if input_scale is None else input_scale.to(dev), group_size)

    def _prepare_kernel(self) -> str:
        """Which product `forward` runs, with its operands laid out once. The layouts replace the codes
        rather than copy them: int4's repacked weight is all that stays (`codes()` recovers q from it).
        Int8 layers (weight-only and W8A8) also take gemv.c's kernels when a product has few rows."""
        cpu = self.scale.device.type == "cpu"
        if self.group_size is None:  # one scale per output row: the GEMV's operand, laid out once
            self._scale_rows = self.scale[:, 0].contiguous()
        if self.act:
            if cpu and hasattr(torch, "_int_mm"):
                self._wsum = self.q.sum(1, dtype=torch.int32)  # the one-row GEMV's offset term (gemv.c)
                return "int_mm"
            _warn_once("w8a8", "no int8 x int8 kernel here; multiplying the dequantized int8 values instead.")
            return "dequantize"
        if not cpu:
            return "dequantize"
        if self.bits == 8 and self.group_size is None and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            # torch's int8 kernel reads past the row when in_features is not a multiple of 16: wrong numbers
            # or a crash (tests/test_gemv.py). Such layers take the GEMV for few rows, the fallback for more.
            if self.in_features % 16 == 0:
                self._scale_k = self.scale[:, 0].to(KERNEL_DTYPE)
                return "int8pack"
            _warn_once("int8:k", f"torch's int8 kernel mishandles {self.in_features} inputs (not a multiple of "
                       "16); dequantizing for products of many rows instead (slower, same numbers).")
            return "dequantize"
        if self.bits == 4 and self.group_size in (32, 64, 128, 256) and hasattr(torch.ops.aten,
                                                                              "_weight_int4pack_mm_for_cpu"):
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(self.codes().to(torch.int32) + 8, 1)
            except RuntimeError as e:  # a shape the kernel refuses (out_features not a multiple of 16, ...)
                _warn_once(f"int4:{e}", f"int4 kernel unavailable ({e}); dequantizing instead (slower).")
                return "dequantize"
            # torch's int4 kernel computes (u - 8) * scale + zero with u = q + 8: zero 0 is symmetric.
            sz = torch.stack([self.scale.T, torch.zeros_like(self.scale.T)], dim=-1)
            self._packed, self._scales_zeros = packed, sz.to(KERNEL_DTYPE).contiguous()
            self.q = None  # half a byte per weight from here on, not one and a half
            return "int4pack"
        _warn_once(f"{self.bits}:{self.group_size}", f"no integer kernel for {self.bits}-bit weights with group size "
                   f"{self.group_size} here; dequantizing instead (slower, same numbers).")
        return "dequantize"

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The integer codes q [out, in] (int8), recovered from the int4 kernel's layout when only it is kept:
        the kernel applied to the identity with scale 1 and zero 0 returns (u - 8) = q, exactly."""
        if self.q is not None:
            return self.q
        ones = torch.stack([torch.ones_like(self.scale.T), torch.zeros_like(self.scale.T)], dim=-1).contiguous()
        rows = []
        for start in range(0, self.in_features, 1024):  # identity in slices: memory stays bounded
            eye = torch.eye(self.in_features, dtype=torch.float32)[start:start + 1024]
            rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self._packed, self.group_size, ones))
        return torch.cat(rows).T.round().to(torch.int8).to(self.scale.device)

    def dequantize(self) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel_device != self.scale.device:
            self._kernel, self._kernel_device = self._prepare_kernel(), self.scale.device
        if self.act:
            return self._forward_w8a8(x)
        x2 = x.reshape(-1, self.in_features)
        if self.bits == 8 and self.group_size is None and gemv.usable(x2, self.q, gemv.W8A16_MAX_ROWS):
            y = gemv.w8a16(x2, self.q, self._scale_rows)  # batch-1 decode: memory-bound
        elif self._kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2.to(KERNEL_DTYPE), self.q, self._scale_k)
        elif self._kernel == "int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self._packed, self.group_size,
                                                           self._scales_zeros)
        else:
            return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self._finish(y, x)

    def _forward_w8a8(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self._kernel == "int_mm" and gemv.usable(x2, self.q, gemv.W8A8_MAX_ROWS):  # few rows: same integers
            return self._finish(gemv.w8a8(x2, self.q, self._scale_rows, self._wsum, self.input_scale), x)
        if self.act == "dynamic":
            x_scale = x2.abs().amax(1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny) / 127
        else:
            x_scale = self.input_scale
        xq = quantize_rows(x2, x_scale)
        if self._kernel == "int_mm":
            acc = torch._int_mm(xq, self.q.T).float()  # [M, K] by [K, N]: a transposed view is as fast
        else:  # the same integers, multiplied in float (exact below 2^24 per sum)
            acc = xq.float() @ self.codes().float().T
        return self._finish(acc * x_scale * self.scale[:, 0], x)

    def _finish(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """y [rows, out] back to x's dtype and shape, plus the bias."""
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        g = "per channel" if self.group_size is None else f"group {self.group_size}"
        a = f", int8 activations ({self.act})" if self.act else ""
        return f"{self.in_features}, {self.out_features}, int{self.bits} {g}{a}, kernel={self._kernel}"


def linear_layers(model: nn.Module, ignore: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Names of the nn.Linear layers quantization replaces (the output head is left alone by default, as
    llm-compressor's recipes do: it is the layer most sensitive to rounding)."""
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] not in ignore and n not in ignore]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None,
                   ignore: tuple[str, ...] = ("lm_head",), act: str | None = None,
                   input_scales: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Replace every linear layer (but `ignore`d ones) by a round-to-nearest QuantizedLinear, in place.
    `act`: int8 activations too; "static" takes each layer's scale from `input_scales` (by layer name)."""
    for name in linear_layers(model, ignore):
        scale = None if act != "static" else (input_scales or {}).get(name)
        if act == "static" and scale is None:
            raise LlmcycleError(f"quantize: no calibrated input scale for {name}.")
        set_module(model, name, QuantizedLinear.from_linear(model.get_submodule(name), bits, group_size, act, scale))
    return model
