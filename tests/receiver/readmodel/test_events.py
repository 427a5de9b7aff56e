"""The events feed (receiver/readmodel/events.py): a sender's pages hold only their
events, in id order, however few they are among everyone's."""

from __future__ import annotations

from sqlalchemy import Engine, insert

from receiver import readmodel
from shared.identity import Viewer
from shared.models import Event
from tests.receiver.readmodel.conftest import ADMIN, add_many
from tests.support.seedrows import T0

QUIET = Viewer(3, "quiet", "sender", ("quiet@few.example",))


def test_a_sparse_senders_feed_pages_through_their_events_alone(engine: Engine) -> None:
    others = add_many(engine, 60)
    mine = add_many(engine, 3, start=100, sender="quiet@few.example")
    hits = []
    for n in range(600):  # every 25th hit is the quiet sender's
        message = mine[n // 25 % 3] if n % 25 == 7 else others[n % 60]
        hits.append(
            {"event_key": f"h{n}", "message_id": message, "recipient_position": 1 + n % 2,
             "kind": "open", "occurred_at": T0, "verdict": "human"}
        )  # fmt: skip
    with engine.begin() as conn:
        ids = conn.execute(insert(Event).returning(Event.id), hits).scalars().all()  # type: ignore[arg-type]
    theirs = [i for i, h in zip(ids, hits, strict=True) if h["message_id"] in mine]
    assert len(theirs) == 24

    pages, after = [], 0
    while rows := readmodel.events_after(engine, QUIET, after, 10):
        pages.append([r.event.id for r in rows])
        after = rows[-1].event.id
        assert all(r.sender == "quiet@few.example" and r.address for r in rows)
    assert [len(p) for p in pages] == [10, 10, 4]
    assert [i for p in pages for i in p] == sorted(theirs)
    assert len(readmodel.events_after(engine, ADMIN, 0, 1000)) == 600
    everyone = [r.event.id for r in readmodel.events_after(engine, ADMIN, theirs[0], 5)]
    assert everyone == sorted(i for i in ids if i > theirs[0])[:5]
