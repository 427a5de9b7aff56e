"""Keyset pages: every row once, in order, however many arrive between two pages."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine

from receiver import readmodel
from receiver.readmodel import paging
from shared.identity import Viewer
from tests.receiver.readmodel.conftest import ADMIN, BULK, add_many


def walk(engine: Engine, viewer: Viewer, limit: int) -> list[int]:
    seen: list[int] = []
    cursor = None
    while True:
        page = readmodel.messages_page(engine, viewer, readmodel.Selection(), limit, cursor)
        seen += [r.message.id for r in page.rows]
        if page.older is None:
            return seen
        cursor = readmodel.Cursor.decode(page.older)


def test_walking_older_pages_gives_every_row_once_in_order(engine: Engine) -> None:
    bulk = add_many(engine, 29, sender="bulk@bulk.example")
    other = add_many(engine, 28, start=100, sender="other@else.example")
    assert walk(engine, ADMIN, 10) == other + bulk
    assert walk(engine, BULK, 7) == bulk
    assert walk(engine, BULK, 29) == bulk


def test_pages_are_stable_while_mail_arrives(engine: Engine) -> None:
    old = add_many(engine, 30)
    first = readmodel.messages_page(engine, ADMIN, readmodel.Selection(), 10)
    assert first.newer is None
    assert first.older is not None
    newer_mail = add_many(engine, 12, start=1000)  # all newer than everything before
    second = readmodel.messages_page(
        engine, ADMIN, readmodel.Selection(), 10, readmodel.Cursor.decode(first.older)
    )
    assert [r.message.id for r in second.rows] == old[10:20]  # no row again, none skipped
    assert second.newer is not None
    back = readmodel.messages_page(
        engine, ADMIN, readmodel.Selection(), 10, readmodel.Cursor.decode(second.newer)
    )
    assert [r.message.id for r in back.rows] == old[:10]
    top = readmodel.messages_page(engine, ADMIN, readmodel.Selection(), 10)
    assert [r.message.id for r in top.rows] == newer_mail[:10]


def test_counts_stop_at_the_cap(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    add_many(engine, 12)
    page = readmodel.messages_page(engine, ADMIN, readmodel.Selection(), 5)
    assert (page.total, page.capped) == (12, False)
    monkeypatch.setattr(paging, "COUNT_CAP", 10)
    page = readmodel.messages_page(engine, ADMIN, readmodel.Selection(), 5)
    assert (page.total, page.capped) == (10, True)
    monkeypatch.setattr(paging, "COUNT_CAP", 12)
    assert readmodel.messages_page(engine, ADMIN, readmodel.Selection(), 5).capped is False


@pytest.mark.parametrize("text", ["x:abc", "o:", "o:!!!", "o:WzEsMl0", "n:" + "A" * 300])
def test_a_cursor_not_handed_out_is_refused(text: str) -> None:
    with pytest.raises(readmodel.BadCursor):
        readmodel.Cursor.decode(text)
