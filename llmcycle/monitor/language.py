"""A prompt's language, for drift: py3langid (the data stage's language model, shipped in its wheel),
loaded once per process."""

from __future__ import annotations

import functools
import re
from typing import Any

_LETTER = re.compile(r"[^\W\d_]")
MAX_CHARS = 2000  # enough to tell a language; a long prompt need not be read whole


@functools.cache
def _identifier() -> Any:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    load = getattr(LanguageIdentifier, "from_model_file", None) or LanguageIdentifier.from_pickled_model
    return load(MODEL_FILE, norm_probs=True)


MIN_LETTERS = 12  # below this a guess is noise ("hi" came out Estonian): undetermined


def language_of(text: str) -> str:
    """py3langid's code for the text's language; "und" when it has fewer than 12 letters."""
    text = text[:MAX_CHARS]
    if len(_LETTER.findall(text)) < MIN_LETTERS:
        return "und"
    return _identifier().classify(text)[0]
