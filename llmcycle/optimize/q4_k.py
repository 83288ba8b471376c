"""GGML's Q4_K format, quantized in numpy (the `gguf` package only dequantizes it).

A block holds 256 weights as 8 sub-blocks of 32: each weight is `d * sc[s] * q - dmin * m[s]` with q a
4-bit code, sc and m 6-bit per sub-block, d and dmin float16 per block (144 bytes, 4.5 bits a weight).
Scales are chosen by round to nearest from each sub-block's range (min clamped to <= 0, so zero is
exact); llama.cpp's llama-quantize also searches around them, which lowers the error a little.
"""

from __future__ import annotations

import numpy as np

QK_K = 256
BLOCK_BYTES = 144


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """Rows of `data` (last axis a multiple of 256) as Q4_K bytes: shape (..., last // 256 * 144), uint8."""
    if data.shape[-1] % QK_K:
        raise ValueError(f"Q4_K needs rows that are a multiple of {QK_K}, got {data.shape[-1]}")
    x = data.astype(np.float32).reshape(-1, 8, 32)  # blocks, sub-blocks, weights
    lo = np.minimum(x.min(axis=-1), 0.0)
    scale = (x.max(axis=-1) - lo) / 15.0
    d = (scale.max(axis=-1) / 63.0).astype(np.float16)
    dmin = ((-lo).max(axis=-1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.rint(scale / d32), 0).clip(0, 63).astype(np.uint8)
        m = np.where(dmin32 > 0, np.rint(-lo / dmin32), 0).clip(0, 63).astype(np.uint8)
        step = (d32 * sc)[..., None]
        q = np.where(step > 0, np.rint((x + (dmin32 * m)[..., None]) / step), 0).clip(0, 15).astype(np.uint8)
    # 12 scale bytes: sub-blocks 0-3 in the low 6 bits of bytes 0-3 (scale) and 4-7 (min); sub-blocks 4-7
    # as low nibbles in bytes 8-11 and their top 2 bits in the top bits of bytes 0-7.
    scales = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), m[:, :4] | ((m[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)], axis=-1)
    # 128 code bytes: 4 groups of 32, sub-block 2g in the low nibbles and 2g+1 in the high ones.
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             scales.astype(np.uint8), qs], axis=-1)
    return blocks.reshape(*data.shape[:-1], data.shape[-1] // QK_K * BLOCK_BYTES)
