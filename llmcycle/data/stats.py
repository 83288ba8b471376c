"""Per-step statistics of a data run: documents in and out, drops by reason, bytes, time, samples.

Each task records a `StepStats` per step; the run merges them in task order (so the merged numbers
and the kept samples do not depend on which worker finished first) and prints a funnel table.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

SAMPLE_CHARS = 500


@dataclass
class StepStats:
    name: str
    docs_in: int = 0
    docs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    dropped: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)
    # reason -> [{"id", "source", "text"}], the first few dropped documents per reason.
    samples: dict[str, list[dict]] = field(default_factory=dict)

    def record_in(self, num_bytes: int) -> None:
        self.docs_in += 1
        self.bytes_in += num_bytes

    def record_out(self, num_bytes: int) -> None:
        self.docs_out += 1
        self.bytes_out += num_bytes

    def record_drop(self, reason: str, doc_id: str, source: str, text: str, max_samples: int) -> None:
        self.dropped[reason] += 1
        kept = self.samples.setdefault(reason, [])
        if len(kept) < max_samples:
            kept.append({"id": doc_id, "source": source, "text": text[:SAMPLE_CHARS]})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dropped"] = dict(sorted(self.dropped.items()))
        d["counters"] = dict(sorted(self.counters.items()))
        d["docs_per_s"] = round(self.docs_in / self.seconds, 1) if self.seconds >= 1e-3 else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepStats:
        d = dict(d)
        d.pop("docs_per_s", None)
        d["dropped"] = Counter(d.get("dropped", {}))
        d["counters"] = Counter(d.get("counters", {}))
        return cls(**d)

    def merge(self, other: StepStats, max_samples: int) -> None:
        self.docs_in += other.docs_in
        self.docs_out += other.docs_out
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.seconds += other.seconds
        self.dropped.update(other.dropped)
        self.counters.update(other.counters)
        for reason, samples in other.samples.items():
            kept = self.samples.setdefault(reason, [])
            kept.extend(samples[: max(0, max_samples - len(kept))])


def merge_stats(per_task: list[list[dict]], max_samples: int) -> list[StepStats]:
    """Merge the step statistics of all tasks (each a list in step order) into one list."""
    merged: dict[str, StepStats] = {}
    for task_stats in per_task:
        for d in task_stats:
            s = StepStats.from_dict(d)
            if s.name not in merged:
                merged[s.name] = StepStats(s.name)
            merged[s.name].merge(s, max_samples)
    return list(merged.values())


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def funnel_table(stats: list[StepStats]) -> str:
    """A plain-text table: one row per step, then its drop reasons indented below it."""
    rows = [("step", "docs in", "docs out", "kept %", "bytes out", "seconds", "docs/s")]
    for s in stats:
        kept = 100.0 * s.docs_out / s.docs_in if s.docs_in else 100.0
        # under a millisecond (a step that applied to no document) a rate means nothing
        rate = f"{s.docs_in / s.seconds:,.0f}" if s.seconds >= 1e-3 else "-"
        rows.append((s.name, f"{s.docs_in:,}", f"{s.docs_out:,}", f"{kept:.1f}", _human_bytes(s.bytes_out),
                     f"{s.seconds:.2f}", rate))
        for reason, n in sorted(s.dropped.items(), key=lambda kv: (-kv[1], kv[0])):
            rows.append((f"  - {reason}", "", f"-{n:,}", "", "", "", ""))
        for name, n in sorted(s.counters.items()):
            rows.append((f"  ~ {name}", "", f"{n:,}", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
