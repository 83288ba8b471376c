import random

import pytest

from llmcycle.data.document import Document
from llmcycle.data.pycorpus import (
    MAX_DOC_BYTES,
    collect_python_corpus,
    corpus_hash,
    read_jsonl,
    split_heldout,
    write_jsonl,
)
from llmcycle.errors import LlmcycleError

SOURCES = {"pydoc_data": "pydoc:", "stdlib-docstrings": "docstring:", "stdlib-source": "source:"}


@pytest.fixture(scope="module")
def corpus() -> list[Document]:
    return collect_python_corpus()


def test_deterministic(corpus):
    again = collect_python_corpus()
    assert [d.id for d in again] == [d.id for d in corpus]
    assert corpus_hash(again) == corpus_hash(corpus)


def test_three_sources_with_expected_ids(corpus):
    by_source = {s: [d for d in corpus if d.source == s] for s in SOURCES}
    for source, prefix in SOURCES.items():
        docs = by_source[source]
        assert len(docs) > 50, source
        assert all(d.id.startswith(prefix) and d.text.strip() for d in docs)
    ids = {d.id for d in corpus}
    assert len(ids) == len(corpus)
    assert {"pydoc:if", "docstring:json.decoder", "source:json/decoder.py"} <= ids


def test_content_looks_right(corpus):
    docs = {d.id: d for d in corpus}
    assert "if_stmt" in docs["pydoc:if"].text
    assert "class JSONDecoder" in docs["docstring:json.decoder"].text
    method = "def JSONDecoder.raw_decode(self, s, idx=0)\n    Decode a JSON document"
    assert method in docs["docstring:json.decoder"].text
    assert docs["source:json/decoder.py"].text.startswith('"""Implementation of JSONDecoder')
    paths = [d.metadata["path"] for d in corpus if d.source == "stdlib-source"]
    for skipped in ("test/", "tests/", "idlelib/", "lib2to3/", "site-packages/", "tkinter/"):
        assert not any(p.startswith(skipped) or f"/{skipped}" in p for p in paths), skipped
    assert "pydoc_data/topics.py" not in paths


def test_size_in_range(corpus):
    sizes = [len(d.text.encode()) for d in corpus]
    assert 3_000_000 <= sum(sizes) <= 8_000_000
    assert max(sizes) <= MAX_DOC_BYTES


def test_max_bytes_is_a_mixed_prefix(corpus):
    small = collect_python_corpus(max_bytes=300_000)
    assert small == corpus[: len(small)]
    assert sum(len(d.text.encode()) for d in small) <= 300_000
    assert sum(len(d.text.encode()) for d in corpus[: len(small) + 1]) > 300_000
    assert {d.source for d in small} == set(SOURCES)
    with pytest.raises(LlmcycleError):
        collect_python_corpus(max_bytes=0)


def test_heldout_split(corpus):
    train, heldout = split_heldout(corpus, heldout_fraction=0.2)
    assert split_heldout(corpus, heldout_fraction=0.2) == (train, heldout)
    assert {d.id for d in train}.isdisjoint(d.id for d in heldout)
    assert len(train) + len(heldout) == len(corpus)
    assert 0.1 < len(heldout) / len(corpus) < 0.3
    # Docstrings and source of one file always fall on the same side (no held-out text in training).
    groups_train = {d.metadata.get("split_group") for d in train}
    assert all(d.metadata["split_group"] not in groups_train for d in heldout if "split_group" in d.metadata)
    # Order of the input does not change which documents are held out.
    shuffled = corpus[:]
    random.Random(0).shuffle(shuffled)
    assert {d.id for d in split_heldout(shuffled, heldout_fraction=0.2)[1]} == {d.id for d in heldout}
    # The default 5% split is a subset of the 20% one: thresholds on one hash.
    assert {d.id for d in split_heldout(corpus)[1]} <= {d.id for d in heldout}


def test_heldout_fraction_on_ungrouped_docs():
    docs = [Document(id=f"doc-{i}", text="x", source="t") for i in range(4000)]
    for frac in (0.05, 0.3):
        _, heldout = split_heldout(docs, heldout_fraction=frac)
        assert abs(len(heldout) / len(docs) - frac) < 0.02
    assert split_heldout(docs, 0.0)[1] == [] and split_heldout(docs, 1.0)[0] == []
    assert split_heldout(docs, salt="other")[1] != split_heldout(docs)[1]
    with pytest.raises(LlmcycleError):
        split_heldout(docs, heldout_fraction=1.5)


def test_jsonl_round_trip(tmp_path, corpus):
    docs = corpus[:40] + [Document("odd", "ünïcode 😀\n\"quotes\"\x00", "t", {"k": [1, 2]})]
    path = tmp_path / "sub" / "docs.jsonl"
    write_jsonl(docs, path)
    back = read_jsonl(path)
    assert back == docs
    assert corpus_hash(back) == corpus_hash(docs)


def test_jsonl_errors_name_the_file(tmp_path):
    with pytest.raises(LlmcycleError, match="missing.jsonl"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok", "source": "s"}\n{"id": "b"\n')
    with pytest.raises(LlmcycleError, match=r"bad.jsonl:2"):
        read_jsonl(bad)


def test_corpus_hash_is_order_and_boundary_sensitive():
    a, b = Document("a", "xy", "s"), Document("b", "z", "s")
    assert corpus_hash([a, b]) != corpus_hash([b, a])
    assert corpus_hash([Document("a", "xy", "s")]) != corpus_hash([Document("ax", "y", "s")])
