"""The overview's figures, from the daily rollup: what the page used to count per message."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from receiver.dashboard.overview import build
from shared.identity import Viewer
from tests.support.seedrows import T0, add_message, event, write_events

ADMIN = Viewer(1, "ada", "admin", ())
SAM = Viewer(2, "sam", "sender", ("sam@example.com",))
CORP = Viewer(3, "dom", "sender", ("@corp.example",))
TODAY = (T0 + timedelta(days=9)).date()


def _seed(engine: Engine) -> None:
    sam = [
        add_message(engine, sender="Sam@Example.com", created_at=T0 + timedelta(days=d))
        for d in (2, 2, 8)
    ]
    corp = add_message(engine, sender="x@corp.example", created_at=T0 + timedelta(days=8))
    untracked = add_message(engine, sender="x@corp.example", created_at=T0, tracked=False)
    too_old = add_message(engine, sender="sam@example.com", created_at=T0 - timedelta(days=60))
    write_events(
        engine,
        [
            event(sam[0], "open", 1, "human"),
            event(sam[0], "open", 2, "human"),  # a second open: still one opened message
            event(sam[0], "open", 1, "machine"),
            event(sam[0], "click", 1, "human", link=1),
            event(sam[1], "open", 1, "machine"),  # a machine open is no open
            event(sam[2], "click", 2, "scanner", link=1),
            event(corp, "open", 0, "proxy"),
            event(untracked, "open", 1, "human"),  # counted, but not tracked for opens
            event(too_old, "open", 1, "human"),
        ],
    )


def test_daily_figures_for_an_admin(engine: Engine) -> None:
    _seed(engine)
    o = build(engine, ADMIN, "day", TODAY)
    t = o.total
    assert (t.sent, t.track_opens, t.opened, t.track_clicks, t.clicked) == (5, 4, 2, 4, 1)
    assert (t.human_opens, t.machine_opens) == (4, 2)
    assert o.verdicts == {"human": 3, "machine": 2, "proxy": 1}
    senders = {name: (s.sent, s.opened) for name, s in o.senders}
    assert senders == {"sam@example.com": (3, 1), "x@corp.example": (2, 1)}
    assert [name for name, _ in o.senders] == ["sam@example.com", "x@corp.example"]


def test_a_sender_sees_only_their_mail_and_weeks_add_up(engine: Engine) -> None:
    _seed(engine)
    days = build(engine, SAM, "day", TODAY)
    weeks = build(engine, SAM, "week", TODAY)
    assert [name for name, _ in days.senders] == ["sam@example.com"]
    assert (days.total.sent, days.total.opened, days.total.clicked) == (3, 1, 1)
    assert weeks.total.sent == 4  # 12 weeks reach back to the 60-day-old message
    corp = build(engine, CORP, "day", TODAY, sender="X@Corp.example")
    assert (corp.total.sent, corp.total.opened) == (2, 1)
    assert build(engine, CORP, "day", TODAY, sender="sam@example.com").total.sent == 0
