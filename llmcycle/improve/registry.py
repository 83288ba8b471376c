"""The model registry: named models, immutable numbered versions, aliases that move, and A/B splits.

`register(name, model_dir)` copies the directory (hard links where the file system allows: free, and a
later republish of the source, which replaces files by rename, leaves the copy as it was) into
`<root>/<name>/v<N>/` and records version N pinned by content hash: the sha256 of its manifest.json, which
hashes every file of the model (artifacts/manifest.py), so a version is its content and its lineage.
Registering content a name already holds returns that version instead of a new one.

Aliases are MLflow's: free names (`production`, `staging`, `challenger`, ...) pointing at a version, moved
with `alias()`; `NAME@ALIAS`, `NAME@3` or bare `NAME` (its `production` alias, else its newest version)
resolve to a version. An A/B split (`set_split`) makes a name answer from several aliases or versions by
weight. Every change (register, alias moved or removed, split started or ended) is an audit record.

The tables live in the monitor's database (the request log's SQLite file or PostgreSQL URL); the copies
under `root`, by default `registry/` beside a SQLite database (a PostgreSQL registry needs `root` on a
file system every server reads). A server following the registry polls `state()` (serve/registered.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmcycle.artifacts.io import publish_dir, staging_dir
from llmcycle.artifacts.manifest import MANIFEST, file_hashes
from llmcycle.errors import LlmcycleError
from llmcycle.monitor.store import LogStore, as_store, transaction
from llmcycle.paths import check_model_dir

DEFAULT_ALIAS = "production"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    path: str            # the registry's own copy
    content_hash: str    # sha256 of manifest.json (or of the file hashes, for a directory without one)
    source: str          # the directory it was registered from
    created: float
    stage: str | None    # what made it (the manifest's stage: sft, dpo, quantize ...)
    parent: str | None   # the model it was trained from (the manifest's inputs.model.path)
    metrics: dict        # the manifest's metrics, and eval.json's beside the source when present
    description: str | None = None

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def content_hash(model_dir: Path) -> str:
    """sha256 of the manifest (equal manifests hash equal files), else of the directory's file hashes."""
    manifest = model_dir / MANIFEST
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    return hashlib.sha256(json.dumps(file_hashes(model_dir, ("README.md",)), sort_keys=True).encode()).hexdigest()


def check_name(kind: str, name: str) -> str:
    if not _NAME.match(name or "") or name.isdigit():
        raise LlmcycleError(f"{kind} {name!r}: letters, digits, '.', '_' and '-', starting with a letter "
                            "(at most 64).")
    return name


def _copy_tree(src: Path, dst: Path) -> None:
    """Hard-link every file of `src` into `dst` (copy where linking fails: another file system)."""
    for p in sorted(src.rglob("*")):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(p, target)
        except OSError:
            shutil.copy2(p, target)


class Registry:
    """The registry in a monitor database (`target`: SQLite file or PostgreSQL URL); copies under `root`."""

    def __init__(self, target: LogStore | str | Path, root: str | Path | None = None,
                 audit: Any = None) -> None:
        self.store = as_store(target)
        if self.store.kind == "sqlite":
            self.store.path.parent.mkdir(parents=True, exist_ok=True)
            self.root = Path(root) if root else self.store.path.parent / "registry"
            if audit is None:
                from llmcycle.monitor.audit import AuditLog, audit_path_for

                audit = AuditLog(audit_path_for(self.store.path))  # the trail serve keeps beside its databases
        else:
            self.root = Path(root) if root else None
        self.audit = audit
        con = self.store.connect()
        try:
            with transaction(con):
                con.execute(f"CREATE TABLE IF NOT EXISTS registry_versions ({self.store.id_column}, name TEXT, "
                            "version INTEGER, path TEXT, content_hash TEXT, source TEXT, created "
                            f"{self.store.column_type('REAL')}, stage TEXT, parent TEXT, metrics TEXT, "
                            "description TEXT, UNIQUE (name, version))")
                con.execute("CREATE TABLE IF NOT EXISTS registry_aliases (name TEXT, alias TEXT, version INTEGER, "
                            f"updated {self.store.column_type('REAL')}, PRIMARY KEY (name, alias))")
                con.execute("CREATE TABLE IF NOT EXISTS registry_splits (name TEXT PRIMARY KEY, split TEXT, "
                            f"salt TEXT, started {self.store.column_type('REAL')})")
        finally:
            con.close()

    def _audit(self, action: str, target: str, details: dict, actor: str | None) -> None:
        if self.audit is not None:
            self.audit.append(action, target, details, actor=actor)

    # ---- versions ------------------------------------------------------------------------------------

    def register(self, name: str, model_dir: str | Path, description: str | None = None,
                 actor: str | None = None) -> tuple[Version, bool]:
        """(the version, whether it is new). Content the name already holds returns its version."""
        check_name("model name", name)
        src = check_model_dir(model_dir)
        h = content_hash(src)
        for v in self.versions(name):
            if v.content_hash == h:
                return v, False
        if self.root is None:
            raise LlmcycleError("a registry in PostgreSQL needs --root: a folder every server can read.")
        manifest = json.loads((src / MANIFEST).read_text()) if (src / MANIFEST).is_file() else {}
        metrics = dict(manifest.get("metrics") or {})
        evaluation = src.parent / "eval.json"  # `llmcycle eval` writes its results beside the model
        if evaluation.is_file():
            metrics["eval"] = json.loads(evaluation.read_text()).get("metrics", {})
        parent = ((manifest.get("inputs") or {}).get("model") or {}).get("path")
        con = self.store.connect()
        try:
            with transaction(con):  # the number is taken inside the write (two registrations never share one)
                row = con.execute(self.store.sql("SELECT MAX(version) FROM registry_versions WHERE name = ?"),
                                  (name,)).fetchone()
                number = (row[0] or 0) + 1
                final = self.root / name / f"v{number}"
                if final.exists():  # a registration racing this one took the number first
                    raise LlmcycleError(f"{final} exists: another registration of {name} is under way; try again.")
                tmp = staging_dir(final)
                _copy_tree(src, tmp)
                if content_hash(tmp) != h:
                    shutil.rmtree(tmp, ignore_errors=True)
                    raise LlmcycleError(f"{src} changed while it was being registered; try again.")
                publish_dir(tmp, final)
                version = Version(name, number, str(final.resolve()), h, str(src.resolve()), time.time(),
                                  manifest.get("stage"), parent, metrics, description)
                con.execute(self.store.sql(
                    "INSERT INTO registry_versions (name, version, path, content_hash, source, created, stage, "
                    "parent, metrics, description) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"),
                    (name, number, version.path, h, version.source, version.created, version.stage, parent,
                     json.dumps(metrics, default=str), description))
        finally:
            con.close()
        self._audit("registry_register", version.ref, {"content_hash": h, "source": version.source,
                                                       "stage": version.stage}, actor)
        return version, True

    def versions(self, name: str | None = None) -> list[Version]:
        """Every version (of `name`), oldest first."""
        where, args = ("WHERE name = ?", [name]) if name else ("", [])
        rows = self.store.rows(f"SELECT * FROM registry_versions {where} ORDER BY name, version", args)
        return [Version(r["name"], r["version"], r["path"], r["content_hash"], r["source"], r["created"],
                        r["stage"], r["parent"], json.loads(r["metrics"] or "{}"), r["description"])
                for r in rows]

    def version(self, name: str, number: int) -> Version:
        for v in self.versions(name):
            if v.version == number:
                return v
        have = [v.version for v in self.versions(name)]
        raise LlmcycleError(f"{name} has no version {number} (versions: {', '.join(map(str, have))})." if have
                            else self._known(name))

    def _known(self, name: str) -> str:
        """The message for a name that has no version."""
        names = sorted({v.name for v in self.versions()})
        return (f"no model {name!r} is registered" + (f" (registered: {', '.join(names)})" if names else "")
                + f" in {self.store}; llmcycle registry register {name} MODEL_DIR adds one.")

    # ---- aliases -------------------------------------------------------------------------------------

    def aliases(self, name: str | None = None) -> dict[str, dict[str, int]]:
        """{name: {alias: version}}."""
        where, args = ("WHERE name = ?", [name]) if name else ("", [])
        out: dict[str, dict[str, int]] = {}
        for r in self.store.rows(f"SELECT name, alias, version FROM registry_aliases {where}", args):
            out.setdefault(r["name"], {})[r["alias"]] = r["version"]
        return out

    def alias(self, name: str, alias: str, number: int, actor: str | None = None) -> int | None:
        """Point `name@alias` at version `number`; returns the version it pointed at before (None: new)."""
        check_name("alias", alias)
        self.version(name, number)  # it must exist
        before = self.aliases(name).get(name, {}).get(alias)
        con = self.store.connect()
        try:
            with transaction(con):
                con.execute(self.store.sql("DELETE FROM registry_aliases WHERE name = ? AND alias = ?"), (name, alias))
                con.execute(self.store.sql("INSERT INTO registry_aliases (name, alias, version, updated) "
                                           "VALUES (?, ?, ?, ?)"), (name, alias, number, time.time()))
        finally:
            con.close()
        self._audit("registry_alias", f"{name}@{alias}", {"version": number, "previous": before}, actor)
        return before

    def remove_alias(self, name: str, alias: str, actor: str | None = None) -> None:
        before = self.aliases(name).get(name, {}).get(alias)
        if before is None:
            raise LlmcycleError(f"{name}@{alias} does not exist.")
        self.store.execute("DELETE FROM registry_aliases WHERE name = ? AND alias = ?", [name, alias])
        self._audit("registry_alias_removed", f"{name}@{alias}", {"previous": before}, actor)

    def resolve(self, ref: str) -> Version:
        """`NAME@ALIAS`, `NAME@N` or `NAME` (its production alias, else its newest version) -> the version."""
        name, at, which = ref.partition("@")
        if not name or (at and not which):
            raise LlmcycleError(f"{ref!r}: expected NAME, NAME@ALIAS or NAME@VERSION (e.g. chat@production, chat@2).")
        if not which:
            which = DEFAULT_ALIAS if DEFAULT_ALIAS in self.aliases(name).get(name, {}) else ""
            if not which:
                versions = self.versions(name)
                if not versions:
                    raise LlmcycleError(self._known(name))
                return versions[-1]
        if which.isdigit():
            return self.version(name, int(which))
        number = self.aliases(name).get(name, {}).get(which)
        if number is None:
            if not self.versions(name):
                raise LlmcycleError(self._known(name))
            have = sorted(self.aliases(name).get(name, {}))
            raise LlmcycleError(f"{name}@{which}: no such alias ({'aliases: ' + ', '.join(have) if have else 'no aliases'}"
                                f"; llmcycle registry alias {name} {which} VERSION sets it).")
        return self.version(name, number)

    # ---- A/B splits ------------------------------------------------------------------------------------

    def set_split(self, name: str, split: dict[str, float], actor: str | None = None) -> None:
        """Answer `name` from several aliases or versions by weight ({"production": 90, "challenger": 10})."""
        if len(split) < 2 or any(w < 0 for w in split.values()) or sum(split.values()) <= 0:
            raise LlmcycleError("a split needs two or more aliases or versions with weights >= 0 (not all 0).")
        for which in split:
            self.resolve(f"{name}@{which}")
        salt = hashlib.sha256(f"{name}{time.time()}".encode()).hexdigest()[:12]  # a new test, new buckets
        con = self.store.connect()
        try:
            with transaction(con):
                con.execute(self.store.sql("DELETE FROM registry_splits WHERE name = ?"), (name,))
                con.execute(self.store.sql("INSERT INTO registry_splits (name, split, salt, started) VALUES "
                                           "(?, ?, ?, ?)"), (name, json.dumps(split), salt, time.time()))
        finally:
            con.close()
        self._audit("ab_start", name, {"split": split, "salt": salt}, actor)

    def end_split(self, name: str, actor: str | None = None) -> None:
        if self.split(name) is None:
            raise LlmcycleError(f"{name} has no A/B split running.")
        self.store.execute("DELETE FROM registry_splits WHERE name = ?", [name])
        self._audit("ab_end", name, {}, actor)

    def split(self, name: str) -> dict[str, Any] | None:
        """{"split": {alias or version: weight}, "salt", "started"} or None."""
        rows = self.store.rows("SELECT split, salt, started FROM registry_splits WHERE name = ?", [name])
        return {**rows[0], "split": json.loads(rows[0]["split"])} if rows else None

    # ---- what a server follows -------------------------------------------------------------------------

    def state(self, name: str) -> dict[str, Any]:
        """What `name` answers from now: {"variants": {label: Version}, "weights": {label: w}, "salt"}. Without
        a split: one variant, the bare name's version."""
        split = self.split(name)
        if split is None:
            v = self.resolve(name)
            return {"variants": {str(v.version): v}, "weights": {str(v.version): 1.0}, "salt": ""}
        variants, weights = {}, {}
        for which, w in split["split"].items():
            v = self.resolve(f"{name}@{which}")
            label = str(v.version)
            variants[label] = v
            weights[label] = weights.get(label, 0.0) + float(w)  # two aliases on one version: one variant
        return {"variants": variants, "weights": weights, "salt": split["salt"]}
