"""Which messages a reader may see and which a selection picks, as WHERE clauses.

Visibility is one SQL clause applied to every read, so a sender can never
reach another sender's message by guessing an id: the row is simply not found
(a 404 in both the dashboard and the API).

The decisions the dashboard and the API used to make differently, made once:

- "Not opened" means tracked for opens and no counted open: mail that was never
  tracked for opens was not "not opened", it is unknown. Likewise "not
  clicked" needs click tracking.
- A text search matches literally: ``50%`` finds "50%" and ``a_b`` finds
  "a_b", not "a1b" (LIKE wildcards in the text are escaped).
- Dates are whole UTC days, both ends inclusive.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from sqlalchemy import exists, false, func, or_, true
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from shared.addresses import spellings
from shared.identity import Viewer
from shared.isotime import aware as aware  # re-exported for readmodel's modules
from shared.models import Event, Message, Recipient
from shared.verdicts import AUTOMATED as AUTOMATED  # re-exported, as are aware and COUNTED
from shared.verdicts import COUNTED as COUNTED


def day_start(day: date) -> datetime:
    return datetime.combine(day, time.min, tzinfo=UTC)


def day_end(day: date) -> datetime:
    """The last instant of ``day``: an inclusive upper bound for the whole day."""
    return datetime.combine(day, time.max, tzinfo=UTC)


@dataclass(frozen=True)
class Selection:
    """What a reader asked for; None and "" mean "any"."""

    tracked: bool | None = None  # tracking was on for opens or clicks
    opened: bool | None = None  # True: a counted open; False: tracked for opens, none
    clicked: bool | None = None  # True: a counted click; False: tracked for clicks, none
    sender: str = ""  # envelope sender, exact, any case
    since: datetime | None = None  # created at or after (inclusive)
    until: datetime | None = None  # created at or before (inclusive)
    text: str = ""  # in the subject or a recipient address, any case, literally


def visible(viewer: Viewer) -> ColumnElement[bool]:
    """The messages ``viewer`` may see, as a WHERE clause."""
    if viewer.is_admin:
        return true()
    sender = func.lower(col(Message.sender))
    clauses = [  # a sender keeps what MAIL FROM said: an IDN domain may be in Unicode
        sender.endswith(p, autoescape=True) if p.startswith("@") else sender == p
        for stored in viewer.addresses
        for p in spellings(stored)
    ]
    return or_(*clauses) if clauses else false()


def counted(kind: str) -> ColumnElement[bool]:
    """The message has at least one counted event of ``kind`` (open or click)."""
    return exists().where(
        col(Event.message_id) == col(Message.id),
        col(Event.kind) == kind,
        col(Event.verdict).in_(COUNTED),
    )


def selected(viewer: Viewer, selection: Selection) -> list[ColumnElement[bool]]:
    """WHERE clauses: what ``viewer`` may see, narrowed by ``selection``."""
    s = selection
    where = [visible(viewer)]
    if s.tracked is not None:
        tracked = or_(col(Message.track_opens), col(Message.track_clicks))
        where.append(tracked if s.tracked else ~tracked)
    for wanted, kind, tracking in (
        (s.opened, "open", col(Message.track_opens)),
        (s.clicked, "click", col(Message.track_clicks)),
    ):
        if wanted is not None:
            where += [counted(kind)] if wanted else [tracking.is_(True), ~counted(kind)]
    if sender := s.sender.strip().lower():
        where.append(func.lower(col(Message.sender)) == sender)
    if s.since is not None:
        where.append(col(Message.created_at) >= s.since)
    if s.until is not None:
        where.append(col(Message.created_at) <= s.until)
    if text := s.text.strip().lower():
        in_recipients = exists().where(
            col(Recipient.message_id) == col(Message.id),
            func.lower(col(Recipient.address)).contains(text, autoescape=True),
        )
        where.append(
            or_(func.lower(col(Message.subject)).contains(text, autoescape=True), in_recipients)
        )
    return where


def visible_sender(viewer: Viewer, key: ColumnElement[str]) -> ColumnElement[bool]:
    """:func:`visible` for a column holding the lower-cased sender (``sender_key`` of
    the rollups, shared/eventstate.py): the same addresses and domains."""
    if viewer.is_admin:
        return true()
    clauses = [
        key.endswith(p, autoescape=True) if p.startswith("@") else key == p
        for stored in viewer.addresses
        for p in spellings(stored)
    ]
    return or_(*clauses) if clauses else false()
