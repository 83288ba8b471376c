"""Language identification with py3langid, whose model ships inside its wheel (works offline).

Semantics of datatrove's `LanguageFilter` (which FineWeb runs with fastText and a 0.65 threshold):
the document is kept when one of the wanted languages scores above `min_score` (strictly), scores
being normalized probabilities over py3langid's languages. The best language and its score are
written to `metadata["language"]` and `metadata["language_score"]` either way. A dropped document's
reason names the best language when it is not a wanted one (`lang_de`), else `low_lang_score`.
A text without letters gets language "und", score 0 and is dropped ("low_lang_score").
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.filters import check_range
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError

# The languages py3langid 0.4's model knows (ISO 639-1 where there is one, else 639-3).
KNOWN_LANGUAGES = frozenset(
    "af am ar as az be bg bn br bs ca cs cy da de el en eo es et eu fa fi fr fy ga gd gl gu ha he hi hr ht "
    "hu hy id ig is it ja jv ka kk km kn ko ku ky la lg ln lo lt lv mg mk ml mn mr ms my ne nl no om or pa "
    "pl ps pt qu ro ru sa si sk sl so sq sr sv sw ta te th tl tr ug uk ur uz vi xh yo zh zu zxx ace bcl dz "
    "ext gcf gom grc gug hbo kik nso pcm rw se sn st an ary crh fo fuv gcr guw kab lb lij ltg uzs wa sdh arz "
    "ba mt nn oc tg tk tt vec vo wuu yue".split()
)

_LETTER = re.compile(r"[^\W\d_]")


@dataclasses.dataclass
class LanguageParams:
    languages: list[str] = F(["en"], "Languages to keep (py3langid codes); an empty list keeps any language.")
    min_score: float = F(0.65, "Keep only when a wanted language's probability is above (FineWeb: 0.65).")
    max_chars: int | None = F(None, "Identify on the first this many characters only (null: the whole text; "
                                    "py3langid reads about 1 MB/s).")


@register_step
class Language(MapStep):
    """Identify the language; keep documents in the wanted languages with a confident score."""

    name = "language"
    Params = LanguageParams

    def __init__(self, params: LanguageParams | None = None):
        super().__init__(params)
        p = self.params
        check_range(self.name, "min_score", p.min_score, lo=0, hi=1, allow_none=False)
        check_range(self.name, "max_chars", p.max_chars, lo=1)
        unknown = [lang for lang in p.languages if lang not in KNOWN_LANGUAGES]
        if unknown:
            raise ConfigError(f"{self.name}.languages: unknown language code {unknown[0]!r}; py3langid "
                              f"knows: {', '.join(sorted(KNOWN_LANGUAGES))}.")
        self._wanted = frozenset(p.languages)
        self._identifier: Any = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_identifier"] = None  # loaded again by setup() in the process that runs the step
        return state

    def setup(self) -> None:
        if self._identifier is not None:
            return
        try:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier
        except ImportError as e:
            raise ConfigError(f"{self.name}: the language step needs the py3langid package ({e}).") from None
        # py3langid >= 0.4 loads the model with from_model_file, earlier releases with from_pickled_model.
        load = getattr(LanguageIdentifier, "from_model_file", None) or LanguageIdentifier.from_pickled_model
        identifier = load(MODEL_FILE, norm_probs=True)
        missing = self._wanted - set(identifier.nb_classes)
        if missing:
            raise ConfigError(f"{self.name}.languages: this py3langid model does not know "
                              f"{', '.join(sorted(missing))}.")
        self._identifier = identifier

    def process(self, doc: Document) -> Document | str:
        if self._identifier is None:
            self.setup()
        p = self.params
        text = doc.text if p.max_chars is None else doc.text[: p.max_chars]
        if not _LETTER.search(text):
            lang, score, wanted_score = "und", 0.0, 0.0
        else:
            ranked = self._identifier.rank(text)
            lang, score = ranked[0]
            wanted_score = score if not self._wanted else max(s for code, s in ranked if code in self._wanted)
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(float(score), 4)
        if wanted_score > p.min_score:
            return doc
        if self._wanted and lang not in self._wanted:
            return f"lang_{lang}"
        return "low_lang_score"
