"""URL / domain blocklist: drop documents whose `metadata["url"]` is listed.

Files hold one entry per line; blank lines and text after `#` are ignored.

- `domains_file`: host names. A document is dropped ("domain") when its URL's host, or any parent
  domain of it, is listed: `example.com` blocks `example.com`, `www.example.com` and
  `a.b.example.com`, not `notexample.com`. Entries may be written `*.example.com`, `.example.com`,
  or as a URL (its host is taken). Comparison is case-insensitive, with a trailing dot and a port
  ignored, and internationalized names compared in their ASCII (punycode) form.
- `urls_file`: whole URLs, dropped ("url") on an exact match after normalization: scheme, user info
  and fragment are ignored, host lower-cased (with `www.` kept), default ports removed, an empty path
  taken as `/`, a trailing `/` on a longer path removed; path and query compared as written.

Reason names follow datatrove's `URLFilter` ("domain", "url"). Documents without a URL are kept and
counted in `counters["no_url"]`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from urllib.parse import urlsplit

from llmcycle.config import field_help as F
from llmcycle.data.document import Document
from llmcycle.data.steps import MapStep, register_step
from llmcycle.errors import ConfigError


def _read_entries(path: str) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            entry = line.split("#", 1)[0].strip()
            if entry:
                out.append(entry)
    return out


def normalize_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("*."):
        host = host[2:]
    host = host.lstrip(".")
    if host.startswith("[") and "]" in host:  # IPv6 literal
        return host[: host.index("]") + 1]
    host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            pass
    return host


def _split(url: str):
    url = url.strip()
    if "://" not in url and not url.startswith("//"):
        url = "//" + url  # "example.com/page": a host, not a path
    return urlsplit(url)


def url_host(url: str) -> str | None:
    try:
        host = _split(url).hostname
    except ValueError:
        return None
    return normalize_host(host) if host else None


def normalize_url(url: str) -> str | None:
    """The form URLs are compared in: host[:port]/path[?query] (see the module docstring)."""
    try:
        parts = _split(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return None
    if not host:
        return None
    host = normalize_host(host)
    scheme = parts.scheme.lower()
    default_port = (scheme in ("http", "") and port == 80) or (scheme == "https" and port == 443)
    if port is not None and not default_port:
        host = f"{host}:{port}"
    path = parts.path or "/"
    if len(path) > 1 and path.endswith("/"):
        path = path.rstrip("/") or "/"
    return host + path + (f"?{parts.query}" if parts.query else "")


@dataclasses.dataclass
class UrlBlocklistParams:
    domains_file: str | None = F(None, "File of blocked host names, one per line (subdomains too).")
    urls_file: str | None = F(None, "File of blocked URLs, one per line (exact match after normalization).")


@register_step
class UrlBlocklist(MapStep):
    """Drop documents whose URL or domain is on a blocklist file."""

    name = "url_blocklist"
    Params = UrlBlocklistParams

    def __init__(self, params: UrlBlocklistParams | None = None):
        super().__init__(params)
        p = self.params
        if p.domains_file is None and p.urls_file is None:
            raise ConfigError(f"{self.name}: give domains_file, urls_file or both.")
        for key in ("domains_file", "urls_file"):
            path = getattr(p, key)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{self.name}.{key}: {path} is not a file.")
        self._domains: frozenset[str] | None = None
        self._urls: frozenset[str] = frozenset()

    def setup(self) -> None:
        if self._domains is not None:
            return
        p = self.params
        domains: set[str] = set()
        if p.domains_file:
            for entry in _read_entries(p.domains_file):
                host = url_host(entry) if "/" in entry else normalize_host(entry)
                if host:
                    domains.add(host)
        urls: set[str] = set()
        if p.urls_file:
            for entry in _read_entries(p.urls_file):
                key = normalize_url(entry)
                if key:
                    urls.add(key)
        self._domains, self._urls = frozenset(domains), frozenset(urls)

    def process(self, doc: Document) -> Document | str:
        if self._domains is None:
            self.setup()
        url = doc.metadata.get("url")
        if not url or not isinstance(url, str):
            self.counters["no_url"] += 1
            return doc
        if self._domains:
            host = url_host(url)
            if host:
                if host in self._domains:
                    return "domain"
                labels = host.split(".")
                for i in range(1, len(labels)):
                    if ".".join(labels[i:]) in self._domains:
                        return "domain"
        if self._urls and normalize_url(url) in self._urls:
            return "url"
        return doc
