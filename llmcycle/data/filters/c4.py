"""C4's line and document rules (Raffel et al. 2020, section 2.2), as datatrove's `C4QualityFilter`.

Lines are judged one by one and the document keeps only the lines that pass (the step rewrites the
text, as datatrove does); a few findings drop the whole document. Same order of checks, defaults and
reasons as datatrove; sentences are counted as spaCy's sentencizer does (see `words.py`).

Not offered: datatrove's `split_paragraph=False` mode (judging sentences instead of lines) and the C4
bad-words filter, whose list must be downloaded; the `harmful` step with that list as a word list file
and `threshold: 0` does the same (any listed word drops the document).
"""

from __future__ import annotations

import dataclasses
import re

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.filters.words import count_sentences
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError

CITATION = re.compile(r"\[\d*]|\[edit]|\[citation needed]")
END_PUNCTUATION = (".", "?", "!", '"', "'")
ELLIPSIS = "..."
POLICY_SUBSTRINGS = ["terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies",
                     "use cookies"]


@dataclasses.dataclass
class C4QualityParams:
    remove_citations: bool = F(True, "Remove Wikipedia citations: [1], [edit], [citation needed].")
    filter_no_terminal_punct: bool = F(
        True, "Remove lines that do not end in . ? ! \" ' (or that end in '...') (C4).")
    min_num_sentences: int = F(5, "Drop documents with fewer sentences in their kept lines (C4: 5; -1: off).")
    min_words_per_line: int = F(3, "Remove lines with fewer words (C4: 3; -1: off).")
    max_word_length: int = F(1000, "Remove lines with a longer word (C4 code: 1000; -1: off).")
    filter_lorem_ipsum: bool = F(True, "Drop documents with 'lorem ipsum' in a line (C4).")
    filter_javascript: bool = F(True, "Remove lines that mention 'javascript' (C4).")
    filter_curly_bracket: bool = F(True, "Drop documents with '{' in a line (C4).")
    filter_policy: bool = F(True, "Remove lines about cookies, terms of use and privacy policies (C4 code).")


@register_step
class C4Quality(MapStep):
    """datatrove's C4QualityFilter (with split_paragraph=True): removes lines, drops some documents."""

    name = "c4_quality"
    Params = C4QualityParams

    def __init__(self, params: C4QualityParams | None = None):
        super().__init__(params)
        p = self.params
        for key in ("min_num_sentences", "min_words_per_line", "max_word_length"):
            value = getattr(p, key)
            if value < -1:
                raise ConfigError(f"{self.name}.{key} = {value} must be >= 0, or -1 to turn the rule off.")

    def process(self, doc: Document) -> Document | str:
        p = self.params
        max_word = p.max_word_length
        min_words = p.min_words_per_line
        min_sentences = p.min_num_sentences
        num_sentences = 0
        kept = []
        too_long = no_punct = too_few = javascript = policy = 0
        lines = doc.text.splitlines()
        for line in lines:
            line = line.strip()
            words = line.split()
            if max_word != -1 and len(line) > max_word and any(len(w) > max_word for w in words):
                too_long += 1
                continue
            if p.remove_citations and "[" in line:
                line = CITATION.sub("", line)
            if p.filter_no_terminal_punct and (not line.endswith(END_PUNCTUATION) or line.endswith(ELLIPSIS)):
                no_punct += 1
                continue
            if len(words) < min_words:
                too_few += 1
                continue
            lower = line.lower()
            if p.filter_lorem_ipsum and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if p.filter_javascript and "javascript" in lower:
                javascript += 1
                continue
            if p.filter_curly_bracket and "{" in line:
                return "curly_bracket"
            if p.filter_policy and any(s in lower for s in POLICY_SUBSTRINGS):
                policy += 1
                continue
            # Only "at least min_num_sentences" matters, so counting stops once it is reached.
            if min_sentences != -1 and num_sentences < min_sentences:
                num_sentences += count_sentences(line)
            kept.append(line)
        if num_sentences < min_sentences:
            return "too_few_sentences"
        c = self.counters
        c["line-total"] += len(lines)
        c["line-kept"] += len(kept)
        c["line-filter-too_long_word"] += too_long
        c["line-filter-no_terminal_punc"] += no_punct
        c["line-filter-too_few_words"] += too_few
        c["line-filter-javascript"] += javascript
        c["line-filter-policy"] += policy
        text = "\n".join(kept).strip()
        if text != doc.text:
            doc.text = text
        return doc
