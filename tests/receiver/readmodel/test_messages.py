"""The messages and events exports: streamed, every row once, in order, with its recipients."""

from __future__ import annotations

from sqlalchemy import Engine

from receiver import readmodel
from tests.receiver.readmodel.conftest import ADMIN, BULK, add_hits, add_many
from tests.support.seedrows import settle


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
