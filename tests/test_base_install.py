"""The README's first command installs the base package only (no extras). These tests run llmcycle in a
subprocess where every module that only an extra provides cannot be imported, as on a fresh machine, so a
stage that reaches one fails here even though the test environment has the dev extras installed.
(.ci/run also runs the real thing: a fresh virtual environment with `pip install -e .`.)"""

import json
import re
import subprocess
import sys
import textwrap
from importlib.metadata import distributions, packages_distributions
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    return _norm(re.split(r"[ <>=!~;\[(]", req.strip(), maxsplit=1)[0])


def extra_only_modules() -> list[str]:
    """Top-level modules installed here whose distributions the base dependencies (and what they require,
    transitively) do not provide: the modules a base install lacks."""
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requires = {_norm(d.metadata["Name"] or ""): {_requirement_name(r) for r in (d.requires or [])
                                                    if "extra ==" not in r} for d in distributions()}
    closure, todo = set(), [_requirement_name(r) for r in meta["dependencies"]]
    while todo:
        name = todo.pop()
        if name not in closure:
            closure.add(name)
            todo.extend(requires.get(name, ()))
    extras = {_requirement_name(r) for reqs in meta.get("optional-dependencies", {}).values() for r in reqs}
    modules = []
    for module, dists in packages_distributions().items():
        dists = {_norm(d) for d in dists}
        if module.isidentifier() and not dists & closure and dists & (extras | _extra_closure(extras, requires)):
            modules.append(module)
    return sorted(modules)


def _extra_closure(extras: set[str], requires: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(extras)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(requires.get(name, ()))
    return seen


def base_only_site(view: Path) -> Path:
    """A folder of links to every entry of site-packages except the files of the distributions that only an
    extra provides: with `python -S` and this folder on the path, the interpreter sees a base install
    (imports, `importlib.util.find_spec` and package metadata alike)."""
    from importlib.metadata import distribution

    site = Path(distribution("torch").locate_file(""))
    blocked_dists = {d for m in extra_only_modules() for d in packages_distributions()[m]}
    hidden = set()
    for name in blocked_dists:
        hidden |= {Path(str(f)).parts[0] for f in distribution(name).files or ()}
    view.mkdir(parents=True, exist_ok=True)
    for entry in site.iterdir():
        if entry.name not in hidden and not entry.name.endswith(".pth") and not entry.name.startswith("__editable__"):
            (view / entry.name).symlink_to(entry)
    return view


# Runs `llmcycle.cli.main(argv)`; prints the sorted list of top-level modules imported as its last line.
RUNNER = textwrap.dedent("""
    import json, sys
    from llmcycle.cli import main
    try:
        code = main(json.loads(sys.argv[1]))
    except SystemExit as e:
        code = e.code
    print(json.dumps(sorted(m for m in sys.modules if "." not in m)))
    sys.exit(code)
""")

_VIEW: list[Path] = []


def run_base_only(argv: list[str], cwd: Path, timeout: float = 300) -> tuple[int, str, set[str]]:
    """(exit code, stdout + stderr, top-level modules imported) of the CLI seeing only the base install."""
    import os
    import tempfile

    if not _VIEW:
        _VIEW.append(base_only_site(Path(tempfile.mkdtemp(prefix="base-site-")) / "site-packages"))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{_VIEW[0]}", "PYTHONNOUSERSITE": "1"}
    proc = subprocess.run([sys.executable, "-S", "-c", RUNNER, json.dumps(argv)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=env)
    lines = proc.stdout.strip().splitlines()
    imported = set(json.loads(lines[-1])) if lines and lines[-1].startswith("[") else set()
    return proc.returncode, proc.stdout + proc.stderr, imported


pytestmark = pytest.mark.skipif(tomllib is None, reason="needs tomllib (Python 3.11+)")


def test_the_dev_extras_are_blocked():
    """The check is only worth something if it blocks what the base install lacks."""
    blocked = extra_only_modules()
    assert {"transformers", "trl", "ray", "openai"} <= set(blocked)
    assert not {"torch", "fastapi", "uvicorn", "tokenizers", "numpy", "httpx"} & set(blocked)


# `--help` answers at once: no command imports torch or the trainers to describe itself.


@pytest.mark.parametrize("command", [
    [], ["run"], ["data"], ["tokenizer", "train"], ["pretrain"], ["sft"], ["reward"], ["dpo"], ["ppo"],
    ["grpo"], ["generate"], ["serve"], ["eval"], ["lineage"], ["keys"], ["export"], ["export", "gguf"]])
def test_every_command_help_from_the_base_install(command, tmp_path):
    code, out, imported = run_base_only([*command, "--help"], tmp_path)
    assert code == 0, out
    assert "usage: llmcycle" in out
    assert "torch" not in imported


def test_gguf_export_without_its_extra_names_the_extra(tmp_path):
    code, out, imported = run_base_only(["export", "gguf", str(tmp_path), "--out", str(tmp_path / "m.gguf")], tmp_path)
    assert code == 2 and "pip install 'llmcycle[edge]'" in out, out
    assert "gguf" not in imported


def test_data_stage_does_not_import_torch(tmp_path):
    """The data stage tokenizes and shards with `tokenizers` and numpy; it never needs torch."""
    code, out, imported = run_base_only(
        ["data", "inputs=[{type: python, max_bytes: 100000}]", "steps=[normalize, exact_dedup]",
         "tokenizer.vocab_size=300", "shards.val_fraction=0.3", "workers=1", f"out_dir={tmp_path / 'data'}"], tmp_path)
    assert code == 0, out
    assert (tmp_path / "data" / "train").is_dir()
    assert "torch" not in imported


@pytest.mark.slow
def test_whole_lifecycle_from_the_base_install(tmp_path):
    """`llmcycle run` on the shipped miniature recipe, every stage (serving included), with only the base
    install importable: the README's first command on a fresh machine, in miniature."""
    code, out, imported = run_base_only(["run", "smoke", f"runs_dir={tmp_path / 'runs'}"], tmp_path)
    assert code == 0, out[-3000:]
    assert (tmp_path / "runs" / "smoke" / "report.html").exists()
    serve = json.loads((tmp_path / "runs" / "smoke" / "serve" / "serve.json").read_text())
    assert serve["requests"] == 4 and serve["stream_equals_plain"]
    assert not set(extra_only_modules()) & imported
