"""What is notable: one answer per row, decided by one query per written batch."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy import event as sa_event

from shared import notable
from shared.notable import CLICK, FIRST_MACHINE_OPEN, FIRST_OPEN, mark, may_notify
from tests.support.seedrows import add_message, event, write_events


def written(engine: Engine, batch: list[dict[str, Any]]) -> list[str | None]:
    """Store ``batch`` and mark it as the writer does; the marks in batch order."""
    write_events(engine, batch)
    with engine.begin() as conn:
        mark(conn, batch)
    return [row["notable"] for row in batch]


def test_the_first_open_per_copy_and_verdict_group(engine: Engine) -> None:
    message = add_message(engine)
    t = message.created_at
    batch = [
        event(message, verdict="human", at=t + timedelta(minutes=5)),
        event(message, verdict="proxy", at=t + timedelta(minutes=3)),  # earlier: first
        event(message, verdict="machine", at=t + timedelta(minutes=1)),  # its own group
        event(message, verdict="machine", at=t + timedelta(minutes=2)),
        event(message, recipient=2, at=t + timedelta(minutes=9)),  # another copy
        event(message, kind="click", link=1),
        event(message, kind="click", link=1),  # every click
        event(message, kind="click", verdict="unknown", link=1),
        event(message, kind="click", verdict="scanner", link=1),
        event(message, verdict="self"),
    ]
    assert written(engine, batch) == [
        None,
        FIRST_OPEN,
        FIRST_MACHINE_OPEN,
        None,
        FIRST_OPEN,
        CLICK,
        CLICK,
        CLICK,
        None,
        None,
    ]
    assert written(engine, [event(message, at=t + timedelta(hours=3))]) == [None]  # later
    # A replayed journal's older open is the earliest now: it is the first one.
    assert written(engine, [event(message, at=t + timedelta(minutes=1))]) == [FIRST_OPEN]
    with engine.begin() as conn:
        mark(conn, batch)
    assert batch[1]["notable"] is None


def test_a_tie_is_broken_by_the_event_key_across_batches(engine: Engine) -> None:
    message = add_message(engine)
    at = message.created_at + timedelta(hours=1)
    a, b, c = (event(message, at=at) for _ in range(3))
    a["event_key"], b["event_key"], c["event_key"] = "k2", "k3", "k1"
    assert written(engine, [a, b]) == [FIRST_OPEN, None]
    assert written(engine, [c]) == [FIRST_OPEN]  # another writer, same microsecond
    with engine.begin() as conn:
        mark(conn, [a, b])
    assert (a["notable"], b["notable"]) == (None, None)


def test_one_query_for_the_whole_batch(engine: Engine) -> None:
    messages = [add_message(engine) for _ in range(3)]
    batch = [
        event(message, recipient=position, verdict=verdict)
        for message in messages
        for position in (1, 2)
        for verdict in ("human", "human", "proxy", "machine")
    ]
    batch += [event(messages[0], kind="click", link=1)]
    write_events(engine, batch)
    statements: list[str] = []

    def seen(*args: Any) -> None:
        statements.append(args[2])

    sa_event.listen(engine, "before_cursor_execute", seen)
    try:
        with engine.begin() as conn:
            notable = mark(conn, batch)
    finally:
        sa_event.remove(engine, "before_cursor_execute", seen)
    assert len(statements) == 1, statements
    assert sorted(str(row["notable"]) for row in notable) == sorted(
        [FIRST_OPEN] * 6 + [FIRST_MACHINE_OPEN] * 6 + [CLICK]
    )


def test_what_may_notify_at_all() -> None:
    assert may_notify("open", "human")
    assert may_notify("open", "machine")
    assert may_notify("click", "unknown")
    assert not may_notify("click", "machine")
    assert not may_notify("open", "scanner")
    assert not may_notify("open", "self")


def test_sqlite_candidates_in_several_queries_give_the_same_answer(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(notable, "SQLITE_CANDIDATES_PER_QUERY", 2)
    message = add_message(engine, recipients=tuple(f"r{i}@client.test" for i in range(5)))
    stored = [event(message, recipient=i) for i in range(1, 6)]
    write_events(engine, stored)
    later = message.created_at + timedelta(hours=2)
    batch = [event(message, recipient=i, at=later) for i in range(1, 7)]
    assert written(engine, batch) == [None] * 5 + [FIRST_OPEN]
