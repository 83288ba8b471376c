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
    out = tmp_path / "run"
    args = ["run", "tiny", *tiny_data["overrides"], *tiny_train_overrides(out, 12)]
    r = run_cli(args)
    assert r.returncode == 0, r.stderr
    assert "summary" in r.stdout and "held-out bits/byte" in r.stdout
    # A second run resumes from the final checkpoint and has nothing left to do.
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    assert "resume: continuing" in again.stdout
    assert "None" not in again.stdout.split("summary")[1]  # nothing left to train, still evaluated
    g = run_cli(["generate", str(out / "model"), "--prompt", "import ", "--max-new-tokens", "5"])
    assert g.returncode == 0, g.stderr
    assert g.stdout.startswith("import ")


def test_wrong_arguments_are_explained(tmp_path):
    r = run_cli(["pretrain", "--config", str(tmp_path / "missing.yaml")])
    assert r.returncode == 2 and "not found" in r.stderr and "Traceback" not in r.stderr
    r = run_cli(["frobnicate"])
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli(["generate", str(tmp_path)])
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
