"""Per sender and day figures over a time window: what the overview draws.

They come from the ``daily_stats`` rollup that the writers keep with their
rows (shared/eventstate.py says what each figure counts), so a year's chart
reads 365 rows per sender however much mail was sent. Rates are per message:
``opened`` is the number of messages tracked for opens with a counted open
(human or proxy); machine and scanner opens are counted apart. A day is the
UTC day the message was sent on, and its hits count there whenever they came.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from typing import Any

from sqlalchemy import Engine, func, select

from receiver.readmodel.scope import visible_sender
from shared.db import session_scope
from shared.eventstate import FIGURES  # the rollup's columns, named by its owner
from shared.identity import Viewer
from shared.models import DailyStats
from shared.verdicts import VERDICTS


@dataclass
class DayFigures:
    """One sender's mail of one UTC day."""

    sender: str  # lower-cased envelope sender ('' = null sender)
    day: date
    sent: int = 0
    track_opens: int = 0
    opened: int = 0  # tracked for opens, had a counted open
    track_clicks: int = 0
    clicked: int = 0  # tracked for clicks, had a counted click
    human_opens: int = 0  # counted opens (human and proxy)
    machine_opens: int = 0  # machine and scanner opens
    replied: int = 0
    bounced: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)  # opens by verdict


def daily(
    engine: Engine, viewer: Viewer, since: date, sender: str = "", by: str = ""
) -> list[DayFigures]:
    """Days since ``since`` (inclusive) of the senders ``viewer`` may see (or of ``sender``).

    One row per sender and day; summed in SQL with ``by``: ``"day"`` one row per
    day (``sender`` empty), ``"sender"`` one per sender (``day`` is ``since``), so
    a chart of a year of 300 senders reads a few hundred rows, not 100,000.
    """
    table = DailyStats.__table__  # type: ignore[attr-defined]
    key, day = table.c.sender_key, table.c.day
    where = [visible_sender(viewer, key), day >= since]
    if wanted := sender.strip().lower():
        where.append(key == wanted)
    names = [*FIGURES, *(f"opens_{v}" for v in VERDICTS)]
    figures: list[Any] = [table.c[name] for name in names]
    groups: list[Any] = [key, day]
    if by:
        if by not in ("day", "sender"):
            raise ValueError(f"daily: by is 'day' or 'sender', not {by!r}")
        groups = [day] if by == "day" else [key]
        figures = [func.sum(column) for column in figures]
    query = select(*groups, *figures).where(*where)
    if by:
        query = query.group_by(*groups)
    with session_scope(engine) as session:
        rows = session.execute(query).all()
    return [_figures(row, by, since) for row in rows]


def _figures(row: Any, by: str, since: date) -> DayFigures:
    if by == "day":
        sender, day, values = "", row[0], row[1:]
    elif by == "sender":
        sender, day, values = row[0], since, row[1:]
    else:
        sender, day, values = row[0], row[1], row[2:]
    numbers = [int(n or 0) for n in values]
    counts = dict(zip(FIGURES, numbers[: len(FIGURES)], strict=True))
    opens = dict(zip(VERDICTS, numbers[len(FIGURES) :], strict=True))
    return DayFigures(sender, day, **counts, verdicts={v: n for v, n in opens.items() if n})
