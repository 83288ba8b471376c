"""Writing one artifact file: the bytes the caller gives and no others, their sha256 returned, and the old
file left whole when the write fails."""

import hashlib
import json

import pytest

from llmcycle.artifacts import (
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    is_temporary,
    sha256_file,
)
from llmcycle.artifacts.manifest import MANIFEST, write_manifest


def test_atomic_writes_return_the_sha256_of_exactly_the_bytes_written(tmp_path):
    p = tmp_path / "a.bin"
    assert atomic_write_bytes(p, b"abc") == hashlib.sha256(b"abc").hexdigest() == sha256_file(p)
    assert atomic_write_bytes(p, [b"a", b"bc"]) == sha256_file(p) and p.read_bytes() == b"abc"
    assert atomic_write_text(p, "é\n") == sha256_file(p) and p.read_bytes() == "é\n".encode()
    assert atomic_write_bytes(p, b"cache", durable=False) == sha256_file(p)  # work/ files: renamed, not synced
    obj = {"b": 1, "a": [1, 2], "t": "é"}
    for kwargs, expected in [
        ({}, json.dumps(obj, indent=2) + "\n"),
        ({"sort_keys": True}, json.dumps(obj, indent=2, sort_keys=True) + "\n"),
        ({"indent": 1, "end": ""}, json.dumps(obj, indent=1)),
        ({"ensure_ascii": False}, json.dumps(obj, indent=2, ensure_ascii=False) + "\n"),
    ]:
        assert atomic_write_json(p, obj, **kwargs) == sha256_file(p)
        assert p.read_text(encoding="utf-8") == expected
    assert [q.name for q in tmp_path.iterdir()] == ["a.bin"]  # no temporary file left beside it


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(p, "w") as f:
        f.write("half of the new")
        raise RuntimeError("crash")
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["config.json"]


def test_temporary_names_are_recognised(tmp_path):
    assert is_temporary(f".stage.json.tmp-{123}") and is_temporary("stage.json.tmp")
    assert not is_temporary("stage.json") and not is_temporary("model.tmp.bin")


def test_manifest_is_written_whole(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"w")
    m = write_manifest(tmp_path, "pretrain", {"lr": 1e-3}, {}, {"loss": 1.0})
    assert json.loads((tmp_path / MANIFEST).read_text()) == m
    assert (tmp_path / MANIFEST).read_text() == json.dumps(m, indent=2, default=str) + "\n"
    assert m["outputs"] == {"weights.bin": hashlib.sha256(b"w").hexdigest()}
    assert sorted(q.name for q in tmp_path.iterdir()) == [MANIFEST, "weights.bin"]


def test_a_crashed_writers_temporary_is_no_part_of_the_artifact(tmp_path):
    from llmcycle.artifacts.lineage import trace

    (tmp_path / "weights.bin").write_bytes(b"w")
    (tmp_path / ".README.md.tmp-99").write_text("half a card")  # a writer killed amid atomic_write_text
    m = write_manifest(tmp_path, "pretrain", {}, {}, {})
    assert list(m["outputs"]) == ["weights.bin"]
    (tmp_path / ".config.json.tmp-98").write_text("{")
    assert [link.problems for link in trace(tmp_path)] == [[]]
    (tmp_path / "extra.bin").write_bytes(b"x")
    assert "added after the manifest" in trace(tmp_path)[0].problems[0]
