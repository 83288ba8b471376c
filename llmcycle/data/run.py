"""`llmcycle data`: run a data recipe from raw sources to token shards, resumable, on either executor.

Output folder (`out_dir`):
    tokenizer/          the tokenizer the shards were made with (trained here unless one was given)
    train/, val/        token shard sets (docs/token-shards.md), balanced for `shards.num_ranks`
    documents/          the cleaned documents, zstd JSONL, one file per input task
    stats.json          per-step funnel, bad input by reason and location, per-task summaries
    dropped_samples.jsonl   a few dropped documents per step and reason
    manifest.json       config, input content hashes, output hashes, metrics
    work/               intermediate phases and completion markers (what a restarted run reuses)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from llmcycle.artifacts import atomic_write_json, publish_dir, staging_dir
from llmcycle.data.config import DataConfig
from llmcycle.data.executor import make_executor
from llmcycle.data.output import (
    TokenizeJob,
    check_tokenizer,
    run_tokenize_task,
    train_tokenizer_on_docs,
    write_split,
)
from llmcycle.data.pipeline import (
    DOCS_SUFFIX,
    PhaseJob,
    _digest,
    build_plan,
    run_decide,
    run_phase_task,
    task_name,
)
from llmcycle.data.readers import Problems
from llmcycle.data.stats import StepStats, funnel_table, merge_stats
from llmcycle.errors import ConfigError, LlmcycleError

log = logging.getLogger(__name__)  # progress at INFO: the CLI prints it (llmcycle/logs.py)


def check_config(cfg: DataConfig):
    """Everything that can be checked before work starts: readers, steps, parameters, paths."""
    plan = build_plan(cfg.inputs, cfg.steps, cfg.max_doc_bytes)
    if not 0.0 <= cfg.shards.val_fraction < 1.0:
        raise ConfigError(f"recipe: shards.val_fraction must be in [0, 1), got {cfg.shards.val_fraction}.")
    if cfg.shards.num_ranks < 1 or cfg.shards.shard_tokens < 1:
        raise ConfigError("recipe: shards.num_ranks and shards.shard_tokens must be positive.")
    if cfg.workers < 0:
        raise ConfigError(f"recipe: workers must be >= 0 (0: all cores), got {cfg.workers}.")
    if cfg.tokenizer.path:
        check_tokenizer(cfg.tokenizer.path)
    return plan


def run_data(cfg: DataConfig) -> dict:
    t_start = time.time()
    plan = check_config(cfg)
    out = Path(cfg.out_dir)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    executor = make_executor(cfg.executor, cfg.workers, cfg.ray_address)
    log.info(f"data: {len(plan.tasks)} tasks, {len(plan.steps)} steps in {len(plan.phases)} phases, "
             f"{executor.name} executor")
    try:
        phase_summaries, decisions = _run_phases(plan, cfg, work, executor)
        final = plan.phases[-1]
        doc_files = [work / final.folder / f"{task_name(t.index)}{DOCS_SUFFIX}" for t in plan.tasks]
        if not cfg.tokenize:
            return _finish_documents_only(cfg, out, plan, final, doc_files, phase_summaries, decisions,
                                          t_start)
        tok_key = _digest(final.key, dataclasses.asdict(cfg.tokenizer), cfg.shards.val_fraction)
        tokenizer_dir, tokenizer = _tokenizer(cfg, work, tok_key, doc_files)
        tok_dir = work / f"tokenize-{tok_key[:12]}"
        t0 = time.perf_counter()
        tok_jobs = [TokenizeJob(t.index, str(f), str(tokenizer_dir), str(tok_dir), cfg.shards.val_fraction)
                    for t, f in zip(plan.tasks, doc_files)]
        tok_summaries = executor.map(run_tokenize_task, tok_jobs)
        tok_seconds = time.perf_counter() - t0
    finally:
        executor.close()

    readers = {t.index: t.reader.name for t in plan.tasks}
    for s in tok_summaries:
        s["reader"] = readers[s["task"]]
    log.info("data: writing shards")
    _publish(out, tokenizer_dir, plan, final, doc_files)
    meta = {"data_key": tok_key}
    splits = {}
    for split in ("train", "val"):
        splits[split] = write_split(split, tok_dir, tok_summaries, out / split, tokenizer, cfg.shards.shard_tokens,
                                    cfg.shards.num_ranks, meta)
        if splits[split] is None:
            shutil.rmtree(out / split, ignore_errors=True)
    if splits["train"] is None:
        raise LlmcycleError("no training documents survived the pipeline; see the funnel in stats.json.")
    if splits["val"] is None and cfg.shards.val_fraction > 0:
        kept = sum(s["docs"] for s in tok_summaries)
        raise LlmcycleError(f"none of the {kept} cleaned documents fell into the validation split at "
                            f"shards.val_fraction={cfg.shards.val_fraction}; raise it (finished work is reused).")

    steps = _collect_stats(phase_summaries, decisions, cfg.samples_per_reason)
    tok_stats = StepStats("tokenize", seconds=sum(s["seconds"] for s in tok_summaries))
    tok_stats.docs_in = tok_stats.docs_out = sum(s["docs"] for s in tok_summaries)
    tok_stats.bytes_in = tok_stats.bytes_out = sum(s["bytes"] for s in tok_summaries)
    tok_stats.counters.update(tokens_train=sum(s["tokens_train"] for s in tok_summaries),
                              tokens_val=sum(s["tokens_val"] for s in tok_summaries),
                              docs_val=sum(s["docs_val"] for s in tok_summaries))
    steps.append(tok_stats)
    problems = Problems()
    for s in phase_summaries[0]:
        problems.merge(s["problems"])
    result = _write_reports(cfg, out, plan, steps, problems, phase_summaries[0], splits, tokenizer,
                            time.time() - t_start, tok_seconds)
    result["worker_peak_rss_mb"] = executor.worker_peak_kb / 1024 or None  # None: all ran in this process
    log.info("")
    log.info(funnel_table(steps))
    log.info(_problems_summary(problems))
    log.info(f"data: {splits['train']['num_tokens']:,} training tokens in {len(splits['train']['shards'])} shards"
             + (f", {splits['val']['num_tokens']:,} validation tokens" if splits["val"] else "")
             + f" [{time.time() - t_start:.1f}s]")
    log.info(f"wrote {out}")
    return result


def _finish_documents_only(cfg, out, plan, final, doc_files, phase_summaries, decisions, t_start) -> dict:
    from llmcycle.artifacts.manifest import write_manifest

    _publish(out, None, plan, final, doc_files)
    steps = _collect_stats(phase_summaries, decisions, cfg.samples_per_reason)
    problems = Problems()
    for s in phase_summaries[0]:
        problems.merge(s["problems"])
    stats = _stats_json(steps, problems, phase_summaries[0], time.time() - t_start)
    atomic_write_json(out / "stats.json", stats, indent=1)
    _write_samples(out, steps)
    metrics = {"seconds": stats["seconds"], "documents_kept": steps[-1].docs_out if steps else 0,
               "bad_input": dict(problems.counts), "funnel": _funnel(steps)}
    manifest = write_manifest(out, stage="data", config=dataclasses.asdict(cfg),
                              inputs={s["file"]: s["input_sha256"] for s in phase_summaries[0]}, metrics=metrics,
                              skip=("work",))
    log.info("")
    log.info(funnel_table(steps))
    log.info(_problems_summary(problems))
    log.info(f"data: {metrics['documents_kept']:,} cleaned documents in {out / 'documents'} "
             f"[{time.time() - t_start:.1f}s]")
    return {"out_dir": str(out), "manifest": manifest, "stats": stats}


def _run_phases(plan, cfg: DataConfig, work: Path, executor) -> tuple[list[list[dict]], list[dict]]:
    summaries, decisions = [], []
    prev = None
    for phase in plan.phases:
        folder = work / phase.folder
        done = sum((folder / f"{task_name(t.index)}.done.json").exists() for t in plan.tasks)
        names = [n for n, _ in phase.map_steps]
        if phase.incoming:
            names.insert(0, phase.incoming[0])
        log.info(f"data: phase {phase.index} [{', '.join(names) or 'read'}]: {len(plan.tasks)} tasks"
                 + (f" ({done} already done)" if done else ""))
        t0 = time.perf_counter()
        jobs = [PhaseJob(phase, t, str(work), prev.folder if prev else None,
                         prev.decision_file if prev else None, cfg.max_doc_bytes, cfg.samples_per_reason)
                for t in plan.tasks]
        summaries.append(executor.map(run_phase_task, jobs))
        log.info(f"data: phase {phase.index} done [{time.perf_counter() - t0:.1f}s]")
        if phase.outgoing:
            decision = run_decide(phase, work, len(plan.tasks))
            decisions.append(decision)
            log.info(f"data: {phase.outgoing[0]} decided over all tasks [{decision['seconds']:.1f}s]")
        prev = phase
    return summaries, decisions


def _tokenizer(cfg: DataConfig, work: Path, key: str, doc_files: list[Path]):
    if cfg.tokenizer.path:
        return Path(cfg.tokenizer.path), check_tokenizer(cfg.tokenizer.path)
    out = work / f"tokenizer-{key[:12]}"
    if (out / "tokenizer.json").is_file():
        return out, check_tokenizer(str(out))
    t0 = time.perf_counter()
    tc = cfg.tokenizer
    tok = train_tokenizer_on_docs(doc_files, out, tc.kind, tc.vocab_size, tc.min_frequency, tc.train_bytes,
                                  cfg.shards.val_fraction)
    log.info(f"data: trained a {tc.kind} tokenizer of {tok.vocab_size} tokens [{time.perf_counter() - t0:.1f}s]")
    return out, tok


def _publish(out: Path, tokenizer_dir: Path | None, plan, final, doc_files: list[Path]) -> None:
    """Copy the tokenizer and link the cleaned documents into the output folder, each folder swapped in
    whole (llmcycle/artifacts/io.py): a previous run's folders stay until the new ones are complete."""
    dest = out / "tokenizer"
    if tokenizer_dir is not None and tokenizer_dir.resolve() != dest.resolve():
        tmp = staging_dir(dest)
        shutil.copytree(tokenizer_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns("manifest.json"))
        publish_dir(tmp, dest)
    docs = staging_dir(out / "documents")
    for f in doc_files:
        try:
            os.link(f, docs / f.name)
        except OSError:  # another file system
            shutil.copy2(f, docs / f.name)
    publish_dir(docs, out / "documents")


def _collect_stats(phase_summaries: list[list[dict]], decisions: list[dict], samples: int) -> list[StepStats]:
    per_task: list[list[dict]] = []
    for phase in phase_summaries:
        for s in phase:
            per_task.append(s["stats"])
    steps = merge_stats(per_task, samples)
    by_name = {s.name: s for s in steps}
    for d in decisions:
        st = by_name[d["step"]]
        st.seconds += d["seconds"]
        st.counters.update(d["counters"])
    return steps


def _problems_summary(problems: Problems) -> str:
    if not problems.counts:
        return "bad input: none"
    lines = [f"bad input: {sum(problems.counts.values()):,} records"]
    for reason, n in sorted(problems.counts.items(), key=lambda kv: (-kv[1], kv[0])):
        locs = problems.locations.get(reason, [])
        lines.append(f"  {reason}: {n:,}" + (f"  (first: {locs[0]})" if locs else ""))
    return "\n".join(lines)


def _stats_json(steps, problems, read_summaries, seconds) -> dict:
    stats = {
        "steps": [s.to_dict() for s in steps],
        "problems": problems.to_dict(),
        "tasks": [{k: s[k] for k in ("task", "file", "reader", "docs_out", "input_sha256")} for s in read_summaries],
        "seconds": seconds,
    }
    for s in stats["steps"]:
        s.pop("samples")
    return stats


def _write_samples(out: Path, steps) -> None:
    with open(out / "dropped_samples.jsonl", "w", encoding="utf-8") as f:
        for s in steps:
            for reason, items in s.samples.items():
                for item in items:
                    f.write(json.dumps({"step": s.name, "reason": reason, **item}, ensure_ascii=False) + "\n")


def _funnel(steps) -> list[dict]:
    return [{"step": s.name, "in": s.docs_in, "out": s.docs_out, "dropped": dict(s.dropped)} for s in steps]


def _write_reports(cfg, out: Path, plan, steps, problems, read_summaries, splits, tokenizer, seconds,
                   tok_seconds) -> dict:
    from llmcycle.artifacts.manifest import write_manifest

    stats = _stats_json(steps, problems, read_summaries, seconds)
    atomic_write_json(out / "stats.json", stats, indent=1)
    _write_samples(out, steps)
    metrics = {
        "seconds": seconds,
        "documents_read": steps[0].docs_in if steps else 0,
        "documents_kept": sum(s["docs_out"] for s in read_summaries) if len(plan.phases) == 1 else None,
        "train": {k: splits["train"][k] for k in ("num_docs", "num_tokens", "num_bytes")},
        "val": {k: splits["val"][k] for k in ("num_docs", "num_tokens", "num_bytes")} if splits["val"] else None,
        "train_shards": [{k: e[k] for k in ("name", "num_docs", "num_tokens", "sources")}
                         for e in splits["train"]["shards"]],
        "tokenizer_hash": tokenizer.content_hash(),
        "bad_input": dict(problems.counts),
        "funnel": _funnel(steps),
    }
    metrics["documents_kept"] = steps[-1].docs_out if steps else 0
    inputs = {s["file"]: s["input_sha256"] for s in read_summaries}
    manifest = write_manifest(out, stage="data", config=dataclasses.asdict(cfg), inputs=inputs, metrics=metrics,
                              skip=("work",))
    return {"out_dir": str(out), "manifest": manifest, "stats": stats, "tokenize_seconds": tok_seconds}
