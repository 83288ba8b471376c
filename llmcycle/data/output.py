"""The last stage of `llmcycle data`: tokenizer, tokenization per task, balanced train/val shards.

Tokenization runs as tasks like the other phases (one per input file, resumable by marker) and writes
raw uint32 token files; the driver then cuts the documents, in task order, into shards of near-equal
token counts whose number is a multiple of the rank count, so every rank of a data-parallel run reads
the same amount. The shards are the format `llmcycle pretrain` reads (`docs/token-shards.md`).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmcycle.artifacts import atomic_open, atomic_write_json, publish_dir, staging_dir
from llmcycle.data.pycorpus import is_heldout
from llmcycle.data.shards import token_dtype, write_shard_files, write_sidecar
from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer import Tokenizer


def train_tokenizer_on_docs(doc_files: list[Path], out: Path, kind: str, vocab_size: int, min_frequency: int,
                            train_bytes: int | None, val_fraction: float) -> Tokenizer:
    """Train on the training side of the cleaned documents (task order, capped) and save to `out`."""
    from llmcycle.data.pipeline import iter_docs
    from llmcycle.tokenizer.train import train_tokenizer

    def texts():
        seen = 0
        for f in doc_files:
            for doc in iter_docs(f):
                if is_heldout(doc, val_fraction):
                    continue
                yield doc.text
                seen += len(doc.text.encode("utf-8", "surrogatepass"))
                if train_bytes is not None and seen >= train_bytes:
                    return

    tok = train_tokenizer(texts(), kind=kind, vocab_size=vocab_size, min_frequency=min_frequency)
    tmp = staging_dir(out)
    tok.save_pretrained(tmp)
    publish_dir(tmp, out)
    return tok


@dataclass
class TokenizeJob:
    task: int
    docs_file: str
    tokenizer_dir: str
    out_dir: str
    val_fraction: float
    batch_size: int = 256


def run_tokenize_task(job: TokenizeJob) -> dict:
    """Tokenize one task's cleaned documents (BOS ... EOS each) into raw token and per-document files."""
    from llmcycle.data.pipeline import iter_docs, task_name

    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = task_name(job.task)
    marker = out / f"{name}.done.json"
    if marker.exists():
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    tok = Tokenizer.from_pretrained(job.tokenizer_dir)
    lengths: list[int] = []
    heldout: list[bool] = []
    nbytes: list[int] = []
    with atomic_open(out / f"{name}.tokens.u32", durable=False) as f:  # work/: a cache, not synced
        batch = []
        for doc in _with_end(iter_docs(Path(job.docs_file))):
            if doc is not None:
                batch.append(doc)
            if batch and (doc is None or len(batch) >= job.batch_size):
                for d, ids in zip(batch, tok.encode_batch([d.text for d in batch], add_bos=True, add_eos=True)):
                    f.write(np.asarray(ids, dtype=np.uint32).tobytes())
                    lengths.append(len(ids))
                    heldout.append(is_heldout(d, job.val_fraction))
                    nbytes.append(len(d.text.encode("utf-8", "surrogatepass")))
                batch = []
    np.save(out / f"{name}.docs.npy", np.array([lengths, heldout, nbytes], dtype=np.int64).reshape(3, -1))
    lengths_a, val_a = np.array(lengths, dtype=np.int64), np.array(heldout, dtype=bool)
    summary = {"task": job.task, "docs": len(lengths), "docs_val": int(val_a.sum()),
               "tokens_train": int(lengths_a[~val_a].sum()), "tokens_val": int(lengths_a[val_a].sum()),
               "bytes": int(sum(nbytes)), "seconds": time.perf_counter() - t0}
    atomic_write_json(marker, summary, indent=None, end="", durable=False)
    return summary


def _with_end(items):
    yield from items
    yield None


def balanced_cuts(lengths: np.ndarray, num_shards: int) -> list[int]:
    """Document indices that cut `lengths` into `num_shards` contiguous runs of near-equal token sums.

    Returns num_shards + 1 boundaries from 0 to len(lengths); every run holds at least one document.
    """
    n_docs = len(lengths)
    if not 1 <= num_shards <= n_docs:
        raise ValueError(f"cannot cut {n_docs} documents into {num_shards} non-empty shards")
    cum = np.cumsum(lengths)
    total = int(cum[-1])
    cuts = [0]
    for k in range(1, num_shards):
        target = total * k / num_shards
        i = int(np.searchsorted(cum, target))  # cum[i] is the first running sum >= target
        # cut after document i or before it, whichever lands closer to the target
        cut = i + 1 if i < n_docs and (cum[i] - target) <= (target - (cum[i - 1] if i > 0 else 0)) else i
        cut = max(cut, cuts[-1] + 1)
        cut = min(cut, n_docs - (num_shards - k))
        cuts.append(cut)
    cuts.append(n_docs)
    return cuts


def shard_count(total_tokens: int, num_docs: int, shard_tokens: int, num_ranks: int) -> int:
    n = max(1, -(-total_tokens // shard_tokens))
    n = -(-n // num_ranks) * num_ranks  # a multiple of the rank count
    return max(1, min(n, num_docs))


def write_split(split: str, tok_dir: Path, tasks: list[dict], out: Path, tokenizer: Tokenizer,
                shard_tokens: int, num_ranks: int, metadata: dict) -> dict | None:
    """Write the `split` ("train" or "val") documents of every task as one balanced shard set at `out`,
    replacing a previous one atomically; None (and `out` untouched) when the split has no documents."""
    from llmcycle.data.pipeline import task_name

    pieces = []  # per task: (tokens memmap, doc starts, doc lengths, selected mask, bytes, source)
    for t in tasks:
        name = task_name(t["task"])
        lengths, heldout, nbytes = np.load(tok_dir / f"{name}.docs.npy")
        if len(lengths) == 0:
            continue
        tokens = np.memmap(tok_dir / f"{name}.tokens.u32", dtype=np.uint32, mode="r")
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        selected = heldout.astype(bool) if split == "val" else ~heldout.astype(bool)
        pieces.append((tokens, starts[selected], lengths[selected], nbytes[selected], t["reader"]))
    doc_lengths = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros(0, dtype=np.int64)
    if len(doc_lengths) == 0:
        return None
    owner = np.concatenate([np.full(len(p[2]), i) for i, p in enumerate(pieces)])
    local = np.concatenate([np.arange(len(p[2])) for p in pieces])
    n = shard_count(int(doc_lengths.sum()), len(doc_lengths), shard_tokens, num_ranks)
    cuts = balanced_cuts(doc_lengths, n)
    tmp = staging_dir(out)  # the previous shard set stays whole until this one is
    dtype = token_dtype(tokenizer.vocab_size)
    entries = []
    total_bytes = 0
    for s in range(n):
        parts, sources = [], Counter()
        for j in range(cuts[s], cuts[s + 1]):
            tokens, starts, lens, nbytes, source = pieces[owner[j]]
            k = local[j]
            parts.append(np.asarray(tokens[starts[k]: starts[k] + lens[k]]))
            sources[source] += 1
            total_bytes += int(nbytes[k])
        shard_tokens_arr = np.concatenate(parts)
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in parts], out=offsets[1:])
        entry = write_shard_files(tmp, f"shard_{s:05d}", shard_tokens_arr, offsets, dtype)
        entry["sources"] = dict(sorted(sources.items()))
        entries.append(entry)
    meta = dict(metadata, split=split, balanced_for_ranks=num_ranks if n % num_ranks == 0 else None)
    sidecar = write_sidecar(tmp, entries, tokenizer.vocab_size, tokenizer.content_hash(), tokenizer.bos_id,
                            total_bytes, meta)
    publish_dir(tmp, out)
    return sidecar


def check_tokenizer(path: str) -> Tokenizer:
    p = Path(path)
    if not (p / "tokenizer.json").is_file():
        raise LlmcycleError(f"tokenizer.path: {p} holds no tokenizer.json.")
    return Tokenizer.from_pretrained(p)
