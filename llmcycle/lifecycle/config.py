"""`LifecycleConfig`, the recipe of `llmcycle run`: the run's name, where runs live, which stages to run,
and one section per stage that takes settings, named after the stage and typed by its `Stage.config`.

It is derived from the registry rather than written out, so a new stage's section appears (in recipes,
`--print-config`, `--help` and the wrong-key errors) from its Stage record alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llmcycle.config import field_help as F
from llmcycle.lifecycle import stages as registry
from llmcycle.lifecycle.stage import Stage


def lifecycle_config(stages: Sequence[Stage]) -> type:
    """The recipe dataclass of a graph of `stages` (fields: name, runs_dir, stages, then their sections)."""
    names = [s.name for s in stages]
    fields = [
        ("name", str, F("default", "run name: every stage writes into <runs_dir>/<name>/<stage>/")),
        ("runs_dir", str, F("runs", "where runs live")),
        ("stages", list[str], F(names, f"stages to run, a subset of {', '.join(names)}")),
        *((s.name, s.config, dataclasses.field(default_factory=s.config)) for s in stages if s.config is not None),
    ]
    cls = dataclasses.make_dataclass("LifecycleConfig", fields)
    cls.__module__ = __name__  # (make_dataclass's module= is Python 3.12+)
    return cls


LifecycleConfig = lifecycle_config(registry.STAGES)
