"""report: runs/<name>/report.md and report.html from the run's records, and a model card in every model
directory (llmcycle/report.py, llmcycle/card.py)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from llmcycle.lifecycle.stage import EARLIER, Stage

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle

log = logging.getLogger(__name__)


def run(lc: Lifecycle, resume: bool) -> dict:
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import write_report

    # this run's stages only: folders an earlier recipe left under runs/<name>/ are not this run's
    path = write_report(Records(lc.root, lc.stages), lc.dir("report"))
    log.info(f"report: {path}")
    return {"report": str(path)}


def summary(record: dict) -> list[tuple[str, str]]:
    md = Path((record.get("metrics") or {})["report"])
    return [("report", f"{md}, {md.with_suffix('.html')}")]


STAGE = Stage("report", run, inputs=EARLIER, headline=None, summary=summary)
