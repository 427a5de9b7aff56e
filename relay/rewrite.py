"""Plan, then render: what tracking changes in one message, and each copy's bytes.

Pure: bytes and a Decision go in, a Plan and segments come out; no SMTP, no
database, no tokens (the caller's ``links_for`` signs them). Split in two
because a message is planned once and rendered once per copy (one per
recipient with per-recipient attribution): planning is the expensive half
(MIME scan, the HTML splicer and its selectolax cross-check), rendering is
only the splicing and the re-encoding of the touched bodies.

* :func:`plan` locates the eligible parts (relay/mime.py), finds their links
  and the pixel spot (relay/html.py, relay/text.py) and numbers the links
  (positions are what click tokens carry; 1-based across the message).
* :func:`render_segments` splices a copy: the new bytes of each planned body,
  the rest views of the received message (a 25 MB attachment next to a
  tracked HTML part is never copied).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from relay import html, mime, text
from relay.headers import Field, Segment, first

if TYPE_CHECKING:  # a type only: planning never reads the policy store
    from relay.policy import Decision

#: ``links_for(position, url)``: the tracking URL that replaces a link.
LinksFor = Callable[[int, str], str]


@dataclass
class PartPlan:
    body: mime.Body
    kind: str  # 'html' | 'text'
    first_position: int
    links: list[str]  # URLs tracked in this part, in order
    html_scan: html.Scan | None = None
    text_links: list[text.TextLink] = field(default_factory=list)
    pixel: bool = False


@dataclass
class Plan:
    parts: list[PartPlan]
    left_alone: list[dict[str, str]]
    skipped: dict[str, int]
    disagreements: list[str]

    @property
    def links(self) -> list[str]:
        return [url for part in self.parts for url in part.links]

    @property
    def pixel(self) -> bool:
        return any(p.pixel for p in self.parts)


def plan(data: bytes, decision: Decision, tracking_host: str) -> Plan:  # noqa: C901 - per part: one guard each
    """Find what to rewrite in ``data`` under ``decision``; no tokens yet."""
    root = mime.scan(data)
    parts: list[PartPlan] = []
    left_alone: list[dict[str, str]] = []
    skipped: dict[str, int] = {}
    disagreements: list[str] = []
    position = 1
    pixel_done = not decision.opens
    for part in mime.walk(root):
        if part.content_type not in ("text/html", "text/plain") or part.children:
            continue
        why = part.frozen or ("attachment" if part.attachment else "")
        kind = part.kind
        if kind == "text" and not decision.text_links:
            continue
        if kind == "html" and not (decision.html_links or not pixel_done):
            continue
        if not why:
            try:
                body = mime.open_body(data, part)
            except mime.BodyError as exc:
                why = str(exc)
        if why:
            left_alone.append({"part": part.path, "type": part.content_type, "why": why})
            continue
        if kind == "html":
            found = html.scan(body.text, tracking_host)
            if not found.agreed:
                disagreements.append(f"part {part.path}: {found.disagreement}")
            for reason, count in found.skipped().items():
                skipped[reason] = skipped.get(reason, 0) + count
            urls = [h.url for h in found.tracked] if decision.html_links else []
            pp = PartPlan(body, kind, position, urls, html_scan=found, pixel=not pixel_done)
            pixel_done = True
        else:
            found_text = text.scan(body.text, tracking_host)
            for link in found_text:
                if link.skip:
                    skipped[link.skip] = skipped.get(link.skip, 0) + 1
            urls = [link.url for link in found_text if not link.skip]
            pp = PartPlan(body, kind, position, urls, text_links=found_text)
        if pp.links or pp.pixel:
            parts.append(pp)
            position += len(pp.links)
    return Plan(parts, left_alone, skipped, disagreements)


def render(data: bytes, the_plan: Plan, links_for: LinksFor, pixel_url: str | None) -> bytes:
    """:func:`render_segments` joined into one bytes object."""
    return b"".join(render_segments(data, the_plan, links_for, pixel_url))


def render_segments(
    data: bytes,
    the_plan: Plan,
    links_for: LinksFor,
    pixel_url: str | None,
    cut: Sequence[Field] = (),
) -> list[Segment]:
    """``data`` with every planned part rewritten and the ``cut`` header fields
    deleted; ``links_for(position, url)`` gives the tracking URL of a link.

    Only the rewritten bodies (and a changed Content-Transfer-Encoding line)
    are new bytes; everything between them is a view of ``data``, so a 25 MB
    attachment next to a tracked HTML part is never copied. The plan's offsets
    are offsets into ``data`` itself, the cut fields included: deleting whole
    header lines moves nothing else, so planning the received bytes and
    cutting here gives the same bytes as planning the message without them.
    """
    replacements: list[tuple[int, int, bytes]] = [(f.start, f.end, b"") for f in cut]
    for pp in the_plan.parts:
        urls = [links_for(pp.first_position + i, url) for i, url in enumerate(pp.links)]
        if pp.kind == "html":
            assert pp.html_scan is not None
            pixel = pixel_url if pp.pixel and pixel_url else None
            edits = html.edits_for(pp.html_scan, urls, pixel)
        else:
            edits = text.edits_for(pp.text_links, urls)
        body = pp.body
        new = mime.encode(body, mime.byte_edits(body, edits))
        part = body.part
        if new.cte_line is not None:
            cte = first(part.fields, "content-transfer-encoding")
            if cte is not None:
                replacements.append((cte.start, cte.end, new.cte_line))
            else:
                replacements.append((part.header_end, part.header_end, new.cte_line))
        replacements.append((part.body_start, part.body_end, new.raw))
    replacements.sort(key=lambda r: (r[0], r[1]))
    view = memoryview(data)
    out: list[Segment] = []
    pos = 0
    for start, end, new_bytes in replacements:
        if start > pos:
            out.append(view[pos:start])
        if new_bytes:
            out.append(new_bytes)
        pos = end
    if pos < len(data) or not out:
        out.append(view[pos:])
    return out
