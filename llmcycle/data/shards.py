"""On-disk token shards: the tokenized corpus that pre-training reads.

A shard set is a directory (the full specification is docs/token-shards.md):

    NAME.bin      flat token ids of every document in the shard, back to back, raw
                  little-endian uint16 when vocab_size <= 65536, else uint32
    NAME.idx      little-endian int64 document offsets into NAME.bin: num_docs + 1 entries,
                  the first 0 and the last num_tokens; document i is bin[idx[i]:idx[i+1]]
    shards.json   the sidecar: format, version, dtype, vocab_size, tokenizer_hash, bos_id,
                  totals, one entry per shard with its sha256s, free-form metadata

Every file is written atomically (llmcycle/artifacts/io.py: temporary name, fsync, rename), and
`shards.json` is written last, so a directory without it is an incomplete write. Writing one
shard (`write_shard_files`) needs nothing but its own tokens, so a multi-process pipeline can
write shards in workers and call `write_sidecar` once at the end.

If `bos_id` is not None every document must begin with it; the packed loader relies on that
to start every training row at a document's BOS.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from llmcycle.artifacts import atomic_write_bytes, atomic_write_json, sha256_file
from llmcycle.errors import LlmcycleError

FORMAT = "llmcycle-token-shards"
VERSION = 1
SIDECAR = "shards.json"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_IDX_DTYPE = np.dtype("<i8")


def token_dtype(vocab_size: int) -> str:
    """The dtype name used for a vocabulary: the smallest of uint16/uint32 that holds every id."""
    if vocab_size < 1 or vocab_size > 1 << 32:
        raise ValueError(f"vocab_size must be in [1, 2**32], got {vocab_size}")
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def write_shard_files(out_dir: str | os.PathLike, name: str, tokens: np.ndarray, offsets: np.ndarray,
                      dtype: str) -> dict:
    """Write NAME.bin and NAME.idx atomically and return the shard's sidecar entry.

    tokens: all token ids of the shard, already validated against the vocabulary;
    offsets: int64 document boundaries, num_docs + 1 entries, first 0 and last len(tokens).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokens = np.ascontiguousarray(tokens, dtype=_DTYPES[dtype])
    offsets = np.ascontiguousarray(offsets, dtype=_IDX_DTYPE)
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        raise ValueError(f"shard {name}: offsets must rise from 0 to {len(tokens)}")
    sha_bin = atomic_write_bytes(out / f"{name}.bin", tokens.tobytes())
    sha_idx = atomic_write_bytes(out / f"{name}.idx", offsets.tobytes())
    return {"name": name, "num_docs": len(offsets) - 1, "num_tokens": len(tokens),
            "sha256_bin": sha_bin, "sha256_idx": sha_idx}


def write_sidecar(out_dir: str | os.PathLike, shards: list[dict], vocab_size: int, tokenizer_hash: str,
                  bos_id: int | None, num_bytes: int | None = None, metadata: dict | None = None) -> dict:
    """Write shards.json for already written shards; this is what marks the directory complete."""
    out = Path(out_dir)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "dtype": token_dtype(vocab_size),
        "vocab_size": int(vocab_size),
        "tokenizer_hash": tokenizer_hash,
        "bos_id": None if bos_id is None else int(bos_id),
        "num_docs": sum(s["num_docs"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_bytes": None if num_bytes is None else int(num_bytes),
        "shards": list(shards),
        "metadata": dict(metadata or {}),
    }
    atomic_write_json(out / SIDECAR, meta)  # indent 2, final newline
    return meta


class ShardWriter:
    """Accumulates documents and writes them as shards of about `shard_tokens` tokens.

    Documents never span shards: a shard is flushed before a document that would overflow it,
    so only a single document longer than `shard_tokens` makes a shard larger than that.
    Use as a context manager; leaving the block with an exception writes no shards.json.
    """

    def __init__(self, out_dir: str | os.PathLike, vocab_size: int, tokenizer_hash: str, bos_id: int | None,
                 shard_tokens: int = 1 << 24, prefix: str = "shard", metadata: dict | None = None):
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        if bos_id is not None and not 0 <= bos_id < vocab_size:
            raise ValueError(f"bos_id {bos_id} is outside the vocabulary of size {vocab_size}")
        self.out_dir = Path(out_dir)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(vocab_size)
        self.tokenizer_hash = tokenizer_hash
        self.bos_id = bos_id
        self.shard_tokens = int(shard_tokens)
        self.prefix = prefix
        self.metadata = dict(metadata or {})
        self.out_dir.mkdir(parents=True, exist_ok=True)
        # A stale sidecar would make a half-rewritten directory look complete.
        (self.out_dir / SIDECAR).unlink(missing_ok=True)
        self._docs: list[np.ndarray] = []
        self._buffered = 0
        self._entries: list[dict] = []
        self._num_bytes: int | None = 0
        self._result: dict | None = None

    def add(self, ids: Sequence[int] | np.ndarray, num_bytes: int | None = None) -> None:
        """Add one document. num_bytes: UTF-8 size of its source text, if known."""
        if self._result is not None:
            raise RuntimeError("ShardWriter.add called after close")
        arr = np.asarray(ids)
        if arr.ndim != 1 or len(arr) == 0:
            raise ValueError(f"a document must be a non-empty 1-D sequence of ids, got shape {arr.shape}")
        if arr.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token id {lo if lo < 0 else hi} is outside the vocabulary of size {self.vocab_size}")
        if self.bos_id is not None and int(arr[0]) != self.bos_id:
            raise ValueError(f"document starts with id {int(arr[0])}, not bos_id {self.bos_id}")
        if self._buffered and self._buffered + len(arr) > self.shard_tokens:
            self._flush()
        self._docs.append(arr.astype(_DTYPES[self.dtype]))
        self._buffered += len(arr)
        if num_bytes is None or self._num_bytes is None:
            self._num_bytes = None
        else:
            self._num_bytes += int(num_bytes)

    def _flush(self) -> None:
        if not self._docs:
            return
        offsets = np.zeros(len(self._docs) + 1, dtype=_IDX_DTYPE)
        np.cumsum([len(d) for d in self._docs], out=offsets[1:])
        name = f"{self.prefix}_{len(self._entries):05d}"
        self._entries.append(write_shard_files(self.out_dir, name, np.concatenate(self._docs), offsets, self.dtype))
        self._docs, self._buffered = [], 0

    def close(self) -> dict:
        """Flush the last shard, write shards.json and return its contents (idempotent)."""
        if self._result is None:
            self._flush()
            if not self._entries:
                raise LlmcycleError(f"no documents were written to {self.out_dir}, so no token shards were made.")
            self._result = write_sidecar(self.out_dir, self._entries, self.vocab_size, self.tokenizer_hash,
                                         self.bos_id, self._num_bytes, self.metadata)
        return self._result

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()


def tokenize_to_shards(texts: Iterable[str], tokenizer, out_dir: str | os.PathLike, batch_size: int = 256,
                       shard_tokens: int = 1 << 24, metadata: dict | None = None, progress: bool = True) -> dict:
    """Tokenize texts (each one document, with BOS and EOS) into a shard set; returns the sidecar dict.

    tokenizer needs .encode_batch(list[str], add_bos=True, add_eos=True), .vocab_size, .bos_id
    and .content_hash(); the hash is recorded so training can refuse shards from another tokenizer.
    """
    from llmcycle.progress import progress as progress_bar

    writer = ShardWriter(out_dir, tokenizer.vocab_size, tokenizer.content_hash(), tokenizer.bos_id,
                         shard_tokens, metadata=metadata)
    num_docs = 0
    bar = progress_bar(desc=f"tokenizing into {out_dir}", unit="doc", disable=not progress)
    try:
        batch: list[str] = []
        for text in _with_sentinel(texts):
            if text is not None:
                batch.append(text)
            if batch and (text is None or len(batch) >= batch_size):
                for t, ids in zip(batch, tokenizer.encode_batch(batch, add_bos=True, add_eos=True)):
                    writer.add(ids, num_bytes=len(t.encode("utf-8")))
                num_docs += len(batch)
                bar.update(len(batch))
                batch = []
    finally:
        bar.close()
    if num_docs == 0:
        raise LlmcycleError(f"no documents to tokenize into {out_dir}: the input texts were empty.")
    return writer.close()


def _with_sentinel(items: Iterable[str]):
    # A trailing None tells the batching loop to flush its last partial batch.
    yield from items
    yield None


class ShardSet:
    """Read-only view of a shard set; token files are memory-mapped, offsets held in memory."""

    def __init__(self, directory: str | os.PathLike, verify: bool = False):
        self.directory = Path(directory)
        side = self.directory / SIDECAR
        if not side.is_file():
            raise LlmcycleError(f"{side} is missing, so {self.directory} is not a complete token-shard set "
                                "(the write may have been interrupted).")
        try:
            meta = json.loads(side.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise LlmcycleError(f"{side} is not valid JSON ({e}).") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise LlmcycleError(f"{side} is not an {FORMAT} sidecar (its format field is "
                                f"{meta.get('format') if isinstance(meta, dict) else None!r}).")
        if meta.get("version") != VERSION:
            raise LlmcycleError(f"{side} has format version {meta.get('version')!r}; this llmcycle reads version "
                                f"{VERSION}.")
        try:
            self.dtype = _DTYPES[meta["dtype"]]
            entries = meta["shards"]
            self.vocab_size = int(meta["vocab_size"])
            self.num_docs = int(meta["num_docs"])
            self.num_tokens = int(meta["num_tokens"])
            names = [(e["name"], int(e["num_docs"]), int(e["num_tokens"])) for e in entries]
        except (KeyError, TypeError, ValueError) as e:
            raise LlmcycleError(f"{side} lacks a valid field {e} (dtype must be uint16 or uint32).") from None
        if sum(n for _, n, _ in names) != self.num_docs or sum(t for _, _, t in names) != self.num_tokens:
            raise LlmcycleError(f"{side} totals num_docs/num_tokens do not match the sum over its shards.")
        self.meta = meta
        self.tokenizer_hash = meta.get("tokenizer_hash")
        self.bos_id = meta.get("bos_id")
        self.num_bytes = meta.get("num_bytes")

        self._bins: list[np.ndarray] = []
        offsets = [np.zeros(1, dtype=np.int64)]
        tok_start = [0]
        doc_start = [0]
        for entry, (name, n_docs, n_tok) in zip(entries, names):
            bin_path, idx_path = self.directory / f"{name}.bin", self.directory / f"{name}.idx"
            self._check_size(bin_path, n_tok * self.dtype.itemsize)
            self._check_size(idx_path, (n_docs + 1) * _IDX_DTYPE.itemsize)
            if verify:
                for path, key in ((bin_path, "sha256_bin"), (idx_path, "sha256_idx")):
                    if sha256_file(path) != entry.get(key):
                        raise LlmcycleError(f"{path} does not match its sha256 in {side}; the file is corrupt.")
            idx = np.fromfile(idx_path, dtype=_IDX_DTYPE)
            if idx[0] != 0 or idx[-1] != n_tok or np.any(np.diff(idx) < 0):
                raise LlmcycleError(f"{idx_path} is corrupt: its offsets must rise from 0 to {n_tok}.")
            # np.memmap cannot map an empty file.
            self._bins.append(np.memmap(bin_path, dtype=self.dtype, mode="r") if n_tok else
                              np.zeros(0, dtype=self.dtype))
            offsets.append(idx[1:] + tok_start[-1])
            tok_start.append(tok_start[-1] + n_tok)
            doc_start.append(doc_start[-1] + n_docs)
        self._offsets = np.concatenate(offsets).astype(np.int64)
        self._tok_start = np.asarray(tok_start, dtype=np.int64)
        self._doc_start = np.asarray(doc_start, dtype=np.int64)

    @staticmethod
    def _check_size(path: Path, expected: int) -> None:
        if not path.is_file():
            raise LlmcycleError(f"{path} is missing although {SIDECAR} lists it.")
        size = path.stat().st_size
        if size != expected:
            raise LlmcycleError(f"{path} is {size} bytes but {SIDECAR} implies {expected} bytes "
                                f"(the file is {'truncated' if size < expected else 'too long'}).")

    def __len__(self) -> int:
        return self.num_docs

    def doc(self, i: int) -> np.ndarray:
        """Token ids of document i (global index across shards), a read-only view."""
        if i < 0:
            i += self.num_docs
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.num_docs} documents")
        s = int(np.searchsorted(self._doc_start, i, side="right")) - 1
        a, b = self._offsets[i] - self._tok_start[s], self._offsets[i + 1] - self._tok_start[s]
        return self._bins[s][a:b]

    def doc_lengths(self) -> np.ndarray:
        return np.diff(self._offsets)

    def doc_offsets(self) -> np.ndarray:
        """Global token offsets (num_docs + 1) of the documents in the concatenation of all shards."""
        return self._offsets

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Gather tokens at global token positions (any shape) with one fancy index per shard touched."""
        positions = np.asarray(positions, dtype=np.int64)
        if len(self._bins) == 1:
            return np.asarray(self._bins[0][positions])
        flat = positions.ravel()
        out = np.empty(flat.shape, dtype=self.dtype)
        shard = np.searchsorted(self._tok_start, flat, side="right") - 1
        for s in np.unique(shard):
            m = shard == s
            out[m] = self._bins[s][flat[m] - self._tok_start[s]]
        return out.reshape(positions.shape)

    def content_hash(self) -> str:
        """A hash of the shard names and sha256s in the sidecar: equal for equal content, cheap to compute."""
        h = hashlib.sha256()
        for e in self.meta["shards"]:
            h.update(f"{e['name']}:{e.get('sha256_bin')}:{e.get('sha256_idx')}\n".encode())
        return h.hexdigest()[:16]
