"""One message's story: its recipients, links and every event, already counted.

The counting rule applies as in the lists: a recipient's or a link's opens and
clicks are the human and proxy ones; everything else is on the timeline only
(a link also says how many of its other clicks were automatic, the sender's
own, or unknown: the timeline's labels). Events from a message-level token
(recipient position 0, or a position no recipient has) belong to the whole
message.

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
from typing import Any

from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from receiver.readmodel.messages import Hits, MessageRow, with_hits
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
    timeline: list[TimelineEntry] = field(default_factory=list)  # oldest first
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
    events: list[Event]  # all of them, in id (arrival) order
    verdicts: dict[str, int]  # opens by verdict
    decision: DecisionFacts


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
        link_views = _link_clicks(session, message_id, links)
        facts = _decision_facts(session, message)
    views = {
        r.position: RecipientView(
            r.position, r.address, r.status, r.reply_code, r.reply_text, r.tracked
        )
        for r in recipients
    }
    whole = RecipientView(0, "", "accepted", 250, "", message.track_opens or message.track_clicks)
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
    return Detail(
        row=row,
        recipients=list(views.values()),
        whole_message=whole,
        links=list(link_views.values()),
        events=events,
        verdicts=verdicts,
        decision=facts,
    )


def _count(hits: Hits, event: Event) -> None:
    """Add a counted event; events arrive oldest first."""
    hits.count += 1
    hits.first = hits.first or event.occurred_at
    hits.last = event.occurred_at


def _link_clicks(session: Session, message_id: int, links: Sequence[Link]) -> dict[int, LinkView]:
    """The message's links with their clicks by whom, as the timeline labels them."""
    views = {link.position: LinkView(link.position, link.url) for link in links}
    rows = session.exec(
        select(col(Event.link_position), col(Event.verdict), func.count())
        .where(col(Event.message_id) == message_id, col(Event.kind) == "click")
        .group_by(col(Event.link_position), col(Event.verdict))
    ).all()
    for position, verdict, count in rows:
        view = views.get(position)
        if view is None:
            continue
        if verdict in COUNTED:
            view.clicks += count
        elif verdict in AUTOMATED:
            view.automatic += count
        elif verdict == SELF:
            view.sender += count
        elif verdict == UNKNOWN:
            view.unknown += count
    return views


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
