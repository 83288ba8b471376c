"""The readers of `llmcycle data`: each turns input files of one format into `Document`s.

`build_reader({"type": "jsonl", "paths": [...], ...}, "sources[0]")` checks a recipe entry and returns
the reader. Every reader module is imported here so that it registers itself in `READERS`. See
docs/data-readers.md for each reader's parameters, metadata and the reasons bad input is counted under.
"""

from __future__ import annotations

from typing import Any

from llmcycle.config import build
from llmcycle.data.readers import chat, code, jsonl, parquet, python, text, warc, wiki  # noqa: F401
from llmcycle.data.readers.base import READERS, FileParams, Problems, Reader, expand_paths, register_reader
from llmcycle.errors import ConfigError

__all__ = ["READERS", "FileParams", "Problems", "Reader", "build_reader", "expand_paths", "register_reader"]


def build_reader(spec: dict[str, Any], where: str) -> Reader:
    """The reader a recipe entry names (`type`) with its parameters checked; `where` names the entry."""
    if not isinstance(spec, dict):
        raise ConfigError(f"recipe: {where} must be a mapping with a `type`, got {spec!r}.")
    params = dict(spec)
    kind = params.pop("type", None)
    if not isinstance(kind, str) or kind not in READERS:
        got = "no `type`" if kind is None else f"type {kind!r}"
        raise ConfigError(f"recipe: {where} has {got}; valid reader types: {', '.join(sorted(READERS))}.")
    cls = READERS[kind]
    return cls(build(cls.Params, params, prefix=f"{where}."))
