"""`llmcycle run` on a miniature recipe of the whole graph: every stage runs and records itself, a second
run skips them all, --from and a changed setting redo exactly the stages they should, the serving smoke
test talks to a real server, and the report says what the records say."""

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import tiny_train_overrides
from llmcycle.cli import main
from llmcycle.config import field_help, load_config
from llmcycle.errors import LlmcycleError
from llmcycle.lifecycle import PREVIOUS_MODEL, Lifecycle, LifecycleConfig, Stage, read_record, stage_outputs
from llmcycle.lifecycle.stage import metrics_named


def _post(stage: str) -> list[str]:
    return [f"{stage}.{k}={v}" for k, v in {
        "train.max_steps": 2, "train.batch_size": 8, "train.warmup_steps": 1, "train.dtype": "fp32",
        "train.threads": 1, "data.max_length": 64, "data.embedded_per_task": 40, "eval.every": 0,
        "eval.generate": 8, "checkpoint.every": 0}.items()]


DATA = ["data.inputs=[{type: python, max_bytes: 400000}]", "data.steps=[normalize, pii, exact_dedup, minhash_dedup]",
        "data.tokenizer.vocab_size=512", "data.shards.val_fraction=0.1", "data.workers=1"]
ALL = "[data,pretrain,sft,dpo,eval,serve,report]"


def miniature(tiny_data, runs: Path, stages: str = ALL) -> list[str]:
    """The whole graph in miniature; without the data stage, pre-training reads the tiny_data shards."""
    pre = [o for o in tiny_train_overrides(runs / "unused", 6) if not o.startswith("out_dir=")]
    given = [] if "data" in stages else tiny_data["overrides"]
    return [f"runs_dir={runs}", "name=mini", f"stages={stages}", *DATA,
            *(f"pretrain.{o}" for o in given + pre),
            *_post("sft"), *_post("dpo"), "eval.limit=16", "serve.requests=4", "serve.concurrency=2", "serve.max_tokens=8"]


def _hashes(runs: Path) -> dict:
    return {s: (read_record(runs / "mini" / s) or {}).get("outputs") for s in ("pretrain", "sft", "dpo")}


def test_miniature_lifecycle_runs_skips_and_redoes(tiny_data, tmp_path, capsys):
    runs = tmp_path / "runs"
    args = miniature(tiny_data, runs)
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    root = runs / "mini"
    for stage in ("data", "pretrain", "sft", "dpo", "eval", "serve", "report"):
        rec = read_record(root / stage)
        assert rec["status"] == "done" and rec["seconds"] > 0 and rec["outputs"], stage
        assert 0 < rec["peak_rss_mb"] < 64_000, stage
        assert (rec["config"] is not None or stage == "report") and set(rec["versions"]) == {"llmcycle", "torch", "python"}, stage
    assert set(read_record(root / "pretrain")["inputs"]) == {"data"}
    assert read_record(root / "sft")["inputs"]["pretrain"] == read_record(root / "pretrain")["outputs"]
    assert (root / "dpo" / "model" / "model.safetensors").exists()
    # pre-training read the data stage's shards and tokenizer, and says so in its manifest
    pre_manifest = json.loads((root / "pretrain" / "model" / "manifest.json").read_text())
    assert pre_manifest["config"]["data"]["train_shards"] == str(root / "data" / "train")
    assert pre_manifest["config"]["tokenizer"]["path"] == str(root / "data" / "tokenizer")
    assert set(pre_manifest["inputs"]["data"]["shards_sha256"]) == {"train", "val"}
    data_rec = read_record(root / "data")["metrics"]
    assert [f["step"] for f in data_rec["funnel"]] == [
        "read", "normalize", "pii", "exact_dedup", "minhash_dedup", "tokenize"]
    # post-training started from the previous stage's model, as the graph says
    assert json.loads((root / "sft" / "model" / "manifest.json").read_text())["inputs"]["model"]["path"] == \
        str(root / "pretrain" / "model")
    serve = json.loads((root / "serve" / "serve.json").read_text())
    assert serve["requests"] == 4 and serve["stream_equals_plain"] and serve["metrics_match_usage"]
    report = (root / "report.md").read_text()
    assert "## Stages" in report and "held-out bits/byte" in report and "Serving smoke test" in report
    assert "| dpo | train_shards: " in report and "Decontamination" in report
    evals = read_record(root / "eval")["metrics"]["by_stage"]
    assert set(evals) == {"pretrain", "sft", "dpo"} and "Evaluation by stage" in report
    # bits/byte of the pre-trained model as the eval suite measures it = as pre-training measured it
    # (the same 16 held-out rows: eval.limit = pretrain eval.sequences)
    assert evals["pretrain"]["heldout_bpb"] == pytest.approx(read_record(root / "pretrain")["metrics"]["val_bpb"],
                                                             rel=1e-4)
    assert main(["lineage", str(root / "dpo" / "model")]) == 0  # the chain back to the corpus verifies
    chain = capsys.readouterr().out
    assert "data  " in chain and "raw: corpus  python" in chain
    assert "summary" in out and str(root / "dpo" / "model") in out

    # report.html: one page, every chart inline; model cards in every model directory
    page = (root / "report.html").read_text()
    assert page.count("<svg") >= 8 and "<script" not in page and "Data funnel" in page
    for stage in ("pretrain", "sft", "dpo"):
        card = (root / stage / "model" / "README.md").read_text()
        assert card.startswith("---\nlibrary_name: transformers") and "## Training data" in card
        assert "| minhash_dedup |" in card and "## Limitations" in card and "personal data" in card
    card = (root / "dpo" / "model" / "README.md").read_text()
    assert "| metric | pretrain | sft | dpo |" in card and "| mc_accuracy |" in card
    first = _hashes(runs)

    # Nothing changed: every stage is skipped and the artifacts are untouched.
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    assert out.count("up to date") == 7 and "running" not in out
    assert _hashes(runs) == first

    # --from dpo redoes dpo and what follows, not sft
    assert main(["run", *args, "--from", "dpo"]) == 0
    out = capsys.readouterr().out
    assert "[sft] up to date" in out and "[dpo] running" in out and "[report] running" in out
    assert _hashes(runs) == first  # same inputs, same seeds: the same weights again

    # A changed SFT setting redoes sft and everything after it; pre-training is kept.
    assert main(["run", *args, "sft.train.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    assert "[pretrain] up to date" in out and "[sft] running" in out and "[dpo] running" in out
    again = _hashes(runs)
    assert again["pretrain"] == first["pretrain"] and again["sft"] != first["sft"]

    # A modified artifact is not "up to date": the stage runs again.
    (root / "dpo" / "model" / "config.json").write_text("{}")
    assert main(["run", *args]) == 0
    assert "[dpo] running" in capsys.readouterr().out

    # Shards rewritten after pre-training read them: lineage fails loudly, naming the file.
    shards = root / "data" / "train" / "shards.json"
    shards.write_text(shards.read_text() + "\n")
    assert main(["lineage", str(root / "dpo" / "model")]) == 1
    assert f"{shards}: changed" in capsys.readouterr().err


def test_lifecycle_refuses_unknown_stages_and_missing_models(tmp_path):
    with pytest.raises(LlmcycleError, match="unknown stage"):
        Lifecycle(load_config(LifecycleConfig, None, ["stages=[pretrain,deploy]"]))
    lc = Lifecycle(load_config(LifecycleConfig, None, [f"runs_dir={tmp_path}", "stages=[sft]",
                                                      f"sft.model={tmp_path / 'nowhere'}"]))
    with pytest.raises(LlmcycleError, match="no model to start from"):
        lc.run()
    with pytest.raises(LlmcycleError, match="--from"):
        Lifecycle(load_config(LifecycleConfig, None, ["stages=[pretrain]"])).run(from_stage="dpo")


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_models(tiny_data, tmp_path):
    """SIGKILL `llmcycle run` in the middle of SFT (after its first checkpoint), run it again: the final
    models hash exactly as those of an uninterrupted run."""
    import signal
    import subprocess
    import sys
    import time

    def args(runs: Path) -> list[str]:
        return ["run", *miniature(tiny_data, runs, "[pretrain,sft,dpo]"), "sft.train.max_steps=6",
                "sft.checkpoint.every=2"]

    from conftest import run_cli

    whole = tmp_path / "whole"
    assert run_cli(args(whole), timeout=600).returncode == 0

    runs = tmp_path / "killed"
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args(runs)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = runs / "mini" / "sft" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (ckpts.exists() and any(p.name.startswith("step") for p in ckpts.iterdir())):
        assert proc.poll() is None, "the run ended before SFT wrote a checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_record(runs / "mini" / "sft")["status"] == "running"
    again = run_cli(args(runs), timeout=600)
    assert again.returncode == 0, again.stderr
    assert "[pretrain] up to date" in again.stdout and "[sft] resuming" in again.stdout
    # (recipe.yaml differs: it names each run's own directories; the weights must not)
    weights = {s: h["model.safetensors"] for s, h in _hashes(runs).items()}
    assert weights == {s: h["model.safetensors"] for s, h in _hashes(whole).items()}


def test_interrupted_rerun_from_dpo_keeps_the_last_dpo_model(tiny_data, tmp_path, capsys):
    """`run --from dpo` SIGKILLed in the middle of DPO: dpo/model is the previous model, whole (it loads
    and `lineage` verifies it); the next run replaces it and leaves nothing beside it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from llmcycle.model.hf_io import load_model

    runs = tmp_path / "runs"
    args = ["run", *miniature(tiny_data, runs, "[pretrain,sft,dpo]")]
    assert main(args) == 0
    dpo = runs / "mini" / "dpo"
    before = _hashes(runs)["dpo"]
    capsys.readouterr()

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args, "dpo.train.max_steps=400", "--from", "dpo"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    def training() -> bool:  # the stale files went before the record says running: metrics are new ones
        return (read_record(dpo) or {}).get("status") == "running" and (dpo / "metrics.jsonl").exists()

    while not training():
        assert proc.poll() is None, "the rerun ended before DPO began"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_record(dpo)["status"] == "running"
    assert load_model(dpo / "model") is not None
    assert main(["lineage", str(dpo / "model")]) == 0
    assert stage_outputs("dpo", dpo) == before  # byte for byte the model of the first run

    assert main(args) == 0  # the recipe of the first run again: DPO reruns and publishes over the kept model
    assert "[dpo] running" in capsys.readouterr().out
    assert _hashes(runs)["dpo"] == before  # same inputs and seeds: the same model again
    assert not [p.name for p in dpo.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_starting_over_keeps_the_model_and_one_a_crash_left_aside(tmp_path):
    """A model stage starting over drops its working files but not model/, nor the model a publish killed
    between its fallback's two renames left as model.old-<pid>; other stages start from an empty folder."""
    from llmcycle.lifecycle import discard_stale

    dpo = tmp_path / "dpo"
    (dpo / "checkpoints" / "step_00000002").mkdir(parents=True)
    (dpo / "metrics.jsonl").write_text("{}\n")
    (dpo / "model.old-4242").mkdir()
    (dpo / "model.old-4242" / "config.json").write_text("{}")
    discard_stale("dpo", dpo)
    assert sorted(p.name for p in dpo.iterdir()) == ["model"] and (dpo / "model" / "config.json").exists()
    discard_stale("dpo", dpo)
    assert sorted(p.name for p in dpo.iterdir()) == ["model"]
    (tmp_path / "eval" / "x").mkdir(parents=True)
    discard_stale("eval", tmp_path / "eval")
    assert not list((tmp_path / "eval").iterdir())


def test_peak_memory_is_each_stages_own():
    from llmcycle.lifecycle import PeakMemory

    first = PeakMemory()
    block = b"\x01" * (200 * 2**20)  # written, so resident
    during = first.read()
    del block
    after = PeakMemory().read()
    assert during["peak_rss_scope"] == "stage"  # Linux: the high-water mark resets per stage
    assert during["peak_rss_mb"] > 200 and after["peak_rss_mb"] < during["peak_rss_mb"] - 150


# ---- the seam: a new stage is one module (here, the block below) and one entry in the registry ----------


@dataclass
class _DistillConfig:
    model: str = field_help("", "the model to distill when no model stage precedes this one")
    factor: int = field_help(2, "a setting, to show it reaches the key and the recipe")


def _distill(lc, resume: bool) -> dict:
    """A stand-in for a distilling stage: publishes a copy of the previous model and records a metric."""
    import shutil

    from llmcycle.artifacts import publish_dir, staging_dir

    src, final = lc.previous_model("distill"), lc.dir("distill") / "model"
    tmp = staging_dir(final)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("README.md"), dirs_exist_ok=True)
    publish_dir(tmp, final)  # over the model a previous run left, as a model stage does
    return {"files": len(list(src.iterdir())), "factor": lc.stage_config("distill").factor}


def _distill_report(run) -> list:
    m = run.metrics("distill")
    return [("Distillation", [("p", f"Copied {m['files']} files with factor {m['factor']}.")])] if m else []


DISTILL = Stage("distill", _distill, config=_DistillConfig, inputs=PREVIOUS_MODEL, produces_model=True,
                 headline=metrics_named("files"), report=_distill_report)


def test_a_new_stage_is_one_module_and_one_registry_entry(tiny_data, tmp_path, capsys, monkeypatch):
    """Registered after dpo, the new stage is configured, run in order, recorded, skipped when up to date,
    rerun by --from, summarised, reported, carded and taken as the final model; the report is rebuilt from
    the records alone."""
    from llmcycle import lifecycle
    from llmcycle.lifecycle import Records, lifecycle_config, stages
    from llmcycle.report import write_report

    graph = list(stages.STAGES)
    graph.insert(stages.names().index("dpo") + 1, DISTILL)  # the one line (in stages/__init__.py: STAGES)
    monkeypatch.setattr(stages, "STAGES", graph)
    monkeypatch.setattr(lifecycle, "LifecycleConfig", lifecycle_config(graph))  # what the import did

    runs = tmp_path / "runs"
    args = [*miniature(tiny_data, runs, "[pretrain,sft,dpo,distill,report]"), "distill.factor=3"]
    assert main(["run", *args, "--print-config"]) == 0
    assert "distill:\n  model: ''\n  factor: 3" in capsys.readouterr().out
    assert main(["run", *args]) == 0
    out = capsys.readouterr().out
    order = [out.index(f"[{s}] running") for s in ("pretrain", "sft", "dpo", "distill", "report")]
    assert order == sorted(order)
    root = runs / "mini"
    rec = read_record(root / "distill")
    assert rec["status"] == "done" and rec["metrics"]["factor"] == 3 and rec["config"]["factor"] == 3
    assert rec["inputs"] == {"dpo": read_record(root / "dpo")["outputs"]}
    assert rec["outputs"] == stage_outputs("dpo", root / "dpo")  # the copy hashes as the model it copied
    assert "distill (" in out and f"files {rec['metrics']['files']}" in out
    assert f"{root / 'distill' / 'model'} (model card: README.md)" in out  # the final model now
    report = (root / "report.md").read_text()
    assert "## Distillation" in report and "Copied" in report and "| distill | done |" in report
    assert "| metric | value |" in report  # the other stages' sections are still there
    assert (root / "distill" / "model" / "README.md").read_text().startswith("---\nlibrary_name")

    assert main(["run", *args]) == 0  # nothing changed: all five skipped
    out = capsys.readouterr().out
    assert out.count("up to date") == 5 and "running" not in out

    assert main(["run", *args, "--from", "distill"]) == 0
    out = capsys.readouterr().out
    assert "[dpo] up to date" in out and "[distill] running" in out and "[report] running" in out

    # the report from runs/mini/*/stage.json alone (no Lifecycle): the same page but for its timestamp
    written = (root / "report.md").read_text()
    (root / "report.md").unlink()
    write_report(Records(root))
    rebuilt = (root / "report.md").read_text()
    assert rebuilt.splitlines()[3:] == written.splitlines()[3:] and "## Distillation" in rebuilt
