"""Stage records (`runs/<name>/<stage>/stage.json`) and a run as its records say: what the report, the
model cards and the summary are built from, with no live Lifecycle."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from llmcycle.artifacts import atomic_write_json
from llmcycle.artifacts.manifest import RECORD
from llmcycle.lifecycle import stages as registry


def read_record(stage_dir: Path) -> dict | None:
    path = stage_dir / RECORD
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a record torn by a crash: the stage reruns


def write_record(stage_dir: Path, record: dict) -> None:
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stage_dir / RECORD, record, default=str)  # a record is whole or absent


class Records:
    """The records under `root` (runs/<name>/), in graph order: those of `stages` if given (the report stage
    names its run's, so folders an earlier recipe left are not reported), else every one found."""

    def __init__(self, root: str | Path, stages: Iterable[str] | None = None) -> None:
        self.root = Path(root)
        self.name = self.root.name
        wanted = None if stages is None else set(stages)
        candidates = [s for s in registry.STAGES if wanted is None or s.name in wanted]
        self.records = {s.name: rec for s in candidates if (rec := read_record(self.dir(s.name))) is not None}
        self.stages = [s for s in candidates if wanted is not None or s.name in self.records]

    def dir(self, stage: str) -> Path:
        return self.root / stage

    def metrics(self, stage: str) -> dict:
        return (self.records.get(stage) or {}).get("metrics") or {}

    def model_stages(self) -> list[str]:
        return [s.name for s in self.stages if s.produces_model and s.name in self.records]

    def final_model(self) -> Path | None:
        """The last model of the run (None: it trained none)."""
        models = self.model_stages()
        return self.dir(models[-1]) / "model" if models else None
