"""The events feed: every event after a cursor, oldest first, with its context.

Events are append-only and their ids only grow, so ``id > after`` is a cursor
that never skips or repeats a row, however many are written meanwhile. The
API hands it out as ``next_after``; the events CSV walks the same feed.

An event can arrive before its message's row (the relay writes through a
journal when the database is away; events have no foreign key), so the
message is an outer join: an administrator's feed carries the event at once.
A sender's scope needs the message's sender, so an event that comes before
its message is not in a sender's feed (as before).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy import select as sa_select
from sqlmodel import col

from receiver.readmodel.scope import Selection, selected
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Link, Message, Recipient

EXPORT_CHUNK = 1000


@dataclass
class EventRow:
    event: Event
    subject: str  # of the message; "" while the relay has not recorded it yet
    sender: str  # of the message; likewise
    address: str  # the recipient's; "" for a message-level token
    url: str  # the clicked link's; "" for opens


def events_after(
    engine: Engine, viewer: Viewer, after: int, limit: int, selection: Selection | None = None
) -> list[EventRow]:
    """Up to ``limit`` events with an id above ``after`` on messages ``viewer`` may
    see (narrowed by ``selection``), in id order."""
    query = (
        sa_select(
            Event, col(Message.subject), col(Message.sender), col(Recipient.address), col(Link.url)
        )
        .join(Message, col(Message.id) == col(Event.message_id), isouter=True)
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
        .where(*selected(viewer, selection or Selection()), col(Event.id) > after)
        .order_by(col(Event.id))
        .limit(limit)
    )
    with session_scope(engine) as session:
        rows = session.execute(query).all()
    return [
        EventRow(event, subject or "", sender or "", address or "", url or "")
        for event, subject, sender, address, url in rows
    ]


def all_events(engine: Engine, viewer: Viewer, selection: Selection) -> Iterator[EventRow]:
    """Every event of the matching messages (for CSV), read in chunks."""
    after = 0
    while True:
        chunk = events_after(engine, viewer, after, EXPORT_CHUNK, selection)
        yield from chunk
        if len(chunk) < EXPORT_CHUNK:
            return
        after = chunk[-1].event.id or 0
