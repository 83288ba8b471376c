"""The filter steps of `llmcycle data`: quality rules (against datatrove's), language, blocklist,
harmful content, PII."""

from __future__ import annotations

import pickle
import random

import pytest

from llmcycle.data.document import Document
from llmcycle.data.filters import words
from llmcycle.data.filters.blocklist import UrlBlocklist, UrlBlocklistParams, normalize_url
from llmcycle.data.filters.c4 import C4Quality, C4QualityParams
from llmcycle.data.filters.fineweb import FineWebQuality, FineWebQualityParams
from llmcycle.data.filters.gopher import (
    GopherQuality,
    GopherQualityParams,
    GopherRepetition,
    GopherRepetitionParams,
)
from llmcycle.data.filters.harmful import Harmful, HarmfulParams
from llmcycle.data.filters.language import Language, LanguageParams
from llmcycle.data.filters.pii import Pii, PiiParams, luhn_ok
from llmcycle.data.steps import build_step
from llmcycle.errors import ConfigError

CLEAN = (
    "The old lighthouse stands at the edge of the harbor, and it has guided ships for more than a "
    "century. Every evening the keeper climbs the narrow stairs to light the lamp. Fishermen say that "
    "the beam can be seen from twenty miles away on a clear night. In winter the storms are fierce, "
    "but the tower has never failed. Visitors come in summer to walk along the cliffs and to learn "
    "about the families that have lived there with the sea as their neighbor."
)


def run(step, text: str, **meta) -> str | Document:
    """The step's verdict on one document: the kept Document or the drop reason."""
    result = step.process(Document(id="d", text=text, source="test", metadata=dict(meta)))
    return result


def reason(step, text: str) -> str:
    result = run(step, text)
    return "keep" if isinstance(result, Document) else result


# ----------------------------------------------------------------------------------- word splitting

def test_words_follow_spacy_english_rules():
    text = ("Don't stop: it's 5km (U.S.A.) e.g. see https://example.com/a-b, well-known 10-20 items :) "
            "end.Next $19.99! Mr. Smith's dog... \"Quoted\" [1] can't")
    assert words.split_into_words(text) == [
        "Do", "n't", "stop", ":", "it", "'s", "5", "km", "(", "U.S.A.", ")", "e.g.", "see",
        "https://example.com/a-b", ",", "well", "-", "known", "10", "-", "20", "items", ":)", "end", ".",
        "Next", "$", "19.99", "!", "Mr.", "Smith", "'s", "dog", "...", '"', "Quoted", '"', "[", "1", "]",
        "ca", "n't"]
    w = words.analyze("Hello, world... #1")
    assert (w.n_words, w.n_non_symbol, w.n_alpha) == (6, 3, 2)  # Hello , world ... # 1
    assert words.count_sentences("Hello there. This is e.g. one! And Mr. Smith left... Then? ok") == 4
    assert words.count_sentences("") == 1  # as datatrove counts an empty line


def test_words_match_datatrove_split_into_words():
    pytest.importorskip("spacy")
    text_mod = pytest.importorskip("datatrove.utils.text")
    rng = random.Random(3)
    pieces = ["word", "Word", "it's", "don't", "U.S.", "e.g.", "3.5", "10-20", "well-known", "(x)", '"q"',
              "a/b", "x,y", "end.Next", ":)", "8)", "...", "$5", "5km", "#tag", "—", "https://a.org/x-y",
              "’s"]
    for _ in range(60):
        ends = ["", "", ",", ".", "!", ")", "'s"]
        text = " ".join(rng.choice(pieces) + rng.choice(ends) for _ in range(12))
        assert words.split_into_words(text) == text_mod.split_into_words(text), text


# ----------------------------------------------------------------------------------- Gopher quality

def lines(*items: str) -> str:
    return "\n".join(items)


def test_gopher_quality_passes_clean_text_and_trips_each_rule():
    g = GopherQuality()
    assert reason(g, CLEAN) == "keep"
    sentence = "The keeper climbs the narrow stairs to light the lamp every evening with care. "
    cases = {
        "gopher_short_doc": "The cat sat on the mat with the dog.",
        "gopher_long_doc": "the cat " * 50_001,
        "gopher_below_avg_threshold": "it is to be or not to be as we go on and " * 6,
        "gopher_above_avg_threshold": "the incomprehensibility of disestablishmentarianism " * 20,
        "gopher_too_many_hashes": CLEAN + " " + " ".join(f"#tag{i}" for i in range(20)),
        "gopher_too_many_ellipsis": CLEAN + " " + "Wait... " * 20,
        "gopher_too_many_bullets": lines(*[f"- {sentence}" for _ in range(10)]),
        "gopher_too_many_end_ellipsis": lines(*[sentence + ("Whatever happens..." if i < 4 else "")
                                                for i in range(10)]),
        "gopher_below_alpha_threshold": CLEAN + " " + " ".join(str(1000 + i) for i in range(60)),
        "gopher_enough_stop_words": "Cats sleep quietly in warm rooms while dogs run fast outside. " * 8,
    }
    for expected, text in cases.items():
        assert reason(g, text) == expected, expected


def test_gopher_quality_thresholds_are_configurable():
    short = " ".join(CLEAN.split()[:40])
    assert reason(GopherQuality(), short) == "gopher_short_doc"
    assert reason(GopherQuality(GopherQualityParams(min_doc_words=30)), short) == "keep"
    assert reason(GopherQuality(GopherQualityParams(min_doc_words=None)), short) == "keep"
    assert reason(GopherQuality(GopherQualityParams(stop_words=["lighthouse", "keeper", "zebra"],
                                                    min_stop_words=3)), CLEAN) == "gopher_enough_stop_words"
    short_words = GopherQuality(GopherQualityParams(max_avg_word_length=4))
    assert reason(short_words, CLEAN) == "gopher_above_avg_threshold"


# -------------------------------------------------------------------------------- Gopher repetition

def filler(n: int) -> str:
    return " ".join(f"filler{i}" for i in range(n))


REPEAT = "the quick brown fox jumps over a lazy dog near an old river bank "


def test_gopher_repetition_passes_clean_text_and_trips_each_rule():
    g = GopherRepetition()
    assert reason(g, CLEAN) == "keep"
    long_para = CLEAN
    cases = {
        "empty": "",
        "dup_para_frac": "\n\n".join(["First paragraph here."] * 3 + ["Another one."]),
        "dup_para_char_frac": "\n\n".join([long_para, long_para] + [f"Short para {i}." for i in range(6)]),
        "dup_line_frac": lines(*(["Same line again."] * 3 + ["Different line."])),
        "dup_line_char_frac": lines(*([long_para, long_para] + [f"Short line {i}." for i in range(6)])),
        "top_2_gram": filler(10) + " " + "alpha beta " * 30,
        "top_3_gram": filler(40) + " " + "to be extraordinarily " * 12,
        "top_4_gram": filler(60) + " " + "to be or extraordinarily " * 12,
        "duplicated_5_n_grams": filler(14) + " " + REPEAT * 2,
        "duplicated_6_n_grams": filler(16) + " " + REPEAT * 2,
        "duplicated_7_n_grams": filler(20) + " " + REPEAT * 2,
        "duplicated_8_n_grams": filler(104) + " " + REPEAT * 4,
        "duplicated_9_n_grams": filler(68) + " " + REPEAT * 3,
        "duplicated_10_n_grams": filler(106) + " " + REPEAT * 4,
    }
    for expected, text in cases.items():
        assert reason(g, text) == expected, expected


def test_gopher_repetition_thresholds_are_configurable():
    text = filler(14) + " " + REPEAT * 2
    assert reason(GopherRepetition(), text) == "duplicated_5_n_grams"
    relaxed = GopherRepetitionParams(dup_n_grams=[[n, 0.5] for n in range(5, 11)])
    assert reason(GopherRepetition(relaxed), text) == "keep"
    assert reason(GopherRepetition(GopherRepetitionParams(top_n_grams=[[2, 0.01]])), CLEAN) == "top_2_gram"
    with pytest.raises(ConfigError, match=r"dup_n_grams\[0\]"):
        GopherRepetition(GopherRepetitionParams(dup_n_grams=[[5.5, 0.1]]))


# -------------------------------------------------------------------------------------------- C4

GOOD = [f"This is good sentence number {i} in the text." for i in range(5)]


def test_c4_removes_lines_and_keeps_the_rest():
    c4 = C4Quality()
    text = lines(
        GOOD[0],
        "Please enable JavaScript to view the comments.",
        "This site uses cookies to improve your experience.",
        "Short line.",
        "A line without terminal punctuation",
        "A line that trails off...",
        "A word " + "x" * 1001 + " too long.",
        "  A cited claim[1] is still a claim[citation needed].  ",
        *GOOD[1:],
    )
    result = run(c4, text)
    assert isinstance(result, Document)
    assert result.text == lines(GOOD[0], "A cited claim is still a claim.", *GOOD[1:])
    assert c4.counters["line-filter-javascript"] == 1
    assert c4.counters["line-filter-policy"] == 1
    assert c4.counters["line-filter-too_few_words"] == 1
    assert c4.counters["line-filter-no_terminal_punc"] == 2
    assert c4.counters["line-filter-too_long_word"] == 1
    assert c4.counters["line-kept"] == 6


def test_c4_drops_documents():
    c4 = C4Quality()
    assert reason(c4, lines(*GOOD)) == "keep"
    assert reason(c4, lines(*GOOD, "Lorem ipsum dolor sit amet, consectetur.")) == "lorem_ipsum"
    assert reason(c4, lines(*GOOD, "The function f(x) { return x; } is short.")) == "curly_bracket"
    assert reason(c4, lines(*GOOD[:4])) == "too_few_sentences"
    # Several sentences on one line count separately (spaCy's sentencizer).
    assert reason(c4, "One is here. Two is here. Three is here. Four is here. Five is here.") == "keep"
    assert reason(C4Quality(C4QualityParams(min_num_sentences=4)), lines(*GOOD[:4])) == "keep"
    assert reason(C4Quality(C4QualityParams(filter_curly_bracket=False)),
                  lines(*GOOD, "The function f(x) { return x; } is short.")) == "keep"


# ---------------------------------------------------------------------------------------- FineWeb

def test_fineweb_quality_rules():
    fw = FineWebQuality()
    assert reason(fw, CLEAN) == "keep"
    cases = {
        "empty": "\n  \n",
        "line_punct_ratio": lines(*[f"A heading without final punctuation number {i}" for i in range(10)]),
        "short_line_ratio": lines(*[f"Short line number {i}." for i in range(10)]),
        "char_dup_ratio": lines(CLEAN, "This exact line appears twice in the text.",
                                "This exact line appears twice in the text."),
        "list_ratio": lines(*[f"Incomprehensibilities{i}disestablishmentarianism." for i in range(10)]),
    }
    for expected, text in cases.items():
        assert reason(fw, text) == expected, expected
    listy = cases["list_ratio"]
    assert reason(FineWebQuality(FineWebQualityParams(new_line_ratio=0.5)), listy) == "keep"
    assert reason(FineWebQuality(FineWebQualityParams(line_punct_exclude_zero=True)),
                  cases["line_punct_ratio"]) == "keep"
    digits_end = FineWebQuality(FineWebQualityParams(stop_chars=["4", "5"]))  # 2 lines of 10 end so
    assert reason(digits_end, cases["line_punct_ratio"]) != "line_punct_ratio"


# ------------------------------------------------------------------------- against datatrove itself

def _generated_documents(n: int = 44) -> list[str]:
    """Varied web-like documents: prose, lists, boilerplate, repeats, code, short and long ones."""
    rng = random.Random(7)
    sentences = [s.strip() + "." for s in CLEAN.split(".") if s.strip()] + [
        "Click here to subscribe!", "It's the best deal you'll ever see, isn't it?", "Read more...",
        "U.S. customers: see our F.A.Q. (e.g. shipping, returns).", "Posted by admin on March 3, 2021",
        "This website uses cookies.", "Enable JavaScript to continue.", "#python #code #news",
        "- Item one", "• Item two", "def f(x): return {x: 1}", "Lorem ipsum dolor sit amet.",
        "Home | About | Contact", "Prices start at $19.99 (incl. VAT) — order now!", "Wait…",
        "The well-known 10-20 rule applies [1].", "Call 555-1234 today...", "Dr. Smith's 5km run."]
    docs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            body = [" ".join(rng.choice(sentences) for _ in range(rng.randint(3, 8)))
                    for _ in range(rng.randint(1, 6))]
            docs.append("\n\n".join(body))
        elif kind == 1:
            docs.append("\n".join(rng.choice(sentences) for _ in range(rng.randint(3, 30))))
        elif kind == 2:
            chunk = " ".join(rng.choice(sentences) for _ in range(rng.randint(1, 4)))
            others = [rng.choice(sentences) for _ in range(rng.randint(0, 9))]
            docs.append("\n".join([chunk] * rng.randint(1, 4) + others))
        else:
            vocab = " ".join(sentences).split()
            docs.append(" ".join(rng.choice(vocab) for _ in range(rng.randint(20, 400))))
    return docs


def test_same_decisions_as_datatrove():
    pytest.importorskip("spacy")  # datatrove's English word splitter
    dt = pytest.importorskip("datatrove.pipeline.filters")
    from datatrove.data import Document as DtDocument

    pairs = [(dt.GopherQualityFilter(), GopherQuality()), (dt.GopherRepetitionFilter(), GopherRepetition()),
             (dt.C4QualityFilter(), C4Quality()), (dt.FineWebQualityFilter(), FineWebQuality())]
    docs = _generated_documents()
    for theirs, ours in pairs:
        outcomes = set()
        for i, text in enumerate(docs):
            their_doc = DtDocument(text=text, id=str(i))
            verdict = theirs.filter(their_doc)
            expected = "keep" if verdict is True else verdict[1]
            result = run(ours, text)
            got = "keep" if isinstance(result, Document) else result
            assert got == expected, (type(ours).__name__, i, text)
            if got == "keep":
                assert result.text == their_doc.text  # C4 rewrites the text: the same way
            outcomes.add(got)
        assert len(outcomes) >= 2, (type(ours).__name__, outcomes)  # the sample exercises both ways


# ---------------------------------------------------------------------------------------- language

SAMPLES = {
    "en": "The weather was lovely this morning, so we walked along the river and watched the boats go by.",
    "de": "Das Wetter war heute Morgen herrlich, also sind wir am Fluss entlang spaziert und haben den "
          "Booten zugesehen.",
    "fr": "Le temps était magnifique ce matin, alors nous nous sommes promenés le long de la rivière pour "
          "regarder passer les bateaux.",
    "es": "El tiempo estaba precioso esta mañana, así que caminamos por la orilla del río y miramos pasar "
          "los barcos de los pescadores mientras tomábamos un café con leche.",
    "zh": "今天早上天气很好，所以我们沿着河边散步，看着船只来来往往。",
    "ru": "Сегодня утром была прекрасная погода, поэтому мы гуляли вдоль реки и смотрели на "
          "проплывающие лодки.",
}


def test_language_identifies_and_filters():
    step = Language(LanguageParams(languages=["en", "de"]))
    step.setup()
    for lang, text in SAMPLES.items():
        result = run(step, text)
        if lang in ("en", "de"):
            assert isinstance(result, Document), lang
            assert result.metadata["language"] == lang
            assert result.metadata["language_score"] > 0.65
        else:
            assert result == f"lang_{lang}"
    strict = Language(LanguageParams(languages=["en"], min_score=0.9999))
    assert run(strict, SAMPLES["en"]) == "low_lang_score"
    anything = Language(LanguageParams(languages=[]))
    assert all(isinstance(run(anything, t), Document) for t in SAMPLES.values())
    assert run(anything, "1234 5678") == "low_lang_score"  # no letters: nothing to identify
    clone = pickle.loads(pickle.dumps(step))  # shipped to workers without the model; loaded again
    assert isinstance(run(clone, SAMPLES["en"]), Document)


# --------------------------------------------------------------------------------------- blocklist

def test_url_blocklist(tmp_path):
    domains = tmp_path / "domains.txt"
    domains.write_text("# blocked hosts\nbad.example\n*.spam.test\nhttps://Evil.ORG/whatever\n")
    urls = tmp_path / "urls.txt"
    urls.write_text("http://good.example/bad-page/  # one page\nhttps://good.example/search?q=x\n")
    step = UrlBlocklist(UrlBlocklistParams(domains_file=str(domains), urls_file=str(urls)))
    step.setup()
    verdicts = {
        "https://bad.example/page": "domain",
        "http://www.bad.example": "domain",
        "https://a.b.bad.example:8080/x": "domain",
        "https://spam.test/": "domain",
        "https://evil.org./": "domain",
        "https://notbad.example/": "keep",
        "https://good.example/bad-page": "url",
        "HTTPS://GOOD.example:443/bad-page/#frag": "url",
        "https://good.example/search?q=x": "url",
        "https://good.example/search?q=y": "keep",
        "https://good.example/": "keep",
    }
    for url, expected in verdicts.items():
        result = run(step, "text", url=url)
        assert ("keep" if isinstance(result, Document) else result) == expected, url
    assert isinstance(run(step, "no url at all"), Document)
    assert step.counters["no_url"] == 1
    assert normalize_url("Example.COM") == "example.com/"
    with pytest.raises(ConfigError, match="domains_file"):
        UrlBlocklist(UrlBlocklistParams(domains_file=str(tmp_path / "missing.txt")))
    with pytest.raises(ConfigError):
        UrlBlocklist(UrlBlocklistParams())


# ----------------------------------------------------------------------------------------- harmful

def toxicity(text: str) -> float:
    """A stand-in classifier for the hook: the share of capital letters."""
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(1, len(letters))


def test_harmful_word_lists_and_classifier(tmp_path):
    wl = tmp_path / "words.txt"
    wl.write_text("# test list\nbadword\nvery bad phrase\t2.5\n")
    step = Harmful(HarmfulParams(word_lists=[str(wl)], threshold=10.0))
    step.setup()
    # 200 words, one "badword" (weight 1) and one phrase (2.5), matched whole-word and across case and
    # line breaks: 1000 * 3.5 / 200 = 17.5 per 1000 words.
    text = "BadWord " + "fine " * 196 + "very BAD\nphrase"
    assert step.score(text) == pytest.approx(17.5)
    assert run(step, text) == "harmful_words"
    assert step.score("badwords and verybad phrase") == 0.0  # whole words only
    assert isinstance(run(Harmful(HarmfulParams(word_lists=[str(wl)], threshold=20.0)), text), Document)
    assert run(Harmful(HarmfulParams(word_lists=[str(wl)])), "one badword " + "ok " * 1000) == "harmful_words"

    hooked = Harmful(HarmfulParams(classifier=f"{__name__}:toxicity", classifier_threshold=0.5))
    hooked.setup()
    assert run(hooked, "THIS IS SHOUTING") == "harmful_classifier"
    kept = run(hooked, "this is calm")
    assert isinstance(kept, Document) and kept.metadata["harmful_classifier_score"] == 0.0
    with pytest.raises(ConfigError, match="classifier"):
        Harmful(HarmfulParams(classifier="not a spec"))
    with pytest.raises(ConfigError, match="cannot import"):
        Harmful(HarmfulParams(classifier="no_such_module_xyz:f")).setup()
    with pytest.raises(ConfigError, match="no function"):
        Harmful(HarmfulParams(classifier=f"{__name__}:missing")).setup()


# --------------------------------------------------------------------------------------------- PII

def test_pii_redacts_each_kind_with_counts():
    emails = ["john.doe@example.com", "a.b+tag@mail.example.co.uk", "x_y@sub.domain.org"]
    cards = ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "6011 0000 0000 0004"]
    ips = ["192.168.1.20", "8.8.8.8", "2001:db8::8a2e:370:7334", "fe80::1"]
    phones = ["+1 415 555 2671", "(415) 555-2671", "415.555.2671", "1-800-555-1234", "+44 20 7946 0958",
              "020 7946 0958", "01 23 45 67 89", "+49 (0)30 123456"]
    text = " and ".join(f"contact {x} now" for x in emails + cards + ips + phones)
    step = Pii()
    result = run(step, text)
    assert dict(step.counters) == {"email": 3, "credit_card": 4, "ip": 4, "phone": 8}
    expected = " and ".join(
        ["contact <EMAIL> now"] * 3 + ["contact <CREDIT_CARD> now"] * 4 + ["contact <IP_ADDRESS> now"] * 4
        + ["contact <PHONE_NUMBER> now"] * 8)
    assert result.text == expected


def test_pii_leaves_lookalikes_alone():
    untouched = ("Card 4111 1111 1111 1112 fails Luhn. Dates 2021-03-04, 03/04/2021 and 12.05.2020, "
                 "version 3.11.7 and 1.2.3.4.5, loopback 127.0.0.1, mask 255.255.255.0, any 0.0.0.0, "
                 "slice x[1::2], time 10:30:00, ZIP 02134-1234, id 12345678901234, total 1,234,567.89, "
                 "ISBN 978-3-16-148410-0, not an address 300.1.1.1.")
    step = Pii()
    assert run(step, untouched).text == untouched
    assert sum(step.counters.values()) == 0
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")


def test_pii_kinds_are_selectable():
    step = Pii(PiiParams(kinds=["email"]))
    text = "mail me@example.com or call +1 415 555 2671"
    assert run(step, text).text == "mail <EMAIL> or call +1 415 555 2671"
    with pytest.raises(ConfigError, match="kinds"):
        Pii(PiiParams(kinds=["ssn"]))


# ------------------------------------------------------------------------------------ configuration

def test_bad_parameters_are_refused_with_the_key_named():
    with pytest.raises(ConfigError, match=r"steps\[0\]\.gopher_quality\.min_doc_words"):
        build_step({"gopher_quality": {"min_doc_words": "x"}}, "steps[0]")
    with pytest.raises(ConfigError, match=r"steps\[1\]\.c4_quality\.no_such_key"):
        build_step({"c4_quality": {"no_such_key": 1}}, "steps[1]")
    with pytest.raises(ConfigError, match="max_bullet_lines_ratio"):
        build_step({"gopher_quality": {"max_bullet_lines_ratio": 1.5}}, "steps[0]")
    with pytest.raises(ConfigError, match="min_score"):
        build_step({"language": {"min_score": -0.1}}, "steps[0]")
    with pytest.raises(ConfigError, match="xx"):
        build_step({"language": {"languages": ["xx"]}}, "steps[0]")
    with pytest.raises(ConfigError, match="min_num_sentences"):
        build_step({"c4_quality": {"min_num_sentences": -5}}, "steps[0]")
    step = build_step({"gopher_repetition": {"top_n_grams": [[2, 0.3]]}}, "steps[0]")
    assert step.params.top_n_grams == [[2, 0.3]]
    for name in ("gopher_quality", "gopher_repetition", "c4_quality", "fineweb_quality", "language", "pii"):
        assert pickle.loads(pickle.dumps(build_step(name, "steps[0]"))).name == name
