"""One message's story: figures from every event, the timeline a page at a time."""

from __future__ import annotations

from sqlalchemy import Engine

from receiver import readmodel
from receiver.readmodel.detail import TIMELINE_PAGE
from shared.identity import Viewer
from tests.receiver.readmodel.conftest import ADMIN, BULK, add_hits, add_many
from tests.support.seedrows import settle


def test_the_timeline_pages_latest_first_and_the_figures_count_everything(
    engine: Engine,
) -> None:
    (mid,) = add_many(engine, 1, sender="bulk@bulk.example")
    add_hits(engine, [mid], per_message=2 * TIMELINE_PAGE + 30)
    settle(engine)
    seen: list[int] = []
    before = None
    while True:
        d = readmodel.message_detail(engine, BULK, mid, before)
        assert d is not None
        assert len(d.events) <= TIMELINE_PAGE
        assert d.recipients[0].opens.count == 2 * TIMELINE_PAGE + 30  # all, not the page's
        assert d.event_count == 2 * TIMELINE_PAGE + 30
        assert d.row.opens.count == 2 * TIMELINE_PAGE + 30
        assert d.paged == (before is not None)
        stamps = [(e.occurred_at, e.id) for e in d.events]
        assert stamps == sorted(stamps, reverse=True)  # latest first
        seen += [e.id or 0 for e in d.events]
        if d.older is None:
            break
        before = readmodel.Cursor.decode(d.older)
    assert len(seen) == len(set(seen)) == 2 * TIMELINE_PAGE + 30
    assert readmodel.message_detail(engine, ADMIN, mid) is not None
    other = Viewer(3, "x", "sender", ("x@else.example",))
    assert readmodel.message_detail(engine, other, mid) is None
