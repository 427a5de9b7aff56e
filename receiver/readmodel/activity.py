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

from sqlalchemy import Engine, select
from sqlmodel import col

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


def daily(engine: Engine, viewer: Viewer, since: date, sender: str = "") -> list[DayFigures]:
    """Days since ``since`` (inclusive) of the senders ``viewer`` may see (or of ``sender``)."""
    table = DailyStats.__table__  # type: ignore[attr-defined]
    key = table.c.sender_key
    where = [visible_sender(viewer, key), col(DailyStats.day) >= since]
    if wanted := sender.strip().lower():
        where.append(key == wanted)
    verdicts = [table.c[f"opens_{v}"] for v in VERDICTS]
    query = select(key, col(DailyStats.day), *(table.c[f] for f in FIGURES), *verdicts).where(
        *where
    )
    with session_scope(engine) as session:
        rows = session.execute(query).all()
    out = []
    for row in rows:
        figures = dict(zip(FIGURES, row[2 : 2 + len(FIGURES)], strict=True))
        opens = dict(zip(VERDICTS, row[2 + len(FIGURES) :], strict=True))
        out.append(
            DayFigures(
                row[0],
                row[1],
                **{f: int(n) for f, n in figures.items()},
                verdicts={v: int(n) for v, n in opens.items() if n},
            )
        )
    return out
