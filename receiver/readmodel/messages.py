"""Lists of messages with their hit counts: a page, every row (CSV), the senders.

Ordered newest first (created_at, then id: ids are random, so the pair is a
total order) and keyset-paged on that pair (receiver/readmodel/paging.py): a
page costs what it shows, however deep it is and however much mail there is.
The count beside it stops at ``COUNT_CAP``. ``offset`` is still read for the
API's deprecated ``offset`` parameter, and costs what OFFSET costs.

The CSV export streams: one query on a server-side cursor (``stream_results``;
psycopg's named cursor on PostgreSQL, SQLite's own lazy cursor), plain tuples,
and one recipients query per ``EXPORT_CHUNK`` messages, so memory stays flat
and no page is counted or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, case, func
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Connection
from sqlmodel import Session, col, select

from receiver.readmodel.paging import Cursor, beyond, capped_count, ordered
from receiver.readmodel.scope import AUTOMATED, COUNTED, Selection, aware, selected, visible
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Message, Recipient

EXPORT_CHUNK = 1000


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
    total: int  # matches in all, exactly up to COUNT_CAP
    capped: bool = False  # more than COUNT_CAP match: ``total`` is COUNT_CAP
    older: str | None = None  # cursor of the next page of older rows, None on the last
    newer: str | None = None  # cursor of the page of newer rows, None on the first


def messages_page(
    engine: Engine,
    viewer: Viewer,
    selection: Selection,
    limit: int,
    cursor: Cursor | None = None,
    offset: int = 0,
) -> Page:
    """Up to ``limit`` matching messages next to ``cursor`` (or after skipping
    ``offset``), the capped count and the cursors of the pages either side."""
    where = selected(viewer, selection)
    older = cursor is None or cursor.older
    query = select(Message).where(*where)
    if cursor is not None:
        query = query.where(beyond(cursor))
    query = ordered(query, older).offset(offset or None).limit(limit + 1)
    with session_scope(engine) as session:
        found = list(session.exec(query).all())
        more = len(found) > limit
        if not older and not more:  # reached the newest rows: that is the first page
            return messages_page(engine, viewer, selection, limit)
        messages = found[:limit] if older else found[:limit][::-1]
        total, capped = capped_count(session, where)
        rows = with_hits(session, messages)
    at_start = cursor is None and not offset
    return Page(
        rows,
        total,
        capped,
        older=Cursor.of(messages[-1], True).encode() if messages and (more or not older) else None,
        newer=Cursor.of(messages[0], False).encode() if messages and not at_start else None,
    )


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
    for message_id, kind, count, first, last, machine in session.execute(_hit_stats(ids)):
        hits = Hits(int(count), aware(first), aware(last))
        if kind == "open":
            rows[message_id].opens = hits
            rows[message_id].machine_opens = int(machine)
        elif kind == "click":
            rows[message_id].clicks = hits
    return list(rows.values())


def _hit_stats(ids: Sequence[int]) -> Any:
    is_counted = col(Event.verdict).in_(COUNTED)
    return (
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


EXPORT_COLUMNS = (
    "message_id", "sent_at", "sender", "subject", "recipients", "track_opens",
    "track_clicks", "opens", "first_open", "last_open", "clicks", "first_click",
    "last_click", "machine_opens", "status",
)  # fmt: skip


def export_messages(
    engine: Engine, viewer: Viewer, selection: Selection
) -> Iterator[tuple[Any, ...]]:
    """Every matching message as a plain tuple of EXPORT_COLUMNS, newest first."""
    m = Message
    query = ordered(
        sa_select(
            col(m.id), col(m.created_at), col(m.sender), col(m.subject),
            col(m.track_opens), col(m.track_clicks), col(m.status),
        ).where(*selected(viewer, selection))
    )  # fmt: skip
    with engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=EXPORT_CHUNK).execute(query)
        for chunk in result.partitions():
            yield from _export_chunk(conn, chunk)


def _export_chunk(conn: Connection, chunk: Sequence[Any]) -> Iterator[tuple[Any, ...]]:
    ids = [row[0] for row in chunk]
    addresses: dict[int, list[str]] = {i: [] for i in ids}
    recipients = (
        sa_select(col(Recipient.message_id), col(Recipient.address))
        .where(col(Recipient.message_id).in_(ids))
        .order_by(col(Recipient.message_id), col(Recipient.position))
    )
    for message_id, address in conn.execute(recipients):
        addresses[message_id].append(address)
    hits: dict[tuple[int, str], tuple[Any, ...]] = {
        (row[0], row[1]): tuple(row[2:]) for row in conn.execute(_hit_stats(ids))
    }
    for mid, created, sender, subject, opens, clicks, status in chunk:
        o = hits.get((mid, "open"), (0, None, None, 0))
        c = hits.get((mid, "click"), (0, None, None, 0))
        yield (
            mid, aware(created), sender, subject, "; ".join(addresses[mid]), opens, clicks,
            o[0], aware(o[1]), aware(o[2]), c[0], aware(c[1]), aware(c[2]), o[3], status,
        )  # fmt: skip


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
