"""`llmcycle lineage MODEL_DIR`: the chain of artifacts from a model back to its raw sources, re-verified.

Every stage writes `manifest.json` (llmcycle/artifacts/manifest.py): the sha256 of each of its own files
(`outputs`) and what it was made from (`inputs`: input models by path and hash, data files by path
and hash, the pre-training data by its preparation key). `trace` follows those records depth first,
re-hashes every recorded file and reports, per artifact, what changed since it was recorded. The
chain is a DAG (PPO has a policy and a reward model that share their SFT parent): each artifact is
visited and printed once.

Recorded paths are re-rooted first: a manifest records its own stage folder (`config.out_dir`), so a
recorded path inside the tree that held that folder (the run folder: `runs/<name>/` for `llmcycle
run`) is looked up at the same place under where that tree is now. A run folder copied or moved
elsewhere (`cp -r runs/default /elsewhere`) is verified against its own files, not the original's.
Then an absolute path as recorded; a relative one (relative to the directory the run was started
from) under each ancestor of the artifact, then under the current directory.

A recorded input that is found nowhere is MISSING, and that is a failure (exit 1, `"ok": false`): a
chain that cannot be followed proves nothing. `--allow-missing` reports it and passes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmcycle.artifacts.hashing import sha256_file
from llmcycle.artifacts.io import is_temporary
from llmcycle.artifacts.manifest import MANIFEST, UNHASHED
from llmcycle.errors import LlmcycleError

SHA = re.compile(r"^[0-9a-f]{64}$")
CONFIG_KEYS = ("model", "ref_model", "reward_model", "init_from", "data.corpus", "data.train", "model.size",
               "train.max_steps", "train.lr", "train.batch_size", "train.seed", "tokenizer.vocab_size")
SKIP = {"data": ("work",)}  # top-level entries a stage leaves out of `outputs` (write_manifest's skip)
SIDECAR = ".manifest.json"  # a one-file artifact (a GGUF export) keeps its manifest in FILE.manifest.json


def file_artifact(path: str | Path) -> Path | None:
    """The sidecar manifest of a one-file artifact at `path`, or None when `path` is no such file."""
    side = Path(str(path) + SIDECAR)
    return side if Path(path).is_file() and side.is_file() else None


@dataclass
class Link:
    """One artifact (or raw source) on the chain; `inputs` names the links it was made from."""

    key: str  # resolved path, or a name for what is not a file ("corpus:python@3.11.7")
    stage: str  # the manifest's stage, or prepared-data / shards / file / corpus / model for leaves
    path: str  # as recorded (or as given, for the start)
    created: str | None = None
    status: str = "OK"  # OK | MODIFIED (a failure) | MISSING | UNVERIFIABLE | UNCHECKED (--no-verify)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    inputs: list[list[str]] = field(default_factory=list)  # [role, key]


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def show_path(p: Path) -> str:
    """A path as short as it can be: relative to the current directory when under it."""
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


def _scalars(d: dict, keys=None) -> dict[str, Any]:
    items = [(k, _get(d, k)) for k in keys] if keys else list(d.items())
    return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in items
            if isinstance(v, (int, float, str, bool)) and v is not None}


class _Tracer:
    def __init__(self, verify: bool):
        self.verify = verify
        self.links: dict[str, Link] = {}  # insertion order = depth-first pre-order
        self._hashes: dict[Path, str] = {}
        self._moved: dict[str, tuple[str, Path]] = {}  # artifact -> (its tree as recorded, that tree now)

    def sha(self, f: Path) -> str:
        if f not in self._hashes:
            self._hashes[f] = sha256_file(f)  # streams in 1 MiB blocks
        return self._hashes[f]

    def check(self, f: Path, recorded: str, what: str) -> str | None:
        """A problem line when `f` no longer has the recorded hash (None when it matches or is unchecked)."""
        if not self.verify:
            return None
        if not f.is_file():
            return f"{what} {f}: missing (recorded {recorded[:12]})"
        now = self.sha(f)
        return None if now == recorded else f"{what} {f}: changed (recorded {recorded[:12]}, now {now[:12]})"

    def add(self, link: Link, parent: Link | None, role: str) -> Link:
        if parent is not None and [role, link.key] not in parent.inputs:
            parent.inputs.append([role, link.key])
        if link.key in self.links:
            return self.links[link.key]
        self.links[link.key] = link
        if not self.verify and link.status == "OK":
            link.status = "UNCHECKED"
        return link

    # ---- artifacts with a manifest ----

    def artifact(self, d: Path, shown: str, parent: Link | None = None, role: str = "", hashed=False) -> None:
        key = str(d.resolve())
        if key in self.links:
            self.add(self.links[key], parent, role)
            return
        if not (d / MANIFEST).is_file() and parent is not None and (d.parent / MANIFEST).is_file():
            # a part of an artifact (the data stage's tokenizer/): its manifest hashes the files here
            return self.artifact(d.parent, show_path(d.parent), parent, role, hashed)
        if not (d / MANIFEST).is_file():
            if parent is None:
                hint = f" (did you mean {d / 'model'}?)" if (d / "model" / MANIFEST).is_file() else ""
                raise LlmcycleError(f"{d}: no {MANIFEST}; not an llmcycle artifact{hint}.")
            why = "only the hashes recorded above were checked" if hashed else "no hash of it was recorded"
            self.add(Link(key, "tokenizer" if "tokenizer" in role else "model", shown, status="UNVERIFIABLE",
                          notes=[f"no manifest, not an llmcycle artifact: {why}"]), parent, role)
            return
        try:
            m = json.loads((d / MANIFEST).read_text())
            stage, outputs, inputs, cfg = m["stage"], m["outputs"], m["inputs"], m["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise LlmcycleError(f"{d / MANIFEST}: not a readable llmcycle manifest ({e}).") from None
        if (moved := _tree_move(d, cfg.get("out_dir") if isinstance(cfg, dict) else None)) is not None:
            self._moved[key] = moved
        shown_keys = CONFIG_KEYS
        if _get(cfg, "data.train_shards"):  # trained on given shards: corpus and tokenizer settings were not used
            shown_keys = tuple(k for k in CONFIG_KEYS if k not in ("data.corpus", "tokenizer.vocab_size"))
        link = self.add(Link(key, stage, shown, m.get("created"), config=_scalars(cfg, shown_keys),
                             metrics=_scalars(m.get("metrics") or {}),
                             hashes={k: v for k, v in outputs.items() if k == "model.safetensors"}), parent, role)
        if self.verify:
            for rel, h in outputs.items():
                link.problems += filter(None, [self.check(d / rel, h, "file")])
            skip = (*SKIP.get(stage, ()), *UNHASHED)  # the model card and the run's stage record: not hashed
            for f in sorted(p for p in d.rglob("*") if p.is_file() and p.name != MANIFEST):
                rel = f.relative_to(d)
                if str(rel) not in outputs and rel.parts[0] not in skip and not is_temporary(f.name):
                    link.problems.append(f"file {f}: added after the manifest was written")
        python = (m.get("versions") or {}).get("python", "?")
        for name, val in inputs.items():
            if isinstance(val, dict) and "path" in val:  # an input model: {path, file: sha256, ...}
                self.model_ref(link, d, name, val)
            elif name == "data" and isinstance(val, dict) and ("key" in val or "train_shards" in val):
                self.pretrain_data(link, d, cfg, val, python)
            elif isinstance(val, dict) and all(isinstance(h, str) for h in val.values()):
                for f, h in val.items():
                    self.file(link, d, name, f, h, python)
            elif stage == "data" and isinstance(val, str):  # the data stage: {raw file: sha256}
                self.file(link, d, "raw", name, val, python)
            elif stage == "tokenizer" and name == "corpus":
                self.corpus(link, d, val, inputs.get("corpus_sha256"), python)
            elif val is not None and name != "corpus_sha256":
                link.notes.append(f"{name}: {val}")
        if "ref_model" in cfg and cfg["ref_model"] is None:
            link.notes.append("reference model: the starting model itself")
        for name in ("init_from", "tokenizer.path"):
            if _get(cfg, name):
                p = self.resolve(_get(cfg, name), d)
                if p is None:
                    self.missing(link, name, _get(cfg, name))
                else:
                    self.artifact(p, _get(cfg, name), link, name)
        self.finish(link)

    def one_file(self, f: Path, shown: str) -> None:
        """A one-file artifact: its sidecar manifest hashes the file itself and names the inputs it was made from."""
        try:
            m = json.loads(Path(str(f) + SIDECAR).read_text())
            stage, outputs, inputs, cfg = m["stage"], m["outputs"], m["inputs"], m["config"]
        except (ValueError, KeyError, TypeError) as e:
            raise LlmcycleError(f"{f}{SIDECAR}: not a readable llmcycle manifest ({e}).") from None
        link = self.add(Link(str(f.resolve()), stage, shown, m.get("created"), config=_scalars(cfg),
                             metrics=_scalars(m.get("metrics") or {}), hashes=dict(outputs)), None, "")
        for rel, h in outputs.items():
            link.problems += filter(None, [self.check(f.parent / rel, h, "file")])
        for name, val in inputs.items():
            if isinstance(val, dict) and "path" in val:
                self.model_ref(link, f.parent, name, val)
        self.finish(link)

    def finish(self, link: Link) -> None:
        if link.problems:
            link.status = "MODIFIED"

    def resolve(self, recorded: str, base: Path) -> Path | None:
        """Where a path that artifact `base` recorded is now (module docstring), or None."""
        p = Path(recorded)
        candidates = [p] if p.is_absolute() else [a / p for a in base.resolve().parents] + [Path.cwd() / p]
        if (moved := self._moved.get(str(base.resolve()))) is not None:
            candidates.insert(0, _reroot(recorded, *moved))
        return next((c for c in candidates if c is not None and c.exists()), None)

    def missing(self, parent: Link, role: str, recorded: str) -> None:
        self.add(Link(f"missing:{recorded}", "?", recorded, status="MISSING",
                      notes=["recorded path not found (looked in the artifact's run folder, under its parent "
                             "folders and here)"]),
                 parent, role)

    # ---- what an artifact was made from ----

    def model_ref(self, parent: Link, d: Path, role: str, val: dict) -> None:
        p = self.resolve(val["path"], d)
        if p is None:
            return self.missing(parent, role, val["path"])
        for name, h in val.items():
            if name != "path":
                parent.problems += filter(None, [self.check(p / name, h, f"input {role}")])
        self.artifact(p, val["path"], parent, role, hashed=True)

    def file(self, parent: Link, d: Path, role: str, recorded: str, h: str, python: str) -> None:
        if recorded.startswith("python:"):  # a part of the embedded corpus: a pseudo-file, hashed by its documents
            return self.corpus(parent, d, "python", h, python, role=role)
        p = self.resolve(recorded, d)
        if p is None:
            return self.missing(parent, role, recorded)
        link = self.add(Link(str(p.resolve()), "file", recorded, hashes={"sha256": h}), parent, role)
        if not SHA.match(h):
            link.status = "UNVERIFIABLE"
            link.notes.append(f"recorded as a hash of the documents read ({h[:17]}), not of the file")
        elif problem := self.check(p, h, f"input {role}"):
            parent.problems.append(problem)
            link.status = "MODIFIED"

    def corpus(self, parent: Link, d: Path, corpus: str, h: str | None, python: str, role: str = "corpus") -> None:
        if corpus != "python":
            p = self.resolve(corpus, d)
            if p is None:
                return self.missing(parent, role, corpus)
            link = Link(str(p.resolve()), "corpus", corpus, status="UNVERIFIABLE")
        else:
            link = Link(f"corpus:python@{python}", "corpus", "python", status="UNVERIFIABLE",
                        notes=[f"embedded corpus: Python's own documentation and standard-library source, "
                               f"Python {python} (docs/corpus.md)"])
        link.notes.append(f"recorded hash of its documents {h[:17]} (llmcycle.data.document; not re-computed)"
                          if h else "no content hash recorded")
        self.add(link, parent, role)

    def pretrain_data(self, parent: Link, d: Path, cfg: dict, info: dict, python: str) -> None:
        if "train_shards" in info:  # given shards: the data stage's output, or a prepared folder
            for split in ("train_shards", "val_shards"):
                if not info.get(split):  # trained without held-out shards: nothing recorded, nothing missing
                    continue
                p = self.resolve(info[split], d)
                if p is None:
                    self.missing(parent, "data", str(info.get(split)))
                    continue
                recorded = (info.get("shards_sha256") or {}).get(split.removesuffix("_shards"))
                if recorded:  # the shard list this model trained on, against what is there now
                    parent.problems += filter(None, [self.check(p / "shards.json", recorded, f"input {split}")])
                if (p.parent / MANIFEST).is_file():
                    self.artifact(p.parent, show_path(p.parent), parent, "data")
                elif (p.parent / "prepared.json").is_file():
                    self.prepared(parent, p.parent, None, python)
                else:
                    link = self.add(Link(str(p.resolve()), "shards", info[split]), parent, "data")
                    link.problems += self.shard_problems(p)
                    self.finish(link)
            return
        data_dir = d.parent / "data"  # prepare_data writes <out_dir>/data next to <out_dir>/model
        if not (data_dir / "prepared.json").is_file():
            data_dir = self.resolve(str(Path(cfg.get("out_dir", "")) / "data"), d) or data_dir
        if not (data_dir / "prepared.json").is_file():
            return self.missing(parent, "data", str(data_dir))
        self.prepared(parent, data_dir, info, python)

    def prepared(self, parent: Link, data_dir: Path, info: dict | None, python: str) -> None:
        """A folder `prepare_data` wrote: prepared.json, tokenizer/, train/ and val/ shard sets."""
        key = str(data_dir.resolve())
        if key in self.links:
            self.add(self.links[key], parent, "data")
            return
        found = json.loads((data_dir / "prepared.json").read_text())
        info = info or found
        link = self.add(Link(key, "prepared-data", show_path(data_dir), metrics=_scalars(found, ("documents.train",
                             "tokens.train", "tokens.val", "heldout_bytes_per_token")),
                             hashes={"key": info.get("key", ""), "tokenizer": info.get("tokenizer_hash", "")}),
                        parent, "data")
        if self.verify:
            if found.get("key") != info.get("key"):
                link.problems.append(f"file {data_dir / 'prepared.json'}: prepared again after training "
                                     f"(key {str(info.get('key'))[:12]} recorded, now {str(found.get('key'))[:12]})")
            from llmcycle.tokenizer import Tokenizer

            now = Tokenizer.from_pretrained(data_dir / "tokenizer").content_hash()
            if info.get("tokenizer_hash") and now != info["tokenizer_hash"]:
                link.problems.append(f"tokenizer {data_dir / 'tokenizer'}: changed (recorded "
                                     f"{info['tokenizer_hash'][:12]}, now {now[:12]})")
            for split in ("train", "val"):
                link.problems += self.shard_problems(data_dir / split)
        self.finish(link)
        self.corpus(link, data_dir, info.get("corpus", "python"), None, python)

    def shard_problems(self, shards: Path) -> list[str]:
        """Shard files against the sha256 that shards.json records for each of them."""
        if not self.verify:
            return []
        try:
            entries = json.loads((shards / "shards.json").read_text())["shards"]
        except (OSError, ValueError, KeyError) as e:
            return [f"file {shards / 'shards.json'}: unreadable ({e})"]
        return [p for e in entries for ext in ("bin", "idx")
                if (p := self.check(shards / f"{e['name']}.{ext}", e[f"sha256_{ext}"], "file"))]


def _tree_move(d: Path, out_dir: str | None) -> tuple[str, Path] | None:
    """(the tree holding the artifact's stage folder, as recorded; that tree now), from the stage folder
    `out_dir` its manifest recorded: the artifact is `out_dir/model` (a model) or `out_dir` itself (the
    data stage). None when the folder names do not match (renamed, or no out_dir recorded)."""
    if not out_dir:
        return None
    out = Path(os.path.normpath(out_dir))
    d = d.resolve()
    if d.name == "model" and d.parent.name == out.name:
        stage_dir = d.parent
    elif d.name == out.name:
        stage_dir = d
    else:
        return None
    return str(out.parent), stage_dir.parent


def _reroot(recorded: str, old_tree: str, new_tree: Path) -> Path | None:
    """`recorded` moved from under `old_tree` to under `new_tree`; None when it was not under it (both
    are absolute, or both relative to the directory the run was started from)."""
    if os.path.isabs(recorded) != os.path.isabs(old_tree):
        return None
    rel = os.path.relpath(os.path.normpath(recorded), os.path.normpath(old_tree))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return new_tree / rel


def trace(model_dir: str | Path, verify: bool = True) -> list[Link]:
    """Every artifact and raw source `model_dir` was made from, depth first, each once; re-hashed unless told not."""
    d = Path(model_dir)
    t = _Tracer(verify)
    if file_artifact(d) is not None:
        t.one_file(d, str(model_dir))
        return list(t.links.values())
    if not d.is_dir():
        raise LlmcycleError(f"{d}: no such directory.")
    t.artifact(d, str(model_dir))
    return list(t.links.values())


def render(links: list[Link]) -> str:
    """The chain as an indented tree; an artifact reached a second time is named, not repeated."""
    by, seen, lines = {link.key: link for link in links}, set(), []

    def walk(key: str, role: str, depth: int) -> None:
        link, pad = by[key], "  " * depth
        head = f"{pad}{role + ': ' if role else ''}{link.stage}  {link.path}"
        if key in seen:
            lines.append(head + "  (shown above)")
            return
        seen.add(key)
        created = f"  created {link.created}" if link.created else ""
        hashes = "".join(f"  {k} {v[:12]}" for k, v in link.hashes.items() if v)
        lines.append(f"{head}{created}{hashes}  [{link.status}]")
        for what, d in (("config", link.config), ("metrics", dict(list(link.metrics.items())[:8]))):
            if d:
                lines.append(f"{pad}    {what}: " + ", ".join(
                    f"{k}={v[:12] if isinstance(v, str) and SHA.match(v) else v}" for k, v in d.items()))
        lines.extend(f"{pad}    note: {n}" for n in link.notes)
        lines.extend(f"{pad}    !! {p}" for p in link.problems)
        for r, k in link.inputs:
            walk(k, r, depth + 1)

    walk(links[0].key, "", 0)
    return "\n".join(lines)


def add_lineage_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR",
                        help="an artifact directory, e.g. runs/default/dpo/model, or a file with FILE.manifest.json "
                             "beside it (llmcycle export gguf)")
    parser.add_argument("--json", action="store_true", help="print the whole chain as JSON")
    parser.add_argument("--no-verify", action="store_true", help="follow the records without re-hashing files")
    parser.add_argument("--allow-missing", action="store_true",
                        help="report recorded inputs that are found nowhere, but do not fail on them")


def _missing_lines(links: list[Link]) -> list[str]:
    """One line per recorded input found nowhere, naming the artifact that recorded it."""
    by = {link.key: link for link in links}
    return [f"{link.stage} {show_path(Path(link.key))}: {role} {by[key].path} not found"
            for link in links for role, key in link.inputs if by[key].status == "MISSING"]


def lineage_main(args: argparse.Namespace) -> int:
    """Print the chain; 1 when any artifact or recorded input changed after it was recorded, or when a
    recorded input is found nowhere (unless --allow-missing)."""
    links = trace(args.model_dir, verify=not args.no_verify)
    bad = [link for link in links if link.problems]
    missing = _missing_lines(links)
    allow = getattr(args, "allow_missing", False)
    ok = not bad and (allow or not missing)
    if args.json:
        print(json.dumps({"model": args.model_dir, "ok": ok, "missing": missing,
                          "links": [asdict(x) for x in links]}, indent=1))
    else:
        print(render(links))
    for link in bad:
        for p in link.problems:
            print(f"lineage: MODIFIED: {link.stage} {show_path(Path(link.key))}: {p}", file=sys.stderr)
    for line in missing:
        print(f"lineage: MISSING{' (allowed)' if allow else ''}: {line}", file=sys.stderr)
    if bad:
        print(f"lineage: {len(bad)} artifact(s) on the chain of {args.model_dir} no longer match their manifests.",
              file=sys.stderr)
    if missing and not allow:
        print(f"lineage: {len(missing)} recorded input(s) on the chain of {args.model_dir} are missing; the chain "
              "cannot be verified (--allow-missing to accept that).", file=sys.stderr)
    return 0 if ok else 1
