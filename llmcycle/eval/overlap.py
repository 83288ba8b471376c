"""Decontamination report: which evaluation prompts occur verbatim, as tokens, in the training data.

The embedded prompts are templated ("What is the second parameter of `def f(a, b)`?"), and the split
puts other questions about the same function or word on the training side on purpose, so a fixed-size
n-gram overlap would flag nearly every long prompt. What matters is whether the *whole* prompt (and
its answer) was trained on, so an item counts when its full token sequence occurs verbatim in a
training stream: the pre-training shards (documents joined by a separator that no token id can take)
or the SFT/DPO JSONL files (each string field encoded on its own, a record's fields concatenated in
order, so "prompt then answer" is one contiguous run).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from llmcycle.data.shards import ShardSet
from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.synthetic import Item

SEP = 0xFFFFFFFF  # between documents/records: never a token id, so no match can span two of them


def _stream(seqs: Iterable[Sequence[int] | np.ndarray]) -> bytes:
    sep = np.array([SEP], dtype="<u4")
    return b"".join(sep.tobytes() + np.asarray(s, dtype="<u4").tobytes() for s in seqs) + sep.tobytes()


def shard_stream(shards: ShardSet) -> bytes:
    return _stream(shards.doc(i) for i in range(len(shards)))


def _strings(value, out: list[str]) -> list[str]:
    """Every string of a JSON record in order, except role names (they are template, not content)."""
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for v in value:
            _strings(v, out)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k != "role":
                _strings(v, out)
    return out


def jsonl_stream(paths: Sequence[Path], tok: Tokenizer) -> bytes:
    records = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        records.append(_strings(json.loads(line), []))
                    except json.JSONDecodeError as e:
                        raise LlmcycleError(f"{path}:{lineno}: not valid JSON ({e}).") from None
    flat = tok.encode_batch([s for r in records for s in r]) if records else []
    seqs, i = [], 0
    for r in records:
        seqs.append([t for ids in flat[i: i + len(r)] for t in ids])
        i += len(r)
    return _stream(seqs)


def occurs(stream: bytes, ids: Sequence[int]) -> bool:
    """Whether the token ids occur contiguously in `stream` (a match must start on a token boundary)."""
    needle = np.asarray(ids, dtype="<u4").tobytes()
    start = stream.find(needle)
    while start != -1 and start % 4:
        start = stream.find(needle, start + 1)
    return start != -1


def contamination(items: Sequence[Item], tok: Tokenizer, streams: dict[str, bytes]) -> dict:
    """Per training source: how many items' prompts, and prompt + answer, occur verbatim in it."""
    report: dict = {"items": len(items)}
    for name, stream in streams.items():
        prompts = pairs = 0
        for it in items:
            p = tok.encode(it.prompt)
            if occurs(stream, p):  # a pair can only occur where its prompt does
                prompts += 1
                pairs += occurs(stream, p + tok.encode(it.answer))
        report[name] = {"prompts": prompts, "prompt_and_answer": pairs}
    return report
