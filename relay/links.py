"""Which links may be tracked: the skip rules shared by the HTML and text rewriters.

A tracked link sends the reader through our receiver first. That is harmless
for an article link and harmful for some others, so these are never rewritten:

* anything that is not ``http``/``https`` with a host (mailto, tel, sms, #,
  javascript, data, relative and protocol-relative URLs);
* template placeholders (``{{..}}``, ``*|..|*``, ``%%..%%``, ``${..}``): the
  sender's mail-merge fills them later, a token would freeze the placeholder;
* our own tracking host (already tracked, or the "stop tracking me" page);
* unsubscribe and password-reset links (a scanner "clicking" them through the
  receiver would count as a click, and people rightly distrust redirects
  there) and signed URLs (``signature=``, ``X-Amz-Signature``, ``expires=``),
  which some services refuse when the Referer or the hop changes.

Host names are compared after IDNA (UTS 46) conversion: the stdlib ``idna``
codec implements IDNA 2003 and maps ``straße`` to ``strasse``, another domain.
"""

from __future__ import annotations

import re
from functools import lru_cache
from urllib.parse import urlsplit

import idna

SCHEMES = ("http", "https")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\*\||\|\*|%%|\$\{|\{%|%\}")
_SENSITIVE = re.compile(  # applied to the lower-cased URL
    r"unsub(?:scribe|[/?=&._-])|opt-?out|pass(?:word|wd)|reset[-_]?pass|/reset\b"
    r"|[?&;](?:signature|x-amz-signature|x-goog-signature|sig|expires)="
)
_SENSITIVE_HINTS = ("unsub", "opt", "pass", "reset", "sig", "expires")
_INNER_WHITESPACE = re.compile(r"[\t\n\r]")
HTML_WHITESPACE = "\t\n\f\r "


def clean_url(value: str) -> str:
    """What a browser navigates to for an attribute value (HTML URL parsing):
    leading/trailing C0 space stripped, tabs and newlines inside removed."""
    value = value.strip(HTML_WHITESPACE + "\x00\x0b")
    if "\t" in value or "\n" in value or "\r" in value:
        value = _INNER_WHITESPACE.sub("", value)
    return value


@lru_cache(maxsize=4096)
def ascii_host(host: str) -> str:
    """A host name in its ASCII (A-label) form, lower-cased; '' if invalid."""
    host = host.strip().rstrip(".").lower()
    if host.isascii():
        return host
    try:
        return idna.encode(host, uts46=True).decode("ascii")
    except idna.IDNAError:
        return ""


@lru_cache(maxsize=4096)
def skip_reason(url: str, tracking_host: str) -> str:
    """Why ``url`` must not be tracked, or '' when it may be (pure, so cached:
    a newsletter sent to each recipient separately asks about the same links)."""
    if not url:
        return "empty"
    if _PLACEHOLDER.search(url):
        return "placeholder"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "malformed"
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        return f"scheme:{scheme}" if scheme else "relative"
    if not host:
        return "no-host"
    if ascii_host(host) == tracking_host:
        return "tracking-host"
    lowered = url.lower()
    if any(hint in lowered for hint in _SENSITIVE_HINTS) and _SENSITIVE.search(lowered):
        return "sensitive"
    return ""
