"""Rewrite links and add the open pixel in an HTML document, by splicing.

Pure: a ``str`` goes in, edits and counts come out; no SMTP, no MIME, no I/O.

Why a splicer and not a parser + serialiser: selectolax (like any HTML5
parser) normalises what it writes back — doctype, attribute quoting, case,
entities turned into raw characters — about 1,600 changed characters on a
51 KB newsletter, any of which may matter to some mail client. So this module
finds the byte spans of ``href`` values with a small tokenizer that follows the
HTML5 rules that matter here (comments, raw-text elements, attribute quoting)
and replaces only those spans and inserts only the pixel.

Two things an HTML5 parser cannot do for us:

* Outlook's VML buttons (``<v:roundrect href=...>``) live inside
  ``<!--[if mso]>`` conditional comments, which a parser sees as one comment.
  The splicer looks inside conditional comments for ``href`` attributes.
* Attribute values are decoded by the HTML5 "character reference in
  attribute value" rule, not ``html.unescape``: ``?a=1&region=eu`` keeps
  ``&region`` literal (``&reg`` is a legacy entity, but inside an attribute a
  reference not ended by ``;`` and followed by ``=`` or an alphanumeric is not
  decoded), where ``html.unescape`` yields ``®ion=eu``, a different URL.

selectolax is still used, to check: it must see the same ``<a>``/``<area>``
hrefs as the splicer; if not (malformed markup the small tokenizer reads
differently), links are left alone and only the pixel is inserted.
"""

from __future__ import annotations

import html as stdlib_html
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from html.entities import html5 as _ENTITIES
from typing import NamedTuple

from selectolax.lexbor import LexborHTMLParser

from relay.links import clean_url, skip_reason

PIXEL_STYLE = (
    "display:block;width:1px;height:1px;border:0;margin:0;padding:0;overflow:hidden;opacity:0"
)

_SCAN = re.compile(  # every alternative starts with '<', so the engine can skip ahead fast
    r"<(?:!--"
    r"|(?P<tag>[aA]|[aA][rR][eE][aA]|script|style|textarea|title|xmp|iframe|noembed|noframes"
    r"|plaintext)(?=[\t\n\f\r />])"
    r"|/(?P<end>body|html)(?=[\t\n\f\r />]))",
    re.IGNORECASE,
)
# One attribute (or the end of the tag), HTML5 tokenizer states condensed.
_ATTR = re.compile(
    r"[\t\n\f\r /]*(?:(>)|([^\t\n\f\r />][^\t\n\f\r />=]*)"
    r"(?:[\t\n\f\r ]*=[\t\n\f\r ]*"
    r"(?:\"([^\"]*)\"|'([^']*)'|([^\t\n\f\r >]*)))?)"
)
_RAW_END = {
    name: re.compile(rf"</{name}(?=[\t\n\f\r />])", re.IGNORECASE)
    for name in ("script", "style", "textarea", "title", "xmp", "iframe", "noembed", "noframes")
}
_COMMENT_END = re.compile(r"--!?>")
_IN_COMMENT_TAG = re.compile(r"<(?P<tag>a|area|v:[a-z]+)(?=[\t\n\f\r />])", re.IGNORECASE)
_CHARREF = re.compile(r"&(?:#[xX]([0-9a-fA-F]+);?|#([0-9]+);?|([A-Za-z][A-Za-z0-9]*)(;?))")
_LEGACY_MAX = max(len(k) for k in _ENTITIES if not k.endswith(";"))
_INVALID_CHARREFS: dict[int, str] = stdlib_html._invalid_charrefs  # type: ignore[attr-defined]
_OPT_OUT = ("data-notrack", "ses:no-track", "disable-tracking", "clicktracking")


class Edit(NamedTuple):
    """Replace ``text[start:end]`` with ``new``."""

    start: int
    end: int
    new: str


@dataclass(frozen=True)
class Href:
    """An ``href`` found by the splicer; ``start:end`` spans the raw value."""

    start: int
    end: int
    url: str  # decoded by HTML5 rules, whitespace-cleaned: what a click opens
    element: str  # 'a', 'area', 'v:roundrect', ...
    in_comment: bool
    skip: str  # '' when it may be tracked, else the reason
    markers: tuple[tuple[int, int], ...] = ()  # opt-out attributes to delete


@dataclass(frozen=True)
class Scan:
    """What the splicer found in one document."""

    hrefs: list[Href]
    pixel_at: int
    agreed: bool
    disagreement: str = ""

    @property
    def tracked(self) -> list[Href]:
        return [h for h in self.hrefs if not h.skip] if self.agreed else []

    def skipped(self) -> Counter[str]:
        return Counter(h.skip for h in self.hrefs if h.skip)


def decode_attribute(value: str) -> str:
    """Decode character references in an attribute value (HTML5 rules)."""
    if "&" not in value:
        return value
    if value.count("&") == value.count("&amp;"):  # the usual case: only &amp; (no re-scan)
        return value.replace("&amp;", "&")
    return _CHARREF.sub(_charref, value)


def _charref(match: re.Match[str]) -> str:
    hex_digits, dec_digits, name, semicolon = match.groups()
    if name is None:
        code = int(hex_digits, 16) if hex_digits is not None else int(dec_digits)
        if code in _INVALID_CHARREFS:
            return _INVALID_CHARREFS[code]
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            return "\ufffd"
        return chr(code)
    if semicolon and name + ";" in _ENTITIES:
        return _ENTITIES[name + ";"]
    text = match.group()
    for size in range(min(len(name), _LEGACY_MAX), 1, -1):
        prefix = name[:size]
        if prefix in _ENTITIES:
            # the character after '&' + prefix, which may lie past the match
            following = text[size + 1 : size + 2] or match.string[match.end() : match.end() + 1]
            if following == "=" or following.isalnum():
                return text  # attribute rule: not a reference
            return _ENTITIES[prefix] + text[size + 1 :]
    return text


def _tag(  # noqa: C901 - the splicer's per-tag loop, inlined: a call per attribute was measured
    text: str, pos: int, element: str, in_comment: bool, host: str
) -> tuple[Href | None, int]:
    """Read a start tag's attributes from ``pos`` (just after the tag name).

    Returns the href (first ``href`` attribute wins, as in HTML5) and the offset
    after the tag, or ``(None, -1)`` if the tag never closes.
    """
    seen: set[str] = set()
    href: tuple[int, int, str] | None = None
    markers: list[tuple[int, int]] = []
    match_attr = _ATTR.match
    while True:
        match = match_attr(text, pos)
        if match is None or match.end() == pos:
            return None, -1
        pos = match.end()
        close, name, dq, sq, uq = match.groups()
        if close:
            break
        name = name.lower()
        if name in seen:
            continue
        seen.add(name)
        if name == "href" or name in _OPT_OUT:
            if dq is not None:
                span, raw = match.span(3), dq
            elif sq is not None:
                span, raw = match.span(4), sq
            elif uq is not None:
                span, raw = match.span(5), uq
            else:
                span, raw = (pos, pos), ""
            if name == "href":
                href = (span[0], span[1], raw)
            elif name != "clicktracking" or raw.strip().lower() == "off":
                markers.append(match.span())
    if href is None:
        return None, pos
    start, stop, raw = href
    url = clean_url(decode_attribute(raw))
    reason = "opt-out" if markers else skip_reason(url, host)
    return Href(start, stop, url, element, in_comment, reason, tuple(markers)), pos


def _comment_hrefs(text: str, start: int, stop: int, host: str) -> list[Href]:
    """hrefs inside a conditional comment (VML buttons, Outlook-only links)."""
    found: list[Href] = []
    pos = start
    while True:
        match = _IN_COMMENT_TAG.search(text, pos, stop)
        if match is None:
            return found
        href, after = _tag(text[:stop], match.end(), match.group("tag").lower(), True, host)
        if href is not None:
            found.append(href)
        pos = after if after > 0 else match.end()


def scan(text: str, tracking_host: str) -> Scan:  # noqa: C901 - one pass over the document
    """Find every a/area/VML href and where the pixel goes, then cross-check."""
    hrefs: list[Href] = []
    last_body = last_html = -1
    pos = 0
    end = len(text)
    while pos < end:
        match = _SCAN.search(text, pos)
        if match is None:
            break
        tag = match.group("tag")
        if tag is None and match.group("end") is None:  # a comment
            body = match.end()
            if text.startswith(">", body) or text.startswith("->", body):
                pos = text.index(">", body) + 1
                continue
            close = _COMMENT_END.search(text, body)
            stop = close.start() if close else end
            if text[body : body + 3].lower() == "[if":
                hrefs.extend(_comment_hrefs(text, body, stop, tracking_host))
            pos = close.end() if close else end
            continue
        if tag is None:
            if match.group("end").lower() == "body":
                last_body = match.start()
            else:
                last_html = match.start()
            pos = match.end()
            continue
        tag = tag.lower()
        if tag in ("a", "area"):
            href, after = _tag(text, match.end(), tag, False, tracking_host)
            if href is not None:
                hrefs.append(href)
            pos = after if after > 0 else match.end()
            continue
        if tag == "plaintext":
            break
        # raw text / RCDATA element: skip to its end tag
        closing = _RAW_END[tag].search(text, match.end())
        pos = closing.end() if closing else end
    pixel_at = last_body if last_body >= 0 else last_html if last_html >= 0 else end
    agreed, why = _cross_check(text, [h.url for h in hrefs if not h.in_comment], hrefs)
    return Scan(hrefs, pixel_at, agreed, why)


def _cross_check(text: str, mine: list[str], hrefs: list[Href]) -> tuple[bool, str]:
    if not hrefs:
        return True, ""
    tree = LexborHTMLParser(text)
    theirs = [clean_url(n.attrs["href"] or "") for n in tree.css("a[href], area[href]")]
    if Counter(theirs) == Counter(mine):
        return True, ""
    missing = Counter(theirs) - Counter(mine)
    extra = Counter(mine) - Counter(theirs)
    return False, f"parser saw {sorted(missing)[:3]}, splicer saw {sorted(extra)[:3]}"


def pixel_tag(url: str) -> str:
    return (
        f'<img src="{_escape(url)}" width="1" height="1" alt="" border="0" style="{PIXEL_STYLE}">'
    )


def _escape(value: str) -> str:
    return value.replace("&", "&amp;").replace('"', "&quot;").replace("'", "&#39;")


def edits_for(scan: Scan, urls: Sequence[str], pixel_url: str | None) -> list[Edit]:
    """Edits that give ``scan.tracked[i]`` the URL ``urls[i]`` and add the pixel.

    No ``urls`` (clicks not tracked in this part, or no link may be): the links
    and their opt-out markers stay as they are, only the pixel goes in. With
    URLs, the opt-out markers are deleted too (their links stay untracked).
    """
    edits: list[Edit] = []
    if urls:
        tracked = scan.tracked
        if len(urls) != len(tracked):
            raise ValueError(f"{len(urls)} URLs for {len(tracked)} tracked links")
        edits = [Edit(h.start, h.end, _escape(u)) for h, u in zip(tracked, urls, strict=True)]
        for href in scan.hrefs:  # tracked links: the scan agreed with the parser
            edits.extend(Edit(s, e, "") for s, e in href.markers)
    if pixel_url is not None:
        edits.append(Edit(scan.pixel_at, scan.pixel_at, pixel_tag(pixel_url)))
    edits.sort(key=lambda e: (e.start, e.end))
    return edits
