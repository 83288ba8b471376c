"""Paged KV-cache block manager with prefix caching (bookkeeping only, no tensors).

The KV cache is one big pool of fixed-size blocks of `block_size` token slots. Each live
sequence owns a *block table*: the list of physical block ids holding its tokens, in order.
The attention kernel reads K/V through that table, so blocks need not be contiguous.

Prefix caching (as in vLLM / nano-vllm): every *full* block gets a hash that chains in the
hash of the block before it, so equal hashes mean equal whole prefixes. A new prompt whose
leading full blocks are already in the cache reuses those physical blocks (ref count + 1)
and skips their prefill. Partial blocks are never shared: their contents still change.

When a sequence is freed its blocks' ref counts drop; a block that reaches 0 but holds a
registered hash is kept as *evictable* (its K/V is still valid and may be hit again) in
least-recently-freed order, and is only recycled when a fresh block is needed and the plain
free list is empty. So `num_free_blocks` counts both plain-free and evictable blocks.

Timing contract with the scheduler: hashes of a prompt's full blocks are registered at
`allocate` and of a decode block when it fills in `append_token`, i.e. before the model has
written their K/V. The caller must therefore compute a sequence's new tokens in the same step
it allocates/appends them, before another sequence can be prefilled against those blocks
(nano-vllm makes the same assumption).

A `salt` (a LoRA adapter's id; 0 for the base model) starts a sequence's hash chain from its own root,
so only sequences with the same salt share blocks: the same tokens under another adapter have other K/V
(vLLM keys its block hashes by LoRA id the same way).
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import xxhash

NO_HASH = -1  # parent hash of a sequence's first block, and "not registered"


def chain_root(salt: int) -> int:
    """The parent hash of a sequence's first block: NO_HASH without a salt, else a hash of the salt."""
    return NO_HASH if salt == 0 else hash_block_tokens(NO_HASH, (-1, salt))


class NoFreeBlocks(RuntimeError):
    """Raised when an allocation needs more blocks than are free (state is left unchanged).

    Not an `LlmcycleError`: the scheduler is expected to check `can_allocate` / `can_append`
    and preempt or wait; reaching this is a scheduler bug, not a user mistake.
    """


def hash_block_tokens(parent_hash: int, token_ids: list[int] | tuple[int, ...]) -> int:
    """Stable 64-bit hash of (parent block hash, tokens of this block).

    xxhash over a fixed little-endian int64 encoding, so the value is the same across processes
    and runs (Python's `hash` is salted per process for str and would not be). Returned as a
    signed int64 so it round-trips through the same encoding as a parent hash.
    """
    data = struct.pack(f"<q{len(token_ids)}q", parent_hash, *token_ids)
    return xxhash.xxh64_intdigest(data) - (1 << 63)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int = NO_HASH  # set once the block is full and registered in the prefix cache
    token_ids: list[int] = field(default_factory=list)  # kept to verify hits against collisions

    def reset(self) -> None:
        self.ref_count = 0
        self.hash = NO_HASH
        self.token_ids = []


@dataclass
class _Seq:
    block_table: list[int]
    num_tokens: int
    root: int = NO_HASH  # parent hash of its first block (NO_HASH, or an adapter's salt)


class BlockManager:
    """Allocates KV-cache blocks to sequences and shares full prefix blocks between them."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[int] = deque(range(num_blocks))  # ref 0, no cached content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0, cached; oldest first
        self._hash_to_block: dict[int, int] = {}
        self._seqs: dict[object, _Seq] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the cache (vLLM's "queries")
        self.prefix_hits = 0  # of those, tokens found cached (vLLM's "hits")

    # ---- queries -------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take: plain-free plus evictable cached blocks."""
        return len(self._free) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live sequences (evictable cache counts as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_table(self, seq_id: object) -> list[int]:
        return list(self._seqs[seq_id].block_table)

    def num_tokens(self, seq_id: object) -> int:
        return self._seqs[seq_id].num_tokens

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._seqs

    # ---- prefix lookup -------------------------------------------------------------------

    def num_cached_tokens(self, token_ids: list[int], salt: int = 0) -> int:
        """Leading tokens of `token_ids` that `allocate` would find in the prefix cache (no side effects)."""
        hit, _ = self._lookup_prefix(token_ids, salt)
        return len(hit) * self.block_size

    def _lookup_prefix(self, token_ids: list[int], salt: int) -> tuple[list[int], list[int]]:
        """Return (cached block ids, hashes of all full blocks) for a prompt.

        Only the first (n - 1) // block_size full blocks may hit: the last prompt token is
        always recomputed, because its logits are needed to sample the next token.
        """
        bs = self.block_size
        hashes: list[int] = []
        parent = chain_root(salt)
        for i in range(len(token_ids) // bs):
            parent = hash_block_tokens(parent, token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        hit: list[int] = []
        if not self.enable_prefix_caching:
            return hit, hashes
        for i in range((len(token_ids) - 1) // bs):
            bid = self._hash_to_block.get(hashes[i])
            if bid is None or self.blocks[bid].token_ids != token_ids[i * bs : (i + 1) * bs]:
                break  # miss, or a hash collision with different tokens: stop sharing here
            hit.append(bid)
        return hit, hashes

    def _blocks_needed(self, token_ids: list[int], hit: list[int]) -> int:
        """Blocks that must come from the free pool: fresh ones plus evictable hits we revive."""
        fresh = -(-len(token_ids) // self.block_size) - len(hit)
        revived = sum(1 for b in hit if self.blocks[b].ref_count == 0)
        return fresh + revived

    def can_allocate(self, token_ids: list[int], salt: int = 0) -> bool:
        if not token_ids:
            return False
        hit, _ = self._lookup_prefix(token_ids, salt)
        return self._blocks_needed(token_ids, hit) <= self.num_free_blocks

    # ---- mutation ------------------------------------------------------------------------

    def _take_fresh_block(self) -> int:
        """Pop a plain-free block, else evict the least-recently-freed cached block."""
        if self._free:
            bid = self._free.popleft()
        elif self._evictable:
            bid, _ = self._evictable.popitem(last=False)
            old = self.blocks[bid].hash
            if self._hash_to_block.get(old) == bid:
                del self._hash_to_block[old]
        else:
            raise NoFreeBlocks("no free KV-cache blocks")
        block = self.blocks[bid]
        block.reset()
        block.ref_count = 1
        return bid

    def _register(self, bid: int, block_hash: int) -> None:
        """Publish a full block in the prefix cache; the newest block with a hash wins."""
        block = self.blocks[bid]
        block.hash = block_hash
        if not self.enable_prefix_caching:
            return
        old = self._hash_to_block.get(block_hash)
        if old is not None and old != bid and old in self._evictable:
            # The older copy is now unreachable; recycle it rather than let it hold cache space.
            del self._evictable[old]
            self.blocks[old].reset()
            self._free.append(old)
        self._hash_to_block[block_hash] = bid

    def allocate(self, seq_id: object, token_ids: list[int], salt: int = 0) -> int:
        """Give a new sequence blocks for its prompt; return the number of leading cached tokens.

        The result is a multiple of block_size and always < len(token_ids). Raises NoFreeBlocks
        (changing nothing) when the pool is too small.
        """
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id!r} is already allocated")
        if not token_ids:
            raise ValueError("cannot allocate an empty prompt")
        token_ids = list(token_ids)
        hit, hashes = self._lookup_prefix(token_ids, salt)
        needed = self._blocks_needed(token_ids, hit)
        if needed > self.num_free_blocks:
            raise NoFreeBlocks(
                f"sequence {seq_id!r} needs {needed} free KV-cache blocks, only {self.num_free_blocks} free"
            )
        bs = self.block_size
        table: list[int] = []
        for bid in hit:  # revive / share cached blocks
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self._evictable[bid]
            block.ref_count += 1
            table.append(bid)
        for i in range(len(hit), -(-len(token_ids) // bs)):
            bid = self._take_fresh_block()
            chunk = token_ids[i * bs : (i + 1) * bs]
            self.blocks[bid].token_ids = chunk
            if len(chunk) == bs:
                self._register(bid, hashes[i])
            table.append(bid)
        self._seqs[seq_id] = _Seq(table, len(token_ids), chain_root(salt))
        cached = len(hit) * bs
        if self.enable_prefix_caching:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += cached
        return cached

    def can_append(self, seq_id: object) -> bool:
        seq = self._seqs[seq_id]
        return seq.num_tokens % self.block_size != 0 or self.num_free_blocks > 0

    def append_token(self, seq_id: object, token_id: int) -> None:
        """Add one token to a sequence, taking a new block when its blocks are full (or a reserved one)."""
        seq = self._seqs[seq_id]
        if seq.num_tokens == len(seq.block_table) * self.block_size:
            seq.block_table.append(self._take_fresh_block())  # raises NoFreeBlocks, unchanged
        index = seq.num_tokens // self.block_size
        block = self.blocks[seq.block_table[index]]
        block.token_ids.append(int(token_id))
        seq.num_tokens += 1
        if len(block.token_ids) == self.block_size:
            parent = self.blocks[seq.block_table[index - 1]].hash if index > 0 else seq.root
            self._register(block.block_id, hash_block_tokens(parent, block.token_ids))

    def reserve(self, seq_id: object, extra_tokens: int) -> bool:
        """Make room for `extra_tokens` more slots without adding tokens (speculative decoding writes
        draft K/V there before knowing which tokens stay). False, changing nothing, if blocks are short.
        `trim` gives back what the accepted tokens did not use."""
        seq = self._seqs[seq_id]
        need = -(-(seq.num_tokens + extra_tokens) // self.block_size) - len(seq.block_table)
        if need > self.num_free_blocks:
            return False
        for _ in range(max(0, need)):
            seq.block_table.append(self._take_fresh_block())
        return True

    def trim(self, seq_id: object) -> None:
        """Release reserved blocks beyond the sequence's tokens (they hold no token, hence no hash)."""
        seq = self._seqs[seq_id]
        keep = -(-seq.num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            block.reset()
            self._free.append(block.block_id)

    def free(self, seq_id: object) -> None:
        """Release a sequence's blocks. Raises KeyError for an unknown sequence.

        Blocks are released tail first, so within one sequence the deepest blocks are evicted
        before the shared prefix blocks they depend on (a tail block is useless without its
        prefix, since hits are matched from the first block on).
        """
        seq = self._seqs.pop(seq_id)
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if self.enable_prefix_caching and self._hash_to_block.get(block.hash) == bid:
                self._evictable[bid] = None
            else:
                block.reset()
                self._free.append(bid)

    # ---- debugging -----------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (used by tests; cheap enough for debugging)."""
        refs = [0] * self.num_blocks
        for seq in self._seqs.values():
            assert len(seq.block_table) == -(-seq.num_tokens // self.block_size)
            for bid in seq.block_table:
                refs[bid] += 1
        free, evict = set(self._free), set(self._evictable)
        assert len(free) == len(self._free) and not (free & evict)
        for block in self.blocks:
            assert block.ref_count == refs[block.block_id], block
            in_pool = block.block_id in free or block.block_id in evict
            assert in_pool == (block.ref_count == 0), block
        for h, bid in self._hash_to_block.items():
            assert self.blocks[bid].hash == h and len(self.blocks[bid].token_ids) == self.block_size
        for bid in evict:
            assert self._hash_to_block.get(self.blocks[bid].hash) == bid


def num_blocks_for_budget(
    budget_bytes: int, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype_bytes: int
) -> int:
    """How many KV blocks fit in `budget_bytes`: each block holds K and V for every layer."""
    if min(num_layers, num_kv_heads, head_dim, block_size, dtype_bytes) <= 0:
        raise ValueError("num_layers, num_kv_heads, head_dim, block_size and dtype_bytes must be positive")
    per_block = 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
    return max(0, int(budget_bytes) // per_block)
