"""Lists of messages with their hit counts: a page, every row (CSV), the senders.

Ordered newest first (created_at, then id: ids are random, so the pair is a
total order) and keyset-paged on that pair (receiver/readmodel/paging.py): a
page costs what it shows, however deep it is and however much mail there is.
The count beside it stops at ``COUNT_CAP``. ``offset`` is still read for the
API's deprecated ``offset`` parameter, and costs what OFFSET costs.

The CSV export streams: one query on a server-side cursor (``stream_results``;
psycopg's named cursor on PostgreSQL, SQLite's own lazy cursor) of plain
tuples, the messages joined to their recipients, so memory stays flat and no
page is counted or skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from itertools import groupby
from operator import itemgetter
from typing import Any

from sqlalchemy import DateTime, Engine, type_coerce
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from receiver.readmodel.paging import Cursor, beyond, capped_count, ordered
from receiver.readmodel.scope import Selection, aware, selected, visible
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Message, Recipient, Sender

EXPORT_CHUNK = 1000


@dataclass
class Hits:
    """Counted opens or clicks (human and proxy only) and when they happened."""

    count: int = 0
    first: datetime | None = None
    last: datetime | None = None


@dataclass
class Answers:
    """What came back from the recipients (shared/eventstate.py keeps the counts):
    ``replies`` and ``bounces`` count recipients (a message-level answer as one),
    an automatic reply is never a reply."""

    replies: int = 0
    first_reply: datetime | None = None
    auto_replies: int = 0
    bounces: int = 0
    bounce_type: str = ""  # hard if any recipient's was, else soft; "" without a bounce
    complaints: int = 0


@dataclass
class MessageRow:
    message: Message
    recipients: list[str] = field(default_factory=list)
    refused: int = 0
    opens: Hits = field(default_factory=Hits)
    clicks: Hits = field(default_factory=Hits)
    machine_opens: int = 0  # machine and scanner opens, never in ``opens``
    answers: Answers = field(default_factory=Answers)


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
    """``messages`` with their recipients and counts, in the same order.

    The counts are the message's state columns (shared/eventstate.py): no
    event is read for a list.
    """
    rows = {m.id: _row(m) for m in messages}
    if not rows:
        return []
    recipients = select(Recipient).where(col(Recipient.message_id).in_(list(rows)))
    for r in session.exec(recipients.order_by(col(Recipient.position))):
        rows[r.message_id].recipients.append(r.address)
        rows[r.message_id].refused += r.status != "accepted"
        answers = rows[r.message_id].answers
        if r.bounce_type and answers.bounce_type != "hard":
            answers.bounce_type = r.bounce_type
    return list(rows.values())


def _row(m: Message) -> MessageRow:
    return MessageRow(
        m,
        opens=Hits(m.opens, aware(m.first_open_at), aware(m.last_open_at)),
        clicks=Hits(m.clicks, aware(m.first_click_at), aware(m.last_click_at)),
        machine_opens=m.machine_opens,
        answers=Answers(
            m.replies,
            aware(m.first_reply_at),
            m.auto_replies,
            m.bounces,
            "soft" if m.bounces else "",  # a recipient's "hard" (with_hits) wins
            m.complaints,
        ),
    )


EXPORT_COLUMNS = (
    "message_id", "sent_at", "sender", "subject", "recipients", "track_opens",
    "track_clicks", "opens", "first_open", "last_open", "clicks", "first_click",
    "last_click", "machine_opens", "status", "replied", "first_reply", "auto_replied",
    "bounced", "bounce_type", "complained",
)  # fmt: skip


def export_messages(
    engine: Engine, viewer: Viewer, selection: Selection
) -> Iterator[tuple[Any, ...]]:
    """Every matching message as a plain tuple of EXPORT_COLUMNS, newest first.

    One streamed query, each message's row once per recipient (outer join, in
    position order), folded here: no IN list of ids, no second query. Times come
    as the driver gives them (aware on PostgreSQL, parsed from text on SQLite):
    the model type's conversion of every cell was a third of the export's time.
    """
    m = Message

    def plain(time: Any) -> Any:  # the driver's datetime, not one converted per cell
        return type_coerce(col(time), DateTime(timezone=True))

    query = ordered(
        sa_select(
            col(m.id), plain(m.created_at), col(m.sender), col(m.subject),
            col(m.track_opens), col(m.track_clicks), col(m.opens), plain(m.first_open_at),
            plain(m.last_open_at), col(m.clicks), plain(m.first_click_at),
            plain(m.last_click_at), col(m.machine_opens), col(m.status), col(m.replies),
            plain(m.first_reply_at), col(m.auto_replies), col(m.bounces), col(m.complaints),
            col(Recipient.bounce_type), col(Recipient.address),
        )
        .select_from(m)
        .join(Recipient, col(Recipient.message_id) == col(m.id), isouter=True)
        .where(*selected(viewer, selection))
    ).order_by(col(Recipient.position))  # fmt: skip
    options = {"stream_results": True, "yield_per": EXPORT_CHUNK}
    with engine.connect() as conn:
        rows = conn.execute(query, execution_options=options)
        for _, group in groupby(rows, key=itemgetter(0)):
            yield _folded(list(group))  # one line per recipient: a few


_TIMES = frozenset({1, 7, 8, 10, 11, 15})  # the EXPORT_COLUMNS that are times


def _folded(lines: list[Any]) -> tuple[Any, ...]:
    """One message's export row from its lines (one per recipient): the addresses
    joined, a hard bounce of any recipient making the message's bounce "hard"."""
    first: tuple[Any, ...] = tuple(lines[0])
    addresses = "; ".join(r[-1] for r in lines if r[-1] is not None)
    bounces = first[17]
    bounce_type = "hard" if any(r[19] == "hard" for r in lines) else "soft" if bounces else ""
    cells = [aware(v) if i in _TIMES else v for i, v in enumerate(first[:19])]
    return (*cells[:4], addresses, *cells[4:18], bounce_type, cells[18])


def senders(engine: Engine, viewer: Viewer) -> list[str]:
    """The senders the viewer may filter on (for a select box), at most 500.

    Read from the ``senders`` table (one row per lower-cased envelope sender,
    kept by the relay's record), never from the messages: a sender sees only
    the keys their own addresses and domains match.
    """
    key = col(Sender.sender_key)
    query = select(key).where(key != "", visible(viewer, key)).order_by(key).limit(500)
    with session_scope(engine) as session:
        return list(session.exec(query).all())
