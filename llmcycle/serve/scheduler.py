"""Continuous-batching scheduler with chunked prefill and recompute preemption (no model here).

Each engine step is `schedule()` -> model forward over the batch -> `update(batch, sampled)`.

The unit of work is "tokens whose K/V must be computed": a sequence's tokens are its prompt plus the
outputs sampled so far, and `num_computed` of them already sit in the KV cache. Prefill, a continued
chunk of prefill, the recompute after a preemption and a plain decode step are then the same thing:
schedule some of the `num_tokens - num_computed` pending tokens. Decode is just "1 pending token".

Block-manager contract (see block_manager.py): hashes of full blocks are registered when the tokens
are allocated/appended, before the model writes their K/V. So the scheduler only ever gives the
block manager tokens that are computed in the step being scheduled:
- admission allocates `tokens[:cached + n]` (cached prefix plus this step's chunk), never the whole
  prompt, or a later request could hit blocks of a chunk that is not computed yet;
- continued chunks and decode tokens are appended with `append_token` in `schedule()`, not in
  `update()`: the sampled token is only *recorded* in `update()`, and its slot is taken next step, where
  it can fail and trigger preemption.
A request admitted in the same step may hit blocks allocated earlier in that step; the runner must
therefore write a layer's new K/V for the whole batch before attention reads it (a batched paged
forward does), or at least process the batch in the listed order.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from dataclasses import dataclass, field

from llmcycle.errors import LlmcycleError
from llmcycle.serve.block_manager import BlockManager
from llmcycle.serve.sampling import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


FINISH_REASONS = ("stop", "length", "abort")


@dataclass
class Sequence:
    """One request's generation state. `seq_id` doubles as the block-manager key."""

    seq_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    eos_token_id: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None
    num_computed: int = 0  # leading tokens whose K/V are in the cache
    arrival_time: float = field(default_factory=time.monotonic)
    num_preemptions: int = 0
    # Its LoRA adapter (0: the base). It salts the prefix-cache hashes: the same tokens under another
    # adapter have other K/V, so they must never share blocks.
    adapter_id: int = 0

    @property
    def tokens(self) -> list[int]:
        """Prompt then outputs: what a recompute after preemption prefills."""
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_pending(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED


@dataclass
class ScheduledSeq:
    """This step's work for one sequence: compute K/V of tokens[start : start + num_new_tokens]."""

    seq: Sequence
    start: int
    num_new_tokens: int
    # True when this step reaches the end of the sequence, so its last logits are sampled. Fixed at
    # schedule time: after update() the sequence has grown and the comparison would no longer hold.
    needs_sample: bool = field(init=False)

    def __post_init__(self) -> None:
        self.needs_sample = self.start + self.num_new_tokens == self.seq.num_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.seq.tokens[self.start : self.start + self.num_new_tokens]


@dataclass
class ScheduledBatch:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    def __len__(self) -> int:
        return len(self.seqs)

    def __iter__(self):
        return iter(self.seqs)


class Scheduler:
    """FIFO continuous batching over a `BlockManager`: decodes first, then chunked prefills."""

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        chunk_size: int | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < max_num_seqs:
            # Every running sequence must be able to decode each step, as vLLM requires.
            raise ValueError(
                f"need max_num_seqs >= 1 and max_num_batched_tokens >= max_num_seqs, "
                f"got {max_num_seqs}, {max_num_batched_tokens}"
            )
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        self.bm = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size  # per-sequence prefill tokens per step; None: the token budget
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        self.num_preemptions = 0
        self._seqs: dict[str, Sequence] = {}  # waiting + running
        self._in_flight: set[str] = set()  # scheduled by the last schedule(), not yet updated
        self._deferred_free: list[str] = []  # finished while in flight: free after update

    # ---- gauges --------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def get(self, seq_id: str) -> Sequence | None:
        return self._seqs.get(seq_id)

    # ---- requests ------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a request. Rejects one that could never fit in the KV cache even alone."""
        if seq.seq_id in self._seqs or seq.seq_id in self.bm:
            raise ValueError(f"request {seq.seq_id!r} is already scheduled")
        if not seq.prompt_token_ids:
            raise LlmcycleError(f"request {seq.seq_id!r} has an empty prompt")
        # The last sampled token is never fed back, so the cache holds at most prompt + max_tokens - 1.
        need = len(seq.prompt_token_ids) + seq.sampling_params.max_tokens - 1
        capacity = self.bm.num_blocks * self.bm.block_size
        if need > capacity:
            raise LlmcycleError(
                f"request {seq.seq_id!r} needs {need} KV-cache slots (prompt + max_tokens - 1) "
                f"but the cache holds only {capacity}"
            )
        seq.status = SequenceStatus.WAITING
        seq.num_computed = 0
        self._seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def abort(self, seq_id: str) -> Sequence | None:
        """Finish a waiting or running request with reason "abort"; None if unknown or finished."""
        return self.finish(seq_id, "abort")

    def finish(self, seq_id: str, reason: str) -> Sequence | None:
        """Finish a request from outside (e.g. a stop string found by the detokenizer) and free it."""
        if reason not in FINISH_REASONS:
            raise ValueError(f"finish reason must be one of {FINISH_REASONS}, got {reason!r}")
        seq = self._seqs.get(seq_id)
        if seq is None:
            return None
        self._finish(seq, reason)
        return seq

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        del self._seqs[seq.seq_id]
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if seq.seq_id in self.bm:
            if seq.seq_id in self._in_flight:
                # Its new blocks are registered but the model has not written them yet; freeing now
                # could let another request hit garbage K/V. Free once the step is done.
                self._deferred_free.append(seq.seq_id)
            else:
                self.bm.free(seq.seq_id)

    # ---- scheduling ----------------------------------------------------------------------

    def _free_slots(self, seq: Sequence) -> int:
        """Tokens `seq` can still append: room in its last block plus every free block."""
        n, bs = self.bm.num_tokens(seq.seq_id), self.bm.block_size
        return -(-n // bs) * bs - n + self.bm.num_free_blocks * bs

    def _cached_prefix_len(self, seq: Sequence, token_ids: list[int]) -> int:
        # allocate() returns exactly this many cached tokens for any prefix longer than it.
        return self.bm.num_cached_tokens(token_ids, seq.adapter_id)

    def _preempt(self, seq: Sequence) -> None:
        """Drop a running sequence's cache; it will be recomputed (prompt + outputs) from scratch."""
        self.running.remove(seq)
        self.bm.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> ScheduledBatch:
        """Pick this step's work. Must be followed by `update` with the same batch."""
        if self._in_flight:
            raise RuntimeError("schedule() called before update() of the previous batch")
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        done: set[str] = set()

        # 1. Running sequences: decodes (1 pending token) first, then continued prefill chunks.
        for seq in sorted(self.running, key=lambda s: s.num_pending > 1):  # stable: admission order
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted as a victim above, or no tokens left this step
            want = min(seq.num_pending, budget, self.chunk_size or budget)
            n = min(want, self._free_slots(seq))
            while n == 0:
                # Victim: the most recently admitted sequence not yet scheduled this step (freeing a
                # scheduled one would expose its just-registered, never-computed blocks), else itself.
                victim = next(s for s in reversed(self.running) if s.seq_id not in done)
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
                n = min(want, self._free_slots(seq))
            if n == 0:
                continue
            start = seq.num_computed
            for tok in seq.tokens[start : start + n]:
                self.bm.append_token(seq.seq_id, tok)
            batch.seqs.append(ScheduledSeq(seq, start, n))
            done.add(seq.seq_id)
            budget -= n

        # 2. Admit waiting sequences FIFO (not after a preemption: memory is known to be short).
        while not batch.preempted and self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            tokens = seq.tokens
            cached = self._cached_prefix_len(seq, tokens)  # < len(tokens): the last token is always computed
            n = min(len(tokens) - cached, budget, self.chunk_size or budget)
            if not self.bm.can_allocate(tokens[: cached + n], seq.adapter_id):
                break  # strict FIFO: nobody overtakes the head of the queue
            got = self.bm.allocate(seq.seq_id, tokens[: cached + n], seq.adapter_id)
            assert got == cached, (got, cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed = cached
            self.running.append(seq)
            batch.seqs.append(ScheduledSeq(seq, cached, n))
            done.add(seq.seq_id)
            budget -= n

        self._in_flight = done
        return batch

    def reset_in_flight(self) -> None:
        """Forget a step that failed before `update` (its sequences were aborted): free what waited on it."""
        self._in_flight = set()
        for seq_id in self._deferred_free:
            self.bm.free(seq_id)
        self._deferred_free.clear()

    def _stop_reason(self, seq: Sequence, token: int) -> str | None:
        """vLLM's order: eos, then stop_token_ids, then length."""
        p = seq.sampling_params
        if not p.ignore_eos and seq.eos_token_id is not None and token == seq.eos_token_id:
            return "stop"
        if token in p.stop_token_ids:
            return "stop"
        if len(seq.output_token_ids) >= p.max_tokens:
            return "length"
        return None

    def update(self, batch: ScheduledBatch, sampled: dict[str, int]) -> list[Sequence]:
        """Record a finished step: advance `num_computed`, append sampled tokens, finish sequences.

        `sampled` needs a token for every entry with `needs_sample`; others are ignored (a partial
        prefill chunk samples nothing). A list of tokens appends them in order (accepted draft tokens
        and the verifier's token), stopping at the first that finishes the sequence. Returns the sequences that finished in this step.
        """
        finished: list[Sequence] = []
        for item in batch.seqs:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted/finished from outside while the step ran
            seq.num_computed += item.num_new_tokens
            assert self.bm.num_tokens(seq.seq_id) == seq.num_computed
            if seq.num_computed < seq.num_tokens:
                continue
            got = sampled[seq.seq_id]
            tokens = [int(t) for t in got] if isinstance(got, (list, tuple)) else [int(got)]
            for i, token in enumerate(tokens):
                if i:
                    # Speculative decoding: the previous token's K/V was written by the verifying
                    # forward (into slots `BlockManager.reserve` made); it is computed, not pending.
                    self.bm.append_token(seq.seq_id, seq.output_token_ids[-1])
                    seq.num_computed += 1
                seq.output_token_ids.append(token)  # the last one's K/V slot is taken in the next schedule()
                reason = self._stop_reason(seq, token)
                if reason is not None:
                    self._in_flight.discard(seq.seq_id)
                    self._finish(seq, reason)
                    finished.append(seq)
                    break
        self._in_flight = set()
        for seq_id in self._deferred_free:
            self.bm.free(seq_id)
        self._deferred_free.clear()
        return finished
