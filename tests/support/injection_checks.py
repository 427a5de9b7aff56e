"""Invariants every injected message must satisfy, checked independently of
the code under test (the email package decodes, selectolax counts links).

``check(original, out, ...)`` asserts:
* the output parses and has the same MIME structure and part headers (only a
  Content-Transfer-Encoding may change, to quoted-printable);
* bytes before the first and after the last rewritten body are identical;
* every leaf part decodes to the same bytes, except rewritten text/html and
  text/plain bodies, which differ only in tracked hrefs and the pixel: putting
  each tracked URL back (the URL signed into its click token) and removing the
  pixel gives the original text;
* every http(s) ``<a>``/``<area>`` link selectolax finds that the skip rules do
  not exclude is tracked, and so is every VML ``href`` in conditional comments.

``check_relayed(submitted, delivered, ...)`` is the same for a message that
went through the relay: the trigger header lines are gone, every other header
line is identical, and it returns the verified tokens of the copy.
"""

from __future__ import annotations

import email
import email.message
import email.policy
import itertools
import re
from dataclasses import dataclass, field

from selectolax.lexbor import LexborHTMLParser

from relay import mime
from relay.headers import first, top_fields
from relay.html import decode_attribute
from relay.links import clean_url, skip_reason
from shared.tokens import ClickToken, OpenToken, Signer

_CONDITIONAL = re.compile(r"<!--\[if[^\]]*\]>(.*?)<!\[endif\]-->", re.S | re.I)
_MARKERS = re.compile(
    r"[\t\n\f\r ]+(?:data-notrack|ses:no-track|disable-tracking|clicktracking=[\"']?off[\"']?)"
    r"(?:=(?:\"[^\"]*\"|'[^']*'|[^\s>]*))?(?=[\s/>])",
    re.I,
)
_VML_HREF = re.compile(r"<v:\w+[^>]*?\shref\s*=\s*([\"'])(.*?)\1", re.S | re.I)


@dataclass
class Report:
    rewritten: list[str] = field(default_factory=list)  # part paths
    clicks: int = 0
    pixels: int = 0


@dataclass
class Relayed:
    """What one delivered copy carries: its verified tokens and the check report."""

    report: Report
    opens: list[OpenToken]
    clicks: list[ClickToken]

    @property
    def urls(self) -> list[str]:
        return [c.url for c in self.clicks]

    @property
    def recipients(self) -> set[int]:
        return {t.recipient for t in [*self.opens, *self.clicks]}

    @property
    def message_ids(self) -> set[int]:
        return {t.message_id for t in [*self.opens, *self.clicks]}


def leaves(data: bytes) -> list[email.message.Message]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [p for p in msg.walk()]


def _text(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    charset = part.get_content_charset() or "utf-8"
    return payload.decode(charset, errors="surrogateescape")


def restore(new: str, original: str, base: str, signer: Signer, is_html: bool) -> Report:
    """Check ``new`` is ``original`` with tracked hrefs and a pixel; count them."""
    report = Report()
    if is_html:
        original = _MARKERS.sub("", original)  # opt-out markers are removed
    pixel = re.compile(r'<img src="' + re.escape(base) + r'/o/([A-Za-z0-9_-]+)\.gif"[^>]*>')
    pixels = pixel.findall(new)
    for token in pixels:
        signer.verify_open(token)
    report.pixels = len(pixels)
    new = pixel.sub("", new)
    click = re.compile(re.escape(base) + r"/c/([A-Za-z0-9_-]+)")
    pieces = click.split(new)
    texts, tokens = pieces[0::2], pieces[1::2]
    assert original.startswith(texts[0]), "text before the first link changed"
    pos = len(texts[0])
    for token, following in zip(tokens, texts[1:], strict=True):
        url = signer.verify_click(token).url
        at = original.find(following, pos) if following else len(original)
        assert at >= 0, f"text after the link to {url} changed"
        raw = original[pos:at]
        decoded = clean_url(decode_attribute(raw)) if is_html else raw
        assert decoded == url, f"href {raw!r} was tracked as {url!r}"
        pos = at + len(following)
    assert pos == len(original), "the end of the text changed"
    report.clicks = len(tokens)
    return report


def trackable_links(text: str, host: str) -> int:
    count = 0
    for node in LexborHTMLParser(text).css("a[href], area[href]"):
        attrs = {k.lower(): (v or "").lower() for k, v in node.attributes.items()}
        if {"data-notrack", "ses:no-track", "disable-tracking"} & attrs.keys():
            continue
        if attrs.get("clicktracking") == "off":
            continue
        count += not skip_reason(clean_url(node.attributes.get("href") or ""), host)
    return count


def trackable_vml(text: str, host: str) -> int:
    count = 0
    for block in _CONDITIONAL.findall(text):
        for _, value in _VML_HREF.findall(block):
            if not skip_reason(clean_url(decode_attribute(value)), host):
                count += 1
    return count


_ADDED_ID = re.compile(rb"Message-ID: <trackrelay\.[0-9a-f]{16}@[a-z0-9.-]+>\r?\n")


def without_added_id(original: bytes, out: bytes) -> bytes:
    """``out`` without the Message-ID the relay adds atop a message that has none
    (relay/pipeline.py, step ``message_id``); never to one that has one."""
    added = _ADDED_ID.match(out)
    if added:
        has_one = first(top_fields(original)[0], "message-id") is not None
        assert not has_one, "a Message-ID added to a message that has one"
    return out[added.end() :] if added else out


def check(
    original: bytes,
    out: bytes,
    base: str,
    host: str,
    signer: Signer,
    *,
    text_links: bool = False,
    links_agreed: bool = True,
) -> Report:
    out = without_added_id(original, out)
    before, after = leaves(original), leaves(out)
    assert [p.get_content_type() for p in before] == [p.get_content_type() for p in after]
    report = Report()
    for old, new in zip(before, after, strict=True):
        old_items = [(k, v) for k, v in old.items() if k.lower() != "content-transfer-encoding"]
        new_items = [(k, v) for k, v in new.items() if k.lower() != "content-transfer-encoding"]
        assert old_items == new_items, "part headers changed"
        if old.get("content-transfer-encoding") != new.get("content-transfer-encoding"):
            assert new["content-transfer-encoding"] == "quoted-printable"
        if old.is_multipart():
            continue
        if old.get_payload(decode=True) == new.get_payload(decode=True):
            continue
        ctype = old.get_content_type()
        assert ctype in ("text/html", "text/plain"), f"a {ctype} part changed"
        assert ctype == "text/html" or text_links, "a text part changed without text links"
        old_text, new_text = _text(old), _text(new)
        part_report = restore(new_text, old_text, base, signer, ctype == "text/html")
        report.clicks += part_report.clicks
        report.pixels += part_report.pixels
        report.rewritten.append(ctype)
        if ctype == "text/html" and links_agreed:
            wanted = trackable_links(old_text, host) + trackable_vml(old_text, host)
            assert part_report.clicks == wanted, "a trackable link was not tracked"
    _check_bytes(original, out)
    return report


def _check_bytes(original: bytes, out: bytes) -> None:
    """Outside the rewritten parts' bodies (and CTE lines), bytes are identical."""
    if original == out:
        return
    spans = [(p.header_start, p.body_end) for p in mime.walk(mime.scan(original)) if p.kind]
    size = min(len(original), len(out))
    first_diff = next((i for i in range(size) if original[i] != out[i]), size)
    suffix = 0
    while suffix < size and original[-1 - suffix] == out[-1 - suffix]:
        suffix += 1
    last_diff = len(original) - suffix
    assert any(s <= first_diff <= e for s, e in spans), "bytes before the bodies changed"
    assert any(s <= last_diff <= e for s, e in spans), "bytes after the bodies changed"
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert original[end:start] in out, "bytes between rewritten bodies changed"


def without_header(data: bytes, name: str) -> bytes:
    """``data`` without the top-level header field ``name`` (continuation lines too)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = line.split(b":", 1)[0].strip().lower() == name.lower().encode()
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept) + sep + body


def check_relayed(
    submitted: bytes, delivered: bytes, base: str, signer: Signer, *, header: str = "X-Track"
) -> Relayed:
    """``delivered`` is ``submitted`` minus the ``header`` field, tracked by :func:`check`."""
    original = without_header(submitted, header)
    assert original != submitted, f"the submitted message has no {header} header"
    head = original.partition(b"\r\n\r\n")[0]
    assert delivered.partition(b"\r\n\r\n")[0] == head, "top-level header lines changed"
    host = base.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)[0]
    report = check(original, delivered, base, host, signer)
    assert report.rewritten, "nothing was tracked"
    texts = [_text(p) for p in leaves(delivered) if p.get_content_type() == "text/html"]
    joined = "".join(texts)
    opens = re.findall(re.escape(base) + r"/o/([A-Za-z0-9_-]+)\.gif", joined)
    clicks = re.findall(re.escape(base) + r"/c/([A-Za-z0-9_-]+)", joined)
    return Relayed(
        report,
        [signer.verify_open(t) for t in opens],
        [signer.verify_click(t) for t in clicks],
    )
