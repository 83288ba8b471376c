"""What every reader shares: the Reader interface, its registry, and the record of bad input.

A reader turns one input file into documents. The pipeline makes one task per file (readers may
split a source into several pseudo-files, as the embedded corpus does), so files are the unit of
parallelism on both executors and of resuming after a crash.

Bad input never stops a job: a reader reports each malformed record with `problems.report(reason,
file, line)` and goes on with the next one. The counts per reason and the first locations end up in
the run's statistics and final summary.
"""

from __future__ import annotations

import dataclasses
import glob
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from llmcycle.data.document import Document
from llmcycle.errors import ConfigError

MAX_LOCATIONS = 20  # locations kept per reason; counts are always complete


class Problems:
    """Counts bad input by reason and keeps the first few locations of each."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.locations: dict[str, list[str]] = {}

    def report(self, reason: str, file: str, line: int | None = None, detail: str = "") -> None:
        self.counts[reason] += 1
        where = f"{file}:{line}" if line is not None else str(file)
        kept = self.locations.setdefault(reason, [])
        if len(kept) < MAX_LOCATIONS:
            kept.append(f"{where}: {detail}" if detail else where)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "locations": self.locations}

    def merge(self, other: dict[str, Any]) -> None:
        self.counts.update(other.get("counts", {}))
        for reason, locs in other.get("locations", {}).items():
            kept = self.locations.setdefault(reason, [])
            kept.extend(locs[: MAX_LOCATIONS - len(kept)])


@dataclasses.dataclass
class FileParams:
    paths: list[str] = dataclasses.field(default_factory=list)


class Reader:
    name: ClassVar[str] = ""
    Params: ClassVar[type] = FileParams

    def __init__(self, params: Any = None):
        self.params = params if params is not None else self.Params()

    def files(self) -> list[str]:
        """The inputs of this source, one task each, in a fixed order. Default: expand `paths` globs."""
        return expand_paths(self.params.paths, self.name)

    def read(self, file: str, problems: Problems) -> Iterator[Document]:
        raise NotImplementedError


def expand_paths(patterns: list[str], reader: str) -> list[str]:
    """Expand globs (with ** recursion) into a sorted, de-duplicated list of files.

    A pattern that matches nothing is a configuration error: a typo in a path must not silently
    produce an empty corpus.
    """
    if not patterns:
        raise ConfigError(f"recipe: the {reader} reader needs `paths` (files or glob patterns).")
    out: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if not Path(m).is_dir()] if glob.has_magic(pattern) else matches
        if not matches or not all(Path(m).exists() for m in matches):
            raise ConfigError(f"recipe: {reader} reader: {pattern!r} matches no file.")
        out.extend(matches)
    return sorted(dict.fromkeys(out))


READERS: dict[str, type[Reader]] = {}


def register_reader(cls: type[Reader]) -> type[Reader]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a `name` to be registered")
    READERS[cls.name] = cls
    return cls
