"""Data pipeline: llmcycle's quality filters and dedup against datatrove's, decisions and documents/s.

One run of this script, on one corpus, does three things:

1. corpus: web-like documents cut from what ships with Python (`collect_python_corpus`: pydoc topics,
   docstrings, stdlib source) at blank lines into ~1-4 KB pieces, shuffled, plus planted exact
   duplicates (~3%) and near-duplicates (~3%, a few words replaced). If the embedded corpus gives too
   few pieces, the stdlib files it leaves out (tests, GUI code, modules over its 64 KB cap) top it up,
   their docstrings first. Written as JSONL shards in the work folder. Same Python + seed -> same corpus.
2. agreement: each of GopherQuality, GopherRepetition, C4Quality, FineWebQuality (defaults on both
   sides) runs on every document independently (not chained): datatrove's `Filter.filter(doc)` and
   llmcycle's step `process(doc)`. Keep/drop agreement per filter, disagreements counted by
   (datatrove reason, llmcycle reason) with diagnosed examples in the JSON, and C4's rewritten text
   compared where both keep. Exact and MinHash dedup also run independently on the whole corpus
   (datatrove's multi-stage pipelines with tasks=1, llmcycle's step signature/decide): dropped sets,
   clusters, and the planted duplicates caught by each, against LSH theory at each pair's Jaccard.
3. throughput: the chain Gopher repetition -> Gopher quality -> C4 -> exact dedup -> MinHash dedup,
   datatrove with its `LocalPipelineExecutor` (filter stage writing JSONL and exact-dedup signatures,
   exact find, exact filter + MinHash signatures, buckets (14 tasks), clusters, MinHash filter, each
   stage `depends` on the previous one) and llmcycle with `run_data` (`tokenize: false`). Documents/s
   = input documents / wall seconds of the whole chain, fresh output folders and cold word caches on
   both sides; the two sides run back to back (order alternating when repeated), and the final kept
   documents of both chains are compared too.

    python benchmarks/data_pipeline.py                          # 5000 documents, workers=1
    python benchmarks/data_pipeline.py --docs 2000 --workers 1,2 --json out.json
    python benchmarks/data_pipeline.py --parts throughput --repeats 2
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import difflib
import gzip
import json
import logging
import math
import os
import platform
import random
import re
import shutil
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import orjson
from machine import cpu_name  # benchmarks/machine.py (the script's own folder is on sys.path)

from llmcycle.data.document import Document

FILTERS = ["gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality"]
CHAIN = ["gopher_repetition", "gopher_quality", "c4_quality", "exact_dedup", "minhash_dedup"]
MIN_CHUNK, MAX_CHUNK = 1000, 4000
# Replacement words for the planted near-duplicates (lower case, so sentence structure is unchanged).
NEAR_WORDS = ("river", "garden", "window", "silver", "market", "yellow", "planet", "candle", "forest", "engine",
              "letter", "bridge", "summer", "pocket", "number", "island", "marble", "ticket", "castle", "harbor")


# ---------------------------------------------------------------------------------------------------
# machine


def machine_info() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def ver(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "?"

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {"cpu": cpu_name(), "cores": cores, "python": platform.python_version(),
            "platform": platform.platform(), "datatrove": ver("datatrove"), "spacy": ver("spacy"),
            "llmcycle": ver("llmcycle"), "loadavg_start": list(os.getloadavg())}


# ---------------------------------------------------------------------------------------------------
# corpus

_BLANK = re.compile(r"(\n[ \t]*\n(?:[ \t]*\n)*)")


def _target(rng: random.Random) -> int:
    """A chunk size, log-uniform in [1 KB, 4 KB]."""
    return int(math.exp(rng.uniform(math.log(MIN_CHUNK), math.log(MAX_CHUNK))))


def chunk_text(text: str, rng: random.Random) -> list[str]:
    """Cut at blank lines into pieces of about a log-uniform 1-4 KB. A paragraph over twice the largest
    size is cut at line ends; a short tail joins the piece before it."""
    parts = _BLANK.split(text.strip("\n"))
    paras, seps = parts[0::2], parts[1::2] + [""]
    units: list[tuple[str, str]] = []
    for p, s in zip(paras, seps):
        if len(p) <= 2 * MAX_CHUNK:
            units.append((p, s))
            continue
        lines, cur = p.split("\n"), []
        for line in lines:
            cur.append(line)
            if sum(map(len, cur)) >= MAX_CHUNK:
                units.append(("\n".join(cur), "\n"))
                cur = []
        if cur:
            units.append(("\n".join(cur), s))
        else:
            units[-1] = (units[-1][0], s)
    chunks: list[str] = []
    cur, size, target = "", 0, _target(rng)
    for p, s in units:
        cur += p
        size += len(p.encode("utf-8"))
        if size >= target:
            chunks.append(cur)
            cur, size, target = "", 0, _target(rng)
        else:
            cur += s
            size += len(s)
    tail = cur.rstrip()
    if tail.strip():
        if chunks and len(tail.encode("utf-8")) < MIN_CHUNK // 2:
            chunks[-1] = chunks[-1].rstrip() + "\n\n" + tail.strip("\n")
        else:
            chunks.append(tail)
    return [c for c in chunks if c.strip()]


def _kind(source: str) -> str:
    return "code" if "source" in source else "prose"


def _pieces(docs: list[Document], rng: random.Random, tag: str = "") -> list[dict]:
    out = []
    for d in docs:
        for k, piece in enumerate(chunk_text(d.text, rng)):
            out.append({"id": f"{d.id}{tag}#{k}", "text": piece, "source": d.source + tag,
                        "metadata": {"kind": _kind(d.source), "planted": None}})
    return out


def _extra_python_docs() -> tuple[list[Document], list[Document]]:
    """The stdlib files `collect_python_corpus` leaves out (tests, GUI code, files over its size cap):
    (docstring documents, source documents), in path order."""
    from llmcycle.data import pycorpus

    root = Path(sysconfig.get_paths()["stdlib"])
    included = {d.metadata.get("path") for d in pycorpus.collect_python_corpus() if "path" in d.metadata}
    doc_docs, src_docs = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__")
                             and not d.startswith((".", "config-")))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if not name.endswith(".py") or rel in included or name.startswith("_sysconfigdata"):
                continue
            try:
                text = path.read_bytes().decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tree = ast.parse(text, filename=rel)
                docs = pycorpus._docstrings(tree, rel[:-3].replace("/", "."))
            except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
                continue
            if docs.strip():
                doc_docs.append(Document(f"docstring:{rel}", docs, "stdlib-docstrings"))
            if text.strip():
                src_docs.append(Document(f"source:{rel}", text, "stdlib-source"))
    return doc_docs, src_docs


def _near_copy(text: str, rng: random.Random) -> tuple[str, int]:
    """`text` with a few words (1 to ~5% of them) replaced by other words: Jaccard similarity of the 5-word
    shingles from ~0.6 to ~0.98, across the LSH threshold region."""
    spans = [m.span() for m in re.finditer(r"\b[a-z]{3,}\b", text)]
    n_words = len(text.split())
    k = min(len(spans), rng.randint(1, max(1, n_words // 20)))
    chosen = sorted(rng.sample(range(len(spans)), k))
    out, pos = [], 0
    for i in chosen:
        a, b = spans[i]
        word = rng.choice([w for w in NEAR_WORDS if w != text[a:b]])
        out += [text[pos:a], word]
        pos = b
    out.append(text[pos:])
    return "".join(out), k


def build_corpus(n_docs: int, seed: int) -> tuple[list[dict], dict]:
    from llmcycle.data.pycorpus import collect_python_corpus

    rng = random.Random(seed)
    n_exact = round(0.03 * n_docs)
    n_near = round(0.03 * n_docs)
    n_base = n_docs - n_exact - n_near
    pool = _pieces(collect_python_corpus(), rng)
    rng.shuffle(pool)
    embedded = len(pool)
    topped_up = 0
    if len(pool) < n_base:
        extra_doc, extra_src = _extra_python_docs()
        for group in (extra_doc, extra_src):  # prose first, then code
            more = _pieces(group, rng, tag="+")
            rng.shuffle(more)
            need = n_base - len(pool)
            topped_up += min(need, len(more))
            pool += more[:need]
            if len(pool) >= n_base:
                break
    base = pool[:n_base]
    rng.shuffle(base)
    # Planted copies go at a random later position than their original: sort keys i for the base
    # documents, a uniform key above the original's for each copy.
    keyed = [(float(i), d) for i, d in enumerate(base)]
    eligible = [i for i, d in enumerate(base) if len(d["text"].split()) >= 50]
    for kind, count in (("exact", n_exact), ("near", n_near)):
        for i in rng.sample(eligible, min(count, len(eligible))):
            orig = base[i]
            if kind == "exact":
                text, changed = orig["text"], 0
            else:
                text, changed = _near_copy(orig["text"], rng)
            meta = {"kind": orig["metadata"]["kind"], "planted": kind, "of": orig["id"], "changed_words": changed}
            copy = {"id": f"{kind}-dup:{orig['id']}", "text": text, "source": orig["source"], "metadata": meta}
            keyed.append((rng.uniform(i + 0.5, len(base)), copy))
    keyed.sort(key=lambda kd: kd[0])
    docs = [d for _, d in keyed]
    sizes = [len(d["text"].encode("utf-8")) for d in docs]
    info = {
        "documents": len(docs), "bytes": sum(sizes), "median_bytes": int(statistics.median(sizes)),
        "pieces_from_embedded_corpus": embedded, "topped_up": topped_up,
        "by_kind": dict(Counter(d["metadata"]["kind"] for d in docs)),
        "by_source": dict(Counter(d["source"] for d in docs)),
        "planted": dict(Counter(d["metadata"]["planted"] for d in docs if d["metadata"]["planted"])),
        "seed": seed,
    }
    return docs, info


def write_corpus(docs: list[dict], folder: Path, shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    per = math.ceil(len(docs) / shards)
    for s in range(shards):
        path = folder / f"corpus-{s:02d}.jsonl"
        with open(path, "wb") as f:
            for d in docs[s * per:(s + 1) * per]:
                f.write(orjson.dumps(d) + b"\n")
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------------------------------
# caches: every timed run starts with cold word caches on both sides


def cold_caches() -> None:
    from datatrove.utils import text as dt_text
    from datatrove.utils import word_tokenizers as dt_wt

    from llmcycle.data.filters import words

    dt_text.split_into_parts.cache_clear()
    dt_wt.load_word_tokenizer.cache_clear()  # the next use builds a new spaCy pipeline
    # llmcycle's caches: chunk -> tokens, token -> facts, the last texts' splits, the compiled tokenizer.
    for cache in ("_CHUNKS", "_TOKENS"):
        if hasattr(words, cache):
            getattr(words, cache).clear()
    if hasattr(words.analyze, "cache_clear"):
        words.analyze.cache_clear()
    if hasattr(words, "_LazyTokenizer"):
        words._LazyTokenizer._tok = None


@contextlib.contextmanager
def quiet_datatrove(log_path: Path):
    """datatrove's output (the loguru sinks it adds per task, tqdm; also in its worker processes) goes to
    stderr: send file descriptor 2 and sys.stderr to a log file meanwhile."""
    from datatrove.utils.logging import logger

    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    saved = os.dup(2)
    with open(log_path, "a", encoding="utf-8") as f:
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stderr(f):
                logger.remove()
                logger.add(f, level="INFO")
                yield
        finally:
            logger.remove()
            f.flush()
            os.dup2(saved, 2)
            os.close(saved)
            logger.add(sys.stderr, level="WARNING")


# ---------------------------------------------------------------------------------------------------
# 2a. per-filter agreement


def _dt_filters() -> dict:
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        FineWebQualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
    )

    return {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
            "c4_quality": C4QualityFilter, "fineweb_quality": FineWebQualityFilter}


def _lc_filters() -> dict:
    from llmcycle.data.filters.c4 import C4Quality
    from llmcycle.data.filters.fineweb import FineWebQuality
    from llmcycle.data.filters.gopher import GopherQuality, GopherRepetition

    return {"gopher_quality": GopherQuality, "gopher_repetition": GopherRepetition, "c4_quality": C4Quality,
            "fineweb_quality": FineWebQuality}


def _word_diff(a: list[str], b: list[str], limit: int = 4) -> list[dict]:
    """The first differences between two token lists, with a little context."""
    out = []
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    for tag, i1, i2, j1, j2 in sm.get_opcodes():
        if tag == "equal":
            continue
        out.append({"datatrove": a[i1:i2][:12], "llmcycle": b[j1:j2][:12], "before": a[max(0, i1 - 4):i1]})
        if len(out) >= limit:
            break
    return out


def _gopher_values(words: list[str], text: str) -> dict:
    """datatrove's GopherQuality quantities computed from a given word list."""
    from datatrove.utils.text import PUNCTUATION_SET

    non_sym = [w for w in words if any(ch not in PUNCTUATION_SET for ch in w)]
    n = len(words) or 1
    return {"words": len(words), "non_symbol_words": len(non_sym),
            "avg_word_len": round(sum(map(len, non_sym)) / len(non_sym), 4) if non_sym else None,
            "alpha_frac": round(sum(any(c.isalpha() for c in w) for w in words) / n, 4),
            "hash_ratio": round(text.count("#") / n, 4),
            "ellipsis_ratio": round((text.count("...") + text.count("…")) / n, 4),
            "stop_words": sorted({"the", "be", "to", "of", "and", "that", "have", "with"} & set(words))}


def _repetition_values(words_dt: list[str], words_lc: list[str], text: str) -> dict:
    """Top and repeated n-gram character fractions: datatrove's functions on its words, llmcycle's
    `_NGrams` on its words."""
    from datatrove.pipeline.filters.gopher_repetition_filter import (
        find_all_duplicate,
        find_top_duplicate,
        get_n_grams,
    )

    from llmcycle.data.filters.gopher import _NGrams

    size = len(text)
    out: dict = {"datatrove": {}, "llmcycle": {}}
    grams = _NGrams(words_lc) if words_lc else None
    for n in (2, 3, 4):
        g = get_n_grams(words_dt, n)
        out["datatrove"][f"top_{n}"] = round(find_top_duplicate(g) / size, 4) if g else None
        out["llmcycle"][f"top_{n}"] = round(grams.top_chars(n) / size, 4) if grams and len(words_lc) >= n else None
    for n in range(5, 11):
        out["datatrove"][f"dup_{n}"] = round(find_all_duplicate(words_dt, n) / size, 4)
        out["llmcycle"][f"dup_{n}"] = (round(grams.repeated_chars(n) / size, 4)
                                       if grams and len(words_lc) >= n else 0.0)
    return out


def _c4_lines(text: str) -> dict:
    """Per line that C4 could keep: sentence counts of both sides where they differ."""
    from datatrove.utils.text import split_into_sentences

    from llmcycle.data.filters.words import count_sentences

    diffs, dt_total, lc_total = [], 0, 0
    for line in text.splitlines():
        line = line.strip()
        if not line or not line.endswith((".", "?", "!", '"', "'")) or line.endswith("...") or len(line.split()) < 3:
            continue
        a, b = len(split_into_sentences(line)), count_sentences(line)
        dt_total += a
        lc_total += b
        if a != b and len(diffs) < 4:
            diffs.append({"line": line[:300], "datatrove": a, "llmcycle": b,
                          "datatrove_sentences": [s[:80] for s in split_into_sentences(line)][:6]})
    return {"sentences_datatrove": dt_total, "sentences_llmcycle": lc_total, "lines_differing": diffs}


def diagnose(name: str, text: str) -> dict:
    from datatrove.utils.text import split_into_words as dt_words

    from llmcycle.data.filters.words import split_into_words as lc_words

    a, b = dt_words(text), lc_words(text)
    out: dict = {"same_words": a == b}
    if a != b:
        out["word_diff"] = _word_diff(a, b)
    if name == "gopher_quality":
        out["datatrove_values"] = _gopher_values(a, text)
        out["llmcycle_values"] = _gopher_values(b, text)
    elif name == "gopher_repetition":
        out["values"] = _repetition_values(a, b, text)
    elif name == "c4_quality":
        out.pop("word_diff", None)
        out.update(_c4_lines(text))
    elif name == "fineweb_quality":
        out["newlines"] = text.count("\n")
        out["words_datatrove"], out["words_llmcycle"] = len(a), len(b)
    return out


def _first_line_diff(a: str, b: str) -> dict:
    la, lb = a.split("\n"), b.split("\n")
    for i, (x, y) in enumerate(zip(la, lb)):
        if x != y:
            return {"line": i, "datatrove": x[:300], "llmcycle": y[:300]}
    return {"line": min(len(la), len(lb)), "datatrove_lines": len(la), "llmcycle_lines": len(lb)}


def filter_agreement(docs: list[dict], n_examples: int, log) -> dict:
    from datatrove.data import Document as DtDocument

    dt_classes, lc_classes = _dt_filters(), _lc_filters()
    results = {}
    for name in FILTERS:
        cold_caches()
        dt, lc = dt_classes[name](), lc_classes[name]()
        lc.setup()
        t_dt = t_lc = 0.0
        agree = 0
        confusion: Counter = Counter()
        same_drop_other_reason: Counter = Counter()
        examples: dict = defaultdict(list)
        text_equal = text_differ = 0
        text_examples = []
        dropped_dt = dropped_lc = 0
        for d in docs:
            ddoc = DtDocument(text=d["text"], id=d["id"])
            ldoc = Document(d["id"], d["text"], d["source"], {})
            t0 = time.perf_counter()
            r_dt = dt.filter(ddoc)
            t1 = time.perf_counter()
            r_lc = lc.process(ldoc)
            t2 = time.perf_counter()
            t_dt += t1 - t0
            t_lc += t2 - t1
            keep_dt = r_dt is True or (isinstance(r_dt, tuple) and r_dt[0])
            reason_dt = "keep" if keep_dt else (r_dt[1] if isinstance(r_dt, tuple) else "drop")
            keep_lc = not isinstance(r_lc, str)
            reason_lc = "keep" if keep_lc else r_lc
            dropped_dt += not keep_dt
            dropped_lc += not keep_lc
            if keep_dt == keep_lc:
                agree += 1
                if not keep_dt and reason_dt != reason_lc:
                    same_drop_other_reason[f"{reason_dt} | {reason_lc}"] += 1
                if keep_dt and name == "c4_quality":
                    if ddoc.text == r_lc.text:
                        text_equal += 1
                    else:
                        text_differ += 1
                        if len(text_examples) < n_examples:
                            text_examples.append({"id": d["id"], **_first_line_diff(ddoc.text, r_lc.text)})
                continue
            key = f"{reason_dt} | {reason_lc}"
            confusion[key] += 1
            if len(examples[key]) < n_examples:
                examples[key].append({"id": d["id"], "kind": d["metadata"]["kind"], "text": d["text"][:800],
                                      "diagnosis": diagnose(name, d["text"])})
        n = len(docs)
        res = {
            "documents": n, "agree": agree, "agreement": agree / n,
            "dropped_datatrove": dropped_dt, "dropped_llmcycle": dropped_lc,
            "disagreements": dict(confusion.most_common()),
            "both_drop_different_reason": dict(same_drop_other_reason.most_common()),
            "seconds_datatrove": t_dt, "seconds_llmcycle": t_lc,
            "docs_per_s_datatrove": n / t_dt, "docs_per_s_llmcycle": n / t_lc, "speedup": t_dt / t_lc,
            "examples": dict(examples),
        }
        if name == "c4_quality":
            res["text_both_keep_equal"] = text_equal
            res["text_both_keep_differ"] = text_differ
            res["text_examples"] = text_examples
        results[name] = res
        log(f"  {name:18s} agreement {100 * res['agreement']:7.3f}%  ({n - agree} differ; dropped "
            f"datatrove {dropped_dt}, llmcycle {dropped_lc})  isolated docs/s: datatrove "
            f"{res['docs_per_s_datatrove']:.0f}, llmcycle {res['docs_per_s_llmcycle']:.0f} "
            f"(x{res['speedup']:.1f})")
    return results


# ---------------------------------------------------------------------------------------------------
# 2b. dedup agreement (each dedup alone on the whole corpus)


def _text_of(doc) -> str:
    return doc.text


def _read_dt_jsonl(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.rglob("*.jsonl*")):
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as f:
            rows.extend(orjson.loads(line) for line in f if line.strip())
    return rows


def datatrove_dedup_only(corpus: Path, work: Path) -> dict:
    """datatrove's exact and MinHash dedup, each alone on the corpus (tasks=1): dropped ids and clusters."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    def ex(pipeline, name, tasks=1, depends=None):
        return LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=1, logging_dir=str(work / "logs" / name),
                                     depends=depends)

    ecfg = ExactDedupConfig(content_getter=_text_of)
    e1 = ex([JsonlReader(str(corpus)), ExactDedupSignature(str(work / "e_sigs"), config=ecfg)], "e1")
    e2 = ex([ExactFindDedups(str(work / "e_sigs"), str(work / "e_dups"), config=ecfg)], "e2", depends=e1)
    e3 = ex([JsonlReader(str(corpus)),
             ExactDedupFilter(str(work / "e_dups"), config=ecfg,
                              exclusion_writer=JsonlWriter(str(work / "e_removed"), compression=None))], "e3", depends=e2)
    e3.run()
    mcfg = MinhashConfig()
    m1 = ex([JsonlReader(str(corpus)), MinhashDedupSignature(str(work / "m_sigs"), config=mcfg)], "m1")
    m2 = ex([MinhashDedupBuckets(str(work / "m_sigs"), str(work / "m_buckets"), config=mcfg)], "m2",
            tasks=mcfg.num_buckets, depends=m1)
    m3 = ex([MinhashDedupCluster(str(work / "m_buckets"), str(work / "m_ids"), config=mcfg, save_cluster_id=True)],
            "m3", depends=m2)
    m4 = ex([JsonlReader(str(corpus)),
             MinhashDedupFilter(str(work / "m_ids"), load_cluster_ids=True,
                                exclusion_writer=JsonlWriter(str(work / "m_removed"), compression=None)),
             JsonlWriter(str(work / "m_kept"), compression=None)], "m4", depends=m3)
    m4.run()
    removed = _read_dt_jsonl(work / "m_removed")
    kept = _read_dt_jsonl(work / "m_kept")
    cluster = {}
    for r in removed + kept:
        cid = r.get("metadata", {}).get("minhash_cluster_id", -1)
        if cid != -1:
            cluster[r["id"]] = cid
    return {"exact_dropped": {r["id"] for r in _read_dt_jsonl(work / "e_removed")},
            "minhash_dropped": {r["id"] for r in removed}, "minhash_cluster": cluster}


def llmcycle_dedup_only(docs: list[dict]) -> dict:
    from llmcycle.data.dedup.steps import ExactDedup, MinhashDedup

    out = {}
    for key, step in (("exact", ExactDedup()), ("minhash", MinhashDedup())):
        step.setup()
        sigs = [step.signature(Document(d["id"], d["text"], d["source"], {})) for d in docs]
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in sigs])]).astype(np.int64)
        values = np.concatenate(sigs) if sigs else np.empty(0, dtype=np.uint64)
        decision = step.decide([(values, offsets)])
        dropped = decision["drop_index"].tolist()  # one task: its indices are the documents'
        out[f"{key}_dropped"] = {docs[i]["id"] for i in dropped}
        if key == "minhash":
            kept = dict(zip(decision["drop_index"].tolist(), decision["kept_index"].tolist()))
            out["minhash_cluster"] = {}
            for i, k in kept.items():
                out["minhash_cluster"][docs[i]["id"]] = docs[k]["id"]
                out["minhash_cluster"][docs[k]["id"]] = docs[k]["id"]
            out["minhash_signatures"] = {d["id"]: s for d, s in zip(docs, sigs)}
    return out


def _lsh_probability(s: float, bands: int = 14, rows: int = 8) -> float:
    return 1 - (1 - s ** rows) ** bands


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def classify_minhash(dt: dict, lc: dict, a: set, b: set, all_ids: list[str], by_id: dict, pair_facts,
                     n_examples: int) -> dict:
    """Every document only one side's MinHash dedup drops, put in one of three classes:

    - "same cluster, other member kept": both sides cluster the document with the same kept document of
      the dropping side, but the other side keeps this one and drops another member (llmcycle keeps the
      first document of a cluster; datatrove's union-find keeps the root of the larger subtree);
    - "pair in a shared bucket on one side only": the pair (document, the one the dropping side kept)
      has all 8 rows of at least one band equal on the dropping side and of none on the other: a
      borderline pair under two different hash families (datatrove: xxh64 of the joined shingle,
      numpy RandomState permutations; llmcycle: xxh3 per word combined, blake2b-seeded permutations);
    - "joined through another member": the pair shares no band on the dropping side either; the
      document reached that cluster through a third document.
    """
    dt_c, lc_c = dt["minhash_cluster"], lc["minhash_cluster"]
    members: dict = defaultdict(list)
    for i in all_ids:
        if i in dt_c:
            members[dt_c[i]].append(i)
    classes: dict = defaultdict(lambda: {"documents": 0, "examples": [], "jaccards": [], "probabilities": []})
    for side, ids in (("only_datatrove", sorted(a - b)), ("only_llmcycle", sorted(b - a))):
        for i in ids:
            if side == "only_llmcycle":
                rep = lc_c.get(i)
                other_same = i in dt_c and dt_c.get(i) == dt_c.get(rep)
            else:
                rep = next((j for j in members[dt_c[i]] if j not in a), None)
                other_same = i in lc_c and lc_c.get(i) == lc_c.get(rep)
            facts = pair_facts(i, rep) if rep else {}
            mine, other = (("bands_matching_datatrove", "bands_matching_llmcycle") if side == "only_datatrove"
                           else ("bands_matching_llmcycle", "bands_matching_datatrove"))
            if other_same:
                cls = "same cluster, other member kept"
            elif facts.get(mine, 0) > 0 and facts.get(other, 0) == 0:
                cls = "pair in a shared bucket on one side only"
            else:
                cls = "joined through another member"
            c = classes[f"{cls} ({side})"]
            c["documents"] += 1
            if facts:
                c["jaccards"].append(facts["jaccard_llmcycle_shingles"])
                c["probabilities"].append(facts["lsh_probability"])
            if len(c["examples"]) < n_examples:
                c["examples"].append({"id": i, "kept_instead": rep, "planted": by_id[i]["metadata"]["planted"],
                                      "text": by_id[i]["text"][:300], **facts})
    out = {}
    for key, c in sorted(classes.items()):
        js, ps = c.pop("jaccards"), c.pop("probabilities")
        if js:
            c.update(jaccard_min=min(js), jaccard_max=max(js), probability_min=min(ps), probability_max=max(ps))
        out[key] = c
    dt_clusters = {frozenset(m) for m in members.values()}
    lc_members: dict = defaultdict(set)
    for i, k in lc_c.items():
        lc_members[k].add(i)
    lc_clusters = {frozenset(m) for m in lc_members.values()}
    return {"classes": out, "clusters_datatrove": len(dt_clusters), "clusters_llmcycle": len(lc_clusters),
            "clusters_identical": len(dt_clusters & lc_clusters)}


def dedup_agreement(docs: list[dict], corpus: Path, work: Path, n_examples: int, log) -> dict:
    from datatrove.pipeline.dedup import MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig

    from llmcycle.data.dedup.minhash import MinHasher

    t0 = time.perf_counter()
    with quiet_datatrove(work / "datatrove.log"):
        dt = datatrove_dedup_only(corpus, work / "datatrove")
    t_dt = time.perf_counter() - t0
    t0 = time.perf_counter()
    lc = llmcycle_dedup_only(docs)
    t_lc = time.perf_counter() - t0
    by_id = {d["id"]: d for d in docs}
    all_ids = [d["id"] for d in docs]
    res: dict = {"seconds_datatrove": t_dt, "seconds_llmcycle": t_lc}

    # datatrove's shingles and signatures, in process, to explain the MinHash differences.
    dt_sig = MinhashDedupSignature(str(work / "scratch"), config=MinhashConfig())
    lc_hasher = MinHasher(112, ngram=5, seed=1)

    def dt_shingles(text):
        return set(dt_sig.get_shingles(text).ravel().tolist())

    def lc_shingles(text):
        return set(lc_hasher.shingles(text).tolist())

    def dt_signature(text):
        sh = dt_sig.get_shingles(text)
        return np.concatenate(dt_sig.get_signature(sh)) if sh.size else np.empty(0)

    def pair_facts(a: str, b: str) -> dict:
        ta, tb = by_id[a]["text"], by_id[b]["text"]
        sa, sb = dt_signature(ta), dt_signature(tb)
        la, lb = lc["minhash_signatures"][a], lc["minhash_signatures"][b]

        def bands(x, y):
            if len(x) != 112 or len(y) != 112:
                return 0
            return int((x.reshape(14, 8) == y.reshape(14, 8)).all(axis=1).sum())

        j_dt, j_lc = _jaccard(dt_shingles(ta), dt_shingles(tb)), _jaccard(lc_shingles(ta), lc_shingles(tb))
        return {"jaccard_datatrove_shingles": round(j_dt, 4), "jaccard_llmcycle_shingles": round(j_lc, 4),
                "lsh_probability": round(_lsh_probability(j_lc), 4),
                "bands_matching_datatrove": bands(sa, sb), "bands_matching_llmcycle": bands(la, lb),
                "estimate_datatrove": round(float(np.mean(sa == sb)), 4) if len(sa) == len(sb) == 112 else None,
                "estimate_llmcycle": round(float(np.mean(la == lb)), 4) if len(la) == len(lb) == 112 else None}

    for kind in ("exact", "minhash"):
        a, b = dt[f"{kind}_dropped"], lc[f"{kind}_dropped"]
        same = sum((i in a) == (i in b) for i in all_ids)
        planted = [d for d in docs if d["metadata"]["planted"] == ("exact" if kind == "exact" else "near")]
        r = {"dropped_datatrove": len(a), "dropped_llmcycle": len(b), "dropped_both": len(a & b),
             "only_datatrove": len(a - b), "only_llmcycle": len(b - a), "agreement": same / len(all_ids),
             "planted": len(planted),
             "planted_dropped_datatrove": sum(d["id"] in a for d in planted),
             "planted_dropped_llmcycle": sum(d["id"] in b for d in planted)}
        if kind == "minhash":
            r.update(classify_minhash(dt, lc, a, b, all_ids, by_id, pair_facts, n_examples))
        else:
            r["examples"] = [{"side": side, "id": i, "text": by_id[i]["text"][:400]}
                             for side, ids in (("only_datatrove", sorted(a - b)), ("only_llmcycle", sorted(b - a)))
                             for i in ids[:n_examples]]
        res[kind] = r
        log(f"  {kind + '_dedup':18s} agreement {100 * r['agreement']:7.3f}%  dropped datatrove {len(a)}, "
            f"llmcycle {len(b)}, both {len(a & b)}; planted {r['planted']}: datatrove "
            f"{r['planted_dropped_datatrove']}, llmcycle {r['planted_dropped_llmcycle']}")
        for cls, c in r.get("classes", {}).items():
            log(f"      {c['documents']:4d} {cls}" + (f" (Jaccard {c['jaccard_min']:.2f}-{c['jaccard_max']:.2f}, "
                                                     f"LSH probability {c['probability_min']:.2f}-"
                                                     f"{c['probability_max']:.2f})" if "jaccard_min" in c else ""))

    # Planted near-duplicates: caught (same cluster as the original) by each side, against theory.
    dt_c, lc_c = dt["minhash_cluster"], lc["minhash_cluster"]
    rows = []
    for d in docs:
        if d["metadata"]["planted"] != "near":
            continue
        i, o = d["id"], d["metadata"]["of"]
        c_dt = i in dt_c and dt_c.get(i) == dt_c.get(o)
        c_lc = i in lc_c and lc_c.get(i) == lc_c.get(o)
        j_lc = _jaccard(lc_shingles(by_id[i]["text"]), lc_shingles(by_id[o]["text"]))
        j_dt = _jaccard(dt_shingles(by_id[i]["text"]), dt_shingles(by_id[o]["text"]))
        rows.append((c_dt, c_lc, j_dt, j_lc))
    bins = [(0.0, 0.6), (0.6, 0.7), (0.7, 0.8), (0.8, 0.9), (0.9, 1.01)]
    near = {"pairs": len(rows), "caught_datatrove": sum(r[0] for r in rows), "caught_llmcycle": sum(r[1] for r in rows),
            "caught_both": sum(r[0] and r[1] for r in rows),
            "expected_datatrove": round(sum(_lsh_probability(r[2]) for r in rows), 2),
            "expected_llmcycle": round(sum(_lsh_probability(r[3]) for r in rows), 2),
            "mean_abs_jaccard_difference": round(float(np.mean([abs(r[2] - r[3]) for r in rows])), 4) if rows else None,
            "by_jaccard": []}
    for lo, hi in bins:
        sel = [r for r in rows if lo <= r[3] < hi]
        if sel:
            near["by_jaccard"].append({
                "jaccard": f"[{lo:.1f}, {min(hi, 1.0):.1f})", "pairs": len(sel),
                "caught_datatrove": sum(r[0] for r in sel), "caught_llmcycle": sum(r[1] for r in sel),
                "expected": round(sum(_lsh_probability(r[3]) for r in sel), 2)})
    res["minhash"]["planted_near"] = near
    log(f"  planted near-dups: {near['pairs']} pairs, caught datatrove {near['caught_datatrove']} "
        f"(expected {near['expected_datatrove']}), llmcycle {near['caught_llmcycle']} (expected "
        f"{near['expected_llmcycle']}); mean |Jaccard difference| of the two shingle definitions "
        f"{near['mean_abs_jaccard_difference']}")
    for b in near["by_jaccard"]:
        log(f"      Jaccard {b['jaccard']}: {b['pairs']:4d} pairs, caught datatrove {b['caught_datatrove']}, "
            f"llmcycle {b['caught_llmcycle']}, theory {b['expected']}")
    return res


# ---------------------------------------------------------------------------------------------------
# 3. throughput of the whole chain


def datatrove_chain(corpus: Path, out: Path, workers: int) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.exact_dedup import (
        ExactDedupConfig,
        ExactDedupFilter,
        ExactDedupSignature,
        ExactFindDedups,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter

    tasks = 1 if workers == 1 else len(list(corpus.glob("*.jsonl")))
    ecfg = ExactDedupConfig(content_getter=_text_of)
    mcfg = MinhashConfig()
    p = {k: str(out / k) for k in ("filtered", "e_sigs", "e_dups", "exact", "m_sigs", "m_buckets", "m_ids", "final")}
    stages = []

    def stage(name, pipeline, n_tasks):
        ex = LocalPipelineExecutor(pipeline=pipeline, tasks=n_tasks, workers=min(workers, n_tasks),
                                   logging_dir=str(out / "logs" / name), depends=stages[-1][1] if stages else None)
        stages.append((name, ex))

    stage("1_filter+exact_sigs", [JsonlReader(str(corpus)), GopherRepetitionFilter(), GopherQualityFilter(),
                                  C4QualityFilter(), JsonlWriter(p["filtered"]),
                                  ExactDedupSignature(p["e_sigs"], config=ecfg)], tasks)
    stage("2_exact_find", [ExactFindDedups(p["e_sigs"], p["e_dups"], config=ecfg)], 1)
    stage("3_exact_filter+minhash_sigs", [JsonlReader(p["filtered"]), ExactDedupFilter(p["e_dups"], config=ecfg),
                                          JsonlWriter(p["exact"]), MinhashDedupSignature(p["m_sigs"], config=mcfg)],
          tasks)
    stage("4_minhash_buckets", [MinhashDedupBuckets(p["m_sigs"], p["m_buckets"], config=mcfg)], mcfg.num_buckets)
    stage("5_minhash_cluster", [MinhashDedupCluster(p["m_buckets"], p["m_ids"], config=mcfg)], 1)
    stage("6_minhash_filter", [JsonlReader(p["exact"]), MinhashDedupFilter(p["m_ids"]), JsonlWriter(p["final"])],
          tasks)
    stage_seconds = {}
    t_start = time.perf_counter()
    with quiet_datatrove(out / "datatrove.log"):
        for name, ex in stages:  # each one's `depends` is the one before, already complete
            t0 = time.perf_counter()
            ex.run()
            stage_seconds[name] = time.perf_counter() - t0
    wall = time.perf_counter() - t_start
    steps = []
    for name, _ in stages:
        for s in json.loads((out / "logs" / name / "stats.json").read_text()):
            ts = s.get("time_stats", {})
            steps.append({"stage": name, "step": s["name"],
                          "seconds": ts.get("total", 0.0) if isinstance(ts, dict) else 0.0,
                          "stats": {k: v for k, v in s.get("stats", {}).items() if not isinstance(v, dict) or "total" in v}})
    final = _read_dt_jsonl(out / "final")
    return {"seconds": wall, "tasks": tasks, "stage_seconds": stage_seconds, "steps": steps,
            "kept": {r["id"]: r["text"] for r in final}}


def llmcycle_chain(corpus: Path, out: Path, workers: int) -> dict:
    from llmcycle.config import build
    from llmcycle.data.config import DataConfig
    from llmcycle.data.pipeline import iter_docs
    from llmcycle.data.run import run_data

    cfg = build(DataConfig, {"out_dir": str(out), "inputs": [{"type": "jsonl", "paths": [str(corpus / "*.jsonl")]}],
                             "steps": list(CHAIN), "tokenize": False, "workers": workers})
    lines: list[str] = []
    logger = logging.getLogger("llmcycle")
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())  # run_data's progress, kept for the report
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        run_data(cfg)
    finally:
        logger.removeHandler(handler)
    wall = time.perf_counter() - t0
    stats = json.loads((out / "stats.json").read_text())
    steps = [{"step": s["name"], "seconds": s["seconds"], "in": s["docs_in"], "out": s["docs_out"],
              "dropped": s["dropped"]} for s in stats["steps"]]
    kept = {}
    for f in sorted((out / "documents").glob("*.jsonl.zst")):
        for d in iter_docs(f):
            kept[d.id] = d.text
    return {"seconds": wall, "steps": steps, "kept": kept, "log": lines}


def throughput(corpus: Path, work: Path, n_docs: int, workers_list: list[int], repeats: int, log) -> dict:
    results = {}
    for workers in workers_list:
        runs: dict = {"datatrove": [], "llmcycle": []}
        last = {}
        for rep in range(repeats):
            order = ("datatrove", "llmcycle") if rep % 2 == 0 else ("llmcycle", "datatrove")
            for side in order:
                out = work / f"chain-w{workers}-r{rep}-{side}"
                shutil.rmtree(out, ignore_errors=True)
                cold_caches()
                load0 = os.getloadavg()[0]
                r = (datatrove_chain if side == "datatrove" else llmcycle_chain)(corpus, out, workers)
                r["loadavg_before"], r["loadavg_after"] = load0, os.getloadavg()[0]
                r["docs_per_s"] = n_docs / r["seconds"]
                log(f"  workers={workers} run {rep + 1}/{repeats} {side:9s}: {r['seconds']:7.1f} s, "
                    f"{r['docs_per_s']:7.1f} docs/s, kept {len(r['kept'])}  (load {load0:.2f} -> "
                    f"{r['loadavg_after']:.2f})")
                last[side] = r
                runs[side].append({k: v for k, v in r.items() if k not in ("kept", "log")})
        best = {side: min(runs[side], key=lambda r: r["seconds"]) for side in runs}
        a, b = last["datatrove"]["kept"], last["llmcycle"]["kept"]
        both = set(a) & set(b)
        res = {
            "workers": workers, "runs": runs,
            "docs_per_s_datatrove": n_docs / best["datatrove"]["seconds"],
            "docs_per_s_llmcycle": n_docs / best["llmcycle"]["seconds"],
            "ratio": best["datatrove"]["seconds"] / best["llmcycle"]["seconds"],
            "final_kept_datatrove": len(a), "final_kept_llmcycle": len(b), "final_kept_both": len(both),
            "final_only_datatrove": sorted(set(a) - set(b))[:50], "final_only_llmcycle": sorted(set(b) - set(a))[:50],
            "final_text_equal": sum(a[i] == b[i] for i in both),
        }
        results[str(workers)] = res
        log(f"  workers={workers}: datatrove {res['docs_per_s_datatrove']:.1f} docs/s, llmcycle "
            f"{res['docs_per_s_llmcycle']:.1f} docs/s -> x{res['ratio']:.2f}; final documents: datatrove "
            f"{len(a)}, llmcycle {len(b)}, both {len(both)} ({res['final_text_equal']} with equal text)")
    return results


# ---------------------------------------------------------------------------------------------------
# report


def print_summary(report: dict) -> None:
    m = report["machine"]
    print()
    print(f"machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, datatrove {m['datatrove']}, "
          f"spaCy {m['spacy']}; load average {m['loadavg_start'][0]:.2f} at start, "
          f"{m.get('loadavg_end', [0])[0]:.2f} at end")
    c = report["corpus"]
    print(f"corpus: {c['documents']} documents, {c['bytes'] / 1e6:.1f} MB (median {c['median_bytes']} B), "
          f"{c['by_kind']}, planted {c['planted']}" + (f", {c['topped_up']} pieces from the extra stdlib files"
                                                       if c["topped_up"] else ""))
    if "filters" in report:
        print()
        print(f"{'filter':20s} {'agree %':>8s} {'differ':>7s} {'drop dt':>8s} {'drop lc':>8s} "
              f"{'dt doc/s':>9s} {'lc doc/s':>9s} {'x':>6s}")
        for name, r in report["filters"].items():
            print(f"{name:20s} {100 * r['agreement']:8.3f} {r['documents'] - r['agree']:7d} "
                  f"{r['dropped_datatrove']:8d} {r['dropped_llmcycle']:8d} {r['docs_per_s_datatrove']:9.0f} "
                  f"{r['docs_per_s_llmcycle']:9.0f} {r['speedup']:6.1f}")
            for key, n in r["disagreements"].items():
                print(f"{'':4s}{n:5d}  datatrove {key.split(' | ')[0]:28s} llmcycle {key.split(' | ')[1]}")
            for key, n in r["both_drop_different_reason"].items():
                print(f"{'':4s}{n:5d}  both drop, other reason: datatrove {key.split(' | ')[0]}, "
                      f"llmcycle {key.split(' | ')[1]}")
            if "text_both_keep_equal" in r:
                print(f"{'':4s}rewritten text where both keep: {r['text_both_keep_equal']} equal, "
                      f"{r['text_both_keep_differ']} differ")
    if "dedup" in report:
        for kind in ("exact", "minhash"):
            r = report["dedup"][kind]
            print(f"{kind + '_dedup':20s} {100 * r['agreement']:8.3f} {r['only_datatrove'] + r['only_llmcycle']:7d} "
                  f"{r['dropped_datatrove']:8d} {r['dropped_llmcycle']:8d}   planted {r['planted']}: dropped "
                  f"datatrove {r['planted_dropped_datatrove']}, llmcycle {r['planted_dropped_llmcycle']}")
            if "classes" in r:
                print(f"{'':4s}clusters: datatrove {r['clusters_datatrove']}, llmcycle {r['clusters_llmcycle']}, "
                      f"identical {r['clusters_identical']}")
                for cls, c in r["classes"].items():
                    print(f"{'':4s}{c['documents']:5d}  {cls}"
                          + (f", Jaccard {c['jaccard_min']:.2f}-{c['jaccard_max']:.2f}" if "jaccard_min" in c else ""))
    if "throughput" in report:
        print()
        print(f"{'chain':10s} {'datatrove doc/s':>16s} {'llmcycle doc/s':>15s} {'ratio':>6s} {'kept dt':>8s} "
              f"{'kept lc':>8s} {'kept both':>9s}")
        for w, r in report["throughput"].items():
            print(f"workers={w:3s} {r['docs_per_s_datatrove']:16.1f} {r['docs_per_s_llmcycle']:15.1f} "
                  f"{r['ratio']:6.2f} {r['final_kept_datatrove']:8d} {r['final_kept_llmcycle']:8d} "
                  f"{r['final_kept_both']:9d}")
        for w, r in report["throughput"].items():
            best_dt = min(r["runs"]["datatrove"], key=lambda x: x["seconds"])
            best_lc = min(r["runs"]["llmcycle"], key=lambda x: x["seconds"])
            print(f"  workers={w} datatrove stages: "
                  + ", ".join(f"{k} {v:.1f}s" for k, v in best_dt["stage_seconds"].items()))
            dt_steps = Counter()
            for s in best_dt["steps"]:
                dt_steps[s["step"]] += s["seconds"]
            print("    datatrove steps: " + ", ".join(f"{k} {v:.1f}s" for k, v in dt_steps.items()))
            print("    llmcycle steps:  " + ", ".join(f"{s['step']} {s['seconds']:.1f}s" for s in best_lc["steps"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=5000, help="documents in the corpus, planted duplicates included")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed (cutting, shuffling, planting)")
    ap.add_argument("--shards", type=int, default=2, help="JSONL files the corpus is written as (tasks for workers>1)")
    ap.add_argument("--work", help="work folder (corpus, outputs, logs); default: a temporary folder, removed")
    ap.add_argument("--parts", default="agreement,dedup,throughput", help="which parts to run, comma-separated")
    ap.add_argument("--workers", default="1", help="worker counts for the chain, e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs of each chain per worker count (best kept)")
    ap.add_argument("--examples", type=int, default=3, help="examples kept per disagreement class")
    ap.add_argument("--json", help="write everything here")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    unknown = parts - {"agreement", "dedup", "throughput"}
    if unknown:
        ap.error(f"unknown part(s): {', '.join(sorted(unknown))}")

    tmp = None
    if args.work:
        work = Path(args.work)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="llmcycle-data-bench-")
        work = Path(tmp)

    def log(msg: str) -> None:
        print(msg, flush=True)

    report: dict = {"machine": machine_info(), "args": vars(args)}
    try:
        t0 = time.perf_counter()
        docs, info = build_corpus(args.docs, args.seed)
        corpus = work / "corpus"
        shutil.rmtree(corpus, ignore_errors=True)
        write_corpus(docs, corpus, args.shards)
        report["corpus"] = {**info, "folder": str(corpus)}
        log(f"corpus: {info['documents']} documents, {info['bytes'] / 1e6:.1f} MB, {info['by_kind']}, planted "
            f"{info['planted']} [{time.perf_counter() - t0:.1f}s] -> {corpus}")
        # Throughput first, so that no earlier part has warmed anything up for either side.
        if "throughput" in parts:
            log("throughput: " + " -> ".join(CHAIN))
            report["throughput"] = throughput(corpus, work, len(docs), [int(w) for w in args.workers.split(",")],
                                              args.repeats, log)
        if "agreement" in parts:
            log("agreement per filter (every document, each filter alone):")
            report["filters"] = filter_agreement(docs, args.examples, log)
        if "dedup" in parts:
            log("agreement of dedup (each alone on the whole corpus):")
            shutil.rmtree(work / "dedup", ignore_errors=True)
            report["dedup"] = dedup_agreement(docs, corpus, work / "dedup", args.examples, log)
        report["machine"]["loadavg_end"] = list(os.getloadavg())
        print_summary(report)
        if args.json:
            Path(args.json).write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str) + "\n")
            print(f"\nwrote {args.json}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
