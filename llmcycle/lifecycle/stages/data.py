"""data: sources -> filters -> dedup -> tokenizer -> token shards (`llmcycle data`), into runs/<name>/data/."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from llmcycle import svg
from llmcycle.data.config import DataConfig
from llmcycle.lifecycle.stage import Stage

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Block, Section


def configure(lc: Lifecycle, cfg: DataConfig) -> DataConfig:
    return dataclasses.replace(cfg, out_dir=str(lc.dir("data")))


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.data.run import run_data

    result = run_data(lc.stage_config("data"))  # logs through logging (llmcycle/logs.py)
    # the funnel, token counts, bad input (the hashes stay in the manifest), and the workers' peak memory
    return {**result["manifest"]["metrics"], "peak_rss_workers_mb": result.get("worker_peak_rss_mb")}


def headline(record: dict) -> dict:
    m = record.get("metrics") or {}
    return {"documents kept": f"{m.get('documents_kept', 0):,} of {m.get('documents_read', 0):,}",
            "training tokens": f"{(m.get('train') or {}).get('num_tokens', 0):,}"}


def report(run: Records) -> list[Section]:
    """The funnel (documents in and out of every step, drops by reason) and the tokenizer's compression."""
    m = run.metrics("data")
    if not m:
        return []
    funnel = m.get("funnel") or []
    rows = [[f["step"], f["in"], f["out"], ", ".join(f"{k} {v}" for k, v in f.get("dropped", {}).items()) or None]
            for f in funnel]
    blocks: list[Block] = [
        ("p", f"{m.get('documents_read', 0):,} documents read, {m.get('documents_kept', 0):,} kept; malformed "
              f"input records: {sum((m.get('bad_input') or {}).values())}. Details (drops by reason and location, "
              f"samples of dropped documents): `{run.dir('data') / 'stats.json'}`."),
        ("table", ["step", "documents in", "documents out", "dropped"], rows),
        ("chart", svg.funnel_chart([(f["step"], f["out"]) for f in funnel], title="Data funnel (documents)")),
    ]
    sections: list[Section] = [("Data", blocks)]
    tr, va = m.get("train") or {}, m.get("val") or {}
    if tr.get("num_tokens"):
        tokenizer = run.records["data"]["config"]["tokenizer"]
        bpt_train = tr["num_bytes"] / tr["num_tokens"]
        bpt_val = va["num_bytes"] / va["num_tokens"] if va.get("num_tokens") else None
        tok: list[Block] = [
            ("p", f"{tokenizer['kind']} tokenizer, {tokenizer['vocab_size']} tokens, trained on the cleaned training "
                  f"text. {tr['num_tokens']:,} training tokens ({tr['num_docs']:,} documents), "
                  f"{va.get('num_tokens', 0):,} held-out tokens ({va.get('num_docs', 0):,} documents)."),
            ("table", ["text", "UTF-8 bytes", "tokens", "bytes per token"],
             [["training", tr["num_bytes"], tr["num_tokens"], bpt_train],
              ["held out", va.get("num_bytes"), va.get("num_tokens"), bpt_val]]),
            ("chart", svg.bar_chart(["raw UTF-8 bytes", "tokenizer: training text", "tokenizer: held-out text"],
                                    [1.0, bpt_train, bpt_val if bpt_val is not None else math.nan],
                                    title="Tokenizer compression (bytes per token)")),
        ]
        sections.append(("Tokenizer", tok))
    return sections


STAGE = Stage("data", run, config=DataConfig, configure=configure, scratch=("work",),  # work/: intermediate phases
              headline=headline, report=report)
