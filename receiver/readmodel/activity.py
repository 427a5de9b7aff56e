"""Per-message activity over a time window: what the overview's rates are made of.

One row per message (not per event), so a rate is "share of messages tracked
for opens that had a counted open", whatever the number of opens. The
counting rule is the read model's: human and proxy opens count, machine and
scanner opens are counted apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, func
from sqlalchemy import select as sa_select
from sqlmodel import col, select

from receiver.readmodel.scope import AUTOMATED, COUNTED, Selection, aware, selected
from shared.db import session_scope
from shared.identity import Viewer
from shared.models import Event, Message


@dataclass
class Activity:
    message_id: int
    created_at: datetime
    sender: str
    track_opens: bool
    track_clicks: bool
    opened: bool = False  # had a counted open
    clicked: bool = False  # had a counted click
    human_opens: int = 0  # counted opens (human and proxy)
    machine_opens: int = 0  # machine and scanner opens


@dataclass
class Window:
    messages: list[Activity]
    verdicts: dict[str, int] = field(default_factory=dict)  # opens by verdict


def activity(engine: Engine, viewer: Viewer, since: datetime, sender: str = "") -> Window:
    """Messages ``viewer`` may see, created since ``since`` (from ``sender`` if given)."""
    where = selected(viewer, Selection(sender=sender, since=since))
    with session_scope(engine) as session:
        messages = session.execute(
            sa_select(
                col(Message.id),
                col(Message.created_at),
                col(Message.sender),
                col(Message.track_opens),
                col(Message.track_clicks),
            ).where(*where)
        ).all()
        in_window = select(Message.id).where(*where)
        hits = session.execute(
            sa_select(col(Event.message_id), col(Event.kind), col(Event.verdict), func.count())
            .where(col(Event.message_id).in_(in_window.scalar_subquery()))
            .group_by(col(Event.message_id), col(Event.kind), col(Event.verdict))
        ).all()
    rows = {
        mid: Activity(mid, aware(created) or created, address or "", bool(opens), bool(clicks))
        for mid, created, address, opens, clicks in messages
    }
    window = Window(list(rows.values()))
    for message_id, kind, verdict, n in hits:
        row = rows.get(message_id)
        if kind == "open":
            window.verdicts[verdict] = window.verdicts.get(verdict, 0) + int(n)
        if row is None:
            continue
        if verdict in COUNTED:
            if kind == "open":
                row.opened = True
                row.human_opens += int(n)
            else:
                row.clicked = True
        elif kind == "open" and verdict in AUTOMATED:
            row.machine_opens += int(n)
    return window
