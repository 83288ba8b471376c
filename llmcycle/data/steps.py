"""The building blocks of `llmcycle data`: steps, their parameters and the registry a recipe names.

A recipe lists steps by name with parameters (plus `apply_to: [reader types]` on any step). Each step class declares its parameters as a dataclass
(`Params`, fields made with `llmcycle.config.field_help`), so a misspelt key or a threshold of the
wrong type is refused, with the dotted key named, before any document is read.

Two kinds of step:

- `MapStep` looks at one document at a time: `process(doc)` returns the document (possibly changed)
  to keep it, or a short reason string to drop it ("too_few_words", "lang_de"...). Normalizers,
  filters, PII redaction and decontamination are map steps. They run inside the per-file tasks.
- `GlobalStep` needs to see every document before it can decide about any (deduplication, boilerplate
  lines). It works in three phases so that both executors can run it over many processes:
  `signature(doc)` per document inside the tasks, `decide(signatures)` once over all of them, and
  `apply(doc, task, index, decision)` per document inside the tasks of the next phase.

Steps may count things beyond kept/dropped (PII kinds redacted, lines removed) in `self.counters`;
the pipeline adds them to the step's statistics.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, ClassVar

import numpy as np

from llmcycle.data.document import Document
from llmcycle.errors import ConfigError


@dataclasses.dataclass
class NoParams:
    pass


class Step:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    # Reader types the step applies to (recipe key `apply_to`); None: every document. Documents from
    # other readers pass through untouched, e.g. web-text quality rules that would wreck source code.
    apply_to: list[str] | None = None

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()
        self.counters: Counter[str] = Counter()

    def setup(self) -> None:
        """Load what the step needs (models, word lists) in the process that runs it.

        Called once per task before the first document; keep __init__ cheap and picklable so a
        step can be shipped to worker processes and Ray workers.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params})"


class MapStep(Step):
    def process(self, doc: Document) -> Document | str:
        """Return the document to keep it (it may be modified), or a drop reason."""
        raise NotImplementedError


class GlobalStep(Step):
    # dtype of the arrays `signature` returns; each document's signature is a 1-D array of any length.
    signature_dtype: ClassVar[Any] = np.uint64

    def signature(self, doc: Document) -> np.ndarray:
        raise NotImplementedError

    def decide(self, signatures: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        """Decide over all tasks. `signatures[task] = (values, offsets)`: document i of that task has
        signature `values[offsets[i]:offsets[i + 1]]`. Tasks and documents are in a fixed order (task
        index, then position), so "keep the first" is deterministic. Returns named arrays (saved as .npz).
        """
        raise NotImplementedError

    def apply(self, doc: Document, task: int, index: int, decision: dict[str, np.ndarray]) -> Document | str:
        """Keep (possibly modified) or drop document `index` of task `task` given the decision."""
        raise NotImplementedError


STEPS: dict[str, type[Step]] = {}


def register_step(cls: type[Step]) -> type[Step]:
    """Class decorator: make a step available to recipes under `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` to be registered")
    if cls.name in STEPS and STEPS[cls.name] is not cls:
        raise TypeError(f"two steps are named {cls.name!r}: {STEPS[cls.name].__name__} and {cls.__name__}")
    STEPS[cls.name] = cls
    return cls


def _load_builtin_steps() -> None:
    # Importing the modules registers their steps.
    from llmcycle.data import decontam, normalize  # noqa: F401
    from llmcycle.data.dedup import steps as _dedup  # noqa: F401
    from llmcycle.data.filters import steps as _filters  # noqa: F401


def step_names() -> list[str]:
    _load_builtin_steps()
    return sorted(STEPS)


def build_step(spec: Any, where: str) -> Step:
    """Build one step from its recipe entry: `name`, `{name: {params}}` or `{name: null}`."""
    from llmcycle.config import build

    _load_builtin_steps()
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and len(spec) == 1:
        (name, params), = spec.items()
        params = params if params is not None else {}
    else:
        raise ConfigError(f"recipe: {where} must be a step name or a one-key mapping {{name: {{params}}}}, "
                          f"got {spec!r}.")
    apply_to = None
    if isinstance(params, dict) and "apply_to" in params:
        params = dict(params)
        apply_to = params.pop("apply_to")
        if not (isinstance(apply_to, list) and all(isinstance(a, str) for a in apply_to)):
            raise ConfigError(f"recipe: {where}.{name}.apply_to must be a list of reader types, got {apply_to!r}.")
    if name not in STEPS:
        raise ConfigError(f"recipe: {where}: unknown step {name!r}; valid steps: {', '.join(sorted(STEPS))}.")
    cls = STEPS[name]
    step = cls(build(cls.Params, params, prefix=f"{where}.{name}."))
    if apply_to is not None:
        from llmcycle.data.readers import READERS

        unknown = sorted(set(apply_to) - set(READERS))
        if unknown:
            raise ConfigError(f"recipe: {where}.{name}.apply_to: unknown reader {unknown[0]!r}; "
                              f"valid: {', '.join(sorted(READERS))}.")
        step.apply_to = list(apply_to)
    return step
