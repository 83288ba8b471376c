"""Paged KV storage and the per-forward adapter that lets the unchanged `Transformer` read it.

`KVPool` holds the K/V of every layer in fixed-size blocks; `BlockManager` (tensor-free) decides which
physical blocks each sequence owns. `PagedBatch` is a throwaway object for ONE forward over a batch of
sequences that implements the model's kv_cache protocol (`update(layer, k, v)`, `advance(n)`, `length`):
it scatters each row's new K/V into that row's slots and gathers the row's blocks back as a dense,
right-padded [B, kv_heads, T_keys, head_dim] tensor for SDPA (T_keys = the widest row's blocks x block_size).

`model_runner.forward_paged` runs the model over a `PagedBatch`; this module only stores and addresses K/V.

This gather is the plain-PyTorch path (nano-vllm replaces it with a paged flash-attention kernel): it
copies each row's context every layer, whole blocks at a time, which is simple and exact.

Batch layout: row b has `num_cached[b]` tokens already in the pool and `num_new[b]` new tokens this step
(a prefill chunk, or 1 for decode). New tokens are right-padded to T_new = max(num_new); key j of row b
is the token at position j, valid for j < num_cached[b] + num_new[b].
"""

from __future__ import annotations

import torch

from llmcycle.model.config import ModelConfig


class KVPool:
    """K and V for all layers as two tensors [layers, kv_heads, num_blocks, block_size, head_dim].

    One allocation per K and V rather than one per layer: a single buffer is what a memory budget is
    carved into, and `k[layer]` is a free view. Head-major, then block, then token: gathering a row's
    blocks with one `index_select` yields [kv_heads, B, T, head_dim] whose (T, head_dim) planes are
    contiguous, which SDPA reads about 3x faster on CPU than the token-major layout (nano-vllm's and
    flash-attention's [blocks, block_size, kv_heads, head_dim]) whose gathered keys must be transposed.
    A flat *slot* id (block * block_size + offset) addresses one token within a head's plane.
    """

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.config = config
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (
            config.num_hidden_layers,
            config.num_key_value_heads,
            num_blocks,
            block_size,
            config.head_dim,
        )
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def slots_k(self, layer: int) -> torch.Tensor:
        """Layer `layer`'s keys as [kv_heads, num_blocks * block_size, head_dim] (a view)."""
        return self.k[layer].flatten(1, 2)

    def slots_v(self, layer: int) -> torch.Tensor:
        return self.v[layer].flatten(1, 2)


class PagedBatch:
    """The model's kv_cache for one forward over a batch of paged sequences."""

    def __init__(
        self, pool: KVPool, block_tables: list[list[int]], num_cached: list[int], num_new: list[int]
    ) -> None:
        if not (len(block_tables) == len(num_cached) == len(num_new)) or not block_tables:
            raise ValueError("block_tables, num_cached and num_new must be non-empty and of equal length")
        bs, dev = pool.block_size, pool.device
        for table, c, n in zip(block_tables, num_cached, num_new, strict=True):
            if n < 1 or c < 0:
                raise ValueError(f"each row needs >= 1 new token and >= 0 cached ones, got {n}, {c}")
            if len(table) * bs < c + n:
                raise ValueError(f"block table of {len(table)} blocks cannot hold {c + n} tokens")
        self.pool = pool
        # The Transformer reads `length` only to default positions and the mask; we always pass both,
        # and rows have different lengths anyway, so there is no single meaningful value.
        self.length = 0
        self.num_new = num_new
        cached = torch.tensor(num_cached, dtype=torch.long, device=dev)[:, None]  # [B, 1]
        new = torch.tensor(num_new, dtype=torch.long, device=dev)[:, None]
        total = cached + new
        t_new = max(num_new)
        # Each row reads whole blocks: the blocks covering its tokens, padded with block 0 (masked out).
        width = max(-(-(c + n) // bs) for c, n in zip(num_cached, num_new))
        rows = [t[: -(-(c + n) // bs)] for t, c, n in zip(block_tables, num_cached, num_new)]
        self.tables = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.long, device=dev)
        i = torch.arange(t_new, device=dev)[None, :]
        j = torch.arange(width * bs, device=dev)[None, :]
        self.positions = cached + i  # [B, T_new]
        self.query_valid = i < new  # [B, T_new]
        self.key_valid = j < total  # [B, width * block_size]
        pos = torch.minimum(self.positions, total - 1)  # padding writes stay inside the row's own table
        slots = self.tables.gather(1, pos // bs) * bs + pos % bs
        self._write_slots = slots[self.query_valid]  # [N real new tokens]
        mask = (j[:, None, :] <= self.positions[:, :, None]) & self.key_valid[:, None, :]
        window = pool.config.sliding_window
        if window is not None:
            mask = mask & (self.positions[:, :, None] - j[:, None, :] < window)
        # A pad query attends key 0 only: an all-False row would make SDPA's softmax NaN.
        pad_row = (j == 0).expand(t_new, -1)
        mask = torch.where(self.query_valid[:, :, None], mask, pad_row)
        self.attention_mask = mask[:, None]  # [B, 1, T_new, T_keys], True = attend

    def logits_mask(self, num_logits: list[int] | None = None) -> torch.Tensor:
        """Boolean [B, T_new] selecting each row's last `num_logits[b]` new tokens (default 1), row-major."""
        dev = self.positions.device
        end = torch.tensor(self.num_new, device=dev)[:, None]
        count = torch.tensor(num_logits, device=dev)[:, None] if num_logits is not None else 1
        i = torch.arange(self.positions.shape[1], device=dev)[None, :]
        return (i < end) & (i >= end - count)

    def input_ids(self, new_token_ids: list[list[int]]) -> torch.Tensor:
        """Right-pad each row's new token ids to [B, T_new] (pad id 0: pad queries are masked out)."""
        t_new = self.positions.shape[1]
        if [len(r) for r in new_token_ids] != self.num_new:
            raise ValueError("new_token_ids lengths do not match num_new")
        rows = [list(r) + [0] * (t_new - len(r)) for r in new_token_ids]
        return torch.tensor(rows, dtype=torch.long, device=self.positions.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new k/v ([B, kv_heads, T_new, head_dim]) and return the rows' K/V [B, kv_heads, T_keys, D].

        Keys past a row's length (the tail of its last block, padding blocks) hold stale but finite values
        and are masked out; the pool starts zeroed and is only ever written with computed K/V.
        """
        pool = self.pool
        B, width = self.tables.shape
        k_slots, v_slots = pool.slots_k(layer), pool.slots_v(layer)
        new_k = k.transpose(0, 1)[:, self.query_valid].to(pool.dtype)  # [kv_heads, N, head_dim]
        new_v = v.transpose(0, 1)[:, self.query_valid].to(pool.dtype)
        k_slots.index_copy_(1, self._write_slots, new_k)
        v_slots.index_copy_(1, self._write_slots, new_v)
        # Whole-block copies (block_size * head_dim contiguous values each) are much cheaper than
        # gathering token by token; the result is [B, kv_heads, T, D] with contiguous (T, D) planes.
        flat = self.tables.flatten()
        shape = (pool.k.shape[1], B, width * pool.block_size, pool.k.shape[-1])
        keys = pool.k[layer].index_select(1, flat).view(shape).transpose(0, 1)
        values = pool.v[layer].index_select(1, flat).view(shape).transpose(0, 1)
        return keys.to(k.dtype), values.to(v.dtype)

    def advance(self, n: int) -> None:
        """No-op: token counts live in the BlockManager / scheduler, not in this per-step view."""
