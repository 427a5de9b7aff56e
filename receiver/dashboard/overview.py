"""Overview: how tracked mail fares over time, per sender, and who "opened" it.

Rates are per message: the share of messages tracked for opens that had at
least one counted open (human or proxy), the same for clicks. Machine opens
(Apple Mail Privacy Protection, scanners) are counted next to human ones, so
a reader sees how much of the raw pixel traffic was not a person.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from markupsafe import Markup
from sqlalchemy import Engine, func
from sqlalchemy import select as sa_select
from sqlmodel import col, select
from starlette.requests import Request
from starlette.responses import Response

from receiver.dashboard.chart import Point, rate_chart
from receiver.dashboard.queries import Viewer, visible
from receiver.dashboard.queries import senders as all_senders
from receiver.dashboard.web import engine_of, page, render
from shared.db import session_scope
from shared.isotime import aware
from shared.models import Event, Message
from shared.verdicts import COUNTED, MACHINES

PERIODS = {"day": ("Daily, last 30 days", 30), "week": ("Weekly, last 12 weeks", 12)}


@dataclass
class Tally:
    sent: int = 0
    track_opens: int = 0
    opened: int = 0
    track_clicks: int = 0
    clicked: int = 0
    human_opens: int = 0
    machine_opens: int = 0

    @property
    def open_rate(self) -> float | None:
        return self.opened / self.track_opens if self.track_opens else None

    @property
    def click_rate(self) -> float | None:
        return self.clicked / self.track_clicks if self.track_clicks else None


@dataclass
class Overview:
    period: str
    chart: Markup
    total: Tally
    senders: list[tuple[str, Tally]]
    verdicts: dict[str, int] = field(default_factory=dict)


def _bucket(day: date, period: str) -> date:
    return day - timedelta(days=day.weekday()) if period == "week" else day


def build(engine: Engine, viewer: Viewer, period: str, today: date, sender: str = "") -> Overview:
    caption, count = PERIODS[period]
    last = _bucket(today, period)
    step = timedelta(days=7 if period == "week" else 1)
    starts = [last - step * i for i in reversed(range(count))]
    since = datetime(starts[0].year, starts[0].month, starts[0].day, tzinfo=UTC)
    where = [visible(viewer), col(Message.created_at) >= since]
    if sender:
        where.append(func.lower(col(Message.sender)) == sender.lower())
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
    opened: set[int] = set()
    clicked: set[int] = set()
    human: dict[int, int] = {}
    machine: dict[int, int] = {}
    verdicts: dict[str, int] = {}
    for message_id, kind, verdict, n in hits:
        if kind == "open":
            verdicts[verdict] = verdicts.get(verdict, 0) + int(n)
        if verdict in COUNTED:
            (opened if kind == "open" else clicked).add(message_id)
            if kind == "open":
                human[message_id] = human.get(message_id, 0) + int(n)
        elif kind == "open" and verdict in MACHINES:
            machine[message_id] = machine.get(message_id, 0) + int(n)
    buckets = {start: Tally() for start in starts}
    per_sender: dict[str, Tally] = {}
    total = Tally()
    for message_id, created_at, sender, track_opens, track_clicks in messages:
        when = aware(created_at) or created_at
        tallies = [total, per_sender.setdefault(sender.lower() or "(null sender)", Tally())]
        bucket = buckets.get(_bucket(when.date(), period))
        if bucket is not None:
            tallies.append(bucket)
        for t in tallies:
            t.sent += 1
            t.track_opens += bool(track_opens)
            t.opened += bool(track_opens) and message_id in opened
            t.track_clicks += bool(track_clicks)
            t.clicked += bool(track_clicks) and message_id in clicked
            t.human_opens += human.get(message_id, 0)
            t.machine_opens += machine.get(message_id, 0)
    points = [
        Point(
            label=start.strftime("%-d %b"),
            title=("Week of " if period == "week" else "") + start.strftime("%a %-d %b %Y"),
            sent=t.sent,
            open_rate=t.open_rate,
            click_rate=t.click_rate,
            opened=t.opened,
            clicked=t.clicked,
        )
        for start, t in buckets.items()
    ]
    ranked = sorted(per_sender.items(), key=lambda item: (-item[1].sent, item[0]))
    return Overview(period, rate_chart(points, caption), total, ranked[:50], verdicts)


@page()
async def overview(request: Request, viewer: Viewer) -> Response:
    period = request.query_params.get("period", "day")
    if period not in PERIODS:
        period = "day"
    sender = request.query_params.get("sender", "").strip()[:320]
    engine = engine_of(request)
    today = datetime.now(UTC).date()
    data = await asyncio.to_thread(build, engine, viewer, period, today, sender)
    senders = await asyncio.to_thread(all_senders, engine, viewer)
    return render(
        request,
        "dashboard/overview.html",
        {"o": data, "periods": PERIODS, "sender": sender, "senders": senders, "nav": "overview"},
    )
