"""The run graph: the stages of the registry in order, each keyed, skipped, resumed or rerun, and recorded.

Stages run in graph order, each into `runs/<name>/<stage>/`. Every stage leaves `stage.json`: its key (a
hash of its configuration and of the recorded outputs of the stages it reads), status, timings, peak
memory, metrics, its configuration, input hashes and versions, and the content hashes of its outputs. A
second `run` skips a stage whose key matches and whose outputs still hash as recorded; a stage that was
interrupted (status "running" under the same key) resumes from its own checkpoints; a stage whose key
changed, or that `--from` names (and everything after it), starts over. What a stage is, reads and does
is its `Stage` record (stage.py); nothing here names a stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from llmcycle import memory
from llmcycle.artifacts import is_temporary, recover
from llmcycle.artifacts.manifest import MANIFEST, UNHASHED, file_hashes, versions
from llmcycle.config import to_dict
from llmcycle.errors import LlmcycleError
from llmcycle.lifecycle import stages as registry
from llmcycle.lifecycle.records import read_record, write_record
from llmcycle.lifecycle.stage import EARLIER, PREVIOUS_MODEL

log = logging.getLogger(__name__)


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def stage_outputs(stage: str, stage_dir: Path) -> dict[str, str]:
    """Content hashes of what a stage produced: the model directory, or its result files.

    The model card (README.md) is left out, as lineage leaves it out: it is documentation the report stage
    rewrites when evaluation results arrive, not something a later stage reads."""
    st = registry.get(stage)
    if st.produces_model:
        return file_hashes(stage_dir / "model", skip=UNHASHED) if (stage_dir / "model").exists() else {}
    skip = (*st.scratch, *UNHASHED)  # scratch: working files (the data stage's intermediate phases)
    return {name: h for name, h in file_hashes(stage_dir, skip).items() if not is_temporary(name)}


def discard_stale(stage: str, stage_dir: Path) -> None:
    """Clear a stage that starts over (stale, or named by --from), all but its published model.

    A model stage's checkpoints, metrics and working files go; its `model/` stays until the rerun
    publishes the new one over it (llmcycle/artifacts/io.py swaps it in whole), so a rerun that is
    interrupted still leaves the last good model, loadable and verifiable by `llmcycle lineage`.
    Other stages start from an empty folder: their results are cheap to redo, and a data stage kept
    half-old could mix the shards of two recipes."""
    kept = ("model",) if registry.get(stage).produces_model else ()
    if kept:
        recover(stage_dir / "model")  # a publish killed amid its fallback swap left the model renamed aside
    for entry in stage_dir.iterdir():
        if entry.name in kept:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def up_to_date(stage: str, stage_dir: Path, key: str) -> bool:
    rec = read_record(stage_dir)
    return bool(rec and rec.get("status") == "done" and rec.get("key") == key
                and rec.get("outputs") == stage_outputs(stage, stage_dir))


class PeakMemory:
    """Peak memory of one stage: the process's resident-set high-water mark, reset when the stage starts.

    Freed heap is handed back to the OS first (llmcycle/memory.py), so a stage's peak is its own and not what
    the stage before it freed but kept. Linux resets VmHWM; elsewhere the number is the process's peak so far
    (`ru_maxrss`), an upper bound that says so. CUDA reports the allocator's peak. (Worker processes are not
    children of this one, forkserver or Ray starts them: the data stage has them report their own.)"""

    def __init__(self) -> None:
        memory.release_free_memory()
        self.per_stage = memory.reset_peak()
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_rss_mb": memory.peak_rss_mb(),
                               "peak_rss_scope": "stage" if self.per_stage else "process"}
        if self.cuda:
            import torch

            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


# ---- the run ----------------------------------------------------------------------------------


class Lifecycle:
    """One run of the graph: resolves each stage's configuration and inputs, skips, resumes or reruns.

    `cfg` is a LifecycleConfig (config.py): run name, runs_dir, the stages to run, a section per stage."""

    def __init__(self, cfg: Any) -> None:
        names = registry.names()
        unknown = [s for s in cfg.stages if s not in names]
        if unknown:
            raise LlmcycleError(f"unknown stage(s) {unknown}; stages are {', '.join(names)}.")
        self.cfg = cfg
        self.root = Path(cfg.runs_dir) / cfg.name
        self.stages = [s for s in names if s in cfg.stages]
        self.results: dict[str, dict] = {}

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def model_stages(self, before: str | None = None) -> list[str]:
        """The run's model-producing stages (those before `before`, if given), in order."""
        upto = self.stages[: self.stages.index(before)] if before else self.stages
        return [s for s in upto if registry.get(s).produces_model]

    def final_model(self) -> Path:
        models = self.model_stages()
        if not models:
            every = ", ".join(s.name for s in registry.STAGES if s.produces_model)
            raise LlmcycleError(f"this recipe trains no model (stages has none of {every}).")
        return self.dir(models[-1]) / "model"

    def previous_model(self, stage: str) -> Path:
        """The model a stage reading PREVIOUS_MODEL starts from: the nearest model stage before it in this
        run, else its configured `<stage>.model`."""
        before = self.model_stages(before=stage)
        if not before:
            configured = Path(getattr(self.cfg, stage).model)
            if not (configured / "config.json").exists():
                first = next(s.name for s in registry.STAGES if s.produces_model)
                raise LlmcycleError(f"stage {stage} has no model to start from: run {first} in this recipe, "
                                    f"or set {stage}.model to a model directory.")
            return configured
        return self.dir(before[-1]) / "model"

    def stage_config(self, stage: str) -> Any:
        """The stage's configuration with the graph's paths filled in."""
        st = registry.get(stage)
        return st.configure(self, getattr(self.cfg, stage, None))

    def deps(self, stage: str) -> list[str]:
        """The stages of this run whose recorded outputs `stage` reads."""
        inputs = registry.get(stage).inputs
        if inputs == PREVIOUS_MODEL:
            return self.model_stages(before=stage)[-1:]
        if inputs == EARLIER:
            return self.stages[: self.stages.index(stage)]
        return [s for s in inputs if s in self.stages]

    def identity(self, stage: str) -> dict[str, Any]:
        """What a stage's result depends on: its configuration and the content hashes of its inputs (the
        recorded outputs of the stages it reads, or an outside model's manifest)."""
        cfg = self.stage_config(stage)
        deps = self.deps(stage)
        inputs = {d: (read_record(self.dir(d)) or {}).get("outputs") for d in deps}
        if registry.get(stage).inputs == PREVIOUS_MODEL and not deps:  # an outside model: its manifest
            manifest = self.previous_model(stage) / MANIFEST
            inputs["model"] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None
        return {"stage": stage, "config": to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "inputs": inputs}

    def key(self, stage: str) -> str:
        return _sha(self.identity(stage))

    def run(self, from_stage: str | None = None) -> dict[str, dict]:
        if from_stage is not None and from_stage not in self.stages:
            raise LlmcycleError(f"--from {from_stage}: not a stage of this recipe ({', '.join(self.stages)}).")
        forced = set(self.stages[self.stages.index(from_stage):]) if from_stage else set()
        for stage in self.stages:  # every section resolved and checked before any work starts
            self.stage_config(stage)
        t_run = time.time()
        for stage in self.stages:
            d = self.dir(stage)
            key = self.key(stage)
            if stage not in forced and up_to_date(stage, d, key):
                rec = read_record(d)
                self.results[stage] = rec
                log.info(f"[{stage}] up to date ({rec['seconds']:.0f} s when it ran): skipped")
                continue
            rec = read_record(d)
            resume = stage not in forced and bool(rec) and rec.get("key") == key and rec.get("status") == "running"
            if not resume and d.exists():
                discard_stale(stage, d)  # stale or forced: start over, but keep the last good model
            log.info(f"[{stage}] {'resuming' if resume else 'running'} -> {d}")
            started = time.time()
            write_record(d, {"stage": stage, "key": key, "status": "running", "started": started})
            peak = PeakMemory()
            metrics = registry.get(stage).run(self, resume)
            workers = {"peak_rss_workers_mb": metrics.pop("peak_rss_workers_mb")} if "peak_rss_workers_mb" in metrics \
                else {}
            rec = {"stage": stage, "key": key, "status": "done", "started": started, "seconds": time.time() - started,
                   **peak.read(), **workers, "metrics": metrics, "outputs": stage_outputs(stage, d),
                   "config": (ident := self.identity(stage))["config"], "inputs": ident["inputs"],
                   "versions": versions()}
            write_record(d, rec)
            self.results[stage] = rec
            log.info(f"[{stage}] done in {rec['seconds']:.0f} s")
        log.info(f"lifecycle {self.cfg.name}: {time.time() - t_run:.0f} s")
        return self.results
