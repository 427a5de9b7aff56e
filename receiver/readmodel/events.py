"""The events feed: every event after a cursor, oldest first, with its context.

Events are append-only and their ids only grow, so ``id > after`` is a cursor
that never skips or repeats a row, however many are written meanwhile. The
API hands it out as ``next_after``; the events CSV walks the same feed.

An event can arrive before its message's row (the relay writes through a
journal when the database is away; events have no foreign key), so the
message is an outer join: an administrator's feed carries the event at once.
A sender's scope needs the message's sender, so an event that comes before
its message is not in a sender's feed (as before).

A sender's page is found in two steps: first the ids of its events, from the
messages in scope to their events (``id > after``, id order, the limit), which
both indexes answer without reading a row (``ix_messages_sender_key_created``
then ``ix_events_message_time``, index-only on PostgreSQL); then those events
with their context. In one step the planner walked every event in id order
and looked up each one's message, because reaching the sender's events
through their messages meant reading each event's row: for a sender with few
events among everyone's that read the whole table (PostgreSQL, 100k messages:
250 ms for a page of a sender with 0.02 % of the mail; BENCHMARKS.md "Scale").
With the ids alone the planner reaches a sparse sender's events through their
messages (cost: their own events after the cursor) and still walks the ids
for a sender with much of the mail (a page is found in the first few thousand).

The CSV export (:func:`export_events`) is one query on a server-side cursor
(``stream_results``) of plain tuples. An administrator's walks the events in
id order; a sender's starts from their messages (``sender_key``'s index) and
reaches each one's events through ``ix_events_message_kind``, message by
message (newest message first, then id order), so it never reads the events
of other senders' mail.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine
from sqlalchemy import select as sa_select
from sqlmodel import col

from receiver.readmodel.paging import Q, ordered
from receiver.readmodel.scope import Selection, aware, selected
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Link, Message, Recipient

EXPORT_CHUNK = 2000


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
    where = [*selected(viewer, selection or Selection()), col(Event.id) > after]
    query = _joined(
        sa_select(
            Event,
            col(Message.subject),
            col(Message.sender),
            col(Recipient.address),
            col(Link.url),
        ),
        outer=viewer.is_admin,
    )
    if viewer.is_admin:
        query = query.where(*where)
    else:  # the page's ids first, from the messages in scope (the module says why)
        page = (
            sa_select(col(Event.id))
            .select_from(Message)
            .join(Event, col(Event.message_id) == col(Message.id))
        )
        page = page.where(*where).order_by(col(Event.id)).limit(limit)
        query = query.where(col(Event.id).in_(page.scalar_subquery()))
    query = query.order_by(col(Event.id)).limit(limit)
    with session_scope(engine) as session:
        rows = session.execute(query).all()
    return [
        EventRow(event, subject or "", sender or "", address or "", url or "")
        for event, subject, sender, address, url in rows
    ]


def _joined(query: Q, outer: bool) -> Q:
    """Events with their message (outer: also those that came before it), the
    recipient of their token and the link clicked."""
    if outer:
        query = query.select_from(Event).join(
            Message, col(Message.id) == col(Event.message_id), isouter=True
        )
    else:  # from the messages in scope to their events
        query = query.select_from(Message).join(Event, col(Event.message_id) == col(Message.id))
    return query.join(
        Recipient,
        (col(Recipient.message_id) == col(Event.message_id))
        & (col(Recipient.position) == col(Event.recipient_position)),
        isouter=True,
    ).join(
        Link,
        (col(Link.message_id) == col(Event.message_id))
        & (col(Link.position) == col(Event.link_position)),
        isouter=True,
    )


EXPORT_COLUMNS = (
    "message_id", "subject", "sender", "kind", "occurred_at", "recipient", "url",
    "verdict", "reasons", "ip", "user_agent", "method", "bounce_type", "status", "diagnostic",
)  # fmt: skip


def export_events(
    engine: Engine, viewer: Viewer, selection: Selection
) -> Iterator[tuple[Any, ...]]:
    """Every event of the matching messages as a plain tuple of EXPORT_COLUMNS (a
    bounce's type, status code and diagnostic text; "" for other kinds)."""
    e = Event
    query = _joined(
        sa_select(
            col(e.message_id), col(Message.subject), col(Message.sender), col(e.kind),
            col(e.occurred_at), col(Recipient.address), col(Link.url), col(e.verdict),
            col(e.reasons), col(e.ip), col(e.user_agent), col(e.method), col(e.bounce_type),
            col(e.status_code), col(e.diagnostic),
        ),
        outer=viewer.is_admin,
    ).where(*selected(viewer, selection))  # fmt: skip
    if viewer.is_admin:
        query = query.order_by(col(Event.id))
    else:
        query = ordered(query).order_by(col(Event.id))
    options = {"stream_results": True, "yield_per": EXPORT_CHUNK}
    with engine.connect() as conn:
        for row in conn.execute(query, execution_options=options):
            yield (*row[:4], aware(row[4]), *(v or "" for v in row[5:7]), *row[7:])
