"""The rollup read per sender and day, and summed in SQL by day or by sender."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import Engine

from receiver.readmodel.activity import FIGURES, DayFigures, daily
from shared.identity import Viewer
from tests.support.seedrows import T0, add_message, event, write_events

ADMIN = Viewer(1, "ada", "admin", ())
SAM = Viewer(2, "sam", "sender", ("sam@example.com",))


def _seed(engine: Engine) -> None:
    messages = [
        add_message(engine, sender=who, created_at=T0 + timedelta(days=d))
        for who, d in [("sam@example.com", 1), ("sam@example.com", 1), ("x@corp.example", 1),
                       ("sam@example.com", 3), ("x@corp.example", 5)]
    ]  # fmt: skip
    write_events(
        engine,
        [
            event(messages[0], "open", 1, "human"),
            event(messages[1], "open", 1, "machine"),
            event(messages[2], "click", 1, "human"),
            event(messages[3], "open", 1, "proxy"),
        ],
    )


def _summed(rows: list[DayFigures], key: str) -> dict[object, Counter[str]]:
    out: dict[object, Counter[str]] = {}
    for row in rows:
        c = out.setdefault(getattr(row, key), Counter())
        c.update({f: getattr(row, f) for f in FIGURES})
        c.update({f"opens_{v}": n for v, n in row.verdicts.items()})
    return out


@pytest.mark.parametrize("viewer", [ADMIN, SAM], ids=["admin", "sender"])
def test_sums_by_day_and_by_sender_equal_the_rows(engine: Engine, viewer: Viewer) -> None:
    _seed(engine)
    since = T0.date()
    rows = daily(engine, viewer, since)
    assert len(rows) == (4 if viewer is ADMIN else 2)
    by_day = daily(engine, viewer, since, by="day")
    assert {r.sender for r in by_day} == {""}
    assert _summed(by_day, "day") == _summed(rows, "day")
    by_sender = daily(engine, viewer, since, by="sender")
    assert {r.day for r in by_sender} == {since}
    assert _summed(by_sender, "sender") == _summed(rows, "sender")
    later = daily(engine, viewer, since + timedelta(days=2), by="sender")
    assert sum(r.sent for r in later) == (2 if viewer is ADMIN else 1)


def test_an_unknown_grouping_is_refused(engine: Engine) -> None:
    with pytest.raises(ValueError, match="by is 'day' or 'sender'"):
        daily(engine, ADMIN, T0.date(), by="week")
