"""Structured outputs: decoding constrained by a JSON schema, a regex, a choice or a Lark grammar.

vLLM's `StructuredOutputsParams` names (json, json_object, regex, choice, grammar) on `SamplingParams`;
the OpenAI routes fill it from `response_format` or vLLM's `structured_outputs` field. Every step, a
guided sequence's next-token logits are masked to the tokens its grammar allows (`GuidedRows.mask`), and
the sampled token advances its matcher, so what comes out parses, whatever the weights: the tests run a
random-weight model. A sequence stops when its grammar is complete (only a stop token is allowed then);
one cut off by `max_tokens` ends with finish reason "length", as OpenAI's does.

The grammar engine is llguidance (Microsoft's, used by vLLM and SGLang): a 3 MB wheel with no Python
dependencies that reads a Hugging Face `tokenizer.json` as it is, computes a 4k-token mask in ~10-20 µs and
compiles a schema lazily (no per-schema warm-up). xgrammar, the other engine vLLM uses, needs transformers
and triton installed beside it, too heavy for the base install of a CPU server.

JSON is generated compact (`", "` and `": "` separators, no free whitespace): with free whitespace a weak
model can fill its whole budget with spaces and newlines, which the grammar allows.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from typing import Any

import torch

from llmcycle.errors import LlmcycleError

# json.dumps's separators; "whitespace_flexible": False forbids any other whitespace between tokens
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class StructuredOutputsParams:
    """One of: `json` (a JSON schema, as a dict or its text), `json_object` (any JSON object), `regex`,
    `choice` (one of the strings), `grammar` (Lark, llguidance's dialect, which can embed `%json {...}`)."""

    json: dict | str | None = None
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "json_object", "regex", "choice", "grammar") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(f"structured_outputs takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(given) or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs choice must be a list of non-empty strings")

    def grammar_text(self) -> str:
        """The llguidance grammar this stands for (not yet checked: `GuidedDecoding.check` does)."""
        import llguidance

        if self.json is not None or self.json_object:
            schema = {"type": "object"} if self.json_object else self.json
            try:
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"structured_outputs json: not a JSON schema object: {exc}") from None
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in self.choice))
        return llguidance.LLMatcher.grammar_from_lark(self.grammar or "")


def _require_llguidance() -> Any:
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a base dependency; a broken install still gets one line
        raise LlmcycleError("structured outputs need llguidance: pip install llguidance") from None
    return llguidance


class GuidedDecoding:
    """An engine's grammar side: the tokenizer as llguidance sees it (built once) and one matcher per
    guided sequence. `stop_ids`: the tokens that end a sequence (eos, the template's end of turn), allowed
    exactly when a grammar is complete."""

    def __init__(self, tokenizer_json: str, vocab_size: int, stop_ids: list[int]) -> None:
        llguidance = _require_llguidance()
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=stop_ids or None)
        self.matchers: dict[str, Any] = {}
        self._bits = torch.arange(32, dtype=torch.int32)
        self._words = (vocab_size + 31) // 32
        self._eos = torch.tensor(self.tokenizer.eos_tokens, dtype=torch.long)
        self._checked: dict[str, str] = {}  # a request is checked in several places

    def check(self, params: StructuredOutputsParams) -> str:
        """The grammar's text; ValueError naming the problem for a schema, regex or grammar llguidance
        refuses (the request's 400, before anything is queued)."""
        llguidance = _require_llguidance()
        key = json.dumps(dataclasses.asdict(params), sort_keys=True)
        if key in self._checked:
            return self._checked[key]
        grammar = params.grammar_text()
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise ValueError(f"structured_outputs is not valid: {error.strip().splitlines()[0]}")
        if len(self._checked) >= 256:
            self._checked.clear()
        self._checked[key] = grammar
        return grammar

    def add(self, seq_id: str, grammar: str) -> None:
        llguidance = _require_llguidance()
        self.matchers[seq_id] = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    def remove(self, seq_id: str) -> None:
        self.matchers.pop(seq_id, None)

    def allowed(self, seqs: list[Any]) -> torch.Tensor:
        """[len(seqs), vocab] bool: the tokens each guided sequence may sample next. Where a grammar is
        complete, the sequence's own stop tokens are allowed (the grammar may also go on, as `[1, 2` may
        become `[1, 23`); where it is not, no stop token is."""
        words = torch.empty(len(seqs), self._words, dtype=torch.int32)
        for row, seq in zip(words, seqs):  # llguidance writes each mask in place: no copies
            self.matchers[seq.seq_id].unsafe_compute_mask_ptr(row.data_ptr(), self._words * 4)
        allowed = ((words.unsqueeze(-1) >> self._bits) & 1).view(len(seqs), -1)[:, : self.vocab_size].bool()
        allowed[:, self._eos] = False
        for i, seq in enumerate(seqs):
            matcher = self.matchers[seq.seq_id]
            if matcher.is_accepting() or matcher.is_stopped():
                stops = self.stops_of(seq) or self.tokenizer.eos_tokens  # ignore_eos: an eos that ends nothing
                allowed[i, [t for t in stops if t < self.vocab_size]] = True
        return allowed

    def mask(self, seqs: list[Any], logits: torch.Tensor) -> None:
        """Set, in place, the logits of tokens the grammar forbids to -inf on every row whose sequence
        (a `Sequence`: row i is seqs[i]) is guided; unguided rows are left alone."""
        rows = [i for i, s in enumerate(seqs) if s.seq_id in self.matchers]
        if not rows:
            return
        forbidden = ~self.allowed([seqs[i] for i in rows]).to(logits.device)
        if len(rows) == len(seqs):  # every row guided: in place, no gather
            logits[:, : self.vocab_size].masked_fill_(forbidden, float("-inf"))
            return
        index = torch.tensor(rows, device=logits.device)
        part = logits[index]
        part[:, : self.vocab_size].masked_fill_(forbidden, float("-inf"))
        logits[index] = part

    @staticmethod
    def stops_of(seq: Any) -> list[int]:
        p = seq.sampling_params
        return ([] if p.ignore_eos or seq.eos_token_id is None else [seq.eos_token_id]) + list(p.stop_token_ids)

    def advance(self, seq: Any, token: int) -> None:
        """Feed the sampled token to the sequence's matcher; a stop token ends the sequence instead."""
        matcher = self.matchers.get(seq.seq_id)
        if matcher is None or token in self.stops_of(seq) or token in self.tokenizer.eos_tokens:
            return
        if not matcher.consume_token(token):  # cannot happen for a token from the mask
            raise LlmcycleError(f"guided decoding: {matcher.get_error()}")

