"""`pip install -e '.[bench]'` must be enough to run every benchmark: each third-party import in
benchmarks/*.py is declared by name in the base dependencies or the `bench` extra (not merely pulled in by
one of them today, which a peer's next release may change)."""

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
KNOWN = {"yaml": "pyyaml", "sklearn": "scikit-learn"}  # module names unlike their distribution's


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = meta["dependencies"] + meta["optional-dependencies"]["bench"]
    return {_norm(re.split(r"[ <>=!~;\[]", r, maxsplit=1)[0]) for r in reqs}


def _third_party_imports(path: Path) -> dict[str, int]:
    local = {p.stem for p in path.parent.glob("*.py")} | {"llmcycle"}
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for n in names:
            top = n.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local:
                found.setdefault(top, node.lineno)
    return found


def test_every_benchmark_import_is_in_base_or_the_bench_extra():
    declared, dists = _declared(), packages_distributions()
    missing = []
    for f in sorted((ROOT / "benchmarks").glob("*.py")):
        for top, line in _third_party_imports(f).items():
            names = {_norm(d) for d in dists.get(top, [])} | {_norm(KNOWN.get(top, top))}
            if not names & declared:
                missing.append(f"{f.name}:{line} imports {top}")
    assert not missing, "not in [project].dependencies nor the bench extra: " + "; ".join(missing)
