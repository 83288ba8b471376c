"""The command line as a user meets it: real subprocesses, real files."""

import json
import os
import subprocess
import sys

import pytest

from conftest import run_cli, tiny_train_overrides


def test_tokenizer_train_command(tmp_path):
    out = tmp_path / "tok"
    r = run_cli(["tokenizer", "train", f"out_dir={out}", "vocab_size=400", "max_bytes=200000",
                 "heldout_fraction=0.2"])
    assert r.returncode == 0, r.stderr
    assert "bytes/token on held-out text" in r.stdout and str(out) in r.stdout
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert "chat_template" in config
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tokenizer" and len(manifest["inputs"]["corpus_sha256"]) == 64


def test_run_then_generate(tiny_data, tmp_path):
    runs = tmp_path / "runs"
    pre = [o for o in tiny_train_overrides(runs / "unused", 12) if not o.startswith("out_dir=")]
    args = ["run", f"runs_dir={runs}", "name=r", "stages=[pretrain]",
            *(f"pretrain.{o}" for o in tiny_data["overrides"] + pre)]
    log = tmp_path / "run.log"
    with open(log, "wb") as f:  # `llmcycle run > run.log 2>&1`: bytes, so a carriage return cannot hide
        r = subprocess.run([sys.executable, "-m", "llmcycle", *args], stdout=f, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = log.read_bytes().decode()
    assert r.returncode == 0, text
    assert "summary" in text and "held-out bits/byte" in text
    assert "\r" not in text and "pretrain: 100%" in text  # progress as plain lines, not redrawn frames
    # A second run finds the stage up to date and does nothing.
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    assert "[pretrain] up to date" in again.stdout
    assert "nan" not in again.stdout.split("summary")[1]  # the summary still has the numbers
    g = run_cli(["generate", str(runs / "r" / "pretrain" / "model"), "--prompt", "import ", "--max-new-tokens", "5"])
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("import ")


def test_wrong_arguments_are_explained(tmp_path):
    r = run_cli(["pretrain", "--config", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["frobnicate"])
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli(["generate", str(tmp_path)])
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


# ---- what a new user meets first (issue 13, section 5) -------------------------------------------


def _stage_dir(tmp_path):
    """runs/x/sft with its model inside: the directory a user names instead of runs/x/sft/model."""
    stage = tmp_path / "runs" / "x" / "sft"
    (stage / "model").mkdir(parents=True)
    (stage / "model" / "config.json").write_text("{}")
    (stage / "model" / "manifest.json").write_text("{}")
    return stage


def test_check_model_dir_has_one_wording(tmp_path):
    import pytest

    from llmcycle.errors import LlmcycleError
    from llmcycle.paths import check_model_dir

    stage = _stage_dir(tmp_path)
    assert check_model_dir(stage / "model") == stage / "model"
    with pytest.raises(LlmcycleError, match=r"sft: not a model directory \(no config.json\)\. Did you mean .*sft/model\?"):
        check_model_dir(stage)
    with pytest.raises(LlmcycleError, match=r"nowhere: model directory not found\. Train one\.$"):
        check_model_dir(tmp_path / "nowhere", hint="Train one.")
    with pytest.raises(LlmcycleError, match="nowhere: reward model directory not found"):
        check_model_dir(tmp_path / "nowhere", "reward model")


def test_every_command_that_opens_a_model_suggests_its_model_folder(tmp_path, capsys):
    from llmcycle.cli import main

    stage = _stage_dir(tmp_path)
    wanted = f"{stage}: not a model directory (no config.json). Did you mean {stage / 'model'}?"
    for argv in (["generate", str(stage)], ["eval", str(stage)], ["eval", "--compare", str(stage / "model"), str(stage)],
                 ["serve", f"a={stage}"], ["serve", str(stage)]):
        assert main(argv) == 2, argv
        assert wanted in capsys.readouterr().err, argv
    assert main(["lineage", str(stage)]) == 2
    assert f"{stage}: not an artifact directory (no manifest.json). Did you mean {stage / 'model'}?" in \
        capsys.readouterr().err
    assert main(["lineage", str(tmp_path / "gone")]) == 2
    assert f"{tmp_path / 'gone'}: artifact directory not found." in capsys.readouterr().err


def test_post_training_defaults_start_from_the_quickstart_models():
    """`llmcycle dpo|reward|ppo|grpo` after `llmcycle run` find the SFT model the quickstart wrote."""
    import importlib

    from llmcycle.cli import POSTTRAIN_COMMANDS
    from llmcycle.config import load_config

    for name, module, config, _, _ in POSTTRAIN_COMMANDS:
        cfg = load_config(getattr(importlib.import_module(module), config))
        assert cfg.model == f"runs/default/{'pretrain' if name == 'sft' else 'sft'}/model", name


def test_did_you_mean(capsys):
    import pytest

    from llmcycle.cli import main

    with pytest.raises(SystemExit):
        main(["pretian"])
    assert "did you mean 'pretrain'?" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["data", "--executor", "rya"])
    assert "did you mean 'ray'?" in capsys.readouterr().err
    assert main(["pretrain", "train.lrr=1e-3", "--print-config"]) == 2
    assert "unknown key 'train.lrr' (did you mean 'train.lr'?)" in capsys.readouterr().err
    assert main(["run", "defualt", "--print-config"]) == 2
    assert "did you mean 'default'?" in capsys.readouterr().err


def test_generate_chat_prints_the_answer_as_its_own_turn(tiny_base_model, capsys):
    from llmcycle.cli import main

    assert main(["generate", tiny_base_model, "--chat", "--prompt", "Reverse abc", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("user: Reverse abc\nassistant: "), out


def test_a_closed_pipe_ends_quietly(tiny_base_model, tmp_path):
    """`llmcycle lineage MODEL | head -c 10`: the reader goes away; no BrokenPipeError traceback."""
    import os
    import shutil
    import subprocess
    import sys

    from llmcycle.artifacts.manifest import write_manifest

    model = tmp_path / "model"
    shutil.copytree(tiny_base_model, model)
    write_manifest(model, stage="pretrain", config={}, inputs={}, metrics={})
    for args in (["lineage", str(model)], ["lineage", str(model), "--json"]):
        proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
        proc.stdout.close()  # before the command writes: its first write meets a closed pipe
        err = proc.stderr.read().decode()
        assert proc.wait(60) == 141, err
        assert "BrokenPipeError" not in err and "Traceback" not in err, err


def test_eval_says_where_it_wrote_and_what_it_replaced(tmp_path, capsys, monkeypatch):
    import llmcycle.eval.suite as eval_suite  # eval_main imports it when evaluating (not for --help)
    from llmcycle.cli import main

    model = _stage_dir(tmp_path) / "model"
    fake = {"suite": "v1", "model": str(model), "model_sha256": "0" * 64, "metrics": {"mc_accuracy": 0.5},
            "per_task": {}, "counts": {}, "decontamination": None}
    monkeypatch.setattr(eval_suite, "evaluate_model", lambda *a, **k: (fake, None))
    out = model.parent / "eval.json"
    assert main(["eval", str(model), "--json"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out) == fake  # stdout stays pure JSON
    assert cap.err.strip() == f"eval: wrote {out}"
    assert main(["eval", str(model)]) == 0
    assert f"eval: replaced {out} (earlier results in it are gone; --out FILE keeps them apart)" in \
        capsys.readouterr().err
    assert main(["eval", str(model), "--out", str(tmp_path / "mine.json")]) == 0
    assert capsys.readouterr().err.strip() == f"eval: wrote {tmp_path / 'mine.json'}"


def test_ctrl_c_names_the_checkpoint_and_the_resume_command(tiny_data, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    args = ["pretrain", *tiny_data["overrides"], *tiny_train_overrides(run_dir, 400, **{"checkpoint.every": 5})]
    # A shell's background job inherits SIGINT ignored, and Python then never installs its handler: give the
    # child the default disposition, as a terminal's Ctrl-C finds it.
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not (run_dir / "checkpoints" / "latest").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert f"llmcycle: interrupted; latest checkpoint: {run_dir / 'checkpoints'}/step_" in err, err
    assert latest[: len("step_")] == "step_"
    import shlex

    assert f"resume with: llmcycle {shlex.join(args)} --resume" in err, err


def test_interrupted_run_resumes_with_the_same_command(tmp_path):
    import argparse

    from llmcycle.cli import interrupted_message

    roots = [tmp_path / s / "checkpoints" for s in ("pretrain", "sft")]
    roots[0].mkdir(parents=True)
    (roots[0] / "latest").write_text("step_00000010\n")
    args = argparse.Namespace(command="run", checkpoint_roots=roots)
    msg = interrupted_message(args, ["run", "name=x"])
    assert msg == (f"llmcycle: interrupted; latest checkpoint: {roots[0] / 'step_00000010'}\n"
                   "resume with: llmcycle run name=x")
    args = argparse.Namespace(command="sft", checkpoint_roots=[roots[1]])
    assert interrupted_message(args, ["sft"]) == ("llmcycle: interrupted; no checkpoint was written yet\n"
                                                  "start again with: llmcycle sft --resume")
    args = argparse.Namespace(command="data", data_work=tmp_path / "work")
    assert interrupted_message(args, ["data", "--fresh"]) == (
        f"llmcycle: interrupted; finished tasks are kept in {tmp_path / 'work'}\ncontinue with: llmcycle data")
    assert interrupted_message(None, ["data"]) == "llmcycle: interrupted"


def test_progress_is_plain_lines_off_a_terminal():
    import io

    from llmcycle.progress import progress

    buf = io.StringIO()
    bar = progress(total=3, desc="pretrain", unit="step", file=buf)
    for _ in range(3):
        bar.update(1)
        bar.write("a message", file=buf)
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert text.count("a message") == 3 and "3/3" in text.splitlines()[-1]


def test_a_misspelt_flag_is_refused_not_expanded(capsys):
    """argparse would take `--thread` for `--threads`; a typo must be an error, as a wrong key is."""
    from llmcycle.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "m=/nonexistent", "--thread", "2"])
    assert e.value.code == 2
    assert "unrecognized arguments: --thread" in capsys.readouterr().err
