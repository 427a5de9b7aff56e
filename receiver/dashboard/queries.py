"""What the dashboard reads: messages a user may see, with their hit counts.

Synchronous SQLAlchemy (callers use ``asyncio.to_thread``). Visibility is one
SQL clause applied to every query, so a sender can never reach another
sender's message by guessing an id: the row simply is not found (404).

Counting rule, everywhere: opens and clicks count only verdicts ``human`` and
``proxy``; ``machine`` and ``scanner`` opens are counted apart and never mixed
in; ``self`` and ``unknown`` are shown on the timeline only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, case, exists, false, func, or_, true
from sqlalchemy import select as sa_select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import Session, col, select

from receiver.dashboard.filters import Filters
from shared.addresses import spellings
from shared.db import session_scope
from shared.isotime import aware
from shared.models import Event, Link, Message, Recipient
from shared.verdicts import COUNTED, MACHINES


@dataclass(frozen=True)
class Viewer:
    """Who is looking: administrators see everything, senders their addresses."""

    user_id: int
    username: str
    role: str
    addresses: tuple[str, ...]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass
class Hits:
    count: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class MessageRow:
    message: Message
    recipients: list[str] = field(default_factory=list)
    refused: int = 0
    opens: Hits = field(default_factory=Hits)
    clicks: Hits = field(default_factory=Hits)
    machine_opens: int = 0


def _like(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def visible(viewer: Viewer) -> ColumnElement[bool]:
    """The messages ``viewer`` may see, as a WHERE clause."""
    if viewer.is_admin:
        return true()
    sender = func.lower(col(Message.sender))
    clauses: list[ColumnElement[bool]] = []
    # A sender keeps what MAIL FROM said: an IDN domain may be in Unicode.
    for pattern in (p for stored in viewer.addresses for p in spellings(stored)):
        if pattern.startswith("@"):
            clauses.append(sender.like("%" + _like(pattern)[1:-1], escape="\\"))
        else:
            clauses.append(sender == pattern)
    return or_(*clauses) if clauses else false()


def _counted(kind: str) -> Any:
    return exists().where(
        col(Event.message_id) == col(Message.id),
        col(Event.kind) == kind,
        col(Event.verdict).in_(COUNTED),
    )


def filtered(viewer: Viewer, filters: Filters) -> list[ColumnElement[bool]]:
    """WHERE clauses for the messages list, its CSV and the events CSV."""
    where = [visible(viewer)]
    tracked = or_(col(Message.track_opens), col(Message.track_clicks))
    if filters.tracking == "on":
        where.append(tracked)
    elif filters.tracking == "off":
        where.append(~tracked)
    if filters.state == "opened":
        where.append(_counted("open"))
    elif filters.state == "not_opened":
        where += [col(Message.track_opens).is_(True), ~_counted("open")]
    elif filters.state == "clicked":
        where.append(_counted("click"))
    if filters.sender:
        where.append(func.lower(col(Message.sender)) == filters.sender.lower())
    if filters.date_from:
        where.append(col(Message.created_at) >= _midnight(filters.date_from))
    if filters.date_to:
        where.append(col(Message.created_at) < _midnight(filters.date_to + timedelta(days=1)))
    if filters.q:
        pattern = _like(filters.q.lower())
        in_recipients = exists().where(
            col(Recipient.message_id) == col(Message.id),
            func.lower(col(Recipient.address)).like(pattern, escape="\\"),
        )
        where.append(
            or_(func.lower(col(Message.subject)).like(pattern, escape="\\"), in_recipients)
        )
    return where


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def list_messages(
    engine: Engine, viewer: Viewer, filters: Filters, per_page: int
) -> tuple[list[MessageRow], int]:
    """One page of messages, newest first, and how many match in all."""
    where = filtered(viewer, filters)
    with session_scope(engine) as session:
        total = int(session.exec(select(func.count()).select_from(Message).where(*where)).one())
        query = (
            select(Message)
            .where(*where)
            .order_by(col(Message.created_at).desc(), col(Message.id).desc())
            .offset((filters.page - 1) * per_page)
            .limit(per_page)
        )
        messages = list(session.exec(query).all())
        rows = _with_hits(session, messages)
    return rows, total


def _with_hits(session: Session, messages: list[Message]) -> list[MessageRow]:
    rows = {m.id: MessageRow(m) for m in messages}
    if not rows:
        return []
    ids = list(rows)
    recipients = select(Recipient).where(col(Recipient.message_id).in_(ids))
    for r in session.exec(recipients.order_by(col(Recipient.position))):
        rows[r.message_id].recipients.append(r.address)
        rows[r.message_id].refused += r.status != "accepted"
    counted = col(Event.verdict).in_(COUNTED)
    stats = (
        sa_select(
            col(Event.message_id),
            col(Event.kind),
            func.count(case((counted, 1))),
            func.min(case((counted, col(Event.occurred_at)))),
            func.max(case((counted, col(Event.occurred_at)))),
            func.count(case((col(Event.verdict).in_(MACHINES), 1))),
        )
        .where(col(Event.message_id).in_(ids))
        .group_by(col(Event.message_id), col(Event.kind))
    )
    for message_id, kind, count, first, last, machine in session.execute(stats):
        hits = Hits(int(count), aware(first), aware(last))
        if kind == "open":
            rows[message_id].opens = hits
            rows[message_id].machine_opens = int(machine)
        elif kind == "click":
            rows[message_id].clicks = hits
    return list(rows.values())


def senders(engine: Engine, viewer: Viewer) -> list[str]:
    """Distinct senders the viewer may filter on (for the select box)."""
    with session_scope(engine) as session:
        query = (
            select(func.lower(col(Message.sender)))
            .where(visible(viewer))
            .distinct()
            .order_by(func.lower(col(Message.sender)))
            .limit(500)
        )
        return [s for s in session.exec(query).all() if s]


@dataclass
class TimelineEntry:
    event: Event
    device: str
    link_url: str = ""


@dataclass
class RecipientView:
    position: int
    address: str
    status: str
    reply_code: int
    reply_text: str
    tracked: bool
    timeline: list[TimelineEntry] = field(default_factory=list)
    opens: int = 0
    clicks: int = 0


@dataclass
class LinkView:
    position: int
    url: str
    clicks: int = 0
    other_clicks: int = 0


@dataclass
class Detail:
    row: MessageRow
    recipients: list[RecipientView]
    whole_message: RecipientView  # events from message-level tokens (position 0)
    links: list[LinkView]
    decision: list[tuple[str, str]]
    verdicts: dict[str, int]


def message_detail(engine: Engine, viewer: Viewer, message_id: int) -> Detail | None:
    from receiver.dashboard.devices import device_family

    with session_scope(engine) as session:
        message = session.exec(
            select(Message).where(col(Message.id) == message_id, visible(viewer))
        ).first()
        if message is None:
            return None
        row = _with_hits(session, [message])[0]
        recipients = session.exec(
            select(Recipient)
            .where(col(Recipient.message_id) == message_id)
            .order_by(col(Recipient.position))
        ).all()
        links = session.exec(
            select(Link).where(col(Link.message_id) == message_id).order_by(col(Link.position))
        ).all()
        events = session.exec(
            select(Event)
            .where(col(Event.message_id) == message_id)
            .order_by(col(Event.occurred_at), col(Event.id))
        ).all()
    views = {
        r.position: RecipientView(
            r.position, r.address, r.status, r.reply_code, r.reply_text, r.tracked
        )
        for r in recipients
    }
    whole = RecipientView(0, "", "accepted", 250, "", message.track_opens or message.track_clicks)
    link_views = {link.position: LinkView(link.position, link.url) for link in links}
    verdicts: dict[str, int] = {}
    for event in events:
        event.occurred_at = aware(event.occurred_at) or event.occurred_at
        link = link_views.get(event.link_position) if event.kind == "click" else None
        target = views.get(event.recipient_position, whole)
        target.timeline.append(
            TimelineEntry(event, device_family(event.user_agent), link.url if link else "")
        )
        counted = event.verdict in COUNTED
        if event.kind == "open":
            verdicts[event.verdict] = verdicts.get(event.verdict, 0) + 1
            target.opens += counted
        else:
            target.clicks += counted
            if link is not None:
                link.clicks += counted
                link.other_clicks += not counted
    return Detail(
        row=row,
        recipients=list(views.values()),
        whole_message=whole,
        links=list(link_views.values()),
        decision=decision_lines(message.decision),
        verdicts=verdicts,
    )


def decision_lines(raw: str) -> list[tuple[str, str]]:
    """The recorded tracking decision as (label, value) lines a person can read."""
    if not raw.strip():
        return []
    try:
        data = json.loads(raw)
    except ValueError:
        return [("Decision", raw)]
    if not isinstance(data, dict):
        return [("Decision", str(data))]
    lines = []
    for key, value in data.items():
        label = str(key).replace("_", " ").capitalize()
        if isinstance(value, bool):
            text = "yes" if value else "no"
        elif isinstance(value, list):
            text = "; ".join(str(v) for v in value) or "—"
        elif isinstance(value, dict):
            text = ", ".join(f"{k}: {v}" for k, v in value.items()) or "—"
        else:
            text = str(value) if value not in ("", None) else "—"
        lines.append((label, text))
    return lines


def iter_message_rows(engine: Engine, viewer: Viewer, filters: Filters) -> Iterator[MessageRow]:
    """Every message matching the filters (for CSV), in pages of 500."""
    page = 1
    while True:
        chunk, _ = list_messages(engine, viewer, filters.replace(page=page), 500)
        yield from chunk
        if len(chunk) < 500:
            return
        page += 1


def iter_events(
    engine: Engine, viewer: Viewer, filters: Filters
) -> Iterator[tuple[Event, Message, str, str]]:
    """Every event of the matching messages, with recipient address and link URL."""
    where = filtered(viewer, filters)
    last_id = 0
    while True:
        with session_scope(engine) as session:
            query = (
                select(Event, Message, Recipient.address, Link.url)
                .join(Message, col(Message.id) == col(Event.message_id))
                .join(
                    Recipient,
                    (col(Recipient.message_id) == col(Event.message_id))
                    & (col(Recipient.position) == col(Event.recipient_position)),
                    isouter=True,
                )
                .join(
                    Link,
                    (col(Link.message_id) == col(Event.message_id))
                    & (col(Link.position) == col(Event.link_position)),
                    isouter=True,
                )
                .where(*where, col(Event.id) > last_id)
                .order_by(col(Event.id))
                .limit(1000)
            )
            chunk = session.exec(query).all()
        for event, message, address, url in chunk:
            yield event, message, address or "", url or ""
        if len(chunk) < 1000:
            return
        last_id = chunk[-1][0].id or 0
