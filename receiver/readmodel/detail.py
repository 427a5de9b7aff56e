"""One message's story: its recipients, links and every event, already counted.

The counting rule applies as in the lists: a recipient's or a link's opens and
clicks are the human and proxy ones; everything else is on the timeline only
(a link also says how many automated clicks it had). Events from a
message-level token (recipient position 0, or a position no recipient has)
belong to the whole message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlmodel import col, select

from receiver.readmodel.messages import Hits, MessageRow, with_hits
from receiver.readmodel.scope import COUNTED, aware, visible
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Link, Message, Recipient


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
    timeline: list[TimelineEntry] = field(default_factory=list)  # oldest first
    opens: Hits = field(default_factory=Hits)
    clicks: Hits = field(default_factory=Hits)


@dataclass
class LinkView:
    position: int
    url: str
    clicks: int = 0
    other_clicks: int = 0  # not counted: scanners, the sender, unknown


@dataclass
class Detail:
    row: MessageRow
    recipients: list[RecipientView]
    whole_message: RecipientView  # events from message-level tokens (position 0)
    links: list[LinkView]
    events: list[Event]  # all of them, in id (arrival) order
    verdicts: dict[str, int]  # opens by verdict


def message_detail(engine: Engine, viewer: Viewer, message_id: int) -> Detail | None:
    """The message if ``viewer`` may see it, else None (the same as no such message)."""
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
        events = list(
            session.exec(
                select(Event).where(col(Event.message_id) == message_id).order_by(col(Event.id))
            ).all()
        )
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
    for event in sorted(events, key=lambda e: (e.occurred_at, e.id or 0)):
        link = link_views.get(event.link_position) if event.kind == "click" else None
        target = views.get(event.recipient_position, whole)
        target.timeline.append(TimelineEntry(event, link.url if link else ""))
        is_counted = event.verdict in COUNTED
        if event.kind == "open":
            verdicts[event.verdict] = verdicts.get(event.verdict, 0) + 1
        if is_counted:
            _count(target.opens if event.kind == "open" else target.clicks, event)
        if link is not None:
            link.clicks += is_counted
            link.other_clicks += not is_counted
    return Detail(
        row=row,
        recipients=list(views.values()),
        whole_message=whole,
        links=list(link_views.values()),
        events=events,
        verdicts=verdicts,
    )


def _count(hits: Hits, event: Event) -> None:
    """Add a counted event; events arrive oldest first."""
    hits.count += 1
    hits.first = hits.first or event.occurred_at
    hits.last = event.occurred_at
