"""Evaluation suite "v1": the same few numbers at every stage of a model's life.

- held-out bits per byte and perplexity, computed by pre-training's own `heldout_metrics` (same
  packing, same rows, same byte counts), so a base model's number equals its pre-training `val_bpb`;
- multiple choice by log-likelihood on the held-out embedded items (correct answer vs its plausible
  wrong one), which moves before generation does and so shows progress on tiny models;
- exact match of greedy answers (the serving engine, batched) on the same held-out items;
- optionally a reward model's judgement of two models' answers (`win_rate`).

The item set is part of the version: changing the items, prompt format or metric definitions needs a
new SUITE_VERSION, since numbers are only comparable within one.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from llmcycle.artifacts.hashing import sha256_file
from llmcycle.data.loader import PackedLoader
from llmcycle.data.shards import ShardSet
from llmcycle.errors import LlmcycleError
from llmcycle.eval.overlap import contamination, jsonl_stream, shard_stream
from llmcycle.model.heads import ScalarHeadModel, last_token_scores
from llmcycle.model.transformer import Transformer
from llmcycle.paths import check_model_dir
from llmcycle.serve.engine import LLM
from llmcycle.serve.sampling import SamplingParams
from llmcycle.tokenizer import Tokenizer
from llmcycle.train.posttrain.evaluate import normalize_answer
from llmcycle.train.posttrain.logps import token_logps
from llmcycle.train.posttrain.synthetic import Item, make_items, split_items
from llmcycle.train.pretrain.evaluate import heldout_metrics

SUITE_VERSION = "v1"
EMBEDDED = {"seed": 0, "per_task": 400, "eval_fraction": 0.1}  # the split post-training trains against
MAX_NEW_TOKENS = 24
DEFAULT_SEQ_LEN = 256


# --- where a model came from ---------------------------------------------------------------------------


@dataclass
class Lineage:
    """What a model's manifest chain (inputs.model.path back to pre-training) says about its data."""

    heldout: Path | None = None
    train_shards: Path | None = None
    seq_len: int | None = None
    train_jsonl: list[Path] = field(default_factory=list)


def _find(path: str, model_dir: Path) -> Path | None:
    # Manifests record paths relative to where training ran: try the cwd, then the model's ancestors.
    for base in (Path("."), *model_dir.resolve().parents):
        if (base / path).exists():
            return base / path
    return None


def lineage(model_dir: str | Path) -> Lineage:
    out, d, seen = Lineage(), Path(model_dir), set()
    while d is not None and (d / "manifest.json").is_file() and d.resolve() not in seen:
        seen.add(d.resolve())
        m = json.loads((d / "manifest.json").read_text())
        # Training files only: "*eval*" files hold the held-out split by design.
        out.train_jsonl += [p for k in (m.get("inputs", {}).get("data") or {})
                            if k.endswith(".jsonl") and "eval" not in Path(k).name and (p := _find(k, d))]
        if m.get("stage") == "pretrain":
            cfg = m.get("config", {})
            data, base = cfg.get("data", {}), f"{cfg.get('out_dir', '')}/data"
            out.heldout = _find(data.get("val_shards") or f"{base}/val", d)
            out.train_shards = _find(data.get("train_shards") or f"{base}/train", d)
            out.seq_len = cfg.get("train", {}).get("seq_len")
            break
        parent = (m.get("inputs", {}).get("model") or {}).get("path")
        d = _find(parent, d) if parent else None
    return out


def model_hash(model_dir: str | Path) -> str:
    """sha256 of model.safetensors, from the manifest when it records it (no re-read of the weights)."""
    d = Path(model_dir)
    if (d / "manifest.json").is_file():
        h = json.loads((d / "manifest.json").read_text()).get("outputs", {}).get("model.safetensors")
        if h:
            return h
    return sha256_file(d / "model.safetensors")


def heldout_items(limit: int) -> list[Item]:
    """The first `limit` held-out embedded items (tasks mixed, in make_items' fixed order)."""
    return split_items(make_items(EMBEDDED["seed"], EMBEDDED["per_task"]), EMBEDDED["eval_fraction"])[1][:limit]


# --- metrics -----------------------------------------------------------------------------------------


def bpb_metrics(model: Transformer, tok: Tokenizer, val: ShardSet, seq_len: int, sequences: int) -> dict:
    if val.tokenizer_hash and val.tokenizer_hash != tok.content_hash():
        raise LlmcycleError(f"the held-out shards in {val.directory} were tokenized with another tokenizer than "
                            "the model's; pass --heldout with shards of this model's tokenizer.")
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.long)
    token_bytes = F.pad(token_bytes, (0, max(0, model.config.vocab_size - len(token_bytes))))
    m = heldout_metrics(model, val, token_bytes, seq_len, 8, sequences, contextlib.nullcontext())
    rows = min(sequences, PackedLoader(val, seq_len, 1).rows_per_epoch)
    return {"heldout_bpb": m["val_bpb"], "heldout_perplexity": math.exp(min(m["val_loss"], 50.0)),
            "heldout_tokens": rows * seq_len}


def _chat(item: Item, answer: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": item.prompt}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def _padded(seqs: Sequence[Sequence[int]], pad: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [pad] * (width - len(s)) for s in seqs])


@torch.no_grad()
def answer_logprobs(model: Transformer, tok: Tokenizer, items: Sequence[Item], answers: Sequence[str],
                    batch_size: int = 16) -> list[float]:
    """Total log p(answer tokens + end-of-turn | chat prompt): the tokens the chat mask marks assistant."""
    encoded = [tok.encode_chat(_chat(it, a), tools=it.tools) for it, a in zip(items, answers)]
    out: list[float] = []
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i: i + batch_size]
        # Right padding needs no attention mask: a causal model never looks at the pads after a row.
        x, mask = _padded([ids for ids, _ in chunk], 0), _padded([m for _, m in chunk], 0)
        lp = token_logps(model(x[:, :-1]), x[:, 1:])
        out += (lp * mask[:, 1:]).sum(1).tolist()
    return out


def _by_task(items: Sequence[Item], hits: Sequence[bool]) -> dict[str, float]:
    groups: dict[str, list[bool]] = defaultdict(list)
    for it, h in zip(items, hits):
        groups[it.task].append(h)
    return {t: sum(v) / len(v) for t, v in sorted(groups.items())}


def mc_metrics(model: Transformer, tok: Tokenizer, items: Sequence[Item]) -> dict:
    right = answer_logprobs(model, tok, items, [it.answer for it in items])
    wrong = answer_logprobs(model, tok, items, [it.wrong for it in items])
    hits = [r > w for r, w in zip(right, wrong)]  # a tie is a miss: the model did not prefer the answer
    return {"mc_accuracy": sum(hits) / max(len(hits), 1), "per_task": _by_task(items, hits)}


def generate_answers(model: Transformer, tok: Tokenizer, items: Sequence[Item],
                     max_new_tokens: int = MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers from the serving engine, batched, stopped at end of turn."""
    llm = LLM(None, model=model, tokenizer=tok, kv_cache_bytes=64 * 2**20)
    stop = set(tok.end_of_turn_ids)
    prompts = [tok.encode_chat(_chat(it), add_generation_prompt=True, tools=it.tools)[0] for it in items]
    limit = model.config.max_position_embeddings
    params = [SamplingParams(temperature=0.0, max_tokens=max(1, min(max_new_tokens, limit - len(p))),
                             stop_token_ids=sorted(stop)) for p in prompts]
    outs = llm.generate(prompts, params) if prompts else []
    return [tok.decode([t for t in o.outputs[0].token_ids if t not in stop], skip_special_tokens=True)
            for o in outs]


def em_metrics(items: Sequence[Item], answers: Sequence[str]) -> dict:
    hits = [normalize_answer(a) == normalize_answer(it.answer) for it, a in zip(items, answers)]
    samples = [{"prompt": it.prompt, "answer": a, "reference": it.answer, "correct": h}
               for it, a, h in list(zip(items, answers, hits))[:5]]
    return {"exact_match": sum(hits) / max(len(hits), 1), "per_task": _by_task(items, hits), "samples": samples}


@torch.no_grad()
def reward_scores(rm: ScalarHeadModel, tok: Tokenizer, items: Sequence[Item], answers: Sequence[str],
                  batch_size: int = 16) -> list[float]:
    seqs = [tok.encode_chat(_chat(it, a), tools=it.tools)[0] for it, a in zip(items, answers)]
    out: list[float] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        lengths = torch.tensor([len(s) for s in chunk])
        out += last_token_scores(rm(_padded(chunk, 0)), lengths).tolist()
    return out


def win_rate(judge_dir: str | Path, items: Sequence[Item], answers_a: Sequence[str],
             answers_b: Sequence[str]) -> float:
    """B's share of wins over A under the reward model (ties count half)."""
    rm, tok = ScalarHeadModel.from_pretrained(judge_dir).eval(), Tokenizer.from_pretrained(judge_dir)
    a, b = reward_scores(rm, tok, items, answers_a), reward_scores(rm, tok, items, answers_b)
    return sum(1.0 if sb > sa else 0.5 if sb == sa else 0.0 for sa, sb in zip(a, b)) / max(len(a), 1)


# --- the suite -------------------------------------------------------------------------------------------


def evaluate_model(model_dir: str | Path, heldout: str | Path | None = None, train_shards: str | Path | None = None,
                   limit: int = 256, decontam: bool = True, seq_len: int | None = None) -> tuple[dict, list[str]]:
    """Run suite v1 on a causal LM directory; returns (the eval.json dict, the greedy answers).

    `seq_len` (held-out row length) defaults to pre-training's, so bpb equals its `val_bpb`."""
    if limit < 1:
        raise LlmcycleError(f"--limit must be at least 1, got {limit}.")
    model_dir = check_model_dir(model_dir)
    lin = lineage(model_dir)
    heldout = heldout or lin.heldout
    if heldout is None:
        raise LlmcycleError(f"no held-out shards found from {model_dir}'s manifest chain: pass --heldout DIR "
                            "(a token shard set such as runs/default/data/val).")
    from llmcycle.serve.model_runner import ModelRunner  # the engine's loader: plain and quantized models

    model, tok = ModelRunner.load_weights(model_dir), Tokenizer.from_pretrained(model_dir)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    seq_len = min(seq_len or lin.seq_len or DEFAULT_SEQ_LEN, model.config.max_position_embeddings)
    metrics = bpb_metrics(model, tok, ShardSet(heldout), seq_len, limit)
    times["heldout"], t0 = time.perf_counter() - t0, time.perf_counter()
    items = heldout_items(limit)
    mc = mc_metrics(model, tok, items)
    times["mc"], t0 = time.perf_counter() - t0, time.perf_counter()
    answers = generate_answers(model, tok, items)
    em = em_metrics(items, answers)
    times["exact_match"], t0 = time.perf_counter() - t0, time.perf_counter()
    report = None
    if decontam:
        streams = {}
        if train_shards or lin.train_shards:
            streams["train_shards"] = shard_stream(ShardSet(train_shards or lin.train_shards))
        if lin.train_jsonl:
            streams["train_jsonl"] = jsonl_stream(lin.train_jsonl, tok)
        report = contamination(items, tok, streams)
        report["sources"] = {"train_shards": str(train_shards or lin.train_shards or ""),
                             "train_jsonl": [str(p) for p in lin.train_jsonl]}
        times["decontamination"] = time.perf_counter() - t0
    return {
        "suite": SUITE_VERSION, "model": str(model_dir), "model_sha256": model_hash(model_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {"limit": limit, "heldout": str(heldout), "seq_len": seq_len, "embedded": EMBEDDED,
                     "max_new_tokens": MAX_NEW_TOKENS},
        "metrics": {"heldout_bpb": metrics["heldout_bpb"], "heldout_perplexity": metrics["heldout_perplexity"],
                    "mc_accuracy": mc["mc_accuracy"], "exact_match": em["exact_match"]},
        "per_task": {"mc_accuracy": mc["per_task"], "exact_match": em["per_task"]},
        "counts": {"heldout_tokens": metrics["heldout_tokens"], "mc_items": len(items), "em_items": len(items)},
        "decontamination": report, "samples": em["samples"], "timings": times,
    }, answers
