"""Paged KV storage and the per-forward adapter that lets the unchanged `Transformer` read it.

`KVPool` holds the K/V of every layer in fixed-size blocks; `BlockManager` (tensor-free) decides which
physical blocks each sequence owns. `PagedBatch` is a throwaway object for ONE forward over a batch of
sequences. It packs every row's new tokens side by side into one sequence [1, N] (N = the real new tokens,
no padding), so the projections and the MLP cost what the step's tokens cost: fifteen decodes beside a
128-token prefill chunk are 143 token rows, not 16 x 128 (a right-padded batch multiplied a mixed step's
cost ~12x). It implements the model's paged kv_cache protocol, `attend(layer, q, k, v)`: store the new
K/V in each row's slots, then attend row by row's context.

Attention groups rows that have the same number of new tokens: all decodes are one batched SDPA over
their gathered contexts (whole blocks, right-padded to the widest row, masked); a prefill from an empty
cache attends its own new K/V with SDPA's causal kernel (no gather); a continued chunk or a speculative
verification row gathers its blocks under a causal mask. Each group costs what it would cost alone.

`model_runner.forward_paged` runs the model over a `PagedBatch`; this module only stores and addresses K/V.
The gather is the plain-PyTorch path (nano-vllm replaces it with a paged flash-attention kernel): it copies
each decode row's context every layer, whole blocks at a time, which is simple and exact.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

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
    """The model's kv_cache for one forward over a packed batch of paged sequences.

    Row b has `num_cached[b]` tokens already in the pool and `num_new[b]` new ones this step (a prefill
    chunk, 1 for a decode, 1 + k for a speculative verification). Its new tokens are packed after row
    b-1's: `input_ids` and `positions` are [1, N], and `logits_mask` picks row-major logit positions.
    """

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
        # The Transformer reads `length` only to default positions; we always pass them.
        self.length = 0
        self.num_new = num_new
        self.num_tokens = sum(num_new)
        self.starts = starts = list(itertools.accumulate(num_new[:-1], initial=0))
        positions, slots = [], []
        for table, c, n in zip(block_tables, num_cached, num_new, strict=True):
            pos = range(c, c + n)
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
        self.positions = torch.tensor(positions, dtype=torch.long, device=dev)[None]  # [1, N]
        self._write_slots = torch.tensor(slots, dtype=torch.long, device=dev)  # [N]
        by_shape: dict[tuple[int, bool], list[int]] = {}
        window = pool.config.sliding_window
        for b, (c, n) in enumerate(zip(num_cached, num_new, strict=True)):
            fresh = c == 0 and (window is None or n <= window)
            by_shape.setdefault((n, fresh), []).append(b)
        self.groups = [
            _Group(pool, rows, n, fresh, [block_tables[b] for b in rows], [num_cached[b] for b in rows],
                   [starts[b] for b in rows], self.num_tokens)
            for (n, fresh), rows in by_shape.items()
        ]

    def logits_mask(self, num_logits: list[int] | None = None) -> torch.Tensor:
        """Boolean [1, N] selecting each row's last `num_logits[b]` new tokens (default 1), row-major."""
        counts = num_logits if num_logits is not None else [1] * len(self.num_new)
        mask = torch.zeros(self.num_tokens, dtype=torch.bool)
        for start, n, c in zip(self.starts, self.num_new, counts, strict=True):
            mask[start + n - c : start + n] = True
        return mask.to(self.positions.device)[None]

    def input_ids(self, new_token_ids: list[list[int]]) -> torch.Tensor:
        """Every row's new token ids, packed: [1, N]."""
        if [len(r) for r in new_token_ids] != self.num_new:
            raise ValueError("new_token_ids lengths do not match num_new")
        flat = [t for r in new_token_ids for t in r]
        return torch.tensor([flat], dtype=torch.long, device=self.positions.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new k/v ([1, kv_heads, N, head_dim]) in their slots, then attend: q [1, heads, N, D] ->
        [1, heads, N, D]. K/V of every row are written before any row reads, so a row admitted this step
        may read blocks (a prefix-cache hit) that another row of the same step computes."""
        pool = self.pool
        pool.slots_k(layer).index_copy_(1, self._write_slots, k[0].to(pool.dtype))
        pool.slots_v(layer).index_copy_(1, self._write_slots, v[0].to(pool.dtype))
        if len(self.groups) == 1:
            return self.groups[0].attend(layer, q, k, v)[None]
        out = torch.empty_like(q[0])
        for g in self.groups:
            out.index_copy_(1, g.token_index, g.attend(layer, q, k, v))
        return out[None]

    def advance(self, n: int) -> None:
        """No-op: token counts live in the BlockManager / scheduler, not in this per-step view."""


class _Group:
    """Rows of one packed forward that have the same number of new tokens (and the same freshness), attended
    together by one SDPA call."""

    def __init__(self, pool: KVPool, rows: list[int], n: int, fresh: bool, tables: list[list[int]],
                 num_cached: list[int], starts: list[int], num_tokens: int) -> None:
        dev, bs = pool.device, pool.block_size
        self.pool, self.n, self.fresh, self.size = pool, n, fresh, len(rows)
        index = [s + i for s in starts for i in range(n)]
        self.token_index = torch.tensor(index, dtype=torch.long, device=dev)  # packed positions of its queries
        self.all_tokens = len(index) == num_tokens  # the whole batch, in order: views instead of gathers
        if fresh:  # an empty cache: the row's own new K/V are all its keys; SDPA's causal kernel is exact
            return
        blocks = [-(-(c + n) // bs) for c in num_cached]  # blocks covering each row's tokens
        width = max(blocks)
        # Each row reads whole blocks: its own, padded with block 0 (masked out).
        self.tables = torch.tensor([t[:m] + [0] * (width - m) for t, m in zip(tables, blocks, strict=True)],
                                   dtype=torch.long, device=dev).flatten()
        cached = torch.tensor(num_cached, dtype=torch.long, device=dev)[:, None, None]  # [G, 1, 1]
        q_pos = cached + torch.arange(n, device=dev)[None, :, None]  # [G, n, 1]
        j = torch.arange(width * bs, device=dev)[None, None, :]
        mask = j <= q_pos  # causal; keys past a row's length are after its last query, so masked too
        window = pool.config.sliding_window
        if window is not None:
            mask = mask & (q_pos - j < window)
        self.mask = mask[:, None]  # [G, 1, n, T_keys]
        self.keys_shape = (pool.k.shape[1], self.size, width * bs, pool.k.shape[-1])

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """This group's tokens of a packed [1, X, N, D] tensor as [G, X, n, D]."""
        t = t[0] if self.all_tokens else t[0].index_select(1, self.token_index)
        return t.view(t.shape[0], self.size, self.n, t.shape[-1]).transpose(0, 1)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[heads, G * n, D]: the group's attention output in its packed order."""
        gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
        qg = self.take(q)
        if self.fresh:
            y = F.scaled_dot_product_attention(qg, self.take(k), self.take(v), is_causal=self.n > 1, **gqa)
        else:
            # Whole-block copies (block_size * head_dim contiguous values each) are much cheaper than
            # gathering token by token; [G, kv_heads, T, D] with contiguous (T, D) planes.
            pool = self.pool
            keys = pool.k[layer].index_select(1, self.tables).view(self.keys_shape).transpose(0, 1)
            values = pool.v[layer].index_select(1, self.tables).view(self.keys_shape).transpose(0, 1)
            # On the CPU, SDPA over a cached context is ~4x slower in bf16 than in fp32 (a decode step of 16
            # rows at context 144: 2.1 ms against 0.48 ms including the casts, AVX512-BF16 EPYC), so half
            # precision attends in fp32; the gathered copy is made anyway.
            dtype = torch.float32 if q.device.type == "cpu" else q.dtype
            y = F.scaled_dot_product_attention(qg.to(dtype), keys.to(dtype), values.to(dtype), attn_mask=self.mask,
                                               **gqa).to(q.dtype)
        return y.transpose(0, 1).reshape(y.shape[1], self.size * self.n, y.shape[-1])
