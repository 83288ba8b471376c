"""Fast word, sentence and line splitting shared by the quality filters.

The published Gopher, C4 and FineWeb rules count *words*, and what a word is decides the
thresholds: datatrove (the reference implementation of those rules) splits English text with spaCy's
blank English tokenizer (`spacy.blank("en")`, no model), drops whitespace tokens, and counts sentences
with spaCy's rule-based sentencizer. Running spaCy per document is most of datatrove's time, so this
module re-implements the same tokenization rules:

- the text is cut at whitespace (`str.split()`: spaCy cuts at the same `isspace` characters);
- each chunk is split like spaCy does: exceptions first ("don't" -> "do" "n't", "Mr.", "e.g.",
  emoticons), then prefixes ("(", quotes, currency), suffixes ("," "." "'s", units after digits) and
  infixes (hyphens between letters, "." between a lower and an upper case letter, ",", "/", ":" ...),
  a URL being kept whole;
- exceptions that spaCy finds across tokens of one chunk ("8)" after "(1-8)") are merged back.

A chunk's split is computed once and cached (web text reuses its chunks heavily), so a document costs
one `str.split()` plus one dictionary lookup per chunk. Per-token facts the rules need (is it only
punctuation? does it hold a letter? its length) are cached with the chunk, so the rules sum them with
`map` instead of looping over words in Python.

Known differences from spaCy, all rare in English web text: letter classes are Unicode categories
(`\\p{L}`, `\\p{Ll}`, `\\p{Lu}`) where spaCy lists scripts; symbol "icons" are `\\p{So}`; an exception
spelt across two whitespace-separated chunks (") :" becoming "):") is not merged.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from functools import lru_cache
from itertools import chain
from operator import itemgetter

import regex

# ---------------------------------------------------------------------------------------------
# Character sets of the published rules (datatrove.utils.text).

# datatrove's PUNCTUATION: ASCII and CJK punctuation plus the C0/C1 control characters except \t \n.
PUNCTUATION = (
    "!/—”:％１〈&(、━\\【#%「」，】；+^]~“《„';’{|∶´[=-`*．（–？！：$～«〉,><》)?）。…@_.\"}►»"
    + "".join(chr(x) for a, b in ((0, 9), (11, 13), (13, 32), (127, 160)) for x in range(a, b))
)

# datatrove's TERMINAL_PUNCTUATION (sentence terminators of many scripts); FineWeb's "line ends with
# terminal punctuation" uses it.
TERMINAL_PUNCTUATION = frozenset(
    "\u0021\u002e\u003f\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e"
    "\u0964\u0965\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u17d6\u17d9\u17da\u1803"
    "\u1809\u1944\u1945\u1aa8\u1aa9\u1aaa\u1aab\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1c3b\u1c3c\u1c7e"
    "\u1c7f\u203c\u203d\u2047\u2048\u2049\u2e2e\u2e3c\u2e53\u2e54\u3002\ua4ff\ua60e\ua60f\ua6f3\ua6f7"
    "\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1\uabeb\ufe52\ufe56\ufe57"
    "\uff01\uff0e\uff1f\uff61"
    "\U00010a56\U00010a57\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87"
    "\U00010f88\U00010f89\U00011047\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141"
    "\U00011142\U00011143\U000111c5\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239"
    "\U0001123b\U0001123c\U000112a9\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca"
    "\U000115cb\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3"
    "\U000115d4\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e"
    "\U00011944\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7"
    "\U00011ef8\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44"
    "\U00016e98\U0001bc9f\U0001da88"
)

PUNCTUATION_SET = frozenset(PUNCTUATION) | TERMINAL_PUNCTUATION

# spaCy's Sentencizer.default_punct_chars: a token that is exactly one of these ends a sentence.
SENTENCE_PUNCT = TERMINAL_PUNCTUATION - frozenset(
    "\u061d\u061e\u0837\u0839\u083d\u083e\u17d4\u17d5\u17d6\u17d9\u17da\u1b7d\u1b7e\u2e53\u2e54"
    "\U00010f55\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89"
    "\U00011944\U00011946\U00011ef7\U00011ef8\U00011f43\U00011f44\U00016e98"
)

# ---------------------------------------------------------------------------------------------
# spaCy English tokenizer rules, re-expressed.

_ELLIPSES = [r"\.\.+", "…"]
_PUNCT = ["…", "……", ",", ":", ";", "!", "?", "¿", "؟", "¡", "(", ")", "[", "]", "{", "}", "<", ">", "_",
          "#", "*", "&", "。", "？", "！", "，", "、", "；", "：", "～", "·", "।", "،", "۔", "؛", "٪"]
_QUOTES = ["'", '"', "”", "“", "`", "‘", "´", "’", "‚", ",", "„", "»", "«", "「", "」", "『", "』", "（",
           "）", "〔", "〕", "【", "】", "《", "》", "\u3008", "\u3009", "\u2329", "\u232a", "⟦", "⟧"]
_HYPHENS = ["-", "–", "—", "--", "---", "——", "~"]
_CURRENCY = ["$", "£", "€", "¥", "฿", "US$", "C$", "A$", "₽", "﷼", "₴", "₠", "₡", "₢", "₣", "₤", "₥",
             "₦", "₧", "₨", "₩", "₪", "₫", "€", "₭", "₮", "₯", "₰", "₱", "₲", "₳", "₴", "₵", "₶", "₷",
             "₸", "₹", "₺", "₻", "₼", "₽", "₾", "₿"]
_UNITS = ("km km² km³ m m² m³ dm dm² dm³ cm cm² cm³ mm mm² mm³ ha µm nm yd in ft kg g mg µg t lb oz m/s "
          "km/h kmh mph hPa Pa mbar mb MB kb KB gb GB tb TB T G M K % км км² км³ м м² м³ дм дм² дм³ см "
          "см² см³ мм мм² мм³ нм кг г мг м/с км/ч кПа Па мбар Кб КБ кб Мб МБ мб Гб ГБ гб Тб ТБ тб كم كم² "
          "كم³ م م² م³ سم سم² سم³ مم مم² مم³ كم غرام جرام جم كغ ملغ كوب اكواب").split()
_ICONS = r"\p{So}"
_ALPHA = r"\p{L}"
_LOWER = r"\p{Ll}\p{Lo}"
_UPPER = r"\p{Lu}\p{Lt}\p{Lo}"


def _esc(items: Iterable[str]) -> list[str]:
    return [regex.escape(s) for s in items]


def _cls(chars: Iterable[str]) -> str:
    return "".join(regex.escape(c) for c in chars)


_QUOTE_CLASS = _cls(_QUOTES)
_PUNCT_CLASS = _cls("".join(_PUNCT) + "|")
_HYPHEN_ALT = "|".join(_esc(_HYPHENS))

_PREFIXES = (["§", "%", "=", "—", "–", r"\+(?![0-9])"] + _esc(_PUNCT) + _ELLIPSES + _esc(_QUOTES)
             + _esc(_CURRENCY) + [f"[{_ICONS}]"])
_SUFFIXES = (_esc(_PUNCT) + _ELLIPSES + _esc(_QUOTES) + [f"[{_ICONS}]"] + ["'s", "'S", "’s", "’S", "—", "–"]
             + [r"(?<=[0-9])\+",
                r"(?<=°[FfCcKk])\.",
                r"(?<=[0-9])(?:" + "|".join(_esc(_CURRENCY)) + ")",
                r"(?<=[0-9])(?:" + "|".join(_esc(_UNITS)) + ")",
                rf"(?<=[0-9{_LOWER}%²\-\+{_PUNCT_CLASS}(?:){_QUOTE_CLASS}])\.",
                rf"(?<=[{_UPPER}][{_UPPER}])\."])
_INFIXES = (_ELLIPSES + [f"[{_ICONS}]"]
            + [r"(?<=[0-9])[+\-\*^](?=[0-9-])",
               rf"(?<=[{_LOWER}{_QUOTE_CLASS}])\.(?=[{_UPPER}{_QUOTE_CLASS}])",
               rf"(?<=[{_ALPHA}]),(?=[{_ALPHA}])",
               rf"(?<=[{_ALPHA}0-9])(?:{_HYPHEN_ALT})(?=[{_ALPHA}])",
               rf"(?<=[{_ALPHA}0-9])[:<>=/](?=[{_ALPHA}])"])

# A URL (or bare host name) is one token: scheme, user info, host (a public IPv4 address or labels
# ending in a lower-case top-level domain), port, path.
_URL = (
    r"^(?:[\w+\-.]{2,}://)?(?:\S+(?::\S*)?@)?"
    r"(?:(?!(?:10|127)(?:\.\d{1,3}){3})(?!(?:169\.254|192\.168)(?:\.\d{1,3}){2})"
    r"(?!172\.(?:1[6-9]|2\d|3[01])(?:\.\d{1,3}){2})"
    r"(?:[1-9]\d?|1\d\d|2[01]\d|22[0-3])(?:\.(?:1?\d{1,2}|2[0-4]\d|25[0-5])){2}"
    r"\.(?:[1-9]\d?|1\d\d|2[0-4]\d|25[0-4])"
    r"|(?:(?:[A-Za-z0-9\u00a1-\uffff][A-Za-z0-9\u00a1-\uffff_-]{0,62})?[A-Za-z0-9\u00a1-\uffff]\.)+"
    rf"[{_LOWER}]{{2,63}})"
    r"(?::\d{2,5})?(?:[/?#]\S*)?$"
)


def _specials() -> dict[str, tuple[str, ...]]:
    """spaCy's English tokenizer exceptions: strings split (or kept whole) in a fixed way."""
    exc: dict[str, tuple[str, ...]] = {}
    both = lambda w: (w, w.title())  # noqa: E731
    for o in both("i"):
        exc[o + "'m"], exc[o + "m"] = (o, "'m"), (o, "m")
        exc[o + "'ma"], exc[o + "ma"] = (o, "'m", "a"), (o, "m", "a")
    for pron in ("i", "you", "he", "she", "it", "we", "they"):
        for o in both(pron):
            for a in ("'", ""):
                exc[f"{o}{a}ll"], exc[f"{o}{a}ll{a}ve"] = (o, a + "ll"), (o, a + "ll", a + "ve")
                exc[f"{o}{a}d"], exc[f"{o}{a}d{a}ve"] = (o, a + "d"), (o, a + "d", a + "ve")
                if pron in ("i", "you", "we", "they"):
                    exc[f"{o}{a}ve"] = (o, a + "ve")
                if pron in ("you", "we", "they"):
                    exc[f"{o}{a}re"] = (o, a + "re")
                if pron in ("he", "she", "it"):
                    exc[f"{o}{a}s"] = (o, a + "s")
    for word, number in (("who", 0), ("what", 0), ("when", 0), ("where", 0), ("why", 0), ("how", 0),
                         ("there", 0), ("that", 1), ("this", 1), ("these", 2), ("those", 2)):
        for o in both(word):
            if number != 2:
                exc[o + "'s"], exc[o + "s"] = (o, "'s"), (o, "s")
            for a in ("'", ""):
                exc[f"{o}{a}ll"], exc[f"{o}{a}ll{a}ve"] = (o, a + "ll"), (o, a + "ll", a + "ve")
                if number != 1:
                    exc[f"{o}{a}re"], exc[f"{o}{a}ve"] = (o, a + "re"), (o, a + "ve")
                exc[f"{o}{a}d"], exc[f"{o}{a}d{a}ve"] = (o, a + "d"), (o, a + "d", a + "ve")
    for verb in ("ca", "could", "do", "does", "did", "had", "may", "might", "must", "need", "ought", "sha",
                 "should", "wo", "would"):
        for o in both(verb):
            exc[o + "n't"], exc[o + "nt"] = (o, "n't"), (o, "nt")
            exc[o + "n't've"], exc[o + "ntve"] = (o, "n't", "'ve"), (o, "nt", "ve")
    for verb in ("could", "might", "must", "should", "would"):
        for o in both(verb):
            exc[o + "'ve"], exc[o + "ve"] = (o, "'ve"), (o, "ve")
    for verb in ("ai", "are", "is", "was", "were", "have", "has", "dare"):
        for o in both(verb):
            exc[o + "n't"], exc[o + "nt"] = (o, "n't"), (o, "nt")
    for word in ("doin", "goin", "nothin", "nuthin", "ol", "somethin"):
        for o in both(word):
            exc[o], exc[o + "'"] = (o,), (o + "'",)
    for word in ("em", "ll", "nuff"):
        exc[word], exc["'" + word] = (word,), ("'" + word,)
    for h in range(1, 13):
        for period in ("a.m.", "am", "p.m.", "pm"):
            exc[f"{h}{period}"] = (str(h), period)
    exc.update({
        "y'all": ("y'", "all"), "yall": ("y", "all"), "how'd'y": ("how", "'d", "'y"),
        "How'd'y": ("How", "'d", "'y"), "not've": ("not", "'ve"), "notve": ("not", "ve"),
        "Not've": ("Not", "'ve"), "Notve": ("Not", "ve"), "cannot": ("can", "not"), "Cannot": ("Can", "not"),
        "gonna": ("gon", "na"), "Gonna": ("Gon", "na"), "gotta": ("got", "ta"), "Gotta": ("Got", "ta"),
        "let's": ("let", "'s"), "Let's": ("Let", "'s"), "c'mon": ("c'm", "on"), "C'mon": ("C'm", "on"),
    })
    whole = (
        "'S 's \u2018S \u2018s and/or w/o 're 'Cause 'cause 'cos 'Cos 'coz 'Coz 'cuz 'Cuz 'bout ma'am Ma'am "
        "o'clock O'clock lovin' Lovin' lovin Lovin havin' Havin' havin Havin doin' Doin' doin Doin goin' "
        "Goin' goin Goin Mt. Ak. Ala. Apr. Ariz. Ark. Aug. Calif. Colo. Conn. Dec. Del. Feb. Fla. Ga. Ia. "
        "Id. Ill. Ind. Jan. Jul. Jun. Kan. Kans. Ky. La. Mar. Mass. Mich. Minn. Miss. N.C. N.D. N.H. N.J. "
        "N.M. N.Y. Neb. Nebr. Nev. Nov. Oct. Okla. Ore. Pa. S.C. Sep. Sept. Tenn. Va. Wash. Wis. "
        "'d a.m. Adm. Bros. co. Co. Corp. D.C. Dr. e.g. E.g. E.G. Gen. Gov. i.e. I.e. I.E. Inc. Jr. Ltd. Md. "
        "Messrs. Mo. Mont. Mr. Mrs. Ms. p.m. Ph.D. Prof. Rep. Rev. Sen. St. vs. v.s."
    )
    for o in whole.split():
        exc[o] = (o,)
    for o in ("Ill", "ill", "Its", "its", "Hell", "hell", "Shell", "shell", "Shed", "shed", "were", "Were",
              "Well", "well", "Whore", "whore"):
        exc.pop(o, None)
    # Language-independent exceptions: letters with a period, emoticons, a few symbols.
    base = [" ", "\t", "\\t", "\n", "\\n", "\u2014", "\u00a0", "'", '\\")', "<space>", "''", "C++", "ä.",
            "ö.", "ü."] + [f"{c}." for c in "abcdefghijklmnopqrstuvwxyz"]
    base += (
        r""":) :-) :)) :-)) :))) :-))) (: (-: =) (= :] :-] [: [-: [= =] :o) (o: :} :-} 8) 8-) (-8 ;) ;-) """
        r"""(; (-; :( :-( :(( :-(( :((( :-((( ): )-: =( >:( :') :'-) :'( :'-( :/ :-/ =/ =| :| :-| ]= =[ """
        r""":1 :P :-P :p :-p :O :-O :o :-o :0 :-0 :() >:o :* :-* :3 :-3 =3 :> :-> :X :-X :x :-x :D :-D """
        r""";D ;-D =D xD XD xDD XDD 8D 8-D ^_^ ^__^ ^___^ >.< >.> <.< ._. ;_; -_- -__- v.v V.V v_v V_V """
        r"""o_o o_O O_o O_O 0_o o_0 0_0 o.O O.o O.O o.o 0.0 o.0 0.o @_@ <3 <33 <333 </3 (^_^) (-_-) """
        r"""(._.) (>_<) (*_*) (¬_¬) ಠ_ಠ ಠ︵ಠ (ಠ_ಠ) ¯\(ツ)/¯ (╯°□°）╯︵┻━┻ ><(((*>"""
    ).split()
    out = {o: (o,) for o in base}
    for u in "cfkCFK":
        out[f"°{u}."] = ("°", u, ".")
    out.update(exc)
    # Every exception with a straight apostrophe also exists with a curly one.
    for key, pieces in list(out.items()):
        if "'" in key:
            curly = key.replace("'", "’")
            if curly not in out:
                out[curly] = tuple(p.replace("'", "’") for p in pieces)
    return out


_MAX_SUFFIX = 6  # longest fixed suffix ("اكواب", a unit) is 5 characters; "..+" is handled apart
_SIMPLE = re.compile(r"([A-Za-z]+|[0-9]+)([,;:!?]|(?<=[a-z0-9])\.)?").fullmatch


class _Tokenizer:
    """spaCy's English tokenization of one whitespace-free chunk (see the module docstring)."""

    def __init__(self) -> None:
        self.specials = _specials()
        self.prefix = regex.compile("|".join(_PREFIXES)).match
        self._suffix = regex.compile("|".join(p + "$" for p in _SUFFIXES)).search
        self.infixes = regex.compile("|".join(_INFIXES)).finditer
        self.url = regex.compile(_URL).match
        # Exceptions that contain an affix are also matched over the tokens of a chunk and merged.
        self.merges: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
        for key, pieces in self.specials.items():
            if self.prefix(key) or self.suffix(key) or any(True for _ in self.infixes(key)) or " " in key:
                pattern = tuple(self._split(key, use_specials=False))
                if len(pattern) > 1:
                    self.merges.setdefault(pattern[0], []).append((pattern, pieces))
        for options in self.merges.values():
            options.sort(key=lambda o: -len(o[0]))

    def suffix(self, s: str) -> int:
        """Length of the suffix spaCy splits off `s` (its leftmost match ending at the end), 0 if none."""
        if s.endswith(".."):  # a run of dots: the leftmost possible match, however long
            return len(s) - len(s.rstrip("."))
        # Other suffixes are at most _MAX_SUFFIX characters long, so only the tail needs searching
        # (lookbehinds still see the characters before `pos`).
        m = self._suffix(s, max(0, len(s) - _MAX_SUFFIX))
        return m.end() - m.start() if m else 0

    def __call__(self, chunk: str) -> tuple[str, ...]:
        special = self.specials.get(chunk)
        if special is not None:
            return special
        fast = _SIMPLE(chunk)
        if fast is not None:
            # A plain word or number, maybe with one trailing punctuation mark: what the rules below give.
            core, mark = fast.groups()
            if core not in self.specials and core not in self.merges:
                return (core, mark) if mark else (core,)
        tokens = self._split(chunk, use_specials=True)
        if len(tokens) > 1 and self.merges:
            tokens = self._merge(tokens)
        return tuple(tokens)

    def _split(self, s: str, use_specials: bool) -> list[str]:
        specials = self.specials if use_specials else {}
        prefixes: list[str] = []
        suffixes: list[str] = []
        last = -1
        while s and len(s) != last:
            if s in specials:
                break
            last = len(s)
            m = self.prefix(s)
            pre_len = m.end() if m else 0
            if pre_len:
                minus_pre = s[pre_len:]
                if minus_pre and minus_pre in specials:
                    prefixes.append(s[:pre_len])
                    s = minus_pre
                    break
            suf_len = self.suffix(s[pre_len:])
            if suf_len:
                minus_suf = s[:-suf_len]
                if minus_suf and minus_suf in specials:
                    suffixes.append(s[-suf_len:])
                    s = minus_suf
                    break
            if pre_len and suf_len and pre_len + suf_len <= len(s):
                prefixes.append(s[:pre_len])
                suffixes.append(s[-suf_len:])
                s = s[pre_len:-suf_len]
            elif pre_len:
                prefixes.append(s[:pre_len])
                s = s[pre_len:]
            elif suf_len:
                suffixes.append(s[-suf_len:])
                s = s[:-suf_len]
        tokens = prefixes
        if s:
            special = specials.get(s)
            if special is not None:
                tokens.extend(special)
            elif self.url(s):
                tokens.append(s)
            else:
                start = 0
                for m in self.infixes(s):
                    a, b = m.span()
                    if a == 0:
                        continue
                    if a != start:
                        tokens.append(s[start:a])
                    if a != b:
                        tokens.append(s[a:b])
                    start = b
                if s[start:]:
                    tokens.append(s[start:])
        tokens.extend(reversed(suffixes))
        return tokens

    def _merge(self, tokens: list[str]) -> list[str]:
        # Longest exception first, then leftmost; overlapping candidates are skipped (spaCy's filter).
        found = []
        for i, tok in enumerate(tokens):
            for pattern, pieces in self.merges.get(tok, ()):
                n = len(pattern)
                if tuple(tokens[i:i + n]) == pattern:
                    found.append((n, i, pieces))
        if not found:
            return tokens
        found.sort(key=lambda f: (-f[0], f[1]))
        taken: set[int] = set()
        chosen = []
        for n, i, pieces in found:
            if i not in taken and i + n - 1 not in taken:
                chosen.append((i, n, pieces))
            taken.update(range(i, i + n))
        chosen.sort()
        out: list[str] = []
        pos = 0
        for i, n, pieces in chosen:
            out.extend(tokens[pos:i])
            out.extend(pieces)
            pos = i + n
        out.extend(tokens[pos:])
        return out


class _TokenInfo(dict):
    """token -> (non-symbol 0/1, its length if non-symbol, holds a letter 0/1, sentencizer class).

    A token is "non-symbol" when one of its characters is outside `PUNCTUATION_SET` (datatrove's
    Gopher rules). The sentencizer class is "P" for a sentence-ending token ("." "!" "?" ...), "Q" for
    other punctuation (every character in a Unicode P* category, spaCy's `is_punct`), "W" otherwise.
    """

    def __missing__(self, tok: str) -> tuple[int, int, int, str]:
        non_symbol = not PUNCTUATION_SET.issuperset(tok)
        if tok in SENTENCE_PUNCT:
            cls = "P"
        elif all(unicodedata.category(c)[0] == "P" for c in tok):
            cls = "Q"
        else:
            cls = "W"
        info = (int(non_symbol), len(tok) if non_symbol else 0, int(any(c.isalpha() for c in tok)), cls)
        if len(self) >= 100_000:
            self.clear()
        self[tok] = info
        return info


_TOKENS = _TokenInfo()


class _ChunkCache(dict):
    """chunk -> (tokens, n_non_symbol, non_symbol_chars, n_with_alpha, sentencizer classes)."""

    max_size = 100_000

    def __missing__(self, chunk: str) -> tuple:
        tokens = TOKENIZER(chunk)
        if len(tokens) == 1:
            entry = (tokens, *_TOKENS[tokens[0]])
        else:
            infos = list(map(_TOKENS.__getitem__, tokens))
            entry = (tokens, sum(i[0] for i in infos), sum(i[1] for i in infos), sum(i[2] for i in infos),
                     "".join(i[3] for i in infos))
        if len(self) >= self.max_size:
            self.clear()
        self[chunk] = entry
        return entry


class _LazyTokenizer:
    """Builds the tokenizer (its regexes and exception table, ~0.05 s) on first use in a process."""

    _tok: _Tokenizer | None = None

    def __call__(self, chunk: str) -> tuple[str, ...]:
        if self._tok is None:
            type(self)._tok = _Tokenizer()
        return self._tok(chunk)  # type: ignore[misc]


TOKENIZER = _LazyTokenizer()
_CHUNKS = _ChunkCache()
_get_tokens = itemgetter(0)
_get_nonsym = itemgetter(1)
_get_nonsym_chars = itemgetter(2)
_get_alpha = itemgetter(3)


class Words:
    """The words of one text as datatrove's `split_into_words` gives them, with the counts the rules use.

    `words`: the tokens (punctuation tokens included, whitespace excluded); `n_non_symbol`: words with
    at least one character outside `PUNCTUATION_SET`; `non_symbol_chars`: their total length;
    `n_alpha`: words holding at least one alphabetic character.
    """

    __slots__ = ("_entries", "_words", "n_words", "n_non_symbol", "non_symbol_chars", "n_alpha")

    def __init__(self, text: str):
        entries = list(map(_CHUNKS.__getitem__, text.split()))
        self._entries = entries
        self._words: list[str] | None = None
        self.n_non_symbol = sum(map(_get_nonsym, entries))
        self.non_symbol_chars = sum(map(_get_nonsym_chars, entries))
        self.n_alpha = sum(map(_get_alpha, entries))
        self.n_words = sum(map(len, map(_get_tokens, entries)))

    @property
    def words(self) -> list[str]:
        if self._words is None:
            self._words = list(chain.from_iterable(map(_get_tokens, self._entries)))
        return self._words


@lru_cache(maxsize=8)
def analyze(text: str) -> Words:
    """Words of `text`, cached for the few most recent texts (consecutive filters share the split)."""
    return Words(text)


def split_into_words(text: str) -> list[str]:
    """The same list as datatrove's `split_into_words(text, "en")`."""
    return analyze(text).words


_SENTENCE_BREAK = re.compile("P[PQ]*W")


def count_sentences(line: str) -> int:
    """How many sentences spaCy's sentencizer finds in `line` (which must not be empty).

    A sentence ends at a token that is a sentence-ending character ("." "!" "?"...) and the next one
    starts at the first following token that is not punctuation. Whitespace other than a single space
    forms a token of its own (spaCy keeps such runs as tokens), which also starts a sentence.
    """
    parts = line.split()
    if len(parts) == 1:
        classes = _CHUNKS[parts[0]][4]
    else:
        pieces = re.split(r"(\s+)", line.strip())
        out = []
        for i, piece in enumerate(pieces):
            if i % 2:
                if piece != " ":
                    out.append("W")
            elif piece:
                out.append(_CHUNKS[piece][4])
        classes = "".join(out)
    return 1 + len(_SENTENCE_BREAK.findall(classes))
