"""Lists of messages with their hit counts: a page, every row (CSV), the senders.

Ordered newest first (created_at, then id: ids are random, so the pair is a
total order). Paging is limit/offset with a count of all matches today; this
is the one place to make it keyset-paged when the tables grow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, case, func
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from receiver.readmodel.scope import AUTOMATED, COUNTED, Selection, aware, selected, visible
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Message, Recipient

EXPORT_CHUNK = 500


@dataclass
class Hits:
    """Counted opens or clicks (human and proxy only) and when they happened."""

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
    machine_opens: int = 0  # machine and scanner opens, never in ``opens``


@dataclass
class Page:
    rows: list[MessageRow]
    total: int  # matches in all, not only on this page


def messages_page(
    engine: Engine, viewer: Viewer, selection: Selection, limit: int, offset: int = 0
) -> Page:
    """Up to ``limit`` matching messages after skipping ``offset``, and the total."""
    where = selected(viewer, selection)
    with session_scope(engine) as session:
        total = int(session.exec(select(func.count()).select_from(Message).where(*where)).one())
        query = (
            select(Message)
            .where(*where)
            .order_by(col(Message.created_at).desc(), col(Message.id).desc())
            .offset(offset)
            .limit(limit)
        )
        rows = with_hits(session, list(session.exec(query).all()))
    return Page(rows, total)


def all_messages(engine: Engine, viewer: Viewer, selection: Selection) -> Iterator[MessageRow]:
    """Every matching message (for CSV), read in chunks."""
    offset = 0
    while True:
        chunk = messages_page(engine, viewer, selection, EXPORT_CHUNK, offset).rows
        yield from chunk
        if len(chunk) < EXPORT_CHUNK:
            return
        offset += EXPORT_CHUNK


def with_hits(session: Session, messages: list[Message]) -> list[MessageRow]:
    """``messages`` with their recipients and counts, in the same order."""
    rows = {m.id: MessageRow(m) for m in messages}
    if not rows:
        return []
    ids = list(rows)
    recipients = select(Recipient).where(col(Recipient.message_id).in_(ids))
    for r in session.exec(recipients.order_by(col(Recipient.position))):
        rows[r.message_id].recipients.append(r.address)
        rows[r.message_id].refused += r.status != "accepted"
    is_counted = col(Event.verdict).in_(COUNTED)
    stats = (
        sa_select(
            col(Event.message_id),
            col(Event.kind),
            func.count(case((is_counted, 1))),
            func.min(case((is_counted, col(Event.occurred_at)))),
            func.max(case((is_counted, col(Event.occurred_at)))),
            func.count(case((col(Event.verdict).in_(AUTOMATED), 1))),
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
    """Distinct senders the viewer may filter on (for a select box), at most 500."""
    with session_scope(engine) as session:
        query = (
            select(func.lower(col(Message.sender)))
            .where(visible(viewer))
            .distinct()
            .order_by(func.lower(col(Message.sender)))
            .limit(500)
        )
        return [s for s in session.exec(query).all() if s]
