"""`llmcycle run`: the lifecycle as a graph of stages, each reading artifacts and writing artifacts.

Stages run in graph order, each into `runs/<name>/<stage>/`: data (sources -> filters -> dedup ->
tokenizer -> token shards) -> pretrain (causal LM on those shards) -> sft -> dpo -> eval (every model
stage) -> serve (a smoke test of the final model through the real HTTP server) -> report (report.md,
report.html, and a model card README.md in every model directory). Every stage leaves `stage.json`: its
key (a hash of its configuration and of the recorded outputs of the stages it reads), status, timings,
peak memory, metrics, its configuration, input hashes and versions, and the content hashes of its
outputs. A second `run` skips a stage whose key matches and whose outputs still hash as recorded;
a stage that was interrupted (status "running" under the same key) resumes from its own checkpoints; a
stage whose key changed, or that `--from` names (and everything after it), starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmcycle.artifacts import recover
from llmcycle.config import field_help as F
from llmcycle.config import to_dict
from llmcycle.data.config import DataConfig
from llmcycle.errors import LlmcycleError
from llmcycle.manifest import MANIFEST, RECORD, UNHASHED, file_hashes, versions
from llmcycle.train.config import DPOConfig, PretrainConfig, SFTConfig

STAGES = ("data", "pretrain", "sft", "dpo", "eval", "serve", "report")
MODEL_STAGES = ("pretrain", "sft", "dpo")


@dataclass
class EvalStage:
    limit: int = F(400, "held-out items per metric (multiple choice, exact match; the embedded held-out set has "
                        "357: all of them) and at most as many held-out sequences for bits per byte")


@dataclass
class ServeStage:
    requests: int = F(16, "chat requests sent to the served final model")
    concurrency: int = F(4, "requests in flight at once")
    max_tokens: int = F(24, "tokens per answer at most")


@dataclass
class LifecycleConfig:
    name: str = F("default", "run name: every stage writes into <runs_dir>/<name>/<stage>/")
    runs_dir: str = F("runs", "where runs live")
    stages: list[str] = F(list(STAGES), "stages to run, a subset of data, pretrain, sft, dpo, eval, serve, report")
    data: DataConfig = field(default_factory=DataConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    eval: EvalStage = field(default_factory=EvalStage)
    serve: ServeStage = field(default_factory=ServeStage)


# ---- records ----------------------------------------------------------------------------------


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_record(stage_dir: Path) -> dict | None:
    path = stage_dir / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a record torn by a crash: the stage reruns


def _write_record(stage_dir: Path, record: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    tmp = stage_dir / (RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(stage_dir / RECORD)  # atomic: a record is whole or absent


def stage_outputs(stage: str, stage_dir: Path) -> dict[str, str]:
    """Content hashes of what a stage produced: the model directory, or its result files.

    The model card (README.md) is left out, as lineage leaves it out: it is documentation the report stage
    rewrites when evaluation results arrive, not something a later stage reads."""
    if stage in MODEL_STAGES:
        return file_hashes(stage_dir / "model", skip=UNHASHED) if (stage_dir / "model").exists() else {}
    skip = ("work", *UNHASHED) if stage == "data" else UNHASHED  # work/: the data stage's intermediate phases
    return {name: h for name, h in file_hashes(stage_dir, skip).items() if not name.endswith(".tmp")}


def discard_stale(stage: str, stage_dir: Path) -> None:
    """Clear a stage that starts over (stale, or named by --from), all but its published model.

    A model stage's checkpoints, metrics and working files go; its `model/` stays until the rerun
    publishes the new one over it (llmcycle/artifacts.py swaps it in whole), so a rerun that is
    interrupted still leaves the last good model, loadable and verifiable by `llmcycle lineage`.
    Other stages start from an empty folder: their results are cheap to redo, and a data stage kept
    half-old could mix the shards of two recipes."""
    kept = ("model",) if stage in MODEL_STAGES else ()
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

    Linux resets VmHWM on `echo 5 > /proc/self/clear_refs`; elsewhere the number is the process's peak so
    far (`ru_maxrss`), an upper bound that says so. CUDA reports the allocator's peak. (Worker processes
    are not children of this one, forkserver or Ray starts them: the data stage has them report their own.)"""

    def __init__(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.per_stage = True
        except OSError:
            self.per_stage = False
        import torch

        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def read(self) -> dict[str, Any]:
        out: dict[str, Any] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                               "peak_rss_scope": "stage" if self.per_stage else "process"}
        if self.per_stage:
            status = Path("/proc/self/status").read_text()
            hwm = next((ln.split()[1] for ln in status.splitlines() if ln.startswith("VmHWM:")), None)
            if hwm is not None:
                out["peak_rss_mb"] = int(hwm) / 1024
        if self.cuda:
            import torch

            out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return out


# ---- the run ----------------------------------------------------------------------------------


class Lifecycle:
    """One run of the graph: resolves each stage's configuration and inputs, skips, resumes or reruns."""

    def __init__(self, cfg: LifecycleConfig, log: Callable[[str], None] = print) -> None:
        unknown = [s for s in cfg.stages if s not in STAGES]
        if unknown:
            raise LlmcycleError(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}.")
        self.cfg = cfg
        self.root = Path(cfg.runs_dir) / cfg.name
        self.stages = [s for s in STAGES if s in cfg.stages]
        self.log = log
        self.results: dict[str, dict] = {}

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def final_model(self) -> Path:
        models = [s for s in self.stages if s in MODEL_STAGES]
        if not models:
            raise LlmcycleError("this recipe trains no model (stages has none of pretrain, sft, dpo).")
        return self.dir(models[-1]) / "model"

    def previous_model(self, stage: str) -> Path:
        """The model a post-training stage starts from: the nearest model stage before it in this run."""
        before = [s for s in MODEL_STAGES[: MODEL_STAGES.index(stage)] if s in self.stages]
        if not before:
            configured = Path(getattr(self.cfg, stage).model)
            if not (configured / "config.json").exists():
                raise LlmcycleError(f"stage {stage} has no model to start from: run pretrain in this recipe, "
                                    f"or set {stage}.model to a model directory.")
            return configured
        return self.dir(before[-1]) / "model"

    def stage_config(self, stage: str) -> Any:
        """The stage's configuration with the graph's paths filled in."""
        if stage == "data":
            return dataclasses.replace(self.cfg.data, out_dir=str(self.dir(stage)))
        if stage == "pretrain":
            cfg = dataclasses.replace(self.cfg.pretrain, out_dir=str(self.dir(stage)))
            if "data" in self.stages:  # train on what the data stage wrote: its shards and its tokenizer
                d = self.dir("data")
                cfg = dataclasses.replace(
                    cfg, data=dataclasses.replace(cfg.data, train_shards=str(d / "train"), val_shards=str(d / "val")),
                    tokenizer=dataclasses.replace(cfg.tokenizer, path=str(d / "tokenizer")))
            return cfg
        if stage in ("sft", "dpo"):
            return dataclasses.replace(getattr(self.cfg, stage), out_dir=str(self.dir(stage)),
                                       model=str(self.previous_model(stage)))
        return getattr(self.cfg, stage, None)

    def deps(self, stage: str) -> list[str]:
        if stage == "data":
            return []
        if stage == "pretrain":
            return ["data"] if "data" in self.stages else []
        if stage in MODEL_STAGES:
            i = MODEL_STAGES.index(stage)
            before = [s for s in MODEL_STAGES[:i] if s in self.stages]
            return before[-1:]
        return [s for s in self.stages[: self.stages.index(stage)]]

    def identity(self, stage: str) -> dict[str, Any]:
        """What a stage's result depends on: its configuration and the content hashes of its inputs (the
        recorded outputs of the stages it reads, or an outside model's manifest)."""
        cfg = self.stage_config(stage)
        inputs = {d: (read_record(self.dir(d)) or {}).get("outputs") for d in self.deps(stage)}
        if stage in ("sft", "dpo") and not self.deps(stage):  # an outside model: its manifest is its identity
            manifest = self.previous_model(stage) / MANIFEST
            inputs["model"] = hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.exists() else None
        return {"stage": stage, "config": to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg, "inputs": inputs}

    def key(self, stage: str) -> str:
        return _sha(self.identity(stage))

    def run(self, from_stage: str | None = None) -> dict[str, dict]:
        if from_stage is not None and from_stage not in self.stages:
            raise LlmcycleError(f"--from {from_stage}: not a stage of this recipe ({', '.join(self.stages)}).")
        forced = set(self.stages[self.stages.index(from_stage):]) if from_stage else set()
        t_run = time.time()
        for stage in self.stages:
            d = self.dir(stage)
            key = self.key(stage)
            if stage not in forced and up_to_date(stage, d, key):
                rec = read_record(d)
                self.results[stage] = rec
                self.log(f"[{stage}] up to date ({rec['seconds']:.0f} s when it ran): skipped")
                continue
            rec = read_record(d)
            resume = stage not in forced and bool(rec) and rec.get("key") == key and rec.get("status") == "running"
            if not resume and d.exists():
                discard_stale(stage, d)  # stale or forced: start over, but keep the last good model
            self.log(f"[{stage}] {'resuming' if resume else 'running'} -> {d}")
            started = time.time()
            _write_record(d, {"stage": stage, "key": key, "status": "running", "started": started})
            peak = PeakMemory()
            metrics = RUNNERS[stage](self, stage, resume)
            workers = {"peak_rss_workers_mb": metrics.pop("peak_rss_workers_mb")} if "peak_rss_workers_mb" in metrics \
                else {}
            rec = {"stage": stage, "key": key, "status": "done", "started": started, "seconds": time.time() - started,
                   **peak.read(), **workers, "metrics": metrics, "outputs": stage_outputs(stage, d),
                   "config": (ident := self.identity(stage))["config"], "inputs": ident["inputs"],
                   "versions": versions()}
            _write_record(d, rec)
            self.results[stage] = rec
            self.log(f"[{stage}] done in {rec['seconds']:.0f} s")
        self.log(f"lifecycle {self.cfg.name}: {time.time() - t_run:.0f} s")
        return self.results


# ---- stage runners ------------------------------------------------------------------------------


def _run_data(lc: Lifecycle, stage: str, resume: bool) -> dict:
    from llmcycle.data.run import run_data

    result = run_data(lc.stage_config(stage), log=lc.log)
    # the funnel, token counts, bad input (the hashes stay in the manifest), and the workers' peak memory
    return {**result["manifest"]["metrics"], "peak_rss_workers_mb": result.get("worker_peak_rss_mb")}


def _run_pretrain(lc: Lifecycle, stage: str, resume: bool) -> dict:
    from llmcycle.train.pretrain.loop import pretrain

    return pretrain(lc.stage_config(stage), resume=resume, log=lc.log)


def _run_sft(lc: Lifecycle, stage: str, resume: bool) -> dict:
    from llmcycle.train.posttrain.sft import sft

    return sft(lc.stage_config(stage), resume=resume, log=lc.log)


def _run_dpo(lc: Lifecycle, stage: str, resume: bool) -> dict:
    from llmcycle.train.posttrain.dpo import dpo

    return dpo(lc.stage_config(stage), resume=resume, log=lc.log)


def _run_eval(lc: Lifecycle, stage: str, resume: bool) -> dict:
    """Suite v1 on every model stage of the run; one JSON file per stage, the table in the record."""
    from llmcycle.eval.suite import evaluate_model

    by_stage = {}
    for s in lc.stages:
        if s in MODEL_STAGES:
            result, _ = evaluate_model(lc.dir(s) / "model", limit=lc.cfg.eval.limit)
            (lc.dir(stage) / f"{s}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
            by_stage[s] = result["metrics"]
            lc.log(f"[eval] {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in result["metrics"].items()))
    return {"by_stage": by_stage}


def _run_serve(lc: Lifecycle, stage: str, resume: bool) -> dict:
    """Serve the final model through the real HTTP server on loopback and talk to it as a client would."""
    from llmcycle.serve.smoke import smoke_test
    from llmcycle.train.posttrain.synthetic import make_items, split_items

    cfg: ServeStage = lc.cfg.serve
    _, held = split_items(make_items(per_task=40))
    prompts = [it.prompt for it in held][: cfg.requests]
    result = smoke_test(lc.final_model(), prompts, cfg.concurrency, cfg.max_tokens)
    (lc.dir(stage) / "serve.json").write_text(json.dumps(result, indent=2) + "\n")
    return {k: v for k, v in result.items() if k != "answers"}


def _run_report(lc: Lifecycle, stage: str, resume: bool) -> dict:
    from llmcycle.report import write_report

    path = write_report(lc)
    lc.log(f"report: {path}")
    return {"report": str(path)}


RUNNERS: dict[str, Callable[[Lifecycle, str, bool], dict]] = {
    "data": _run_data,
    "eval": _run_eval,
    "serve": _run_serve,
    "report": _run_report,
    "pretrain": _run_pretrain,
    "sft": _run_sft,
    "dpo": _run_dpo,
}
