"""Turn a recipe's data section into a tokenizer and train/held-out token shards.

Given shards, they are used as they are. Given a corpus (the embedded Python corpus by default), it is
split by document hash, a tokenizer is trained on the training side (unless one is given) and both
sides are tokenized into shards under `<out_dir>/data/`. The result is keyed by a hash of everything
that determines it, so a second run (or a resumed one) reuses it instead of redoing the work.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from llmcycle.artifacts import atomic_write_json, sha256_file
from llmcycle.data.shards import ShardSet, tokenize_to_shards
from llmcycle.errors import LlmcycleError
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.config import PretrainConfig
from llmcycle.train.core.distributed import DistInfo, barrier

log = logging.getLogger(__name__)

PREPARED = "prepared.json"


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    tokenizer_dir: Path
    train: ShardSet
    val: ShardSet
    info: dict


def prepare_data(cfg: PretrainConfig, out_dir: Path, dist: DistInfo) -> PreparedData:
    if dist.is_main:
        _prepare_on_main(cfg, out_dir)
    barrier(dist)  # other ranks open what rank 0 wrote
    return _open(cfg, out_dir)


def _tokenizer_source(cfg: PretrainConfig) -> Path | None:
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path)
    if cfg.init_from:
        return Path(cfg.init_from)  # continued pre-training keeps the model's own tokenizer
    return None


def _key(cfg: PretrainConfig) -> str:
    from llmcycle import __version__

    src = _tokenizer_source(cfg)
    parts = {
        "data": asdict(cfg.data),
        "tokenizer": asdict(cfg.tokenizer),
        "tokenizer_hash": Tokenizer.from_pretrained(src).content_hash() if src else None,
        "llmcycle": __version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _prepare_on_main(cfg: PretrainConfig, out_dir: Path) -> None:
    if cfg.data.train_shards:
        return
    data_dir = out_dir / "data"
    key = _key(cfg)
    marker = data_dir / PREPARED
    if marker.exists() and json.loads(marker.read_text()).get("key") == key:
        log.info(f"data: reusing prepared shards in {data_dir}")
        return
    from llmcycle.data.pycorpus import split_heldout
    from llmcycle.data.sources import load_documents
    from llmcycle.tokenizer.train import bytes_per_token, train_tokenizer

    t0 = time.time()
    docs = load_documents(cfg.data.corpus, cfg.data.max_bytes)
    train_docs, val_docs = split_heldout(docs, cfg.data.heldout_fraction)
    if not train_docs or not val_docs:
        raise LlmcycleError(
            f"corpus {cfg.data.corpus!r}: {len(docs)} documents split into {len(train_docs)} train / "
            f"{len(val_docs)} held-out; both need at least one (adjust data.heldout_fraction)."
        )
    log.info(f"data: {len(docs)} documents ({sum(len(d.text) for d in docs) / 1e6:.1f}M chars) from "
             f"{cfg.data.corpus!r}: {len(train_docs)} train, {len(val_docs)} held out [{time.time() - t0:.1f}s]")
    src = _tokenizer_source(cfg)
    tok_dir = data_dir / "tokenizer"
    if src:
        tokenizer = Tokenizer.from_pretrained(src)
    else:
        t0 = time.time()
        tokenizer = train_tokenizer(
            (d.text for d in train_docs), kind=cfg.tokenizer.kind, vocab_size=cfg.tokenizer.vocab_size,
            min_frequency=cfg.tokenizer.min_frequency, model_max_length=cfg.train.seq_len,
        )
        log.info(f"tokenizer: trained {cfg.tokenizer.kind} with {tokenizer.vocab_size} tokens [{time.time() - t0:.1f}s]")
    tokenizer.save_pretrained(tok_dir)
    bpt = bytes_per_token(tokenizer, [d.text for d in val_docs])
    log.info(f"tokenizer: {bpt:.2f} bytes/token on held-out text")
    meta = {"corpus": cfg.data.corpus}
    train = tokenize_to_shards([d.text for d in train_docs], tokenizer, data_dir / "train", metadata=meta)
    val = tokenize_to_shards([d.text for d in val_docs], tokenizer, data_dir / "val", metadata=meta)
    info = {
        "key": key, "corpus": cfg.data.corpus, "documents": {"train": len(train_docs), "val": len(val_docs)},
        "tokens": {"train": train["num_tokens"], "val": val["num_tokens"]},
        "heldout_bytes_per_token": bpt, "tokenizer_hash": tokenizer.content_hash(),
    }
    atomic_write_json(data_dir / PREPARED, info, end="")  # the marker that the data is complete
    log.info(f"data: {train['num_tokens']:,} train tokens, {val['num_tokens']:,} held-out tokens in {data_dir}")


def _open(cfg: PretrainConfig, out_dir: Path) -> PreparedData:
    if cfg.data.train_shards:
        src = _tokenizer_source(cfg)
        if src is None:
            raise LlmcycleError("data.train_shards is set but no tokenizer: set tokenizer.path (or init_from).")
        if not cfg.data.val_shards:
            raise LlmcycleError("data.train_shards is set: set data.val_shards too (held-out evaluation needs it).")
        tokenizer, tok_dir = Tokenizer.from_pretrained(src), src
        train, val = ShardSet(cfg.data.train_shards), ShardSet(cfg.data.val_shards)
        # shards.json lists every shard file with its sha256: its hash pins the exact token sets trained on
        info = {"train_shards": cfg.data.train_shards, "val_shards": cfg.data.val_shards,
                "shards_sha256": {split: sha256_file(Path(p) / "shards.json") for split, p in
                                  (("train", cfg.data.train_shards), ("val", cfg.data.val_shards))
                                  if (Path(p) / "shards.json").is_file()}}
    else:
        data_dir = out_dir / "data"
        tok_dir = data_dir / "tokenizer"
        tokenizer = Tokenizer.from_pretrained(tok_dir)
        train, val = ShardSet(data_dir / "train"), ShardSet(data_dir / "val")
        info = json.loads((data_dir / PREPARED).read_text())
    for name, shards in (("train", train), ("val", val)):
        if shards.tokenizer_hash != tokenizer.content_hash():
            raise LlmcycleError(
                f"{name} shards were tokenized with tokenizer {shards.tokenizer_hash[:12]}, but the tokenizer in "
                f"{tok_dir} is {tokenizer.content_hash()[:12]}; re-tokenize or use the matching tokenizer."
            )
    return PreparedData(tokenizer, Path(tok_dir), train, val, info)
