"""Find the links of a text/plain body, for policies that track text links.

Pure: a ``str`` in, link spans out. Plain text has no markup to say where a URL
ends, so this follows what mail clients linkify: ``http(s)://`` up to
whitespace, quotes or angle brackets, minus trailing punctuation (a sentence's
full stop is not part of the URL) and an unbalanced closing parenthesis.
A URL broken over two lines is only seen up to the break, so the rewriter
would track a truncated URL: a URL that runs to the end of a line ending in
``=``/``-`` or is followed directly by more URL-ish text on the next line is
skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.html import Edit
from relay.links import skip_reason

_URL = re.compile(r"https?://[^\s<>\"'`{}|\\^\[\]]+", re.IGNORECASE)
_TRAILING = ".,;:!?"


@dataclass(frozen=True)
class TextLink:
    start: int
    end: int
    url: str
    skip: str


def scan(text: str, tracking_host: str) -> list[TextLink]:
    """Every http(s) URL in ``text`` with its skip reason ('' = trackable)."""
    links: list[TextLink] = []
    for match in _URL.finditer(text):
        start, url = match.start(), match.group()
        url = url.rstrip(_TRAILING)
        if url.endswith(")") and url.count("(") < url.count(")"):
            url = url[:-1].rstrip(_TRAILING)
        end = start + len(url)
        reason = skip_reason(url, tracking_host)
        if not reason and _continues(text, end):
            reason = "wrapped"
        links.append(TextLink(start, end, url, reason))
    return links


def _continues(text: str, end: int) -> bool:
    """Does the URL seem to go on past a line break?"""
    if not text.startswith(("\r\n", "\n"), end):
        return False
    next_line = text[end:].lstrip("\r\n")
    return bool(next_line) and not next_line[0].isspace() and text[end - 1] in "/-=?&"


def edits_for(links: list[TextLink], urls: list[str]) -> list[Edit]:
    """Replace each tracked link (``skip == ''``) with the matching URL."""
    tracked = [link for link in links if not link.skip]
    if len(tracked) != len(urls):
        raise ValueError(f"{len(urls)} URLs for {len(tracked)} tracked links")
    return [Edit(link.start, link.end, url) for link, url in zip(tracked, urls, strict=True)]
