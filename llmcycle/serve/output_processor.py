"""From sampled tokens to what a caller sees: incremental text, stop strings, finish reasons, RequestOutput.

The output processor keeps each request's user-facing state: its sequences' growing text (incremental
detokenization, `detokenizer.py`), logprobs and timing metrics. After every step it extends the text of
each sequence that got tokens, searches stop strings only where the new text can complete one, and cuts
the text where the earliest stop string begins, finishing the sequence with reason "stop" as vLLM does
(the stop string is not included; neither is a stop token's text). While a sequence runs, a tail that may
be the start of a stop string is held back, so a streamed text never has to be taken back.

It is tensor-free: tokens come in as ints, and it tells the scheduler to finish a sequence through the
`finish` callback and the model runner to drop a finished request's sequences through `release`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from llmcycle.serve.detokenizer import IncrementalDetokenizer
from llmcycle.serve.sampling import SamplingParams, find_stop, stop_holdback
from llmcycle.serve.scheduler import ScheduledSeq, Sequence
from llmcycle.tokenizer import Tokenizer


@dataclass
class CompletionOutput:
    index: int
    text: str  # cumulative; while unfinished, minus a tail that may be the start of a stop string
    token_ids: list[int]  # cumulative
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} (chosen + top alternatives)
    # the sum of the generated tokens' raw logprobs (vLLM's name); None where some were not scored
    # (speculative decoding)
    cumulative_logprob: float | None = None
    # vLLM's stop_reason: the stop string or stop token id that finished the sequence; None for eos,
    # length or an unfinished sequence
    stop_reason: str | int | None = None


@dataclass
class RequestMetrics:
    """Times (time.monotonic) a server turns into queue time, TTFT, inter-token and end-to-end latency."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held when the request was first scheduled


@dataclass
class RequestOutput:
    """A request's state after a step: `step()` returns one for every request that changed in it."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None


@dataclass
class SeqState:
    """One sequence's text-side state."""

    seq: Sequence
    index: int
    detok: IncrementalDetokenizer | None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    cumulative_logprob: float = 0.0
    num_scored: int = 0  # tokens whose logprob is in cumulative_logprob
    stop_reason: str | int | None = None  # see CompletionOutput


@dataclass
class RequestState:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    metrics: RequestMetrics
    states: list[SeqState] = field(default_factory=list)  # kept here: the scheduler forgets finished ones

    @property
    def finished(self) -> bool:
        return all(st.seq.is_finished for st in self.states)


class OutputProcessor:
    """Live requests' text state; `process` turns one step's tokens into RequestOutputs."""

    def __init__(self, tokenizer: Tokenizer | None, eos_id: int | None,
                 finish: Callable[[str, str], object], release: Callable[[str], None]) -> None:
        # Without a tokenizer the engine works in token ids only: no text, no stop strings.
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.finish = finish  # (seq id, reason): finish a running sequence (the scheduler's)
        self.release = release  # (seq id): a finished or aborted sequence's other state can go
        self.requests: dict[str, RequestState] = {}
        self._owner: dict[str, RequestState] = {}  # live sequence id -> its request
        self._state: dict[str, SeqState] = {}  # live sequence id -> its state

    def add_request(self, req: RequestState, seqs: list[Sequence]) -> None:
        for i, seq in enumerate(seqs):
            detok = IncrementalDetokenizer(self.tokenizer) if self.tokenizer is not None else None
            st = SeqState(seq, i, detok)
            req.states.append(st)
            self._state[seq.seq_id] = st
            self._owner[seq.seq_id] = req
        self.requests[req.request_id] = req

    def pop_request(self, request_id: str) -> RequestState | None:
        """Remove a request (abort); its sequences are released. Unknown ids give None."""
        req = self.requests.pop(request_id, None)
        for st in req.states if req else []:
            self._forget(st.seq.seq_id)
        return req

    def mark_scheduled(self, batch: Iterable[ScheduledSeq], now: float) -> None:
        """Note when each request was first scheduled, and how many of its prompt tokens the prefix cache
        held then (where its first chunk starts)."""
        for s in batch:
            m = self._owner[s.seq.seq_id].metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
                m.num_cached_tokens = s.start

    def process(self, sampled: Iterable[str], logprobs: dict[str, dict[int, float]],
                chosen_logprobs: dict[str, float] | None = None) -> list[RequestOutput]:
        """After the scheduler recorded a step: extend the text of every sequence in `sampled` (ids of those
        that got tokens), apply stop strings, and return the state of every request that changed."""
        now = time.monotonic()
        changed: dict[str, RequestState] = {}
        for sid in sampled:
            req, st = self._owner[sid], self._state[sid]
            if sid in logprobs:
                st.logprobs.append(logprobs[sid])
            if chosen_logprobs and sid in chosen_logprobs:
                st.cumulative_logprob += chosen_logprobs[sid]
                st.num_scored += 1
            self._detokenize(st)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            req.metrics.last_token_time = now
            changed[req.request_id] = req
        return [self._output(req, now) for req in changed.values()]

    def _detokenize(self, st: SeqState) -> None:
        """Extend the text with the new tokens; finish the sequence at the first stop string."""
        seq, stop = st.seq, st.seq.sampling_params.stop
        if st.detok is None:
            return  # token ids only
        ids = seq.output_token_ids
        if ids and seq.finish_reason == "stop" and not seq.sampling_params.ignore_eos and (
                ids[-1] == self.eos_id or ids[-1] in seq.sampling_params.stop_token_ids):
            if ids[-1] != self.eos_id:
                st.stop_reason = ids[-1]
            ids = ids[:-1]  # the stop token is not part of the text, as in vLLM
        delta = st.detok.push(ids, final=seq.is_finished)
        if not delta:
            return
        old = len(st.text)
        st.text += delta
        if stop:
            # Only a stop string overlapping the new text can be new: search from there.
            begin = max(0, old - max(len(s) for s in stop) + 1)
            cut = find_stop(st.text[begin:], stop)
            if cut is not None:
                st.stop_reason = next(s for s in stop if s and st.text.startswith(s, begin + cut))
                st.text = st.text[: begin + cut]
                if seq.is_finished:
                    seq.finish_reason = "stop"  # the stop string came with the last allowed token
                else:
                    self.finish(seq.seq_id, "stop")

    def _output(self, req: RequestState, now: float) -> RequestOutput:
        outs = []
        for st in req.states:
            text = st.text
            if not st.seq.is_finished and req.params.stop:
                text = text[: len(text) - stop_holdback(text, req.params.stop)]
            scored = st.num_scored == len(st.seq.output_token_ids) and st.num_scored > 0
            outs.append(CompletionOutput(st.index, text, list(st.seq.output_token_ids), st.seq.finish_reason,
                                         list(st.logprobs) if req.params.logprobs is not None else None,
                                         st.cumulative_logprob if scored else None, st.stop_reason))
        finished = req.finished
        if finished:
            req.metrics.finished_time = now
            del self.requests[req.request_id]
            for st in req.states:
                self._forget(st.seq.seq_id)
        return RequestOutput(req.request_id, req.prompt_token_ids, outs, finished, req.metrics)

    def _forget(self, sid: str) -> None:
        self._owner.pop(sid, None)
        self._state.pop(sid, None)
        self.release(sid)
