"""A stage of the run graph as one record: what it is configured by, what it reads, what it writes, how
it runs, and what it says in the summary and the report.

The graph (graph.py) knows nothing about any particular stage: it orders the stages of the registry
(stages/__init__.py), resolves each one's inputs and configuration through its record, keys, skips,
resumes or reruns it, and writes its stage.json. A new stage is one module defining a `Stage` plus one
entry in the registry's list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmcycle.lifecycle.graph import Lifecycle
    from llmcycle.lifecycle.records import Records
    from llmcycle.report import Section

# `Stage.inputs` beyond names of upstream stages:
PREVIOUS_MODEL = "previous model"  # the nearest model-producing stage before it in the run, if any; without
#                                    one it starts from its configured `<stage>.model` (an outside model)
EARLIER = "earlier stages"  # every stage before it in the run


def _same(lc: Lifecycle, cfg: Any) -> Any:
    return cfg


def _no_numbers(record: dict) -> dict:
    return {}


def metrics_named(*keys: str) -> Callable[[dict], dict]:
    """A `headline`: these metrics of the record, those it has."""

    def headline(record: dict) -> dict:
        m = record.get("metrics") or {}
        return {k: m[k] for k in keys if k in m}

    return headline


def _no_lines(record: dict) -> list[tuple[str, str]]:
    return []


def _no_sections(run: Records) -> list[Section]:
    return []


@dataclass(frozen=True)
class Stage:
    """One stage. Its configuration section in the recipe (and in LifecycleConfig) is named after it.

    - `run(lc, resume) -> metrics`: do the work into `lc.dir(name)` (configuration: `lc.stage_config(name)`)
      and return the metrics recorded in stage.json. `resume`: an interrupted run of the same key left
      its checkpoints there. A metric `peak_rss_workers_mb` is lifted to the record's top level.
    - `config`: the dataclass of its recipe section (None: the stage takes no settings).
    - `configure(lc, cfg) -> cfg`: the section with the graph's paths filled in (out_dir, the model or
      shards it reads). The result, as a dict, is part of the stage's key and of its record.
    - `inputs`: names of the upstream stages it reads (those not in the run are left out), or
      PREVIOUS_MODEL, or EARLIER. Their recorded outputs are part of its key.
    - `produces_model`: it publishes `<stage>/model/` (hashed alone, kept when the stage starts over,
      evaluated, carded, served if last).
    - `scratch`: folders of its directory that are working files, left out of its output hashes.
    - `headline(record) -> {name: value}`: the numbers on its line of the run's summary; None: no line.
    - `summary(record) -> [(label, text)]`: lines of their own after the stages' lines.
    - `report(run) -> [section]`: its sections of report.md/report.html, built from the records alone.
    """

    name: str
    run: Callable[[Lifecycle, bool], dict]
    config: type | None = None
    configure: Callable[[Lifecycle, Any], Any] = _same
    inputs: tuple[str, ...] | str = ()
    produces_model: bool = False
    scratch: tuple[str, ...] = ()
    headline: Callable[[dict], dict] | None = _no_numbers
    summary: Callable[[dict], list[tuple[str, str]]] = _no_lines
    report: Callable[[Records], list[Section]] = _no_sections
