"""The messages and events exports: streamed, every row once, in order, with its recipients."""

from __future__ import annotations

from sqlalchemy import Engine

from receiver import readmodel
from tests.receiver.readmodel.conftest import ADMIN, BULK, add_hits, add_many
from tests.support.seedrows import add_message, event, settle, write_events


def test_the_messages_export_streams_every_row_with_its_recipients(engine: Engine) -> None:
    ids = add_many(engine, 2600)  # more than two of the export's chunks
    add_hits(engine, ids[:3], per_message=2)
    settle(engine)
    rows = list(readmodel.export_messages(engine, ADMIN, readmodel.Selection()))
    assert [r[0] for r in rows] == ids
    assert all(r[4] == f"r1-{r[0]}@client.example; r2-{r[0]}@client.example" for r in rows)
    assert [r[7] for r in rows[:4]] == [2, 2, 2, 0]  # counted opens, from the columns
    assert rows[0][8] is not None
    assert rows[0][8].tzinfo is not None
    opened = list(readmodel.export_messages(engine, ADMIN, readmodel.Selection(opened=True)))
    assert [r[0] for r in opened] == ids[:3]


def test_a_senders_events_export_reaches_only_their_messages(engine: Engine) -> None:
    ids = add_many(engine, 40)
    add_hits(engine, ids, per_message=3)
    settle(engine)
    every = list(readmodel.export_events(engine, ADMIN, readmodel.Selection()))
    assert len(every) == 120
    mine = list(readmodel.export_events(engine, BULK, readmodel.Selection()))
    assert len(mine) == 60
    assert {r[2] for r in mine} == {"bulk@bulk.example"}
    assert {r[5] for r in mine} == {f"r1-{r[0]}@client.example" for r in mine}


def test_the_exports_carry_replies_bounces_and_what_a_bounce_said(engine: Engine) -> None:
    message = add_message(engine, recipients=("ann@c.example", "ben@c.example", "cid@c.example"))
    bounce = {
        **event(message, "bounce", recipient=1, verdict="unknown"),
        "bounce_type": "hard",
        "status_code": "5.1.1",
        "diagnostic": "550 5.1.1 user unknown",
    }
    write_events(
        engine,
        [
            bounce,
            event(message, "auto_reply", recipient=2, verdict="unknown"),
            event(message, "reply", recipient=3, verdict="unknown"),
        ],
    )
    [row] = readmodel.export_messages(engine, ADMIN, readmodel.Selection())
    columns = dict(zip(readmodel.messages.EXPORT_COLUMNS, row, strict=True))
    assert (columns["replied"], columns["auto_replied"], columns["bounced"]) == (1, 1, 1)
    assert (columns["bounce_type"], columns["complained"]) == ("hard", 0)
    assert columns["first_reply"] is not None
    events = [
        dict(zip(readmodel.events.EXPORT_COLUMNS, r, strict=True))
        for r in readmodel.export_events(engine, ADMIN, readmodel.Selection())
    ]
    [bounced] = [e for e in events if e["kind"] == "bounce"]
    assert (bounced["bounce_type"], bounced["status"]) == ("hard", "5.1.1")
    assert bounced["diagnostic"] == "550 5.1.1 user unknown"
    assert {e["bounce_type"] for e in events if e["kind"] != "bounce"} == {""}
