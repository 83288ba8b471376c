"""Plan and run the steps of a data recipe as tasks over input files.

The step list is cut into phases at every global step (deduplication and the like):

    phase 0:  read file -> map steps ... -> signatures for global step A
    decide A  (once, over the signatures of every task)
    phase 1:  apply A -> map steps ... -> signatures for global step B
    decide B
    phase 2:  apply B -> map steps ...

Each phase runs one task per input file on the executor. A task streams its documents through the
steps, writes the survivors (zstd JSONL) and signatures into the phase's folder, and last of all a
`.done.json` marker holding its statistics. A killed run started again skips every task and decision
whose marker exists, so it loses no document and duplicates none. Folder names carry a hash of
everything that determines their content (inputs, steps and parameters up to that point), so editing
a later step reuses the earlier phases.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmcycle.artifacts import atomic_open, atomic_write_json, sha256_file
from llmcycle.data.document import Document
from llmcycle.data.readers import Problems, Reader, build_reader
from llmcycle.data.stats import StepStats
from llmcycle.data.steps import GlobalStep, MapStep, Step, build_step
from llmcycle.errors import ConfigError

DOCS_SUFFIX = ".jsonl.zst"


@dataclass
class TaskSpec:
    index: int
    reader: Reader
    file: str


@dataclass
class Phase:
    index: int
    key: str
    incoming: tuple[str, GlobalStep] | None  # (stats name, step) applied first, decided by the last phase
    map_steps: list[tuple[str, MapStep]]
    outgoing: tuple[str, GlobalStep] | None  # signatures computed at the end, decided after this phase

    @property
    def folder(self) -> str:
        return f"phase{self.index}-{self.key[:12]}"

    @property
    def decision_file(self) -> str:
        return f"decide{self.index}-{self.key[:12]}.npz"


@dataclass
class Plan:
    tasks: list[TaskSpec]
    phases: list[Phase]
    steps: list[tuple[str, Step]]
    base_key: str


def _params(obj: Any) -> Any:
    return dataclasses.asdict(obj.params) if dataclasses.is_dataclass(obj.params) else repr(obj.params)


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _file_identity(path: str) -> Any:
    # Size and modification time stand in for content when deciding whether old work is still valid;
    # the manifest records real content hashes.
    try:
        if os.path.isdir(path):  # a code repository: any file inside may change
            h = hashlib.sha256()
            for p in sorted(Path(path).rglob("*")):
                if p.is_file():
                    st = p.stat()
                    h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            return [path, "dir", h.hexdigest()]
        st = os.stat(path)
        return [path, st.st_size, st.st_mtime_ns]
    except OSError:
        return [path, None, None]


def build_plan(inputs: list[dict], step_specs: list[Any], max_doc_bytes: int) -> Plan:
    """Check every reader and step of the recipe and lay out tasks and phases; no document is read."""
    from llmcycle import __version__

    if not inputs:
        raise ConfigError("recipe: `inputs` is empty; name at least one source.")
    readers = [build_reader(spec, f"inputs[{i}]") for i, spec in enumerate(inputs)]
    steps: list[tuple[str, Step]] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(step_specs):
        step = build_step(spec, f"steps[{i}]")
        seen[step.name] = seen.get(step.name, 0) + 1
        steps.append((step.name if seen[step.name] == 1 else f"{step.name}#{seen[step.name]}", step))
    if max_doc_bytes < 1:
        raise ConfigError(f"recipe: max_doc_bytes must be positive, got {max_doc_bytes}.")

    tasks = [TaskSpec(0, r, f) for r in readers for f in r.files()]
    for i, t in enumerate(tasks):
        t.index = i
    if not tasks:
        raise ConfigError("recipe: the inputs name no files.")
    base_key = _digest([[r.name, _params(r)] for r in readers], [_file_identity(t.file) for t in tasks],
                       max_doc_bytes, __version__)

    phases: list[Phase] = []
    incoming = None
    current: list[tuple[str, MapStep]] = []
    so_far: list[Any] = []
    for name, step in steps:
        so_far.append([name, _params(step), step.apply_to])
        if isinstance(step, GlobalStep):
            phases.append(Phase(len(phases), _digest(base_key, so_far), incoming, current, (name, step)))
            incoming, current = (name, step), []
        elif isinstance(step, MapStep):
            current.append((name, step))
        else:
            raise ConfigError(f"recipe: step {name!r} is neither a map step nor a global step.")
    phases.append(Phase(len(phases), _digest(base_key, so_far, "final"), incoming, current, None))
    return Plan(tasks, phases, steps, base_key)


# ---------------------------------------------------------------- document files


@contextmanager
def write_docs_atomic(path: Path):
    """A zstd writer whose file takes the name `path` only when the block completes (`atomic_open`)."""
    import zstandard

    with atomic_open(path, durable=False) as raw:  # work/ caches: see artifacts/io.py's fsync policy
        writer = zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False)
        yield writer
        writer.close()  # ends the frame; atomic_open then renames the file


def doc_to_line(doc: Document) -> bytes:
    row = {"id": doc.id, "text": doc.text, "source": doc.source, "metadata": doc.metadata}
    return (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")


def iter_docs(path: Path):
    """Documents of an intermediate file written by a phase (our own format: any error is a bug)."""
    import zstandard

    with open(path, "rb") as raw:
        reader = io.TextIOWrapper(zstandard.ZstdDecompressor().stream_reader(raw), encoding="utf-8")
        for line in reader:
            row = json.loads(line)
            yield Document(row["id"], row["text"], row["source"], row["metadata"])


# ---------------------------------------------------------------- one task of one phase


@dataclass
class PhaseJob:
    phase: Phase
    task: TaskSpec
    work_dir: str
    prev_folder: str | None
    decision_file: str | None
    max_doc_bytes: int
    samples: int


def task_name(index: int) -> str:
    return f"task-{index:05d}"


_SETUP_DONE: dict[tuple[str, str], Step] = {}


def _ready(phase_key: str, name: str, step: Step) -> Step:
    """The step, set up once per worker process and phase (language models, word lists, n-gram sets)."""
    key = (phase_key, name)
    if key not in _SETUP_DONE:
        step.setup()
        _SETUP_DONE[key] = step
    return _SETUP_DONE[key]


def _read_source(job: PhaseJob, read_stats: StepStats, problems: Problems, input_hash):
    """Documents of the task's input file; bad records, empty and oversized documents are counted."""
    reader, file = job.task.reader, job.task.file
    records = reader.read(file, problems)
    while True:
        t0 = time.perf_counter()
        doc = next(records, None)
        if doc is None:
            read_stats.seconds += time.perf_counter() - t0
            return
        data = doc.text.encode("utf-8", "surrogatepass")
        input_hash.update(f"{len(doc.id)}:{len(data)}:{doc.id}".encode("utf-8", "surrogatepass"))
        input_hash.update(data)
        read_stats.record_in(len(data))
        reason = None
        if not doc.text.strip():
            reason, detail = "empty_document", doc.id
        elif len(data) > job.max_doc_bytes:
            reason, detail = "over_size_limit", f"{doc.id} ({len(data)} bytes)"
        if reason:
            problems.report(reason, file, detail=detail)
            read_stats.record_drop(reason, doc.id, doc.source, doc.text, job.samples)
        else:
            read_stats.record_out(len(data))
        read_stats.seconds += time.perf_counter() - t0
        if reason is None:
            yield doc


def _applies(step: Step, task: TaskSpec) -> bool:
    return step.apply_to is None or task.reader.name in step.apply_to


def run_phase_task(job: PhaseJob) -> dict:
    """Run one task of one phase unless its marker says it is already done; return its summary."""
    phase, task = job.phase, job.task
    folder = Path(job.work_dir) / phase.folder
    folder.mkdir(parents=True, exist_ok=True)
    name = task_name(task.index)
    marker = folder / f"{name}.done.json"
    if marker.exists():
        return json.loads(marker.read_text())

    stats: list[StepStats] = []
    problems = Problems()
    input_hash = hashlib.sha256()
    if phase.index == 0:
        read_stats = StepStats("read")
        stats.append(read_stats)
        docs = _read_source(job, read_stats, problems, input_hash)
    else:
        docs = iter_docs(Path(job.work_dir) / job.prev_folder / f"{name}{DOCS_SUFFIX}")

    decision = None
    chain: list[tuple[str, Step, StepStats]] = []
    if phase.incoming:
        with np.load(Path(job.work_dir) / job.decision_file, allow_pickle=False) as npz:
            decision = {k: npz[k] for k in npz.files}
        inc_name, inc_step = phase.incoming
        inc_ready = _ready(phase.key, inc_name, inc_step) if _applies(inc_step, task) else None
        chain.append((inc_name, inc_ready, StepStats(inc_name)))
    for step_name, step in phase.map_steps:
        # A step limited by `apply_to` to other readers passes this task's documents through (step None).
        chain.append((step_name, _ready(phase.key, step_name, step) if _applies(step, task) else None,
                      StepStats(step_name)))
    stats.extend(s for _, _, s in chain)
    for _, step, _ in chain:
        if step is not None:
            step.counters.clear()

    out_step = None
    sig_values: list[np.ndarray] = []
    sig_lengths: list[int] = []
    if phase.outgoing:
        out_name, out_step = phase.outgoing
        # A task outside the global step's `apply_to` contributes no signatures (and passes through it).
        out_step = _ready(phase.key, out_name, out_step) if _applies(out_step, task) else None
        out_stats = StepStats(out_name)  # signature time only; documents are counted when applied
        stats.append(out_stats)

    docs_path = folder / f"{name}{DOCS_SUFFIX}"
    kept = 0
    with write_docs_atomic(docs_path) as writer:
        for index, doc in enumerate(docs):
            n_in = len(doc.text.encode("utf-8", "surrogatepass"))
            for _, step, st in chain:
                if step is None:
                    st.record_in(n_in)
                    st.record_out(n_in)
                    st.counters["not_applied"] += 1
                    continue
                text_in = doc.text
                t0 = time.perf_counter()
                if isinstance(step, GlobalStep):
                    result = step.apply(doc, task.index, index, decision)
                else:
                    result = step.process(doc)
                st.seconds += time.perf_counter() - t0
                st.record_in(n_in)
                if isinstance(result, str):
                    st.record_drop(result, doc.id, doc.source, doc.text, job.samples)
                    break
                if result.text is not text_in:  # re-measure only text a step replaced
                    n_in = len(result.text.encode("utf-8", "surrogatepass"))
                doc = result
                st.record_out(n_in)
            else:
                if out_step is not None:
                    t0 = time.perf_counter()
                    sig = np.asarray(out_step.signature(doc), dtype=out_step.signature_dtype).ravel()
                    out_stats.seconds += time.perf_counter() - t0
                    sig_values.append(sig)
                    sig_lengths.append(len(sig))
                writer.write(doc_to_line(doc))
                kept += 1
    if phase.index == 0:  # records the reader could not turn into documents count as read drops too
        for reason, n in problems.counts.items():
            if reason not in ("empty_document", "over_size_limit"):
                read_stats.dropped[reason] += n
                read_stats.docs_in += n
    for _, step, st in chain:
        if step is not None:
            st.counters.update(step.counters)

    if phase.outgoing:
        dtype = phase.outgoing[1].signature_dtype
        offsets = np.zeros(len(sig_lengths) + 1, dtype=np.int64)
        np.cumsum(sig_lengths, out=offsets[1:])
        values = (np.concatenate(sig_values) if sig_values else np.zeros(0)).astype(dtype)
        with atomic_open(folder / f"{name}.sig.npz", durable=False) as f:
            np.savez(f, values=values, offsets=offsets)

    summary = {
        "task": task.index, "file": task.file, "reader": task.reader.name, "docs_out": kept,
        "stats": [s.to_dict() for s in stats], "problems": problems.to_dict(),
        "input_sha256": _input_sha256(task.file, input_hash) if phase.index == 0 else None,
    }
    atomic_write_json(marker, summary, indent=1, default=str, end="", durable=False)
    return summary


def _input_sha256(file: str, docs_hash) -> str:
    p = Path(file)
    if p.is_file():
        try:
            return sha256_file(p)
        except OSError:
            pass
    return "docs:" + docs_hash.hexdigest()  # pseudo-files and folders: a hash of the documents read


def run_decide(phase: Phase, work_dir: Path, num_tasks: int) -> dict:
    """Decide the phase's outgoing global step over the signatures of every task (once)."""
    name, step = phase.outgoing
    out = work_dir / phase.decision_file
    info = out.with_suffix(".json")
    if out.exists() and info.exists():
        return json.loads(info.read_text())
    step = _ready(phase.key, name, step)
    step.counters.clear()
    folder = work_dir / phase.folder
    signatures = []
    for i in range(num_tasks):
        with np.load(folder / f"{task_name(i)}.sig.npz", allow_pickle=False) as npz:
            signatures.append((npz["values"], npz["offsets"]))
    t0 = time.perf_counter()
    decision = step.decide(signatures)
    seconds = time.perf_counter() - t0
    with atomic_open(out, durable=False) as f:
        np.savez(f, **decision)
    result = {"step": name, "seconds": seconds, "counters": dict(step.counters)}
    atomic_write_json(info, result, indent=1, default=str, end="", durable=False)
    return result
