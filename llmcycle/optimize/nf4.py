"""NF4: the 4-bit NormalFloat storage of QLoRA's frozen base, in bitsandbytes' format, written in torch.

`quantize_nf4(w)` cuts the flattened weight into blocks of `blocksize` values, scales each block by its
absolute maximum and stores the nearest of the 16 NF4 codebook values as a 4-bit index, two per byte
(the first value of each pair in the high nibble). With `double_quant` the fp32 block maxima are stored
as 8-bit codes of bitsandbytes' dynamic map, minus their mean, in blocks of 256 with one fp32 scale
each. `dequantize_nf4(state)` inverts it. The layout, the rounding and the arithmetic are those of
bitsandbytes (`bnb.functional.quantize_4bit(..., quant_type="nf4", compress_statistics=...)`, which is
the oracle of tests/test_nf4.py): the packed bytes, the block maxima and the dequantized tensor are equal
to the bit. One exception: bitsandbytes' CPU kernel for the 8-bit codes of double quantization searches
approximately and puts ~0.2% of them a step or two from the nearest; ours are the nearest.

Because the bytes are bitsandbytes', dequantization can run on either side: the torch code here (a table
lookup per packed byte, the default), or bitsandbytes' own op (`kernel="bitsandbytes"`, or `"auto"`: it
where installed). Both give the same bits; bitsandbytes' C++ kernel was 2-7x faster at dequantizing on CPU,
1.1-1.3x end to end (benchmarks/nf4.py), before the per-byte lookup here made ours 1.4-4.7x faster (it is
still about 2-5x faster at dequantizing: one thread, loaded machine; rerun benchmarks/nf4.py). It is not
the default because importing bitsandbytes takes ~5 s here and, with the `kernels` package installed,
tries to look a kernel up on the Hugging Face hub (no network at run time is a rule of this project); ask
for it where that is fine. Quantizing, a one-time cost, is always ours.

`Linear4bit` is a frozen `nn.Linear` replacement holding the quantized weight as buffers; its forward
dequantizes on the fly, and so does its backward (the dequantized weight is never kept for backward).
`quantize_model` swaps a model's `nn.Linear` layers for it.
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The NF4 codebook (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an exact
# zero; bitsandbytes' `get_4bit_type("nf4")` to the last bit.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip

NESTED_BLOCKSIZE = 256  # blocks of absmax values under double quantization, as bitsandbytes


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`): 256 sorted values in [-1, 1].

    Seven decades 1e-6..1, each with a linear fraction of 2**i steps, plus 0 and 1; the code double
    quantization stores the block maxima in.
    """
    data = []
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = ((bounds[:-1] + bounds[1:]) / 2.0 * 10 ** (i - 6)).tolist()
        data += means + [-m for m in means]
    return torch.tensor(sorted(data + [0.0, 1.0]), dtype=torch.float32)


_DYNAMIC = dynamic_map()


def _nearest(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code`; a tie goes to the lower one (bitsandbytes' 4-bit
    rule: `bucketize` against the midpoints)."""
    midpoints = (code[:-1] + code[1:]) / 2
    return torch.bucketize(scaled, midpoints.to(scaled.device))


def _nearest_by_distance(scaled: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest value of the sorted `code` as bitsandbytes' CPU 8-bit kernel decides it: the
    value at or left of `scaled`, or the next one if its fp32 distance is strictly smaller."""
    code = code.to(scaled.device)
    left = (torch.bucketize(scaled, code, right=True) - 1).clamp(0, code.numel() - 2)
    right_closer = (scaled - code[left + 1]).abs() < (scaled - code[left]).abs()
    return left + right_closer


def _blockwise(x: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Flatten fp32 `x` into [blocks, blocksize] (zero-padded) -> (blocks, absmax, numel)."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = F.pad(flat, (0, -n % blocksize)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1), n


def _quantize_blocks(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes: x -> (uint8 indices into `code` [numel], fp32 absmax per block), as bitsandbytes' torch
    kernel computes them (multiply by the reciprocal, clamp; an all-zero block keeps absmax 0)."""
    blocks, absmax, n = _blockwise(x, blocksize)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp(-1, 1)
    return _nearest(scaled.reshape(-1)[:n], code).to(torch.uint8), absmax


def _quantize_blocks_8bit(x: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic-map codes of the block maxima, as bitsandbytes' CPU (C++) kernel computes them: divide by
    the block's absmax, then the nearest code by distance."""
    blocks, absmax, n = _blockwise(x, blocksize)
    scaled = blocks / absmax.clamp(min=1e-38)[:, None]  # a block of equal maxima is all zeros, not 0/0
    return _nearest_by_distance(scaled.reshape(-1)[:n], code).to(torch.uint8), absmax


def _dequantize_blocks(idx: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """uint8 indices [numel] + absmax per block -> fp32 [numel]."""
    n = idx.numel()
    values = F.pad(code.to(idx.device)[idx.long()], (0, -n % blocksize)).view(-1, blocksize)
    return (values * absmax[:, None]).reshape(-1)[:n]


@dataclass
class NF4State:
    """A quantized tensor. `packed`: uint8 [ceil(numel / 2)], two codebook indices per byte, the first in
    the high nibble. `absmax`: fp32 [blocks], or uint8 dynamic-map codes [blocks] under double quantization,
    where the block maxima are `code[absmax] * nested_absmax[block // 256] + nested_offset`."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(blocks / 256)]
    nested_offset: torch.Tensor | None = None  # fp32 scalar: the mean of the block maxima

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "nested_absmax", "nested_offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def nbytes(self) -> int:
        """Bytes of storage: the packed codes and every statistic."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4State:
    """Quantize a float tensor (fp32/bf16/fp16, any shape) to NF4 in blocks of `blocksize` values of the
    flattened tensor; `double_quant` also quantizes the block maxima (QLoRA's double quantization)."""
    if not w.is_floating_point():
        raise TypeError(f"quantize_nf4 needs a floating-point tensor, got {w.dtype}")
    idx, absmax = _quantize_blocks(w.detach(), NF4_CODE.to(w.device), blocksize)
    idx = F.pad(idx, (0, idx.numel() % 2), value=7)  # an odd tail pads with the code of 0.0, as bitsandbytes
    packed = (idx[0::2] << 4) | idx[1::2]
    if not double_quant:
        return NF4State(packed, absmax, w.shape, blocksize)
    offset = absmax.mean()
    codes, nested = _quantize_blocks_8bit(absmax - offset, _DYNAMIC.to(w.device), NESTED_BLOCKSIZE)
    return NF4State(packed, codes, w.shape, blocksize, nested, offset)


def block_absmax(state: NF4State) -> torch.Tensor:
    """The fp32 maximum of every block (decoded from its 8-bit codes under double quantization)."""
    if not state.double_quant:
        return state.absmax
    nested = _dequantize_blocks(state.absmax, state.nested_absmax, _DYNAMIC, NESTED_BLOCKSIZE)
    return nested + state.nested_offset


def _missing():
    raise ImportError("kernel='bitsandbytes' needs bitsandbytes: pip install 'llmcycle[quant]'")


_BYTE_TABLES: dict[torch.device, torch.Tensor] = {}
_CHUNK = 1 << 20  # values per pass of dequantize_nf4 to a 16-bit dtype: a 4 MB fp32 tile


def _byte_table(device: torch.device) -> torch.Tensor:
    """[256] int64: the two fp32 codebook values of every packed byte (high nibble first), their bits
    viewed as one int64. A 1-D gather of 8-byte scalars is torch's vectorized path; a gather of rows of a
    2-D fp32 table copies row by row and took twice as long (and int64, unlike a float view, copies bits
    unchanged, whatever they are)."""
    if device not in _BYTE_TABLES:
        b = torch.arange(256)
        pairs = torch.stack((NF4_CODE[b >> 4], NF4_CODE[b & 0xF]), dim=1)  # [256, 2] fp32
        _BYTE_TABLES[device] = pairs.view(torch.int64).reshape(256).to(device)
    return _BYTE_TABLES[device]


def _lookup(packed: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the codebook values of `packed` (uint8 [m]) into `out` (fp32, contiguous, 2m values); return it."""
    table = _byte_table(packed.device)
    torch.index_select(table, 0, packed.to(torch.int32), out=out.view(torch.int64).view(-1))
    return out


@functools.cache
def _bitsandbytes_kernel():
    """bitsandbytes' own dequantization op, or None where bitsandbytes is not installed."""
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        return None
    return torch.ops.bitsandbytes.dequantize_4bit.default


def dequantize_nf4(state: NF4State, dtype: torch.dtype = torch.float32, kernel: str = "torch") -> torch.Tensor:
    """NF4State -> a tensor of `state.shape` in `dtype`, computed in fp32 and rounded once (as bitsandbytes).

    kernel: "torch" (below), "bitsandbytes" (its C++/CUDA op on the same bytes: the same bits, faster on
    CPU, see benchmarks/nf4.py), or "auto": bitsandbytes where it is installed, else torch.
    """
    if kernel not in ("auto", "torch", "bitsandbytes"):
        raise ValueError(f"kernel must be 'auto', 'torch' or 'bitsandbytes', not {kernel!r}")
    n, bs = state.shape.numel(), state.blocksize
    absmax = block_absmax(state)
    regular = n % bs == 0 and bs % 4 == 0 and state.shape[-1] % 2 == 0
    if kernel != "torch":
        op = _bitsandbytes_kernel() if kernel == "auto" else _bitsandbytes_kernel() or _missing()
        # Odd rows and blocks of 2048+ take bitsandbytes' torch.compile'd fallback on CPU: ours is as good
        # and compiles nothing.
        if op is not None and regular and bs < 2048:
            return op(state.packed, absmax, bs, "nf4", list(state.shape), dtype)
    if not regular:  # a ragged last block or odd rows: the plain path
        idx = torch.stack((state.packed >> 4, state.packed & 0xF), dim=1).reshape(-1)[:n]
        return _dequantize_blocks(idx, absmax, NF4_CODE, bs).view(state.shape).to(dtype)
    packed, device = state.packed, state.packed.device
    if dtype == torch.float32:  # one lookup and one scaling pass: few parallel regions, steady under load
        out = _lookup(packed, torch.empty(n // bs, bs, device=device))
        return out.mul_(absmax[:, None]).view(state.shape)
    out = torch.empty(n // bs, bs, dtype=dtype, device=device)
    step = max(1, _CHUNK // bs)  # blocks per pass: look up, scale and round one cache-sized tile at a time
    for b in range(0, n // bs, step):
        rows = packed[b * bs // 2:(b + step) * bs // 2]
        tile = _lookup(rows, torch.empty(rows.numel() // (bs // 2), bs, device=device))
        out[b:b + step] = tile.mul_(absmax[b:b + step, None])
    return out.view(state.shape)


class _NF4Linear(torch.autograd.Function):
    """y = x @ W.T + b with W dequantized in forward and again in backward: nothing of the size of the
    weight outlives the call, which is the point of holding the base in 4 bits while adapters train."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        ctx.layer, ctx.x_dtype = layer, x.dtype
        # Under autocast the matmul runs in its dtype: dequantize straight to it, not to fp32 and cast.
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        return F.linear(x, layer.dequantize(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        grad_x = grad @ ctx.layer.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[2] else None
        return None if grad_x is None else grad_x.to(ctx.x_dtype), None, grad_b


class Linear4bit(nn.Module):
    """A frozen `nn.Linear` whose weight is stored in NF4: forward(x) = x @ dequantize(W).T + bias.

    The quantized weight lives in buffers (in the state dict, moved by `.to(device)`, never trained):
    `weight_nf4` (packed codes), `absmax`, and under double quantization `nested_absmax`, `nested_offset`.
    A dtype cast of the module (`.to(torch.bfloat16)`) leaves the statistics in fp32, as they were
    quantized; the bias, a frozen parameter, follows it. Gradients flow to the input only.
    """

    _STATS = ("absmax", "nested_absmax", "nested_offset")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.blocksize, self.double_quant = blocksize, double_quant
        self.kernel = "torch"  # of dequantize_nf4 ("bitsandbytes"/"auto": its op, same bits; module docstring)
        # Placeholder buffers of the right shapes, so that a fresh layer can load a saved state dict.
        n = in_features * out_features
        blocks = -(-n // blocksize)
        self.register_buffer("weight_nf4", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        self.register_buffer("absmax", torch.zeros(blocks, device=device, dtype=torch.uint8 if double_quant
                                                   else torch.float32))
        nested = torch.zeros(-(-blocks // NESTED_BLOCKSIZE), device=device) if double_quant else None
        self.register_buffer("nested_absmax", nested)
        self.register_buffer("nested_offset", torch.zeros((), device=device) if double_quant else None)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False) -> Linear4bit:
        """Quantize `linear`'s weight (its bias is copied as is, frozen)."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, blocksize, double_quant,
                    device=w.device)
        layer.load_state(quantize_nf4(w, blocksize, double_quant))
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def state(self) -> NF4State:
        shape = torch.Size((self.out_features, self.in_features))
        return NF4State(self.weight_nf4, self.absmax, shape, self.blocksize, self.nested_absmax,
                        self.nested_offset)

    def load_state(self, state: NF4State) -> None:
        if state.shape != (self.out_features, self.in_features) or state.double_quant != self.double_quant:
            raise ValueError("NF4 state does not match this layer's shape or double quantization")
        self.weight_nf4 = state.packed
        for name in self._STATS:
            setattr(self, name, getattr(state, name))
        self.blocksize = state.blocksize

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight [out_features, in_features] in `dtype`."""
        return dequantize_nf4(self.state(), dtype, self.kernel)

    def weight_nbytes(self) -> int:
        """Bytes holding the weight: packed codes plus all statistics (not the bias)."""
        return self.state().nbytes()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _NF4Linear.apply(x, self, self.bias)

    def _apply(self, fn, recurse=True):
        # `.to(bfloat16)` would round the fp32 block maxima and break equality with what was quantized:
        # let the statistics follow the device only (the packed uint8 codes show where it went).
        stats = {k: self._buffers[k] for k in self._STATS if self._buffers.get(k) is not None}
        super()._apply(fn, recurse)
        for k, v in stats.items():
            self._buffers[k] = v.to(self.weight_nf4.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, double_quant={self.double_quant}")


def _matches(name: str, patterns) -> bool:
    """A module name matches a pattern equal to it, to its last components ("q_proj", "mlp.up_proj"), or
    as a glob ("model.layers.*.self_attn.*")."""
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def quantize_model(model: nn.Module, include=None, exclude=("lm_head",), blocksize: int = 64,
                   double_quant: bool = False) -> list[str]:
    """Swap `model`'s `nn.Linear` layers for `Linear4bit` in place; return the swapped names.

    include: patterns of the layers to quantize (None: every Linear); exclude wins over include. The
    output head stays in full precision by default (as in QLoRA). A layer whose weight is shared with
    another module (tied embeddings) is refused: quantizing it would untie the two.
    """
    params = {id(p) for m in model.modules() if not isinstance(m, nn.Linear) for p in m.parameters(False)}
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)
             and (include is None or _matches(name, include)) and not _matches(name, exclude)]
    for name in names:
        # By name, not from a list of the modules: each full-precision weight is freed as soon as its layer
        # is swapped, so the peak holds one layer in fp32 beside the 4-bit model, not the whole fp32 base.
        module = model.get_submodule(name)
        if id(module.weight) in params:
            raise ValueError(f"{name}.weight is tied to another module's parameter; exclude it")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, Linear4bit.from_linear(module, blocksize, double_quant))
        del module
    return names


def quantized_weight_nbytes(model: nn.Module) -> int:
    """Bytes of every `Linear4bit` weight in `model` (codes and statistics)."""
    return sum(m.weight_nbytes() for m in model.modules() if isinstance(m, Linear4bit))
