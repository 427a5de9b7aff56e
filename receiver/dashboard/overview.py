"""Overview: how tracked mail fares over time, per sender, and who "opened" it.

Rates are per message: the share of messages tracked for opens that had at
least one counted open (human or proxy), the same for clicks. Machine opens
(Apple Mail Privacy Protection, scanners) are counted next to human ones, so
a reader sees how much of the raw pixel traffic was not a person. The figures
per sender and day come from the read model (``readmodel.daily``, the
rollup summed in SQL: one row per day of the window, one per sender); this
page only buckets the days by week.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

from markupsafe import Markup
from sqlalchemy import Engine
from starlette.requests import Request
from starlette.responses import Response

from receiver import readmodel
from receiver.dashboard import filters
from receiver.dashboard.chart import Point, rate_chart
from receiver.dashboard.web import engine_of, page, render
from shared.identity import Viewer

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

    def add(self, day: readmodel.DayFigures) -> None:
        self.sent += day.sent
        self.track_opens += day.track_opens
        self.opened += day.opened
        self.track_clicks += day.track_clicks
        self.clicked += day.clicked
        self.human_opens += day.human_opens
        self.machine_opens += day.machine_opens

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
    buckets = {start: Tally() for start in starts}
    total = Tally()
    verdicts: dict[str, int] = {}
    for d in readmodel.daily(engine, viewer, starts[0], sender, by="day"):
        total.add(d)
        bucket = buckets.get(_bucket(d.day, period))
        if bucket is not None:
            bucket.add(d)
        for verdict, n in d.verdicts.items():
            verdicts[verdict] = verdicts.get(verdict, 0) + n
    per_sender: dict[str, Tally] = {}
    for d in readmodel.daily(engine, viewer, starts[0], sender, by="sender"):
        per_sender.setdefault(d.sender or "(null sender)", Tally()).add(d)
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
    sender = filters.text(request.query_params, "sender", 320)
    engine = engine_of(request)
    today = datetime.now(UTC).date()
    data = await asyncio.to_thread(build, engine, viewer, period, today, sender)
    senders = await asyncio.to_thread(readmodel.senders, engine, viewer)
    return render(
        request,
        "dashboard/overview.html",
        {"o": data, "periods": PERIODS, "sender": sender, "senders": senders, "nav": "overview"},
    )
