"""The command line as a user meets it: real subprocesses, real files."""

import json

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
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "summary" in r.stdout and "held-out bits/byte" in r.stdout
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
