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
- "Replied" is a reply from a recipient (``messages.replies``); an
  out-of-office or other automatic answer (``auto_replies``) never counts, so
  a message answered only automatically is "not replied". "Bounced" is any
  bounce, hard or soft, of any recipient (``bounces``).
- "Follow up after N days" is the list a sales person works through: opened
  (a counted open), no reply, sent more than N whole days ago (``created_at``
  before now minus N days). A bounce of one recipient does not take the
  message off that list: the others may still be worth a follow-up.

Every clause reads columns of ``messages`` (and, for a search, ``recipients``),
never the events table: opened / clicked / replied / bounced are the state columns the writers
keep with the events (shared/eventstate.py), a sender is ``sender_key`` (the
lower-cased envelope sender, indexed with created_at and id), so a filter
costs the same after a year of mail as after a day.

The text search is one ``IN (... UNION ...)`` over the two columns it reads,
``lower(subject)`` and ``lower(recipients.address)``: on PostgreSQL each arm
is a bitmap scan of its pg_trgm GIN index (migration 0005) for a text of
three characters or more (shorter texts have no trigram and scan); an
address's arm asks the index for its local part only (:func:`indexed_part`)
and the subject's arm carries the reader's scope. SQLite has
no trigram index: there the same query scans messages and recipients, the
documented slower path (README, "The dashboard").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import and_, false, func, or_, true, union
from sqlalchemy import select as sa_select
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from shared.addresses import spellings
from shared.identity import Viewer
from shared.isotime import aware as aware  # re-exported for readmodel's modules
from shared.models import Message, Recipient
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
    replied: bool | None = None  # True: a recipient replied (never an auto-reply); False: none
    bounced: bool | None = None  # True: a recipient bounced (hard or soft); False: none did
    follow_up_days: int | None = None  # opened, not replied, sent over N days ago


def visible(viewer: Viewer, key: Any = None) -> ColumnElement[bool]:
    """The messages ``viewer`` may see, as a WHERE clause on ``sender_key`` (the
    messages' unless ``key`` names another column of sender keys)."""
    if viewer.is_admin:
        return true()
    sender = col(Message.sender_key) if key is None else key
    clauses = [  # a sender keeps what MAIL FROM said: an IDN domain may be in Unicode
        sender.endswith(p, autoescape=True) if p.startswith("@") else sender == p
        for stored in viewer.addresses
        for p in spellings(stored)
    ]
    return or_(*clauses) if clauses else false()


_STATE = {  # (count column, tracking column) of each kind
    "open": (col(Message.opens), col(Message.track_opens)),
    "click": (col(Message.clicks), col(Message.track_clicks)),
}


def _hit(kind: str, wanted: bool) -> list[ColumnElement[bool]]:
    """A counted hit of ``kind``; or, not wanted, tracked for it and none."""
    count, tracking = _STATE[kind]
    return [count > 0] if wanted else [tracking.is_(True), count == 0]


def _answers(s: Selection) -> list[ColumnElement[bool]]:
    """Replied, bounced and the follow-up list ("opened, no reply, sent before now
    minus N days"), on the message's answer counts."""
    where = []
    for count, wanted in ((col(Message.replies), s.replied), (col(Message.bounces), s.bounced)):
        if wanted is not None:
            where.append(count > 0 if wanted else count == 0)
    if s.follow_up_days is not None:
        cutoff = datetime.now(UTC) - timedelta(days=s.follow_up_days)
        where += [
            col(Message.opens) > 0,
            col(Message.replies) == 0,
            col(Message.created_at) < cutoff,
        ]
    return where


def _like(text: str) -> str:
    """``%text%`` for LIKE ... ESCAPE '/': the text's own wildcards match literally."""
    return "%" + text.replace("/", "//").replace("%", "/%").replace("_", "/_") + "%"


def indexed_part(text: str) -> str:
    """The part of ``text`` the trigram index is asked for: up to and including
    the first ``@`` when two characters or more come before it, else all of it.

    A GIN index ANDs the posting lists of every trigram of the pattern, and
    reads each list whole when the matches are spread over it: the domain's
    trigrams (``example``, ``gmail``, ``com``) are in most addresses, so an
    address searched whole read ~15,000 index pages for 4,268 rows at 1M
    (BENCHMARKS.md "Scale"). The local part and the ``@`` that ends it are
    what tell addresses apart (``r0@`` is the one trigram ``r0``-then-end);
    the whole text is then checked on the rows found (:func:`_text`).
    """
    local, at, _ = text.partition("@")
    return local + at if at and len(local) >= 2 else text


def _contains(column: Any, text: str) -> ColumnElement[bool]:
    """``lower(column)`` contains ``text`` literally, the index asked only for
    :func:`indexed_part`: the whole text is checked on ``lower(column || '')``,
    an expression no index is on, so the planner cannot fold it into the
    index's condition (which would read every trigram's list again)."""
    part = indexed_part(text)
    found = func.lower(column).like(_like(part), "/")
    if part == text:
        return found
    return and_(found, func.lower(column.concat("")).like(_like(text), "/"))


def _text(text: str, scope: ColumnElement[bool]) -> ColumnElement[bool]:
    """The subject or a recipient address contains ``text`` (lower-case), literally.

    The subject's arm also carries the reader's ``scope`` (:func:`visible`),
    which the outer query applies anyway: for a sender PostgreSQL then ANDs
    the trigram bitmap with ``ix_messages_sender_key_created`` and reads only
    their own matching rows, where it hashed every message of theirs (20,000
    at 1M) against everyone's matches (BENCHMARKS.md "Scale").
    """
    ids = union(
        sa_select(col(Message.id)).where(_contains(col(Message.subject), text), scope),
        sa_select(col(Recipient.message_id)).where(_contains(col(Recipient.address), text)),
    )
    return col(Message.id).in_(ids)


def selected(viewer: Viewer, selection: Selection) -> list[ColumnElement[bool]]:
    """WHERE clauses: what ``viewer`` may see, narrowed by ``selection``."""
    s = selection
    where = [visible(viewer)]
    if s.tracked is not None:
        tracked = or_(col(Message.track_opens), col(Message.track_clicks))
        where.append(tracked if s.tracked else ~tracked)
    if s.opened is not None:
        where += _hit("open", s.opened)
    if s.clicked is not None:
        where += _hit("click", s.clicked)
    where += _answers(s)
    if sender := s.sender.strip().lower():
        where.append(col(Message.sender_key) == sender)
    if s.since is not None:
        where.append(col(Message.created_at) >= s.since)
    if s.until is not None:
        where.append(col(Message.created_at) <= s.until)
    if text := s.text.strip().lower():
        where.append(_text(text, where[0]))
    return where


def visible_sender(viewer: Viewer, key: ColumnElement[str]) -> ColumnElement[bool]:
    """:func:`visible` for a column holding the lower-cased sender (``sender_key`` of
    the rollups, shared/eventstate.py): the same addresses and domains."""
    return visible(viewer, key)
