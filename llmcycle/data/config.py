"""The recipe of `llmcycle data`: where documents come from, which steps they pass, what is written."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from llmcycle.config import field_help as F


@dataclass
class DataTokenizerSection:
    path: str | None = F(None, "use this tokenizer directory; null trains one on the cleaned training text")
    kind: Literal["bpe", "wordpiece", "unigram"] = F("bpe", "tokenizer model to train")
    vocab_size: int = F(4096, "vocabulary size to train, special tokens included")
    min_frequency: int = F(2, "minimum frequency of a merge / token")
    train_bytes: int | None = F(100_000_000, "train on at most this many bytes of cleaned text (in task order)")


@dataclass
class DataShardsSection:
    val_fraction: float = F(0.01, "fraction of documents for validation, by hash of the document id / split group")
    num_ranks: int = F(1, "shard count is a multiple of this and shards hold near-equal tokens (one per rank)")
    shard_tokens: int = F(50_000_000, "target tokens per shard (upper bound unless one document is longer)")


@dataclass
class DataConfig:
    out_dir: str = F("runs/data", "output: tokenizer/, train/, val/ shards, documents/, stats.json, manifest")
    inputs: list[dict] = F([{"type": "python"}], "sources: each {type: jsonl|parquet|text|warc|code|wiki|chat|"
                           "python, paths: [globs], ...reader params}")
    steps: list[Any] = F([], "steps in order: a name or {name: {params}} (see docs/data.md)")
    max_doc_bytes: int = F(10_000_000, "documents larger than this (UTF-8 bytes) are dropped as over_size_limit")
    executor: Literal["local", "ray"] = F("local", "local processes, or Ray tasks")
    workers: int = F(0, "local processes (0: one per CPU core); with Ray, CPUs of a Ray instance started here")
    ray_address: str | None = F(None, "address of a running Ray cluster; null starts a local Ray instance")
    tokenize: bool = F(True, "train/use the tokenizer and write shards; false stops at the cleaned documents/")
    samples_per_reason: int = F(3, "dropped documents kept per step and reason for inspection")
    tokenizer: DataTokenizerSection = field(default_factory=DataTokenizerSection)
    shards: DataShardsSection = field(default_factory=DataShardsSection)
