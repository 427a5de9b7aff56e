"""Keyset paging over (created_at, id), newest first, and counts that stay cheap.

A page is found by where it starts, never by how many rows come before it:
``OFFSET`` reads and drops every skipped row, so page 50 of a million messages
cost as much as reading 2,500 of them and the last page the whole table. A
cursor names the row next to the page, (created_at, id): ids are random, so
the pair is a total order, and a row inserted meanwhile never shifts a page
(no row is shown twice or skipped when mail arrives between two clicks).

The cursor is opaque to callers (``o:`` or ``n:`` for older or newer rows,
then the row's two values, base64url): what the dashboard puts in a link and
the API hands out as ``next_cursor``. A cursor that does not decode is a
:class:`BadCursor`, which the callers turn into a note or a 400.

Counts stop at :data:`COUNT_CAP`: "over 10,000" is what a person needs to
know, and counting a million matches would read a million rows on every page.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, func, or_
from sqlalchemy import select as sa_select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement
from sqlmodel import col

from shared.models import Message

COUNT_CAP = 10_000
Q = TypeVar("Q", bound=Select[*tuple[Any, ...]])  # any SELECT, its row type kept


class BadCursor(ValueError):
    """A cursor this code did not hand out (or from another version)."""


@dataclass(frozen=True)
class Cursor:
    """The row next to a page: ``older`` rows come after it, else newer ones."""

    created_at: datetime
    id: int
    older: bool = True

    def encode(self) -> str:
        raw = json.dumps([self.created_at.isoformat(), self.id]).encode()
        direction = "o" if self.older else "n"
        return f"{direction}:{base64.urlsafe_b64encode(raw).decode().rstrip('=')}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        direction, _, body = text.partition(":")
        if direction not in ("o", "n") or not body or len(text) > 200:
            raise BadCursor(text)
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            stamp, row_id = json.loads(raw)
            created_at = datetime.fromisoformat(stamp)
        except (binascii.Error, ValueError, TypeError) as exc:
            raise BadCursor(text) from exc
        if type(row_id) is not int or not 0 <= row_id < 2**63:
            raise BadCursor(text)
        return cls(created_at, row_id, direction == "o")

    @classmethod
    def of(cls, message: Message, older: bool) -> Cursor:
        return cls(message.created_at, message.id, older)


def beyond(cursor: Cursor) -> ColumnElement[bool]:
    """Rows older (or newer) than the cursor's row, in a form both databases index.

    ``created_at <= x`` is the part an index on ``created_at`` (or on
    ``sender_key, created_at, id``) can range over; the OR settles the ties.
    """
    created, row_id = col(Message.created_at), col(Message.id)
    at, key = cursor.created_at, cursor.id
    if cursor.older:
        return and_(created <= at, or_(created < at, row_id < key))
    return and_(created >= at, or_(created > at, row_id > key))


def ordered(query: Q, older: bool = True) -> Q:
    """Newest first (or oldest first when walking towards newer rows)."""
    created, row_id = col(Message.created_at), col(Message.id)
    if older:
        return query.order_by(created.desc(), row_id.desc())
    return query.order_by(created.asc(), row_id.asc())


def capped_count(session: Session, where: list[ColumnElement[bool]]) -> tuple[int, bool]:
    """How many messages match, exactly up to COUNT_CAP; and whether there are more.

    ``count(*)`` over a ``LIMIT COUNT_CAP + 1`` subquery reads at most that many
    rows, whatever the table holds.
    """
    matches = sa_select(col(Message.id)).where(*where).limit(COUNT_CAP + 1).subquery()
    total = int(session.execute(sa_select(func.count()).select_from(matches)).scalar_one())
    return min(total, COUNT_CAP), total > COUNT_CAP
