"""One message's story: its recipients, links and its events, already counted.

The counting rule applies as in the lists: a recipient's or a link's opens and
clicks are the human and proxy ones; everything else is on the timeline only
(a link also says how many of its other clicks were automatic, the sender's
own, or unknown: the timeline's labels). Events from a message-level token
(recipient position 0, or a position no recipient has) belong to the whole
message.

What it costs does not grow with the message's events: the figures (per
recipient, per link, by verdict) are one grouped query on the message's events
(``GROUP BY`` position, link, kind, verdict: a few dozen rows however many
thousand hits), and the timeline is one page of ``TIMELINE_PAGE`` events,
latest first, keyset-paged on (occurred_at, id) over ``ix_events_message_time``
(migration 0005). ``Detail.older`` is the cursor of the next, older page
("Show more" on the dashboard, ``events_before`` in the API).

:class:`DecisionFacts` is what the message page explains about how the
message was tracked and delivered: the decision record the relay stored
(relay/pipeline.py writes it as JSON), the parts it changed, and the
delivery outcome of each recipient's copy. Both JSON columns are read here,
once, and never trusted to parse: a record the relay did not write (an old
row, a hand edit) gives an empty one, and its raw text stays in the message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, or_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from receiver.readmodel.messages import Hits, MessageRow, with_hits
from receiver.readmodel.paging import Cursor
from receiver.readmodel.scope import COUNTED, aware, visible
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Link, Message, Recipient
from shared.verdicts import AUTOMATED, SELF, UNKNOWN

#: Delivery outcomes the decision panel lists (the recipients list has them all).
OUTCOMES_SHOWN = 20


@dataclass
class TimelineEntry:
    event: Event
    link_url: str = ""  # the clicked link's URL; "" for opens


@dataclass
class RecipientView:
    position: int
    address: str
    status: str
    reply_code: int
    reply_text: str
    tracked: bool
    timeline: list[TimelineEntry] = field(default_factory=list)  # this page's, latest first
    opens: Hits = field(default_factory=Hits)
    clicks: Hits = field(default_factory=Hits)


@dataclass
class LinkView:
    position: int
    url: str
    clicks: int = 0  # counted: a person (human, proxy)
    automatic: int = 0  # machine, scanner
    sender: int = 0  # the sender's own clicks
    unknown: int = 0


@dataclass
class Outcome:
    """How the upstream answered for one recipient's copy."""

    address: str
    accepted: bool
    reply: str  # code and text, e.g. "250 2.0.0 Ok: queued"


@dataclass
class DecisionFacts:
    """How the message was tracked and delivered, as stored (see module docstring)."""

    message: Message
    record: dict[str, Any]  # the decision JSON ({} when absent or unreadable)
    parts: list[dict[str, Any]]  # parts_modified: one object per rewritten part
    accepted: int  # recipients the upstream accepted
    refused: int
    outcomes: list[Outcome]  # the first OUTCOMES_SHOWN recipients, in RCPT order

    @property
    def not_shown(self) -> int:
        return self.accepted + self.refused - len(self.outcomes)


@dataclass
class Detail:
    row: MessageRow
    recipients: list[RecipientView]
    whole_message: RecipientView  # events from message-level tokens (position 0)
    links: list[LinkView]
    events: list[Event]  # this page of the timeline, latest first
    verdicts: dict[str, int]  # opens by verdict
    decision: DecisionFacts
    event_count: int = 0  # all the message's events
    older: str | None = None  # cursor of the next (older) page of events, None on the last
    paged: bool = False  # this is not the latest page


TIMELINE_PAGE = 100


def message_detail(
    engine: Engine, viewer: Viewer, message_id: int, before: Cursor | None = None
) -> Detail | None:
    """The message if ``viewer`` may see it, else None (the same as no such message);
    its timeline is the page of events older than ``before`` (or the latest)."""
    if not 0 <= message_id < 2**63:  # no such id: a BIGINT could not even hold it
        return None
    with session_scope(engine) as session:
        message = session.exec(
            select(Message).where(col(Message.id) == message_id, visible(viewer))
        ).first()
        if message is None:
            return None
        row = with_hits(session, [message])[0]
        recipients = session.exec(
            select(Recipient)
            .where(col(Recipient.message_id) == message_id)
            .order_by(col(Recipient.position))
        ).all()
        links = session.exec(
            select(Link).where(col(Link.message_id) == message_id).order_by(col(Link.position))
        ).all()
        groups = session.execute(_figures(message_id)).all()
        events = _timeline(session, message_id, before)
        facts = _decision_facts(session, message)
    views = {
        r.position: RecipientView(
            r.position, r.address, r.status, r.reply_code, r.reply_text, r.tracked
        )
        for r in recipients
    }
    whole = RecipientView(0, "", "accepted", 250, "", message.track_opens or message.track_clicks)
    link_views = {link.position: LinkView(link.position, link.url) for link in links}
    verdicts = _count(groups, views, whole, link_views)
    more = len(events) > TIMELINE_PAGE
    events = events[:TIMELINE_PAGE]
    for event in events:
        event.occurred_at = aware(event.occurred_at) or event.occurred_at
        link = link_views.get(event.link_position) if event.kind == "click" else None
        target = views.get(event.recipient_position, whole)
        target.timeline.append(TimelineEntry(event, link.url if link else ""))
    return Detail(
        row=row,
        recipients=list(views.values()),
        whole_message=whole,
        links=list(link_views.values()),
        events=events,
        verdicts=verdicts,
        decision=facts,
        event_count=sum(int(g[4]) for g in groups),
        older=Cursor(events[-1].occurred_at, events[-1].id or 0).encode() if more else None,
        paged=before is not None,
    )


def _figures(message_id: int) -> Any:
    """The message's events grouped by what the figures tell apart."""
    e = Event
    keys = (col(e.recipient_position), col(e.link_position), col(e.kind), col(e.verdict))
    return (
        sa_select(*keys, func.count(), func.min(col(e.occurred_at)), func.max(col(e.occurred_at)))
        .where(col(e.message_id) == message_id)
        .group_by(*keys)
    )


def _timeline(session: Session, message_id: int, before: Cursor | None) -> list[Event]:
    """Up to TIMELINE_PAGE + 1 events older than ``before``, latest first."""
    at, key = col(Event.occurred_at), col(Event.id)
    query = select(Event).where(col(Event.message_id) == message_id)
    if before is not None:
        query = query.where(
            and_(at <= before.created_at, or_(at < before.created_at, key < before.id))
        )
    query = query.order_by(at.desc(), key.desc()).limit(TIMELINE_PAGE + 1)
    return list(session.exec(query).all())


def _count(
    groups: Any,
    views: dict[int, RecipientView],
    whole: RecipientView,
    links: dict[int, LinkView],
) -> dict[str, int]:
    """Add each group to its recipient (or the whole message) and link; opens by verdict."""
    verdicts: dict[str, int] = {}
    for position, link_position, kind, verdict, n, first, last in groups:
        count = int(n)
        target = views.get(position, whole)
        is_counted = verdict in COUNTED
        if kind == "open":
            verdicts[verdict] = verdicts.get(verdict, 0) + count
        if is_counted and kind in ("open", "click"):
            _add(target.opens if kind == "open" else target.clicks, count, first, last)
        link = links.get(link_position) if kind == "click" else None
        if link is not None:
            _split(link, verdict, count)
    return verdicts


def _split(link: LinkView, verdict: str, count: int) -> None:
    """A link's clicks by whom, as the timeline labels them."""
    if verdict in COUNTED:
        link.clicks += count
    elif verdict in AUTOMATED:
        link.automatic += count
    elif verdict == SELF:
        link.sender += count
    elif verdict == UNKNOWN:
        link.unknown += count


def _add(hits: Hits, count: int, first: datetime | None, last: datetime | None) -> None:
    hits.count += count
    first, last = aware(first), aware(last)
    hits.first = min(hits.first, first) if hits.first and first else hits.first or first
    hits.last = max(hits.last, last) if hits.last and last else hits.last or last


def _decision_facts(session: Session, message: Message) -> DecisionFacts:
    """:func:`decision_facts` of ``message``: its delivery counted in SQL, the
    first :data:`OUTCOMES_SHOWN` recipients read."""
    counts = dict(
        session.exec(
            select(col(Recipient.status), func.count())
            .where(col(Recipient.message_id) == message.id)
            .group_by(col(Recipient.status))
        ).all()
    )
    shown = session.exec(
        select(Recipient)
        .where(col(Recipient.message_id) == message.id)
        .order_by(col(Recipient.position))
        .limit(OUTCOMES_SHOWN)
    ).all()
    accepted = counts.get("accepted", 0)
    return decision_facts(message, shown, accepted, sum(counts.values()) - accepted)


def decision_facts(
    message: Message,
    recipients: Sequence[Recipient],
    accepted: int | None = None,
    refused: int | None = None,
) -> DecisionFacts:
    """The facts of ``message`` with the outcomes of ``recipients`` (counted from
    them unless ``accepted`` and ``refused`` say how many there are in all)."""
    outcomes = [
        Outcome(r.address, r.status == "accepted", f"{r.reply_code} {r.reply_text}".strip())
        for r in recipients[:OUTCOMES_SHOWN]
    ]
    if accepted is None or refused is None:
        accepted = sum(r.status == "accepted" for r in recipients)
        refused = len(recipients) - accepted
    record = _json(message.decision)
    parts = _json(message.parts_modified)
    return DecisionFacts(
        message,
        record if isinstance(record, dict) else {},
        [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else [],
        accepted,
        refused,
        outcomes,
    )


def _json(raw: str) -> Any:
    try:
        return json.loads(raw) if raw.strip() else None
    except ValueError:
        return None
