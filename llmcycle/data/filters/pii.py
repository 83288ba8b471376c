"""PII redaction: e-mail addresses, IP addresses, phone numbers and credit-card numbers.

Each match is replaced by a typed placeholder and counted in `counters[kind]`; documents are never
dropped. Kinds run in this order, each on the text the previous one left:

- `email` -> `<EMAIL>`: local@domain.tld (ASCII local part of letters, digits and `._%+-`; a domain
  of dot-separated labels and an alphabetic top-level domain).
- `credit_card` -> `<CREDIT_CARD>`: 13-19 digits, optionally in groups of 3-6 separated by single
  spaces or dashes, first digit 2-6 (the payment-card industries), and a valid Luhn checksum.
  Numbers failing the checksum are left alone.
- `ip` -> `<IP_ADDRESS>`: IPv4 dotted quads with valid octets (not inside a longer dotted number such
  as a version "1.2.3.4.5"), except 0.0.0.0, loopback 127.x.x.x and 255.x.x.x masks/broadcast, which
  identify no one; private ranges are redacted (they still map a network). IPv6 addresses that
  Python's `ipaddress` accepts, holding a digit and either three non-empty groups or a 4-digit group
  (so slices like `x[1::2]` stay), except `::` and `::1`.
- `phone` -> `<PHONE_NUMBER>`: international numbers (+ country code, 8-15 digits in groups that may
  be separated by spaces, dots, dashes or a bracketed area code); North-American numbers written
  with separators (415-555-2671, (415) 555-2671, 415.555.2671, 1-800-555-1234); European national
  numbers with a leading 0 and separators (020 7946 0958, 01 23 45 67 89, 030/1234567) holding 9-12
  digits. Plain digit runs, dates (2021-03-04, 03/04/2021, 12.05.2020), ZIP+4 codes (02134-1234) and
  versions (1.2.3) are not matched.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError

KINDS = ("email", "credit_card", "ip", "phone")
PLACEHOLDERS = {"email": "<EMAIL>", "credit_card": "<CREDIT_CARD>", "ip": "<IP_ADDRESS>",
                "phone": "<PHONE_NUMBER>"}

EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![\w-])"
)
CARD = re.compile(r"(?<![\w-])[2-6]\d{2,5}(?:[ -]?\d{3,6}){1,5}(?![\w]|[ -]?\d)")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = re.compile(rf"(?<![\w.])({_OCTET})\.{_OCTET}\.{_OCTET}\.{_OCTET}(?![\w]|\.\d)")
IPV6 = re.compile(
    r"(?<![\w:.])[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?::\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d)")
PHONE = re.compile(
    r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(0\))?(?:[ .-]?\(\d{1,4}\)|[ .-]?\d{1,5}){2,6}(?![\w-]|\.\d)"
    r"|(?<![\w.+/-])(?:1[ .-])?(?:\([2-9]\d{2}\)[ .-]?|[2-9]\d{2}[ .-])[2-9]\d{2}[ .-]\d{4}(?![\w-]|[./]\d)"
    r"|(?<![\w.+/-])0\d{1,4}(?:[ .\-/]\d{2,8}){1,4}(?![\w-]|[./]\d)"
)
_DATE_LIKE = re.compile(r"^\d{1,2}([./-])\d{1,2}\1\d{2,4}$|^\d{4}([./-])\d{1,2}\2\d{1,2}$")
_ZIP4 = re.compile(r"^\d{5}-\d{4}$")
_NANP = re.compile(r"^(?:1[ .-])?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}$")


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _card(m: re.Match) -> str | None:
    digits = re.sub(r"[ -]", "", m.group())
    return PLACEHOLDERS["credit_card"] if 13 <= len(digits) <= 19 and luhn_ok(digits) else None


def _ipv4(m: re.Match) -> str | None:
    first = int(m.group(1))
    if m.group() == "0.0.0.0" or first in (127, 255):
        return None
    return PLACEHOLDERS["ip"]


def _ipv6(m: re.Match) -> str | None:
    s = m.group()
    groups = [g for g in s.split(":") if g]
    if not any(c.isdigit() for c in s) or (len(groups) < 3 and max(map(len, groups), default=0) < 4):
        return None  # "x[1::2]" (a slice) or "dead::beef": too little to be an address
    try:
        addr = ipaddress.IPv6Address(s)
    except ValueError:
        return None
    if addr.is_unspecified or addr.is_loopback:
        return None
    return PLACEHOLDERS["ip"]


def _phone(m: re.Match) -> str | None:
    s = m.group()
    digits = sum(c.isdigit() for c in s)
    if s.startswith("+"):
        return PLACEHOLDERS["phone"] if 8 <= digits <= 15 else None
    if _NANP.match(s):
        return PLACEHOLDERS["phone"]
    if _DATE_LIKE.match(s) or _ZIP4.match(s):
        return None
    return PLACEHOLDERS["phone"] if 9 <= digits <= 12 else None


@dataclasses.dataclass
class PiiParams:
    kinds: list[str] = F(list(KINDS), f"What to redact, among: {', '.join(KINDS)}.")


@register_step
class Pii(MapStep):
    """Replace e-mail addresses, IP addresses, phone and credit-card numbers by typed placeholders."""

    name = "pii"
    Params = PiiParams

    def __init__(self, params: PiiParams | None = None):
        super().__init__(params)
        unknown = [k for k in self.params.kinds if k not in KINDS]
        if unknown:
            raise ConfigError(
                f"{self.name}.kinds: unknown kind {unknown[0]!r}; choose among: {', '.join(KINDS)}.")
        self._kinds = [k for k in KINDS if k in self.params.kinds]

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        """The text with PII replaced, and how many of each kind were replaced."""
        counts: dict[str, int] = {}
        for kind in self._kinds:
            if kind == "email":
                if "@" in text:
                    text, n = EMAIL.subn(PLACEHOLDERS["email"], text)
                    counts["email"] = n
            elif kind == "credit_card":
                text, counts["credit_card"] = _sub(CARD, _card, text)
            elif kind == "ip":
                text, n4 = _sub(IPV4, _ipv4, text) if "." in text else (text, 0)
                text, n6 = _sub(IPV6, _ipv6, text) if "::" in text or text.count(":") >= 7 else (text, 0)
                counts["ip"] = n4 + n6
            elif kind == "phone":
                text, counts["phone"] = _sub(PHONE, _phone, text)
        return text, counts

    def process(self, doc: Document) -> Document | str:
        text, counts = self.redact(doc.text)
        for kind, n in counts.items():
            if n:
                self.counters[kind] += n
        if text != doc.text:
            doc.text = text
        return doc


def _sub(pattern: re.Pattern, replace, text: str) -> tuple[str, int]:
    """pattern.sub where `replace` may decline a match (returns None: the text is kept)."""
    n = 0

    def repl(m: re.Match) -> str:
        nonlocal n
        out = replace(m)
        if out is None:
            return m.group()
        n += 1
        return out

    return pattern.sub(repl, text), n
