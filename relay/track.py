"""Turn one submitted message into the copies the relay sends upstream.

The relay calls :meth:`Tracker.prepare` once per DATA. It returns the copies
(one for everybody, or one per recipient when per-recipient attribution is on),
the message row to record and the tracked links. The steps, in order:

1. find the trigger headers; if a DKIM signature covers one, send the message
   untouched (deleting it would break the signature);
2. delete the trigger headers (always, tracked or not);
3. decide (relay/policy.py): header + sender policy; suppressed recipients,
   and recipients in opt-in consent mode without a consent, are never tracked
   (they get one untracked copy: the message minus the trigger headers);
4. plan once: locate eligible parts (relay/mime.py), find links and the pixel
   spot (relay/html.py, relay/text.py), assign link positions;
5. render each copy: sign tokens for its recipient position (0 = message
   level), splice them into the bodies, re-encode only those bodies.

It fails open: any exception gives one copy of the original bytes with only
the trigger header lines deleted (or the original bytes if even that fails),
logged and counted in :data:`metrics`. A rewriting bug never loses mail.

The work is CPU-only once the policy snapshot is cached (see PolicyCache);
messages above :data:`OFFLOAD_BYTES` are prepared in a worker thread so a
large attachment never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.header import decode_header, make_header
from email.utils import getaddresses, parseaddr
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import Engine
from sqlmodel import SQLModel

from relay import html, mime, text
from relay.headers import (
    Field,
    Segment,
    delete_fields,
    delete_named,
    dkim_signed_names,
    first,
    top_fields,
)
from relay.links import ascii_host
from relay.policy import Decision, PolicyCache, PolicyUnavailable, decide, off, parse_triggers
from relay.policy import trigger_names as _trigger_names
from shared.config import Settings
from shared.models import Message
from shared.policies import Snapshot, lookup_key
from shared.tokens import Signer, new_message_id

log = logging.getLogger(__name__)

OFFLOAD_BYTES = 256 * 1024
T = TypeVar("T", bound=SQLModel)


@dataclass(frozen=True)
class Submission:
    message_id: int
    sender: str
    recipients: list[str]
    data: bytes
    auth_user: str
    client_ip: str


@dataclass
class Copy:
    """One upstream transaction: its recipients and its bytes, as segments
    (views of the received message, and the few bytes tracking made new)."""

    recipients: list[str]
    segments: list[Segment]

    @property
    def size(self) -> int:
        return sum(len(s) for s in self.segments)

    @property
    def data(self) -> bytes:
        """The copy as one bytes object: a new copy of all of it (for tests and
        small uses; delivery writes :attr:`segments`)."""
        return b"".join(self.segments)


class LinkRow(NamedTuple):
    """A row of the ``links`` table (plain data: the recorder inserts it with Core)."""

    message_id: int
    position: int
    url: str


@dataclass
class Prepared:
    copies: list[Copy]
    message: Message
    links: list[LinkRow]
    tracked_recipients: set[str]


@dataclass
class Metrics:
    """Counters for /metrics: messages prepared, tracked, and injection failures."""

    prepared: int = 0
    tracked: int = 0
    failures: int = 0


metrics = Metrics()


# --- the plan: what to change, computed once per message ---------------------


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


def plan(data: bytes, decision: Decision, tracking_host: str) -> Plan:
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


def render(data: bytes, the_plan: Plan, links_for: Any, pixel_url: str | None) -> bytes:
    """:func:`render_segments` joined into one bytes object."""
    return b"".join(render_segments(data, the_plan, links_for, pixel_url))


def render_segments(
    data: bytes,
    the_plan: Plan,
    links_for: Any,
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
            scan = pp.html_scan
            if not urls:
                scan = html.Scan([], scan.pixel_at, True)
            pixel = html.pixel_tag(pixel_url) if pp.pixel and pixel_url else None
            edits = html.edits_for(scan, urls, pixel)
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


# --- the tracker --------------------------------------------------------------


class Tracker:
    """Prepares each submitted message for delivery (see module docstring)."""

    def __init__(self, settings: Settings, engine: Engine, cache_ttl: float = 5.0) -> None:
        self._settings = settings
        self._signer = Signer(settings.signing_keys())
        self._policies = PolicyCache(engine, ttl=cache_ttl)
        self._base_url, self._host = _ascii_base(settings.base_url)
        self._own_header = settings.tracking_header
        self._trigger_names = _trigger_names(settings.tracking_header)

    async def prepare(self, submission: Submission) -> Prepared:
        """The copies to send for ``submission``; never raises."""
        metrics.prepared += 1
        try:
            try:
                snapshot: Snapshot | None = await self._policies.get()
            except PolicyUnavailable as exc:
                log.warning("message %d: %s; not tracking it", submission.message_id, exc)
                snapshot = None
            if len(submission.data) > OFFLOAD_BYTES:
                return await asyncio.to_thread(self.prepare_sync, submission, snapshot)
            return self.prepare_sync(submission, snapshot)
        except Exception:
            metrics.failures += 1
            log.exception(
                "message %d from %r: injection failed, sending it untracked",
                submission.message_id,
                submission.sender,
            )
            return self._fail_open(submission)

    def prepare_sync(self, sub: Submission, snapshot: Snapshot | None) -> Prepared:
        """The synchronous core of :meth:`prepare` (it may raise)."""
        data = sub.data
        fields, _ = top_fields(data)
        triggers = [f for f in fields if f.name in self._trigger_names]
        message = _message_row(sub, fields)
        covered = dkim_signed_names(fields)
        if covered is not None and any(f.name in covered for f in triggers):
            names = sorted({f.name for f in triggers if f.name in covered})
            reason = f"DKIM signature covers {', '.join(names)}: message not modified"
            return self._untracked(sub, message, [data], off(reason))
        cleaned = delete_fields(data, triggers)  # views: no copy of the message
        request = parse_triggers(triggers, self._own_header)
        if snapshot is None:
            return self._untracked(sub, message, cleaned, off("policy store unavailable"))
        sender = sub.sender.strip("<>") or _from_address(fields)
        decision = decide(request, snapshot.policy_for(sender))
        if request.invalid:
            log.info("message %d: %s", sub.message_id, request.invalid)
        if covered is not None and decision.anything:
            decision = off("DKIM-signed: body not modified", None)
        if not decision.anything:
            return self._untracked(sub, message, cleaned, decision)
        left_out = _left_out(sub.recipients, snapshot)
        candidates = [r for r in sub.recipients if r not in left_out]
        if not candidates:
            why = "all recipients suppressed"
            if "no consent" in left_out.values():
                why = "no recipient may be tracked (suppressed, or no consent in opt-in mode)"
            return self._untracked(sub, message, cleaned, decision, why)
        the_plan = plan(data, decision, self._host)  # the trigger lines are cut when rendering
        if not the_plan.parts:
            return self._untracked(sub, message, cleaned, decision, "nothing to track", the_plan)
        return self._tracked(
            sub, message, cleaned, decision, the_plan, candidates, left_out, fields, triggers
        )

    # --- outcomes ---

    def _tracked(
        self,
        sub: Submission,
        message: Message,
        cleaned: list[Segment],
        decision: Decision,
        the_plan: Plan,
        tracked: list[str],
        left_out: dict[str, str],
        fields: list[Field],
        triggers: list[Field],
    ) -> Prepared:
        mid = sub.message_id
        per_recipient = decision.per_recipient and len(sub.recipients) <= decision.recipient_cap
        visible = _visible_addresses(fields)
        position = {r: i + 1 for i, r in reversed(list(enumerate(sub.recipients)))}
        copies: list[Copy] = []
        group = [] if per_recipient else [r for r in tracked if lookup_key(r)[0] in visible]
        data = sub.data
        if group:
            copies.append(Copy(group, self._render(data, the_plan, triggers, mid, 0)))
        for rcpt in tracked:
            if rcpt not in group:
                segments = self._render(data, the_plan, triggers, mid, position[rcpt])
                copies.append(Copy([rcpt], segments))
        if left_out:
            copies.append(Copy(list(left_out), cleaned))
        message.track_opens = the_plan.pixel
        message.track_clicks = bool(the_plan.links)
        message.per_recipient = per_recipient
        message.size_out = max(c.size for c in copies)
        notes = {
            "tracked": True,
            "copies": len(copies),
            "bcc_copies": len([r for r in tracked if r not in group]) if group else 0,
            "suppressed": [r for r, why in left_out.items() if why == "suppressed"],
            "no_consent": [r for r, why in left_out.items() if why == "no consent"],
        }
        message.decision = _decision_json(decision, the_plan, notes)
        message.parts_modified = json.dumps(
            [
                {
                    "part": p.body.part.path,
                    "type": p.body.part.content_type,
                    "encoding": p.body.part.cte,
                    "charset": p.body.codec,
                    "links": len(p.links),
                    "pixel": p.pixel,
                }
                for p in the_plan.parts
            ]
        )
        links = _link_rows(mid, the_plan.links)
        metrics.tracked += 1
        log.info(
            "message %d: tracking opens=%s links=%d copies=%d (%s)",
            mid,
            message.track_opens,
            len(links),
            len(copies),
            "; ".join(decision.reasons),
        )
        return Prepared(copies, message, links, set(tracked))

    def _render(
        self, data: bytes, the_plan: Plan, cut: list[Field], mid: int, recipient: int
    ) -> list[Segment]:
        def link_url(position: int, url: str) -> str:
            token = self._signer.click_token(mid, recipient, position, url)
            return f"{self._base_url}/c/{token}"

        pixel = f"{self._base_url}/o/{self._signer.open_token(mid, recipient)}.gif"
        return render_segments(data, the_plan, link_url, pixel, cut)

    def _untracked(
        self,
        sub: Submission,
        message: Message,
        segments: list[Segment],
        decision: Decision,
        note: str = "",
        the_plan: Plan | None = None,
    ) -> Prepared:
        copy = Copy(list(sub.recipients), segments)
        message.size_out = copy.size
        notes: dict[str, Any] = {"tracked": False}
        if note:
            notes["why"] = note
        message.decision = _decision_json(decision, the_plan, notes)
        message.parts_modified = "[]"
        log.info(
            "message %d: not tracked (%s)",
            sub.message_id,
            "; ".join([*decision.reasons, note] if note else decision.reasons),
        )
        return Prepared([copy], message, [], set())

    def _fail_open(self, sub: Submission) -> Prepared:
        try:
            segments = delete_named(sub.data, self._trigger_names)
        except Exception:
            log.exception("message %d: cannot even delete the trigger headers", sub.message_id)
            segments = [sub.data]
        copy = Copy(list(sub.recipients), segments)
        try:
            message = _message_row(sub, top_fields(sub.data)[0])
        except Exception:
            message = Message(id=sub.message_id or new_message_id(), sender=sub.sender)
        message.size_out = copy.size
        message.decision = json.dumps({"tracked": False, "reasons": ["injection failed"]})
        message.parts_modified = "[]"
        return Prepared([copy], message, [], set())


# --- helpers ------------------------------------------------------------------


def _ascii_base(base_url: str) -> tuple[str, str]:
    """The receiver's base URL with an IDNA (UTS 46) host, and that host."""
    parts = urlsplit(base_url)
    host = ascii_host(parts.hostname or "")
    netloc = host if parts.port is None else f"{host}:{parts.port}"
    if parts.username:
        netloc = f"{parts.username}@{netloc}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", "")), host


def _decode(value: str) -> str:
    try:
        return str(make_header(decode_header(value)))
    except Exception:
        return value


def _message_row(sub: Submission, fields: list[Field]) -> Message:
    def header(name: str) -> str:
        f = first(fields, name)
        return _decode(f.value) if f else ""

    return _row(
        Message,
        id=sub.message_id,
        sender=sub.sender.strip("<>"),
        from_header=header("from"),
        subject=header("subject"),
        message_id_header=header("message-id"),
        auth_user=sub.auth_user,
        client_ip=sub.client_ip,
        size_in=len(sub.data),
        size_out=len(sub.data),
    )


def _row(model: type[T], **values: Any) -> T:
    """A new table row, built without SQLModel's ``__init__``.

    ``Message(...)`` costs ~150 us: SQLModel routes every field through
    ``__setattr__`` and SQLAlchemy's attribute events. ``model_construct``
    fills the same fields and defaults (trusted values: ours, not user input)
    and ``setup_instance`` gives the object the SQLAlchemy state it needs, at
    ~30 us.
    """
    row: T = model.model_construct(**values)  # type: ignore[assignment]
    model._sa_class_manager.setup_instance(row)  # type: ignore[attr-defined]
    return row


def _link_rows(message_id: int, urls: list[str]) -> list[LinkRow]:
    return [LinkRow(message_id, position, url) for position, url in enumerate(urls, start=1)]


def _from_address(fields: list[Field]) -> str:
    f = first(fields, "from")
    return parseaddr(f.value)[1] if f else ""


def _left_out(recipients: list[str], snapshot: Snapshot) -> dict[str, str]:
    """Recipients never tracked, in RCPT order, with why: suppressed, or in opt-in
    consent mode without a recorded consent (DESIGN.md section 4, first rule)."""
    out: dict[str, str] = {}
    for rcpt in recipients:
        if snapshot.is_suppressed(rcpt):
            out[rcpt] = "suppressed"
        elif not snapshot.consent_allows(rcpt):
            out[rcpt] = "no consent"
    return out


def _visible_addresses(fields: list[Field]) -> set[str]:
    """Normalised addresses in To and Cc (everyone else is a Bcc recipient)."""
    values = [_decode(f.value) for f in fields if f.name in ("to", "cc")]
    return {lookup_key(addr)[0] for _, addr in getaddresses(values) if addr}


def _decision_json(decision: Decision, the_plan: Plan | None, notes: dict[str, Any]) -> str:
    out: dict[str, Any] = {**notes, **decision.as_dict()}
    if the_plan is not None:
        out["links_tracked"] = len(the_plan.links)
        out["pixel"] = the_plan.pixel
        if the_plan.skipped:
            out["links_skipped"] = the_plan.skipped
        if the_plan.left_alone:
            out["parts_left_alone"] = the_plan.left_alone
        if the_plan.disagreements:
            out["links_left_alone"] = the_plan.disagreements
    return json.dumps(out)
