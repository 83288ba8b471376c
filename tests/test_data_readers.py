"""The readers of `llmcycle data`: every format, and bad input counted per reason instead of crashing."""

import bz2
import gzip
import io
import json
import os
import pickle
import zlib

import pytest

from llmcycle.data.document import Document, write_jsonl
from llmcycle.data.readers import READERS, Problems, build_reader
from llmcycle.errors import ConfigError


def read_all(reader, files=None):
    """(documents, problems) over every task of the reader, like the pipeline does."""
    problems, docs = Problems(), []
    for f in files if files is not None else reader.files():
        docs.extend(reader.read(f, problems))
    ids = [d.id for d in docs]
    assert len(set(ids)) == len(ids), "document ids must be unique"
    return docs, problems


def lines_of(problems, reason):
    return [int(loc.split(":")[1]) for loc in problems.locations.get(reason, [])]


def jsonl_bytes(rows):
    return b"".join((json.dumps(r) + "\n").encode() for r in rows)


# ---------------------------------------------------------------- jsonl


def test_jsonl_gz_counts_bad_lines_by_reason(tmp_path):
    lines = [json.dumps({"id": f"doc{i}", "text": f"text {i}", "lang": "en"}).encode() for i in range(10)]
    lines.insert(3, b'{"text": "unterminated')  # line 4
    lines.insert(6, b"not json at all")  # line 7
    lines.insert(8, b'{"text": "caf\xe9 latin-1"}')  # line 9: invalid UTF-8
    lines.insert(10, b'{"id": "x", "body": "no text field"}')  # line 11
    lines.insert(12, b"")  # line 13: blank lines are skipped silently
    lines.insert(13, b'{"text": "lone \\ud800 surrogate"}')  # line 14: not writable as UTF-8
    lines.insert(14, b'{"id": "emoji", "text": "paired \\ud83d\\ude00 is fine"}')  # line 15
    path = tmp_path / "a.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n"))
    reader = build_reader({"type": "jsonl", "paths": [str(tmp_path / "*.jsonl.gz")]}, "sources[0]")
    assert reader.files() == [str(path)]
    docs, problems = read_all(reader)
    assert [d.id for d in docs] == [f"doc{i}" for i in range(8)] + ["emoji", "doc8", "doc9"]
    assert docs[0] == Document("doc0", "text 0", str(path), {"lang": "en"})
    assert docs[8].text == "paired \U0001F600 is fine"
    assert dict(problems.counts) == {"malformed_json": 2, "invalid_utf8": 2, "missing_text": 1}
    assert lines_of(problems, "malformed_json") == [4, 7]
    assert lines_of(problems, "invalid_utf8") == [9, 14]
    assert lines_of(problems, "missing_text") == [11]


def test_jsonl_ids_metadata_and_reading_back_llmcycle_output(tmp_path):
    path = tmp_path / "docs.jsonl"
    write_jsonl([Document("a", "alpha", "src", {"k": 1}), Document("b", "beta", "src", {})], path)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "no id", "n": [1, 2]}) + "\n")
        f.write(json.dumps({"text": 5}) + "\n")
        f.write("[1, 2]\n")
    docs, problems = read_all(build_reader({"type": "jsonl", "paths": [str(path)]}, "s"))
    assert [(d.id, d.text) for d in docs] == [("a", "alpha"), ("b", "beta"), (f"{path}:3", "no id")]
    assert docs[0].metadata == {"k": 1, "source": "src"}
    assert docs[2].metadata == {"n": [1, 2]}
    assert dict(problems.counts) == {"missing_text": 1, "malformed_json": 1}
    # Other keys, and no id key at all.
    reader = build_reader({"type": "jsonl", "paths": [str(path)], "text_key": "text", "id_key": None}, "s")
    assert [d.id for d in read_all(reader)[0]] == [f"{path}:{i}" for i in (1, 2, 3)]


def test_truncated_gzip_keeps_complete_lines(tmp_path):
    data = jsonl_bytes({"id": i, "text": f"document number {i} " * (i % 7 + 1)} for i in range(2000))
    whole = gzip.compress(data)
    cut = whole[: len(whole) * 2 // 3]
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    # What a perfect reader could recover: the complete lines of the decompressible prefix.
    prefix = zlib.decompressobj(wbits=31).decompress(cut)
    complete = prefix.count(b"\n")
    assert 0 < complete < 2000
    docs, problems = read_all(build_reader({"type": "jsonl", "paths": [str(path)]}, "s"))
    assert [d.id for d in docs] == [str(i) for i in range(complete)]
    assert dict(problems.counts) == {"truncated_compressed": 1}
    assert lines_of(problems, "truncated_compressed") == [complete + 1]


def test_gzip_multi_member_and_corrupt_gzip(tmp_path):
    good = tmp_path / "multi.jsonl.gz"
    good.write_bytes(b"".join(gzip.compress(jsonl_bytes([{"text": t}])) for t in "ab"))
    bad = tmp_path / "bad.jsonl.gz"
    bad.write_bytes(b"this is not gzip data\n")
    docs, problems = read_all(build_reader({"type": "jsonl", "paths": [str(tmp_path / "*.gz")]}, "s"))
    assert [d.text for d in docs] == ["a", "b"]
    assert dict(problems.counts) == {"truncated_compressed": 1}
    assert problems.locations["truncated_compressed"][0].startswith(f"{bad}:1: corrupt compressed data")


def test_zstd_multi_frame_and_truncated(tmp_path):
    import zstandard

    c = zstandard.ZstdCompressor()
    rows = [{"id": f"z{i}", "text": "zstd text " * 50} for i in range(300)]
    frames = c.compress(jsonl_bytes(rows[:100])) + c.compress(jsonl_bytes(rows[100:]))
    (tmp_path / "a.jsonl.zst").write_bytes(frames)
    docs, problems = read_all(build_reader({"type": "jsonl", "paths": [str(tmp_path / "a.jsonl.zst")]}, "s"))
    assert [d.id for d in docs] == [r["id"] for r in rows] and not problems.counts
    (tmp_path / "b.jsonl.zstd").write_bytes(frames[:-20])
    docs, problems = read_all(build_reader({"type": "jsonl", "paths": [str(tmp_path / "b.jsonl.zstd")]}, "s"))
    assert 100 <= len(docs) < 300 and [d.id for d in docs] == [r["id"] for r in rows[: len(docs)]]
    assert dict(problems.counts) == {"truncated_compressed": 1}


def test_unreadable_files_are_counted(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "broken.jsonl")
    reader = build_reader({"type": "jsonl", "paths": [str(tmp_path / "dir.jsonl")]}, "s")
    files = [str(tmp_path / "dir.jsonl"), str(tmp_path / "broken.jsonl")]
    docs, problems = read_all(reader, files)
    assert docs == [] and dict(problems.counts) == {"unreadable_file": 2}
    for name in ("text", "chat", "parquet", "warc", "wiki"):
        reader = build_reader({"type": name, "paths": ["x"]}, "s")
        docs, problems = read_all(reader, files)
        assert docs == [] and dict(problems.counts) == {"unreadable_file": 2}, name


def test_paths_that_match_nothing_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="matches no file"):
        build_reader({"type": "jsonl", "paths": [str(tmp_path / "*.jsonl")]}, "s").files()
    with pytest.raises(ConfigError, match="needs `paths`"):
        build_reader({"type": "jsonl"}, "s").files()


# ---------------------------------------------------------------- chat


def test_chat_renders_turns_and_rejects_bad_messages(tmp_path):
    good = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
            {"role": "assistant", "content": "Hello."}]
    rows = [
        {"id": "c1", "messages": good, "lang": "en"},
        {"messages": [{"role": "wizard", "content": "abracadabra"}]},  # line 2
        {"messages": "hello"},  # line 3
        {"conversation": good},  # line 4
        {"messages": [{"role": "user"}]},  # line 5
        {"messages": []},  # line 6
        {"messages": good[1:]},  # line 7
    ]
    path = tmp_path / "chat.jsonl"
    path.write_bytes(jsonl_bytes(rows))
    docs, problems = read_all(build_reader({"type": "chat", "paths": [str(path)]}, "s"))
    assert [d.id for d in docs] == ["c1", f"{path}:7"]
    assert docs[0].text == "system: Be brief.\n\nuser: Hi?\n\nassistant: Hello."
    assert docs[0].metadata == {"lang": "en", "messages": good}
    assert dict(problems.counts) == {"malformed_record": 5}
    assert lines_of(problems, "malformed_record") == [2, 3, 4, 5, 6]
    assert "wizard" in problems.locations["malformed_record"][0]


# ---------------------------------------------------------------- parquet


def test_parquet_round_trip_batches_and_bad_rows(tmp_path):
    import datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 25
    table = pa.table({
        "id": [f"p{i}" for i in range(n)],
        "text": [None if i == 7 else f"row {i}" for i in range(n)],
        "score": [i / 2 for i in range(n)],
        "when": [datetime.datetime(2024, 1, 1 + i % 28) for i in range(n)],
        "tags": [["a", str(i)] for i in range(n)],
    })
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=10)
    docs, problems = read_all(build_reader({"type": "parquet", "paths": [str(path)], "batch_size": 4}, "s"))
    assert [d.id for d in docs] == [f"p{i}" for i in range(n) if i != 7]
    assert docs[0].text == "row 0" and docs[0].source == str(path)
    assert docs[0].metadata == {"score": 0.0, "when": "2024-01-01T00:00:00", "tags": ["a", "0"]}
    json.dumps([d.metadata for d in docs])  # JSON-serializable
    assert dict(problems.counts) == {"missing_text": 1} and lines_of(problems, "missing_text") == [7]

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "notext.parquet")
    pq.write_table(pa.table({"text": ["first", "second"]}), tmp_path / "noid.parquet")
    (tmp_path / "corrupt.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    reader = build_reader({"type": "parquet", "paths": [str(tmp_path / "*.parquet")]}, "s")
    files = [str(tmp_path / f) for f in ("notext.parquet", "noid.parquet", "corrupt.parquet")]
    docs, problems = read_all(reader, files)
    assert [d.id for d in docs] == [f"{tmp_path / 'noid.parquet'}:0", f"{tmp_path / 'noid.parquet'}:1"]
    assert dict(problems.counts) == {"missing_text": 1, "unreadable_file": 1}


# ---------------------------------------------------------------- text trees


def test_text_tree_reads_each_file_and_skips_bad_ones(tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("First document.\n")
    (tree / "sub" / "b.txt").write_text("\ufeffSecond document.\n")
    (tree / "sub" / "c.txt.gz").write_bytes(gzip.compress(b"Third, compressed."))
    (tree / "bin.txt").write_bytes(b"\x00\x01\x02binary")
    (tree / "latin.txt").write_bytes(b"line one\ncaf\xe9\n")
    (tree / "big.txt").write_text("x" * 2000)
    (tree / "empty.txt").write_text("")
    reader = build_reader({"type": "text", "paths": [f"{tree}/**/*.txt*"], "max_file_bytes": 1000}, "s")
    assert len(reader.files()) == 7
    docs, problems = read_all(reader)
    by_id = {d.id: d.text for d in docs}
    assert by_id == {
        str(tree / "a.txt"): "First document.\n", str(tree / "sub" / "b.txt"): "Second document.\n",
        str(tree / "sub" / "c.txt.gz"): "Third, compressed.", str(tree / "empty.txt"): "",
    }
    assert dict(problems.counts) == {"binary_file": 1, "invalid_utf8": 1, "oversized_file": 1}
    assert problems.locations["invalid_utf8"][0].startswith(f"{tree / 'latin.txt'}:2:")


# ---------------------------------------------------------------- WARC / WET

# Three real-looking English articles: the pipeline's tests run web-quality filters (Gopher, C4, FineWeb)
# over `write_sample_warc`'s pages, which must pass them.
ARTICLES = {
    "http://fox.example/": ("All about foxes", [
        "The red fox is the largest of the true foxes and one of the most widely distributed members of the "
        "order Carnivora. It is found across the entire Northern Hemisphere, from the Arctic Circle to North "
        "Africa, and it has adapted well to life in towns and cities.",
        "Foxes are mostly active at dusk and at night. They eat small rodents, rabbits, birds and insects, but "
        "they will also take fruit and scraps that people leave behind. A fox can hear a mouse moving under "
        "the snow and will leap high into the air to pounce on it.",
        "Young foxes are born in the spring in a den that the parents dig or borrow from another animal. The "
        "cubs stay with their family through the summer and leave to find their own territory in the autumn.",
    ]),
    "http://bicycle.example/": ("A short history of the bicycle", [
        "The first machine that we would recognise as a bicycle was built in Germany in 1817. It had no "
        "pedals at all, and the rider pushed it along with his feet while sitting on a wooden frame between "
        "two wheels of the same size.",
        "Pedals attached to the front wheel appeared in France in the 1860s, which led to the tall high "
        "wheelers of the following decade. These were fast but dangerous, because a sudden stop could throw "
        "the rider over the handlebars.",
        "The safety bicycle of the 1880s, with a chain driving the rear wheel and tyres filled with air, gave "
        "the design that is still used today. It made cheap personal travel possible for millions of people.",
    ]),
    "http://bread.example/": ("How sourdough bread is made", [
        "Sourdough bread is leavened by a culture of wild yeast and lactic acid bacteria rather than by yeast "
        "bought from a shop. The baker keeps this starter alive by feeding it with fresh flour and water every "
        "day or two.",
        "To make a loaf, a portion of the starter is mixed with more flour, water and salt. The dough then rests "
        "for many hours while the yeast produces gas and the bacteria give the bread its slightly sour taste.",
        "After shaping, the loaf is baked in a very hot oven, often inside a heavy pot with a lid, so that the "
        "steam keeps the crust soft at first and lets the bread rise before it turns brown and crisp.",
    ]),
}


def html_page(title, paragraphs):
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    return f"""<!doctype html><html><head><title>{title}</title><script>var tracking = "SCRIPT_JUNK";</script>
<style>body {{ color: red }}</style></head><body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/about">About us</a></li>
<li><a href="/x">NAVLINK</a></li></ul></nav>
<main><article><h1>{title}</h1>{body}</article></main>
<footer>FOOTER_TEXT copyright 2024</footer></body></html>"""


def _warc_record(writer, url, body, content_type, charset=None):
    from warcio.statusandheaders import StatusAndHeaders

    ct = content_type + (f"; charset={charset}" if charset else "")
    http = StatusAndHeaders("200 OK", [("Content-Type", ct)], protocol="HTTP/1.1")
    rec = writer.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http)
    writer.write_record(rec)


def write_sample_warc(path):
    """A gzipped WARC file (one member per record): warcinfo and request records, then responses: three
    English articles, an image, a broken HTML page and a cp1252 page without a charset, in that order."""
    from warcio.warcwriter import WARCWriter

    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        w.write_record(w.create_warcinfo_record("x.warc.gz", {"software": "test"}))
        request = io.BytesIO(b"GET / HTTP/1.1\r\n\r\n")
        w.write_record(w.create_warc_record("http://fox.example/", "request", payload=request))
        for url, (title, paragraphs) in ARTICLES.items():
            _warc_record(w, url, html_page(title, paragraphs).encode(), "text/html", "utf-8")
        _warc_record(w, "http://img.example/a.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "image/png")
        broken = b"<html><body><p>Broken page <b>with <i>unclosed tags and caf\xe9"
        _warc_record(w, "http://broken.example/", broken, "text/html", "iso-8859-1")
        latin = "<html><body><p>Grüße aus Köln</p></body></html>".encode("cp1252")  # no charset: detected
        _warc_record(w, "http://latin.example/", latin, "text/html")


def test_warc_extracts_main_text(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    write_sample_warc(path)
    reader = build_reader({"type": "warc", "paths": [str(tmp_path / "*.warc.gz")]}, "s")
    docs, problems = read_all(reader)
    assert [d.metadata["url"] for d in docs] == [*ARTICLES, "http://broken.example/", "http://latin.example/"]
    fox = docs[0]
    assert fox.text.startswith("All about foxes\n") and fox.text.endswith("territory in the autumn.")
    assert "A fox can hear a mouse" in fox.text
    for junk in ("SCRIPT_JUNK", "color: red", "NAVLINK", "FOOTER_TEXT"):
        assert junk not in fox.text
    assert fox.id.startswith("urn:uuid:") and fox.source == str(path)
    assert fox.metadata["content_type"] == "text/html" and fox.metadata["record_type"] == "response"
    assert fox.metadata["status"] == 200 and fox.metadata["date"]
    assert "Broken page with unclosed tags and café" in docs[3].text
    assert "Grüße aus Köln" in docs[4].text
    assert dict(problems.counts) == {"skipped_non_html": 1}
    assert "a.png: image/png" in problems.locations["skipped_non_html"][0]
    small = build_reader({"type": "warc", "paths": [str(path)], "max_record_bytes": 500}, "s")
    docs, problems = read_all(small)
    assert [d.metadata["url"] for d in docs] == ["http://broken.example/", "http://latin.example/"]
    assert dict(problems.counts) == {"skipped_oversized": 3, "skipped_non_html": 1}
    # Without main-content extraction the navigation stays (scripts never do).
    all_text = build_reader({"type": "warc", "paths": [str(path)], "main_content": False}, "s")
    text = read_all(all_text)[0][0].text
    assert "NAVLINK" in text and "SCRIPT_JUNK" not in text


def test_warc_truncated_and_garbage(tmp_path):
    path = tmp_path / "crawl.warc.gz"
    write_sample_warc(path)
    data = path.read_bytes()
    (tmp_path / "cut.warc.gz").write_bytes(data[:-30])
    docs, problems = read_all(build_reader({"type": "warc", "paths": [str(tmp_path / "cut.warc.gz")]}, "s"))
    assert [d.metadata["url"] for d in docs] == [*ARTICLES, "http://broken.example/"]
    assert dict(problems.counts) == {"truncated_compressed": 1, "skipped_non_html": 1}  # the cut record: once

    garbage = gzip.compress(b"WARC/1.0\r\nWARC-Type: response\r\nContent-Length: zz\r\n\r\nxx\r\n\r\n")
    (tmp_path / "bad.warc.gz").write_bytes(data + garbage)
    docs, problems = read_all(build_reader({"type": "warc", "paths": [str(tmp_path / "bad.warc.gz")]}, "s"))
    assert len(docs) == 5
    # The garbage record comes out broken, then fastwarc cannot go on past it: both are reported.
    assert dict(problems.counts) == {"malformed_record": 2, "skipped_non_html": 1}
    assert "stops reading after 7 records" in problems.locations["malformed_record"][1]


def test_wet_conversion_records(tmp_path):
    from warcio.warcwriter import WARCWriter

    path = tmp_path / "crawl.warc.wet.gz"
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        for i, text in enumerate(["Plain text of page one.\nSecond line.", "Zweite Seite: Grüße."]):
            rec = w.create_warc_record(f"http://p{i}.example/", "conversion",
                                       payload=io.BytesIO(text.encode()), warc_content_type="text/plain")
            w.write_record(rec)
    docs, problems = read_all(build_reader({"type": "warc", "paths": [str(path)]}, "s"))
    assert [d.text for d in docs] == ["Plain text of page one.\nSecond line.", "Zweite Seite: Grüße."]
    assert docs[0].metadata["record_type"] == "conversion" and docs[1].metadata["url"] == "http://p1.example/"
    assert not problems.counts


# ---------------------------------------------------------------- code


def test_code_repository(tmp_path):
    repo = tmp_path / "myrepo"
    for d in ("src/pkg", "node_modules/lib", ".git/objects", "web", "docs"):
        (repo / d).mkdir(parents=True)
    (repo / "src/pkg/main.py").write_text("def main():\n    return 1\n")
    (repo / "src/pkg/util.rs").write_text("fn main() {}\n")
    (repo / "web/app.js").write_text("export const x = 1;\n")
    (repo / "web/app.min.js").write_text("var a=1;")
    (repo / "web/bundle.js").write_text("var a=" + "1+" * 150 + "1;\n")  # one very long line
    (repo / "web/gen.ts").write_text("// Code generated by protoc. DO NOT EDIT.\nexport {};\n")
    (repo / "package-lock.json").write_text("{}\n")
    (repo / "node_modules/lib/index.js").write_text("module.exports = 1;\n")
    (repo / ".git/objects/ab").write_bytes(b"\x00blob")
    (repo / "src/pkg/blob.c").write_bytes(b"int x;\x00\x00\x00")
    (repo / "src/pkg/huge.py").write_text("x = 1\n" * 400)
    (repo / "src/pkg/latin.py").write_bytes(b"# caf\xe9\n")
    (repo / "docs/README.md").write_text("# Title\n")
    (repo / "docs/image.png").write_bytes(b"\x89PNG")  # unknown extension: ignored
    (repo / "Makefile").write_text("all:\n\techo hi\n")
    reader = build_reader({"type": "code", "paths": [str(tmp_path / "my*")], "max_file_bytes": 1000}, "s")
    assert reader.files() == [str(repo)]
    docs, problems = read_all(reader)
    got = {d.metadata["path"]: d.metadata["language"] for d in docs}
    assert got == {"Makefile": "makefile", "docs/README.md": "markdown", "src/pkg/main.py": "python",
                   "src/pkg/util.rs": "rust", "web/app.js": "javascript"}
    # Walk order: a folder's files, then its subfolders, all sorted.
    assert [d.metadata["path"] for d in docs] == sorted(got, key=lambda p: (p.count("/") > 0, p))
    main = next(d for d in docs if d.metadata["path"] == "src/pkg/main.py")
    assert main.id == f"{repo}:src/pkg/main.py" and main.source == str(repo)
    assert main.metadata["repo"] == "myrepo" and main.text == "def main():\n    return 1\n"
    assert dict(problems.counts) == {"skipped_vendored": 2, "skipped_generated": 4, "skipped_binary": 1,
                                     "skipped_oversized": 1, "invalid_utf8": 1}
    only = build_reader({"type": "code", "paths": [str(repo)], "languages": ["python", "rust"]}, "s")
    assert {d.metadata["language"] for d in read_all(only)[0]} == {"python", "rust"}
    with pytest.raises(ConfigError, match="unknown language 'klingon'"):
        build_reader({"type": "code", "paths": [str(repo)], "languages": ["klingon"]}, "s")
    problems = Problems()
    assert list(reader.read(str(tmp_path / "gone"), problems)) == []
    assert dict(problems.counts) == {"unreadable_file": 1}
    with pytest.raises(ConfigError, match="matches no folder"):
        build_reader({"type": "code", "paths": [str(repo / "Makefile")]}, "s").files()


# ---------------------------------------------------------------- wiki

WIKI_HEAD = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.11/" version="0.11" xml:lang="de">
<siteinfo><sitename>Wikipedia</sitename><namespaces>
<namespace key="0" case="first-letter" /><namespace key="1" case="first-letter">Diskussion</namespace>
<namespace key="6" case="first-letter">Datei</namespace>
<namespace key="14" case="first-letter">Kategorie</namespace>
</namespaces></siteinfo>
"""


def wiki_page(title, page_id, text, ns=0, redirect=None):
    from xml.sax.saxutils import escape

    red = f'<redirect title="{redirect}" />' if redirect else ""
    return (f"<page><title>{escape(title)}</title><ns>{ns}</ns><id>{page_id}</id>{red}"
            f"<revision><id>{page_id}00</id><timestamp>2024-01-01T00:00:00Z</timestamp>"
            f'<text bytes="1" xml:space="preserve">{escape(text)}</text></revision></page>\n')


ADA = """{{Infobox person|name=Ada Lovelace|born=1815}}
'''Ada Lovelace''' was an [[England|English]] mathematician.<ref>A {{cite book|title=Source}}</ref>

== Early life ==
She was born in [[London]]. [[Datei:Ada.jpg|thumb|A portrait]]



[[Kategorie:Mathematicians]]"""


def wiki_pages():
    return [
        wiki_page("Ada Lovelace", 11, ADA),
        wiki_page("Diskussion:Ada Lovelace", 12, "Talk page text", ns=1),
        wiki_page("Lovelace", 13, "#REDIRECT [[Ada Lovelace]]", redirect="Ada Lovelace"),
        wiki_page("Charles Babbage", 14, "'''Charles Babbage''' built engines."),
        "<page><title>No id</title><ns>0</ns><revision><text>x</text></revision></page>\n",
    ]


def test_wiki_xml_and_multistream_bz2(tmp_path):
    pages = wiki_pages()
    xml = WIKI_HEAD + "".join(pages) + "</mediawiki>\n"
    (tmp_path / "dump.xml").write_text(xml)
    # Multistream: the header, then pages, then the footer, each its own bz2 stream.
    (tmp_path / "dump.xml.bz2").write_bytes(
        bz2.compress(WIKI_HEAD.encode()) + bz2.compress("".join(pages[:3]).encode())
        + bz2.compress("".join(pages[3:]).encode()) + bz2.compress(b"</mediawiki>\n"))
    for name in ("dump.xml", "dump.xml.bz2"):
        docs, problems = read_all(build_reader({"type": "wiki", "paths": [str(tmp_path / name)]}, "s"))
        assert [d.id for d in docs] == ["wiki:11", "wiki:14"], name
        ada = docs[0]
        assert ada.text == "Ada Lovelace was an English mathematician.\n\nEarly life\nShe was born in London."
        assert ada.metadata == {"title": "Ada Lovelace", "page_id": 11, "revision_id": 1100,
                                "timestamp": "2024-01-01T00:00:00Z"}
        assert docs[1].text == "Charles Babbage built engines."
        assert dict(problems.counts) == {"malformed_record": 1}
        assert lines_of(problems, "malformed_record") == [5]


def test_wiki_truncated_dumps_keep_pages_read(tmp_path):
    pages = [wiki_page(f"P{i}", i, f"Page {i} text. " * 40).encode() for i in range(1, 200)]
    xml = WIKI_HEAD.encode() + b"".join(pages)
    (tmp_path / "cut.xml").write_bytes(xml[: len(xml) // 2])
    docs, problems = read_all(build_reader({"type": "wiki", "paths": [str(tmp_path / "cut.xml")]}, "s"))
    assert 50 < len(docs) < 150 and [d.id for d in docs] == [f"wiki:{i}" for i in range(1, len(docs) + 1)]
    assert dict(problems.counts) == {"malformed_record": 1}
    # bz2 decompresses whole blocks: with one stream per 20 pages (as multistream dumps are) the
    # streams before the cut survive.
    compressed = bz2.compress(WIKI_HEAD.encode()) + b"".join(
        bz2.compress(b"".join(pages[i : i + 20])) for i in range(0, len(pages), 20))
    (tmp_path / "cut.xml.bz2").write_bytes(compressed[: len(compressed) // 2])
    docs, problems = read_all(build_reader({"type": "wiki", "paths": [str(tmp_path / "cut.xml.bz2")]}, "s"))
    assert 0 < len(docs) < 199 and [d.id for d in docs] == [f"wiki:{i}" for i in range(1, len(docs) + 1)]
    assert dict(problems.counts) == {"truncated_compressed": 1}
    assert lines_of(problems, "truncated_compressed") == [len(docs) + 1]


# ---------------------------------------------------------------- python corpus


def test_python_reader_parts_cover_the_corpus_once():
    from llmcycle.data.pycorpus import collect_python_corpus

    reader = build_reader({"type": "python", "parts": 3, "max_bytes": 60_000}, "sources[0]")
    assert reader.files() == ["python:0", "python:1", "python:2"]
    docs, problems = read_all(reader)
    expected = collect_python_corpus(max_bytes=60_000)
    assert sorted(d.id for d in docs) == sorted(d.id for d in expected) and not problems.counts
    assert {d.source for d in docs} <= set(reader.files())
    assert {d.metadata["origin"] for d in docs} <= {"pydoc_data", "stdlib-docstrings", "stdlib-source"}
    again = [d.id for d in reader.read("python:1", Problems())]
    assert again == [d.id for d in docs if d.source == "python:1"]  # deterministic
    problems = Problems()
    assert list(reader.read("python:7", problems)) == [] and problems.counts["unreadable_file"] == 1
    with pytest.raises(ConfigError, match="parts must be at least 1"):
        build_reader({"type": "python", "parts": 0}, "s").files()


# ---------------------------------------------------------------- building readers


def test_build_reader_checks_the_recipe_entry(tmp_path):
    assert sorted(READERS) == ["chat", "code", "jsonl", "parquet", "python", "text", "warc", "wiki"]
    with pytest.raises(ConfigError, match="valid reader types: chat, code, jsonl"):
        build_reader({"type": "csv", "paths": ["x"]}, "sources[0]")
    with pytest.raises(ConfigError, match="no `type`"):
        build_reader({"paths": ["x"]}, "sources[0]")
    with pytest.raises(ConfigError, match=r"sources\[1\]\.main_content"):
        build_reader({"type": "warc", "paths": ["x"], "main_content": "yes"}, "sources[1]")
    with pytest.raises(ConfigError, match=r"unknown key 'sources\[2\]\.text_column'"):
        build_reader({"type": "jsonl", "paths": ["x"], "text_column": "body"}, "sources[2]")
    with pytest.raises(ConfigError, match=r"sources\[3\]\.paths must be a list"):
        build_reader({"type": "text", "paths": "a.txt"}, "sources[3]")
    for name in READERS:  # readers go to worker processes: cheap to build and picklable
        reader = build_reader({"type": name} if name == "python" else {"type": name, "paths": ["x"]}, "s")
        assert type(pickle.loads(pickle.dumps(reader))) is type(reader)
