"""Overview: how tracked mail fares over time, per sender, and who "opened" it.

Rates are per message: the share of messages tracked for opens that had at
least one counted open (human or proxy), the same for clicks. Machine opens
(Apple Mail Privacy Protection, scanners) are counted next to human ones, so
a reader sees how much of the raw pixel traffic was not a person. The figures
per message come from the read model (``readmodel.activity``); this page
only buckets them by day or week and by sender.
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
    window = readmodel.activity(engine, viewer, readmodel.day_start(starts[0]), sender)
    buckets = {start: Tally() for start in starts}
    per_sender: dict[str, Tally] = {}
    total = Tally()
    for a in window.messages:
        tallies = [total, per_sender.setdefault(a.sender.lower() or "(null sender)", Tally())]
        bucket = buckets.get(_bucket(a.created_at.date(), period))
        if bucket is not None:
            tallies.append(bucket)
        for t in tallies:
            t.sent += 1
            t.track_opens += a.track_opens
            t.opened += a.track_opens and a.opened
            t.track_clicks += a.track_clicks
            t.clicked += a.track_clicks and a.clicked
            t.human_opens += a.human_opens
            t.machine_opens += a.machine_opens
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
    return Overview(period, rate_chart(points, caption), total, ranked[:50], window.verdicts)


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
